"""Where the data and the tokenizer come from: parquet or FASTA/FASTQ files or folders, or an HF data set.

    ds = load_raw_dataset({"path": "./test_genomic_sequences.parquet", "streaming": True}, "sequence")
    tokenizer = load_tokenizer("./tokenizers/nucleotide_fast_tokenizer")
    for name, sequence in read_records("genome.fa.gz"): ...     # what evaluate.py, score.py, generate.py read

A relative path is looked up in the working directory first, then in the recipe folder, so the tier
configs' `./...` paths work from anywhere. Missing files, unreadable parquet, empty data sets and wrong
columns are errors that name the file or column and the fix, raised before any loader worker starts.
"""

import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from data.fasta import fasta_files, is_fasta, load_fasta_dataset
from runtime.paths import looked_in, resolve_path

logger = logging.getLogger(__name__)
# Local files read by another `datasets` builder than parquet, by suffix (optionally .gz).
TEXT_TABLE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(".parquet") or is_fasta(Path(path))


def normalize_load_kwargs(load_dataset_kwargs: dict) -> dict:
    """Turn a local parquet file or folder into `load_dataset("parquet", data_files=...)` arguments.

    Every local file is checked to exist, so a typo fails here and not deep inside `datasets`.
    """
    kwargs = dict(load_dataset_kwargs)
    kwargs.setdefault("split", "train")
    path = str(kwargs.get("path", ""))
    if not path:
        raise ValueError(
            "dataset.load_dataset_kwargs.path is required: a parquet file or folder, or an HF dataset name."
        )
    local = resolve_path(path)
    # A folder of parquet files; a folder with a README.md is a local copy of an HF dataset repo, which
    # `load_dataset(path)` reads with its own split configuration.
    if local.is_dir() and any(local.glob("**/*.parquet")) and not (local / "README.md").exists():
        kwargs.update(path="parquet", data_files=sorted(str(p) for p in local.glob("**/*.parquet")))
    elif local.is_file():
        name = local.name.lower().removesuffix(".gz")
        builder = next((b for suffix, b in TEXT_TABLE_BUILDERS.items() if name.endswith(suffix)), "parquet")
        kwargs.update(path=builder, data_files=str(local))
        if name.endswith(".tsv"):
            kwargs.setdefault("delimiter", "\t")
    elif local.is_dir() and not (local / "README.md").exists():
        found = sorted(p.name for p in local.iterdir())[:5]
        raise FileNotFoundError(
            f"dataset.load_dataset_kwargs.path={path!r} is a folder without parquet or FASTA files (it holds "
            f"{found or 'nothing'}). Point it at parquet or FASTA files (or a folder of them), or an HF dataset name."
        )
    elif _looks_local(path) and path != "parquet":
        raise FileNotFoundError(
            f"dataset.load_dataset_kwargs.path={path!r} does not exist ({looked_in()}). "
            "Point it at a parquet file, a folder of parquet files, or an HF dataset name."
        )
    files = kwargs.get("data_files")
    if isinstance(files, (str, Path)):
        files = [files]
    if isinstance(files, (list, tuple)):
        resolved = []
        for f in map(str, files):
            if "://" in f or any(c in f for c in "*?["):  # remote or a glob: left to `datasets`
                resolved.append(f)
                continue
            if not resolve_path(f).exists():
                raise FileNotFoundError(
                    f"dataset.load_dataset_kwargs.data_files entry {f!r} does not exist ({looked_in()}). "
                    "Fix the path or override dataset.load_dataset_kwargs.data_files=..."
                )
            resolved.append(str(resolve_path(f)))
        kwargs["data_files"] = resolved
    return kwargs


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def describe_decode_error(load_dataset_kwargs: dict, text_column: str, error: UnicodeDecodeError) -> str:
    """One line naming the file and row (parquet) or line (CSV, JSON) whose text is not UTF-8, and the fix.

    Called only after a failure: it reads the files again to find the first bad value.
    """
    kwargs = normalize_load_kwargs(load_dataset_kwargs)
    files = kwargs.get("data_files") or []
    for f in [files] if isinstance(files, str) else files:
        if kwargs["path"] == "parquet":
            try:
                values = pq.read_table(f, columns=[text_column]).column(0).cast(pa.binary()).to_pylist()
            except (OSError, pa.ArrowException):
                continue
            where, unit = f"column {text_column!r}", "row"
        else:  # CSV/TSV/JSON lines: the reader decodes whole lines
            try:
                values, where, unit = Path(f).read_bytes().splitlines(), "the text", "line"
            except OSError:  # not a local file (a hub data set's URL): the general message below
                continue
        bad = [i for i, v in enumerate(values) if v is not None and not _is_utf8(v)]
        if bad:
            at = bad[0] if unit == "row" else bad[0] + 1  # rows count from 0 as in pandas, lines from 1 as editors do
            return (
                f"{f}, {unit} {at} ({len(bad)} {unit}(s) in all): {where} is not valid UTF-8 "
                f"({error.reason}); re-encode the file as UTF-8 (iconv -t utf-8) or drop those records."
            )
    return (
        f"A record of dataset.load_dataset_kwargs={load_dataset_kwargs} is not valid UTF-8 ({error}); re-encode "
        "the data as UTF-8."
    )


