"""The model: the TE Llama, HF <-> TE conversion, building and wrapping it, FP8 recipes.

`modeling_llama_te.py` is copied into every export, so it imports nothing of the recipe. The rest may import
runtime/.
"""
