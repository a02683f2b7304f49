"""Upstream's import path for collation and token packing; they live in `data/collate.py` and `data/packing.py`.

from collator import ThdCollator, TokenPackingDataset
"""

from data.collate import (
    IGNORE_INDEX,
    BshdCollator,
    ContextParallelCollator,
    LabelPolicy,
    PackedRowsCollator,
    ThdCollator,
    mask_genomic_labels,
)
from data.packing import TokenPackingDataset

__all__ = [
    "IGNORE_INDEX",
    "BshdCollator",
    "ContextParallelCollator",
    "LabelPolicy",
    "PackedRowsCollator",
    "ThdCollator",
    "TokenPackingDataset",
    "mask_genomic_labels",
]
