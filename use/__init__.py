"""Using a trained model: loading it from any saved form, per-token log-probabilities, k-mer baselines.

May import runtime/, model/, data/, checkpointing/.
"""