def load_tokenizer(tokenizer_name_or_path: str) -> PreTrainedTokenizerBase:
    """An `AutoTokenizer` from a local folder (working directory or recipe folder) or a hub name."""
    path = resolve_path(tokenizer_name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else tokenizer_name_or_path)
    except OSError as e:  # neither a local folder nor a hub name that can be fetched (offline, typo, private)
        raise FileNotFoundError(
            f"dataset.tokenizer_name_or_path={tokenizer_name_or_path!r} is not a tokenizer folder here ("
            f"{looked_in()}) and could not be fetched from the hub ({str(e).splitlines()[0]}). "
            "Use ./tokenizers/nucleotide_fast_tokenizer or a folder holding tokenizer.json."
        ) from e


def _check_parquet_files(files: list[str]) -> list[int] | None:
    """Read each local parquet footer: a corrupt or empty file is named here, before any worker starts.

    Returns the records per file (None for remote files or globs, which `datasets` checks itself).
    """
    rows = []
    for f in files:
        if "://" in f or any(c in f for c in "*?["):
            return None
        try:
            rows.append(pq.read_metadata(f).num_rows)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(
                f"{f} is not a readable parquet file ({e}); re-export it or drop it from data_files."
            ) from e
    if sum(rows) == 0:
        raise ValueError(f"The data set {files} has no records; check dataset.load_dataset_kwargs.")
    return rows


_DESCRIBED = set()  # data paths already logged by this process


def describe_files(path: str, files: list[str], records: list[int] | None = None) -> None:
    """Log the files a data path stands for (once per process); warn when a folder's subfolders are read too."""
    if path in _DESCRIBED or not files:
        return
    _DESCRIBED.add(path)
    root = resolve_path(path)
    under = [root.is_dir() and Path(f).is_relative_to(root) for f in files]
    names = [str(Path(f).relative_to(root)) if inside else Path(f).name for f, inside in zip(files, under)]
    listed = [name + (f" ({n:,} records)" if records else "") for name, n in zip(names, records or files)]
    more = f", ... ({len(files) - 10} more)" if len(files) > 10 else ""
    logger.info("Data %s: %d file(s): %s%s", path, len(files), ", ".join(listed[:10]), more)
    nested = [f for f, inside in zip(files, under) if inside and Path(f).parent != root]
    if nested:
        folders = sorted({str(Path(f).parent.relative_to(root)) for f in nested})
        logger.warning(
            "Data %s is read with its subfolders %s (%d of %d files); if they are not meant as training data (e.g. "
            "a references/ folder), point the path at the folder or file you mean, or move them out.",
            *(path, folders[:5], len(nested), len(files)),
        )


def local_fasta_files(load_dataset_kwargs: dict) -> list[str]:
    """The FASTA/FASTQ files `path` names (a file or a folder holding them), or [] for any other source."""
    path = str(load_dataset_kwargs.get("path", ""))
    local = resolve_path(path) if path else None
    if local is None or not local.exists() or not (local.is_dir() or is_fasta(local)):
        return []
    return fasta_files(local) if local.is_file() or not any(local.glob("**/*.parquet")) else []


