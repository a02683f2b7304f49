"""FASTA and FASTQ files (plain or gzipped, one or many records) as an HF data set of `{name, sequence}`.

    dataset.load_dataset_kwargs.path=genome.fa.gz          # or a folder of .fa/.fasta/.fna/.fq/.fastq(.gz)

Records are streamed with `dnaio` (never a whole genome collection in memory); each file is one shard, so
ranks and loader workers split whole files, and a stream resumes from its position like parquet does.
Names are kept (the `name` column, the header up to the first space); soft-masked lowercase bases and N
runs are kept as they are, and the label policy (`dataset.uppercase_labels`, `mask_degenerate_bases`)
treats them exactly as for parquet.
"""

import logging
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas", ".fq", ".fastq")


def is_fasta(path: Path) -> bool:
    """A FASTA/FASTQ file name, optionally gzipped."""
    name = path.name.lower().removesuffix(".gz").removesuffix(".bgz")
    return name.endswith(FASTA_SUFFIXES)


def fasta_files(path: Path) -> list[str]:
    """The FASTA/FASTQ files at `path`: the file itself, or those in the folder (recursively), sorted."""
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and is_fasta(p))


_READ_ONCE = set()  # files this process has read to the end (their counts are logged the first time)


def fasta_records(files: list[str], text_column: str = "sequence"):
    """Yield `{"name": ..., text_column: ...}` for every record of `files`, in order.

    The first time a file is read to its end, its records and bases are logged.
    """
    import dnaio

    for file in files:
        records = bases = 0
        try:
            with dnaio.open(file) as reader:
                for record in reader:
                    records, bases = records + 1, bases + len(record.sequence)
                    yield {"name": record.name.split(" ", 1)[0], text_column: record.sequence}
        except (dnaio.UnknownFileFormat, dnaio.FileFormatError, EOFError) as e:  # dnaio's message lacks the file
            raise ValueError(f"{file} could not be read as FASTA/FASTQ ({e}); fix or remove it.") from None
        if file not in _READ_ONCE:
            _READ_ONCE.add(file)
            logger.info("Read %s: %s records, %s bases", file, f"{records:,}", f"{bases:,}")


def _check_not_empty(files: list[str]) -> None:
    import dnaio

    for file in files:
        try:
            with dnaio.open(file) as reader:
                if next(iter(reader), None) is not None:
                    return
        except dnaio.UnknownFileFormat as e:
            raise ValueError(f"{file} is not a FASTA or FASTQ file ({e}); fix or remove it.") from None
        except (dnaio.FileFormatError, OSError, EOFError) as e:
            raise ValueError(f"{file} could not be read as FASTA/FASTQ ({e}); fix or remove it.") from None
    raise ValueError(f"No FASTA/FASTQ records in {files}: the files are empty. Point the path at files with records.")


def load_fasta_dataset(files: list[str], text_column: str, streaming: bool):
    """A streaming `IterableDataset` (one shard per file) or a map-style `Dataset` of the records of `files`."""
    try:
        import dnaio  # noqa: F401
    except ImportError:
        raise ImportError("Reading FASTA/FASTQ needs dnaio: pip install dnaio") from None
    _check_not_empty(files)
    gen_kwargs = {"files": files, "text_column": text_column}
    features = datasets.Features({"name": datasets.Value("string"), text_column: datasets.Value("string")})
    make = datasets.IterableDataset.from_generator if streaming else datasets.Dataset.from_generator
    return make(_records_of_shard, gen_kwargs=gen_kwargs, features=features)


def _records_of_shard(files: list[str], text_column: str):
    # `datasets` hands each shard its part of the `files` list: whole files per rank and worker.
    yield from fasta_records(files, text_column)
