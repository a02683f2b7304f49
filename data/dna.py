"""The DNA alphabet, defined once: which ids are bases, and the other strand.

    is_base(ids)                    # A, C, G or T in either case (soft-masked repeats are lowercase)
    reverse_complement("ACGTn")     # "nACGT"

With the nucleotide tokenizer a character's id is its `ord()`, so ids and bytes are the same numbers.
"""

import numpy as np

BASES = "ACGT"
BASE_IDS = np.frombuffer(BASES.encode(), dtype=np.uint8)  # uppercase only
BASE_IDS_ANY_CASE = np.frombuffer((BASES + BASES.lower()).encode(), dtype=np.uint8)
_COMPLEMENT = str.maketrans("ACGTNacgtn", "TGCANtgcan")


def is_base(ids: np.ndarray) -> np.ndarray:
    """Which ids are A, C, G or T (either case)."""
    return np.isin(ids, BASE_IDS_ANY_CASE)


def reverse_complement(sequence: str) -> str:
    """The other strand, 5' to 3' (other characters than ACGTN, either case, are kept as they are)."""
    return sequence.translate(_COMPLEMENT)[::-1]