def load_raw_dataset(load_dataset_kwargs: dict, text_column: str) -> datasets.Dataset | datasets.IterableDataset:
    """`datasets.load_dataset(**load_dataset_kwargs)`, with a clear error for a missing, empty or wrong source.

    FASTA/FASTQ files (`fasta.py`) are read with dnaio into `{name, <text_column>}` records.
    """
    fasta = local_fasta_files(load_dataset_kwargs)
    if fasta:
        describe_files(str(load_dataset_kwargs["path"]), fasta)
        return load_fasta_dataset(fasta, text_column, streaming=load_dataset_kwargs.get("streaming", False))
    try:
        return _load_with_datasets(load_dataset_kwargs, text_column)
    except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as e:  # CSV/JSON: decoded as read
        cause = e if isinstance(e, UnicodeDecodeError) else e.__cause__  # (datasets wraps it when not streaming)
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(describe_decode_error(load_dataset_kwargs, text_column, cause)) from None
        raise ValueError(
            f"dataset.load_dataset_kwargs={load_dataset_kwargs} could not be read ({cause or e}); check the files' "
            "format."
        ) from e


def _load_with_datasets(load_dataset_kwargs: dict, text_column: str):
    kwargs = normalize_load_kwargs(load_dataset_kwargs)
    checked = kwargs["path"] == "parquet" and isinstance(kwargs.get("data_files"), list)
    if checked:
        rows = _check_parquet_files(kwargs["data_files"])  # also rejects an empty data set
        describe_files(str(load_dataset_kwargs.get("path")), kwargs["data_files"], rows)
    try:
        ds = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise FileNotFoundError(
            f"Could not load dataset.load_dataset_kwargs={load_dataset_kwargs}: {e}. "
            "Point dataset.load_dataset_kwargs.path at a parquet file, a folder of parquet files or an HF dataset."
        ) from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"load_dataset returned splits {list(ds)}; set dataset.load_dataset_kwargs.split to one.")
    ds = _select_text_column(ds, text_column)
    feature = (ds.features or {}).get(text_column)
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        raise ValueError(
            f"Column {text_column!r} holds {feature.dtype} values, not text; set dataset.text_column (the tools' "
            "--text-column) to the column holding the sequences as strings."
        )
    if isinstance(ds, datasets.Dataset):
        empty = len(ds) == 0
    else:  # a remote stream: peek at one record (local parquet was checked from its footers)
        empty = not checked and next(iter(ds.take(1)), None) is None
    if empty:
        raise ValueError(f"The data set {kwargs.get('data_files') or kwargs['path']} has no records; check the path.")
    return ds


def _select_text_column(ds, text_column: str):
    """Keep `text_column` (and `name`) only, falling back to the data's text column if it is missing.

    Other columns are not needed, and a stream's unknown columns would break the tokenizing map. A missing
    `text_column` falls back to a column named `text`, or to the only text column, with a warning.
    """
    columns, first = ds.column_names, None
    if columns is None:  # a CSV/JSON stream: its columns are known only from a record
        first = next(iter(ds.take(1)), None)
        columns = list(first) if first is not None else [text_column]
    if text_column not in columns:
        if ds.features is not None:
            texts = [c for c, f in ds.features.items() if isinstance(f, datasets.Value) and "string" in f.dtype]
        else:
            texts = [c for c, v in first.items() if isinstance(v, str)]
        found = "text" if "text" in columns else texts[0] if len(texts) == 1 else None
        if found is None:
            raise ValueError(
                f"The data set has no column {text_column!r} (columns: {columns}); set dataset.text_column (the "
                "tools' --text-column) to the one holding the sequences."
            )
        logger.warning(
            "dataset.text_column=%r is not a column of the data set; using its text column %r.", text_column, found
        )
        ds = ds.rename_column(found, text_column)
        columns = [text_column if c == found else c for c in columns]
    keep = [c for c in (text_column, "name") if c in columns]
    if ds.column_names is None:
        return ds.select_columns(keep).cast(datasets.Features({c: datasets.Value("string") for c in keep}))
    return ds.select_columns(keep) if keep != columns else ds


def read_records(path: str, text_column: str = "sequence", option: str = "--data"):
    """(name, sequence) of every record of a FASTA/FASTQ/parquet/CSV/JSON file or folder, streamed.

    A record without a name (a table without a `name` column) is named by its position, from "0". `option`:
    the command-line option `path` came from, named in the error for a path that does not exist.
    """
    if _looks_local(str(path)) and not resolve_path(path).exists():
        raise FileNotFoundError(f"{option} {path} does not exist ({looked_in()}); point it at FASTA/FASTQ or parquet.")
    data = load_raw_dataset({"path": str(path), "streaming": True}, text_column)
    return ((r.get("name") or str(i), r[text_column]) for i, r in enumerate(data))
