"""The DNA alphabet, defined once: which ids are bases, and the other strand.

    is_base(ids)                            # A, C, G or T in either case (soft-masked repeats are lowercase)
    reverse_complement("ACGTRn")            # "nYACGT": IUPAC codes and case complemented
    reverse_complement_ids(window, bos, eos)  # the same on token ids, <BOS> and <EOS> kept in place

With the nucleotide tokenizer a character's id is its `ord()`, so ids and bytes are the same numbers.
"""

import numpy as np

BASES = "ACGT"
BASE_IDS = np.frombuffer(BASES.encode(), dtype=np.uint8)  # uppercase only
BASE_IDS_ANY_CASE = np.frombuffer((BASES + BASES.lower()).encode(), dtype=np.uint8)
# IUPAC codes and their complements (R = A/G pairs with Y = C/T, B = not A with V = not T, ...); S, W, N are
# their own. Lowercase (soft-masked) letters complement to lowercase; every other character stays as it is.
IUPAC_CODES, _COMPLEMENTS = "ACGTRYKMBVDHSWN", "TGCAYRMKVBHDSWN"
_COMPLEMENT = str.maketrans(IUPAC_CODES + IUPAC_CODES.lower(), _COMPLEMENTS + _COMPLEMENTS.lower())
COMPLEMENT_IDS = np.array([ord(chr(i).translate(_COMPLEMENT)) for i in range(256)], dtype=np.int64)


def is_base(ids: np.ndarray) -> np.ndarray:
    """Which ids are A, C, G or T (either case)."""
    return np.isin(ids, BASE_IDS_ANY_CASE)


def reverse_complement(sequence: str) -> str:
    """The other strand, 5' to 3' (IUPAC codes and case complemented; other characters kept as they are)."""
    return sequence.translate(_COMPLEMENT)[::-1]


def reverse_complement_ids(ids: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    """A window of nucleotide-tokenizer ids on the other strand: `<BOS>` stays first and `<EOS>` last."""
    start = 1 if len(ids) and ids[0] == bos_id else 0
    end = len(ids) - 1 if len(ids) > start and ids[-1] == eos_id else len(ids)
    out = np.array(ids, copy=True)
    out[start:end] = COMPLEMENT_IDS[np.asarray(ids[start:end])[::-1]]
    return out
