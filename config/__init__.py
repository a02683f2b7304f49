"""From the command line to a checked config: upstream keys, typos, every value checked before anything is built.

With the run record, the only code that reads the whole config. May import runtime/, model/, data/.
"""
