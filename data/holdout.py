"""A held-out fraction of the records, chosen by record: never a window of a validation record in training.

    is_held_out("NC_000913.3", 0.01)       # by the record's name; by its sequence where there is no name

The choice hashes the record's key, so it is the same on every rank, with any number of loader workers,
in any order and after any resume, and needs no list of records.
"""

import hashlib


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the record with `key` (its name, or its sequence) is in the held-out `fraction`."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def held_out_filter(text_column: str, fraction: float, keep: bool):
    """A batched `datasets` filter: keep the held-out records (`keep=True`) or all the others."""

    def predicate(batch: dict) -> list[bool]:
        keys = batch["name"] if "name" in batch else batch[text_column]
        return [is_held_out(str(k), fraction) == keep for k in keys]

    return predicate
