"""What the training loop uses besides the model and the data.

The optimizer step and its NaN/Inf guard, held-out validation loss, and the per-step services (profiler, GC
schedule, FP8 statistics). May import runtime/, model/, data/, checkpointing/.
"""
