"""This process: its rank, device and process group, the signals a scheduler sends it, where paths point.

The bottom layer: imports nothing else of the recipe.
"""
