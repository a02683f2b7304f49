"""FASTA and FASTQ input: the same windows as the equivalent parquet, names kept, resumable, clear errors."""

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import PARQUET, TOKENIZER, losses, make_cfg

import train_fsdp2
from data.loader import create_thd_dataloader, create_tokenized_dataset
from data.sources import load_raw_dataset
from runtime.distributed import DistributedConfig

RECORDS = pq.read_table(PARQUET).column("sequence").to_pylist()[:40]
ONE_RANK = DistributedConfig(0, 0, 1)


def write_fasta(path, records, fastq: bool = False, per_file: int | None = None) -> list:
    """Write `records` as FASTA/FASTQ (gzipped if the name ends in .gz); several files if `per_file`."""
    chunks = [records] if per_file is None else [records[i : i + per_file] for i in range(0, len(records), per_file)]
    paths = []
    for n, chunk in enumerate(chunks):
        target = path if per_file is None else path / f"part{n}{'.fq.gz' if fastq else '.fa.gz'}"
        opener = gzip.open if str(target).endswith(".gz") else open
        with opener(target, "wt") as f:
            for i, seq in enumerate(chunk):
                name = f"rec{n}_{i} some description"
                f.write(f"@{name}\n{seq}\n+\n{'I' * len(seq)}\n" if fastq else f">{name}\n")
                if not fastq:
                    f.writelines(seq[j : j + 60] + "\n" for j in range(0, len(seq), 60))  # wrapped lines
        paths.append(target)
    return paths


def windows(load_dataset_kwargs) -> list[list[int]]:
    from data.sources import load_tokenizer

    ds = create_tokenized_dataset(ONE_RANK, load_tokenizer(TOKENIZER), load_dataset_kwargs, 512, 32)
    return [list(w["input_ids"]) for w in ds]


@pytest.fixture
def parquet_windows(tmp_path):
    import pyarrow as pa

    path = tmp_path / "same.parquet"
    pq.write_table(pa.table({"sequence": RECORDS}), path)
    return windows({"path": str(path), "streaming": True})


@pytest.mark.parametrize("name", ["genome.fa", "genome.fa.gz", "reads.fastq.gz"])
@pytest.mark.parametrize("streaming", [True, False])
def test_fasta_and_fastq_give_the_parquet_windows(tmp_path, parquet_windows, name, streaming):
    path = tmp_path / name
    write_fasta(path, RECORDS, fastq="fastq" in name)
    assert windows({"path": str(path), "streaming": streaming}) == parquet_windows


def test_the_log_names_files_records_bases_and_subfolders(tmp_path, caplog):
    caplog.set_level("INFO")
    folder = tmp_path / "species"
    (folder / "references").mkdir(parents=True)
    write_fasta(folder / "a.fa", RECORDS[:3])
    write_fasta(folder / "references" / "ref.fa.gz", RECORDS[3:5])
    for _ in range(2):  # a second pass (epoch) logs nothing new
        list(load_raw_dataset({"path": str(folder), "streaming": True}, "sequence"))
    assert caplog.text.count(f"Data {folder}: 2 file(s): a.fa, references/ref.fa.gz") == 1
    assert caplog.text.count("is read with its subfolders ['references'] (1 of 2 files)") == 1
    for name, records in (("a.fa", RECORDS[:3]), ("references/ref.fa.gz", RECORDS[3:5])):
        line = f"Read {folder / name}: {len(records)} records, {sum(map(len, records)):,} bases"
        assert caplog.text.count(line) == 1
    caplog.clear()
    parquet = tmp_path / "copy.parquet"  # (a path this process has not logged yet)
    parquet.write_bytes(Path(PARQUET).read_bytes())
    list(load_raw_dataset({"path": str(parquet), "streaming": True}, "sequence"))
    assert f"copy.parquet ({pq.read_metadata(PARQUET).num_rows:,} records)" in caplog.text
    assert "subfolders" not in caplog.text


def test_a_folder_of_fasta_files_and_record_names(tmp_path, parquet_windows):
    folder = tmp_path / "genomes"
    folder.mkdir()
    write_fasta(folder, RECORDS, per_file=7)  # 6 files, read in name order
    assert windows({"path": str(folder), "streaming": True}) == parquet_windows
    ds = load_raw_dataset({"path": str(folder), "streaming": True}, "sequence")
    first = next(iter(ds))
    assert first["name"] == "rec0_0" and first["sequence"] == RECORDS[0]
    assert ds.num_shards == 6  # one per file: ranks and workers read whole files


def test_fasta_loader_resumes_exactly(tmp_path):
    write_fasta(tmp_path, RECORDS, per_file=10)
    kwargs = dict(tokenizer_name_or_path=TOKENIZER, load_dataset_kwargs={"path": str(tmp_path), "streaming": True},
                  micro_batch_size=2, max_seq_length=256, stride=16, buffer_size=50, num_workers=2)  # fmt: skip
    loader, _ = create_thd_dataloader(ONE_RANK, **kwargs)
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(20)]
    restored, _ = create_thd_dataloader(ONE_RANK, **kwargs)
    restored.load_state_dict(state)
    got = [b for b, _ in zip(restored, range(20))]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, expected))


def test_empty_and_unreadable_fasta_are_named(tmp_path):
    empty = tmp_path / "empty.fa"
    empty.write_text("")
    with pytest.raises(ValueError, match="No FASTA/FASTQ records in"):
        load_raw_dataset({"path": str(empty)}, "sequence")
    junk = tmp_path / "junk.fa"
    junk.write_text("this is not fasta\n")
    with pytest.raises(ValueError, match="junk.fa could not be read as FASTA/FASTQ .Error in FASTA file at line 1"):
        load_raw_dataset({"path": str(junk)}, "sequence")


def test_a_damaged_file_later_in_the_stream_is_named(tmp_path):
    """The first file is fine (the up-front check passes); the second breaks mid-stream: its name is in the error."""
    folder = tmp_path / "genomes"
    folder.mkdir()
    (folder / "a.fa").write_text(">one\nACGTACGT\n")
    (folder / "b.fa").write_text("garbage\n")
    with pytest.raises(ValueError, match=r"b\.fa could not be read as FASTA/FASTQ"):
        list(load_raw_dataset({"path": str(folder), "streaming": True}, "sequence"))


def test_training_on_a_gzipped_fasta(tmp_path):
    path = tmp_path / "genome.fa.gz"
    write_fasta(path, RECORDS)
    train_fsdp2.main(make_cfg(tmp_path, "num_train_steps=3", f"dataset.load_dataset_kwargs.path={path}"))
    assert len(losses(tmp_path)) == 3
