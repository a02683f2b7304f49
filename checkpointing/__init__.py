"""What a run writes for a later run or a user to read back.

`step_N/` checkpoints, the Hugging Face export, the run record each carries, and the upstream recipe's
checkpoints. May import runtime/, model/, data/.
"""
