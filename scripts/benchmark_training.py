"""Training speed, side by side in one run: the recipe's real training step for every row below.

Each row is the whole step (data loader, loop, FSDP2 or DDP, fused AdamW) on the GPUs of this machine.

    python scripts/benchmark_training.py                              # every row that fits the GPUs here
    python scripts/benchmark_training.py --groups model,lingua        # some groups only
    python scripts/benchmark_training.py --groups long --row-steps "long 256k 1 GPU=1"  # a row's steps, this run
    python scripts/benchmark_training.py --plot-only benchmarks/results.json

Each row is a `torchrun train_*.py --config-name L1_genomic_1b` run (Llama-3.2-1B body, vocab 256,
8192-token windows of the bundled DNA) with the overrides listed in ROWS. Rows run concurrently when
GPUs are free (each on its own GPUs). A row's numbers are the mean of its log windows after
`--warmup` steps, read from its `metrics.jsonl`: tokens/s/GPU (padded: every input token; real:
prediction targets only), MFU (the logged one: 6N per real token + 6 L H D len^2 per sequence,
causal attention, over the dense BF16 peak of 989 TFLOP/s; FP8 rows are thus "BF16-equivalent"),
step time, peak memory, the fraction
of wall time the loop waited for data, and the checkpoint save time where the row saves one.

Writes `results.json`, `results.md` (the table and the target ratios) and PNG plots to `--out`.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_report import markdown, plot  # noqa: E402

THD = "use_sequence_packing=true"
BSHD = "use_sequence_packing=false"
BF16 = "fp8_config.enabled=false"
COMPILE = "use_torch_compile=true"


def fp8(recipe: str) -> str:
    """Overrides that turn on FP8 with a TE recipe class."""
    return f"fp8_config.enabled=true fp8_config.fp8_recipe=transformer_engine.common.recipe.{recipe}"


LINGUA = (
    "config_name_or_path=./model_configs/lingua-1B config_kwargs.vocab_size=128256 "
    "dataset.micro_batch_size=4 dataset.max_seq_length=4096"
)


# The full-window rows against the bare stack read one long record (the bundled records joined: 2.4 Mbp), as the
# bare stack does (`--dna`), so both train the same 8k windows (all full but one short one an epoch, 293 windows in).
LONG_DNA = "dataset.load_dataset_kwargs.path={long_dna} dataset.stride=0"
# Context-parallel and long-window rows read records of exactly one window each, so that every step trains whole
# windows: one 2.4 Mbp record would end in a short window (at 512k: 302,787 tokens), whose pack then holds two
# sequences and half the attention work of one 512k window.
WHOLE_WINDOWS = "dataset.load_dataset_kwargs.path={whole_windows} dataset.stride=0"
# Records of 8,190 and 2,046 bases in turn, read in order: each BSHD micro-batch of 2 holds one 8,192-token
# window and one of 2,048 (BOS and EOS included), the case where padding wastes the most.
MIXED_DNA = "dataset.load_dataset_kwargs.path={mixed_dna} dataset.stride=0 dataset.buffer_size=1 dataset.num_workers=1"
PADDED = "config_kwargs.attn_input_format=bshd"  # upstream's padded BSHD path instead of packed rows


def row(group, name, precision, fmt, overrides, gpus=1, script="fsdp2", save_checkpoint=False, steps=None) -> dict:
    """One benchmark row: a training run with `overrides` on `gpus` GPUs."""
    return dict(group=group, name=name, precision=precision, format=fmt, overrides=overrides, gpus=gpus,
                script=script, save_checkpoint=save_checkpoint, steps=steps)  # fmt: skip


def cp_rows():
    """Context-parallel rows: cp=1 at S vs cp=2 at 2S, TE's three exchanges, and a length one GPU cannot hold.

    cp=1 at S and cp=2 at 2S have the same tokens per GPU. "DP 2" is cp=1 on two GPUs with the tokens per GPU
    of the cp=2 row at the same length: the same GPUs, attention work and FSDP2 traffic, so the two differ by
    context parallelism alone.
    """
    rows = []
    shapes = ((1, 1, 4096, 4, None, "p2p"), (1, 1, 8192, 2, None, "p2p"), (1, 1, 16384, 2, None, "p2p"),
              (1, 2, 8192, 2, None, "p2p"), (2, 2, 8192, 4, None, "p2p"), (2, 2, 8192, 4, None, "a2a"),
              (1, 2, 16384, 1, None, "p2p"), (2, 2, 16384, 2, None, "p2p"), (2, 2, 16384, 2, None, "a2a"),
              (2, 2, 16384, 2, None, "all_gather"), (1, 1, 196608, 1, 4, "p2p"),
              (2, 2, 196608, 1, 4, "p2p"))  # fmt: skip
    for cp, gpus, seq, batch, steps, comm in shapes:
        overrides = (
            f"{WHOLE_WINDOWS} {THD} {BF16} cp_size={cp} cp_comm_type={comm} dataset.max_seq_length={seq} "
            f"dataset.micro_batch_size={batch}"
        )
        name = f"CP {cp} GPU seq {seq // 1024}k" if gpus == cp else f"DP {gpus} GPU seq {seq // 1024}k"
        name += "" if comm == "p2p" else f" {comm}"
        rows.append(row("cp", name, "BF16", "THD", overrides, gpus, "cp", steps=steps))
    return rows


def scaling_rows():
    """FSDP2 and DDP, BF16 and FP8, 1 to 8 GPUs, each saving one checkpoint at its last step."""
    return [
        row("scaling", f"{script} {precision} {gpus} GPU", precision, "THD", f"{THD} {flags}", gpus, script, True)
        for gpus in (1, 2, 4, 8)
        for script in ("fsdp2", "ddp")
        for precision, flags in (("BF16", BF16), ("FP8 current", fp8("Float8CurrentScaling")))
    ]


def balance_rows():
    """FSDP2 FP8 on 1, 2 and 4 GPUs with `dataset.packing_lookahead=64` (packs of even attention work per rank).

    Compare with the scaling rows of the same GPU count: the same tokens per GPU, packed in stream order.
    """
    flags = f"{THD} {fp8('Float8CurrentScaling')} dataset.packing_lookahead=64"
    return [row("balance", f"fsdp2 FP8 current {gpus} GPU balanced", "FP8 current", "THD", flags, gpus, "fsdp2")
            for gpus in (1, 2, 4)]  # fmt: skip


def bare_rows():
    """The recipe against a bare stack of the same TE layers (`benchmark_model.py --train-row`), identical work.

    Both train full 8,192-token windows of one long record, 2 per step, with fused AdamW and clipping; the
    bare row's overrides field holds its FP8 recipe name. "TE ... full windows" rows are the recipe's step
    (FSDP2; "DDP": `train_ddp.py`, the same step without FSDP2's parameter and gradient copies).
    """
    rows = []
    current = "Float8CurrentScaling"
    for precision, flags, recipe in (("BF16", BF16, "none"), ("FP8 current", fp8(current), current)):
        for fmt, layout, kind in (("BSHD", BSHD, "bare"), ("THD", THD, "bare_thd")):
            overrides = f"{LONG_DNA} {flags} {layout}"
            rows.append(row("bare", f"bare TE stack {precision} {fmt}", precision, fmt, recipe, script=kind))
            rows.append(row("bare", f"TE {precision} {fmt} full windows", precision, fmt, overrides))
            rows.append(row("bare", f"TE {precision} {fmt} full windows DDP", precision, fmt, overrides,
                            script="ddp"))  # fmt: skip
    return rows


def padding_rows():
    """BSHD micro-batches as packed rows (the default), upstream's padded BSHD, and THD, on the mixed records."""
    return [
        row("padding", f"TE {precision} {name} mixed", precision, fmt, f"{MIXED_DNA} {flags} {layout}")
        for precision, flags in (("BF16", BF16), ("FP8 current", fp8("Float8CurrentScaling")))
        for name, fmt, layout in (
            ("BSHD", "BSHD", BSHD),
            ("BSHD padded", "BSHD", f"{BSHD} {PADDED}"),
            ("THD", "THD", THD),
        )
    ]


def graph_rows():
    """use_cuda_graphs (train_ddp.py): BSHD packed rows and THD packs, each eager and graphed.

    On the mixed records (packed rows hold an 8k and a 2k window: a packed row each, eager) and on full windows
    (every micro-batch replayed); FP8, where steps are host-bound.
    """
    rows = []
    for precision, flags in (("FP8 delayed", fp8("DelayedScaling")), ("FP8 current", fp8("Float8CurrentScaling"))):
        for data, name in ((MIXED_DNA, "mixed"), (LONG_DNA, "full windows")):
            for fmt, layout in (("THD", THD), ("BSHD", BSHD)):
                for graphs in ("", " use_cuda_graphs=true"):
                    rows.append(row("graphs", f"TE {precision} {fmt} {name} DDP{' graphs' if graphs else ''}",
                                    precision, fmt, f"{data} {flags} {layout}{graphs}", script="ddp"))  # fmt: skip
    return rows


# The longest window one GPU trains at: BF16 THD, activation checkpointing, one window per step.
LONG_CONTEXT = f"{WHOLE_WINDOWS} {THD} {BF16} use_gradient_checkpointing=true dataset.micro_batch_size=1"
LONG_STEPS = {8: 3, 32: 3, 128: 3, 256: 2, 512: 2, 1024: 1}  # window (thousand tokens) -> steps the row runs


def long_context_rows():
    """One window of 8k to 1M tokens per step on one GPU (and 1M with cp=2 on two, or with activation offload).

    Up to 128k: 3 steps, the last two measured; 256k and 512k: 2 steps, the second measured. The first step
    holds one-off setup (on an H100, 8k: 3.3 s against 0.18 s for the next; 256k: ~1 s more than the next).
    A step's time is about a x pairs + b x tokens; on an H100 the 128k and 256k rows (14.0 s, 53.4 s) give
    12.7 s of attention and 1.3 s of the rest at 128k, so 512k takes ~3.5 minutes a step and 1M ~14 minutes:
    one step, its setup included, longer than a lent device call's 10-minute limit.
    """
    rows = [row("long", f"long {k}k 1 GPU", "BF16", "THD", f"{LONG_CONTEXT} dataset.max_seq_length={k * 1024}",
                steps=steps) for k, steps in LONG_STEPS.items()]  # fmt: skip
    # Each layer's input in CPU memory until backward (256k: the offload cost, paired). 768k: one step of
    # ~8 minutes on an H100 by the fit above, the longest window one 10-minute device call can measure.
    for k in (256, 512, 768, 1024):
        overrides = f"{LONG_CONTEXT} activation_cpu_offload=true dataset.max_seq_length={k * 1024}"
        rows.append(row("long", f"long {k}k 1 GPU offload", "BF16", "THD", overrides, steps=LONG_STEPS.get(k, 1)))
    overrides = f"{LONG_CONTEXT} dataset.max_seq_length={1024 * 1024} cp_size=2"
    rows.append(row("long", "long 1024k CP 2 GPU", "BF16", "THD", overrides, 2, "cp", steps=LONG_STEPS[1024]))
    return rows


# Overrides are on top of `--config-name` (L1_genomic_1b).
ROWS = [
    row("model", "HF BF16 BSHD", "BF16", "BSHD", f"use_te=false {BSHD} {BF16}"),
    row("model", "TE BF16 BSHD", "BF16", "BSHD", f"{BSHD} {BF16}"),
    row("model", "TE BF16 BSHD padded", "BF16", "BSHD", f"{BSHD} {BF16} {PADDED}"),
    row("model", "TE FP8 delayed BSHD", "FP8 delayed", "BSHD", f"{BSHD} {fp8('DelayedScaling')}"),
    row("model", "TE FP8 delayed BSHD padded", "FP8 delayed", "BSHD", f"{BSHD} {fp8('DelayedScaling')} {PADDED}"),
    row("model", "TE FP8 current BSHD", "FP8 current", "BSHD", f"{BSHD} {fp8('Float8CurrentScaling')}"),
    row(
        "model", "TE FP8 current BSHD padded", "FP8 current", "BSHD", f"{BSHD} {fp8('Float8CurrentScaling')} {PADDED}"
    ),  # noqa: E501  # fmt: skip
    row("model", "TE BF16 THD", "BF16", "THD", f"{THD} {BF16}"),
    row("model", "TE FP8 delayed THD", "FP8 delayed", "THD", f"{THD} {fp8('DelayedScaling')}"),
    row("model", "TE FP8 current THD", "FP8 current", "THD", f"{THD} {fp8('Float8CurrentScaling')}"),
    row("model", "TE FP8 block THD", "FP8 block", "THD", f"{THD} {fp8('Float8BlockScaling')}"),
    # Lingua 1B shape (vocab 128256, 4 x 4096 tokens): HF's loss on full fp32 logits vs the chunked loss.
    # The tokens are DNA (ids < 256); the LM head's cost does not depend on which ids they are.
    row("lingua", "Lingua BF16 full logits", "BF16", "THD", f"{LINGUA} {THD} {BF16} loss_chunk_size=null"),
    row("lingua", "Lingua BF16 chunked loss", "BF16", "THD", f"{LINGUA} {THD} {BF16} loss_chunk_size=4096"),
    # use_torch_compile: each decoder layer compiled; compare with the eager rows of the same name above.
    row("compile", "TE BF16 THD compiled", "BF16", "THD", f"{THD} {BF16} {COMPILE}"),
    row("compile", "TE FP8 delayed THD compiled", "FP8 delayed", "THD", f"{THD} {fp8('DelayedScaling')} {COMPILE}"),
    row("compile", "TE BF16 BSHD compiled", "BF16", "BSHD", f"{BSHD} {BF16} {COMPILE}"),
    *bare_rows(),
    *padding_rows(),
    *graph_rows(),
    *scaling_rows(),
    *balance_rows(),
    *cp_rows(),
    *long_context_rows(),
]
ORDER = {r["name"]: i for i, r in enumerate(ROWS)}


def parse_args():
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="model,bare,padding,graphs,lingua,compile,scaling,cp,long")
    p.add_argument("--only", default=None, help="comma-separated row names to run (within --groups)")
    p.add_argument("--config-name", default="L1_genomic_1b")
    p.add_argument("--overrides", default="", help="extra key=value overrides for every row")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the averages")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--row-steps", default="", metavar="NAME=N,...",
                   help="these rows run N steps (e.g. a 512k row in one step, to fit a short GPU lease)")  # fmt: skip
    p.add_argument("--profile-steps", type=int, nargs=2, default=None, metavar=("FIRST", "LAST"),
                   help="profile these steps of every row (<work-dir>/<row>/profiler/rank0_summary.txt)")  # fmt: skip
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--work-dir", default="/tmp/benchmark_training", help="run folders and checkpoints")
    p.add_argument("--out", default=str(RECIPE_DIR / "benchmarks"))
    p.add_argument("--plot-only", default=None, help="re-plot an existing results.json")
    p.add_argument(
        "--append", action="store_true", help="merge into --out's results.json (rows run now replace theirs)"
    )
    return p.parse_args()


def chosen_rows(args) -> list[dict]:
    """The rows of --groups and --only, with the steps --row-steps gives them."""
    rows = [r for r in ROWS if r["group"] in args.groups.split(",")]
    if args.only:
        rows = [r for r in rows if r["name"] in args.only.split(",")]
    steps = dict(item.rsplit("=", 1) for item in args.row_steps.split(",") if item)
    unknown = sorted(set(steps) - {r["name"] for r in rows})
    if unknown:
        raise SystemExit(f"--row-steps names {unknown}, not among the rows chosen by --groups/--only: use their names")
    bad = {name: n for name, n in steps.items() if not n.isdigit() or int(n) < 1}
    if bad:
        raise SystemExit(f"--row-steps {bad}: give each row a whole number of steps, 1 or more")
    return [{**r, "steps": int(steps[r["name"]])} if r["name"] in steps else r for r in rows]


def schedule(row: dict, args) -> tuple[int, int, int]:
    """(steps, log every, steps left out of the mean) of a row.

    --steps, --log-every and --warmup, unless the row has its own few steps: then it logs each one and leaves out
    step 1's one-off setup, or, with one step only (a very long window), keeps that step, setup included.
    """
    if not row["steps"]:
        return args.steps, args.log_every, args.warmup
    return row["steps"], 1, min(1, row["steps"] - 1)


def launch(row: dict, gpu_ids: list[int], args, work: Path) -> subprocess.Popen:
    """Start one row on `gpu_ids` (torchrun, or the bare stack); its output goes to `<work>/<row>/stdout.log`."""
    run_dir = work / row["name"].replace(" ", "_")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a failed rerun must not report the last run's numbers
    steps, log_every, _ = schedule(row, args)
    if row["script"].startswith("bare"):  # overrides: the FP8 recipe name
        command = [sys.executable, "scripts/benchmark_model.py", "--train-row", row["script"], "--recipes",
                   row["overrides"], "--dna", str(long_dna_parquet(work)), "--metrics", str(run_dir / "metrics.jsonl"),
                   "--steps", str(steps), "--log-every", str(log_every)]  # fmt: skip
        if args.profile_steps:
            command += ["--profile-steps", *map(str, args.profile_steps)]
    else:
        window = re.search(r"dataset\.max_seq_length=(\d+)", row["overrides"])
        makers = {"long_dna": lambda: long_dna_parquet(work), "mixed_dna": lambda: mixed_dna_parquet(work),
                  "whole_windows": lambda: whole_windows_parquet(work, int(window.group(1)))}  # fmt: skip
        data = {key: make() for key, make in makers.items() if f"{{{key}}}" in row["overrides"]}  # the files it reads
        overrides = row["overrides"].format(**data).split() + [
            f"num_train_steps={steps}", f"logger.frequency={log_every}", f"run_dir={run_dir}",
            "checkpoint.resume_from_checkpoint=false", *args.overrides.split(),
        ]  # fmt: skip
        if args.profile_steps:
            first, last = args.profile_steps
            overrides += ["profiler.enabled=true", f"profiler.start_step={first}", f"profiler.end_step={last}"]
        if row.get("save_checkpoint"):  # one save, at the last step
            overrides += [f"checkpoint.ckpt_dir={run_dir / 'ckpt'}", f"checkpoint.save_every_n_steps={steps}",
                          "checkpoint.max_checkpoints=1"]  # fmt: skip
        script = {"ddp": "train_ddp.py", "fsdp2": "train_fsdp2.py", "cp": "train_fsdp2_cp.py"}[row["script"]]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpu_ids)}",
                   script, "--config-name", args.config_name, *overrides]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpu_ids))}
    log = (run_dir / "stdout.log").open("w")
    return subprocess.Popen(command, cwd=RECIPE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)


def long_dna_parquet(work: Path) -> Path:
    """One record made of all bundled records joined (2.4 Mbp), so that every window is full length."""
    path = work / "long_dna.parquet"
    if not path.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = pq.read_table(RECIPE_DIR / "test_genomic_sequences.parquet").column("sequence").to_pylist()
        work.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"sequence": ["".join(records)]}), path)
    return path


def whole_windows_parquet(work: Path, window: int) -> Path:
    """The joined record cut into records of `window - 2` bases (BOS and EOS make a window), the rest dropped."""
    return cut_parquet(work, f"whole_windows_{window}", itertools.repeat(window - 2))


def mixed_dna_parquet(work: Path) -> Path:
    """The bundled DNA cut into records of 8,190 and 2,046 bases in turn (MIXED_DNA)."""
    return cut_parquet(work, "mixed_dna", itertools.cycle((8190, 2046)))


def cut_parquet(work: Path, name: str, lengths) -> Path:
    """`<work>/<name>.parquet`, made once: the joined record cut into records of `lengths` bases while they fit."""
    path = work / f"{name}.parquet"
    if not path.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        text = pq.read_table(long_dna_parquet(work)).column("sequence")[0].as_py()
        records, start = [], 0
        for length in lengths:
            if start + length > len(text):
                break
            records.append(text[start : start + length])
            start += length
        if not records:
            raise ValueError(f"{name}: the bundled DNA ({len(text)} bases) is shorter than one record.")
        pq.write_table(pa.table({"sequence": records}), path)
    return path


def summarize(row: dict, run_dir: Path, left_out: int) -> dict:
    """The row's means after its first `left_out` steps (`schedule`) from its metrics.jsonl, or its error."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] if (
        run_dir / "metrics.jsonl").exists() else []  # fmt: skip
    windows = [m for m in lines if "tokens_per_s_per_gpu" in m]
    measured = [m for m in windows if m["step"] > left_out]
    if not measured:
        log = (run_dir / "stdout.log").read_text()
        start = max(log.find("Error executing job"), log.find("Traceback"))  # Hydra's report, else a traceback
        last_error = [line for line in log.splitlines() if "Error:" in line and "ChildFailedError" not in line]
        trace = log[start : start + 1500] if start >= 0 else log[-1500:]
        return {**row, "error": "\n".join([*last_error[-1:], trace])}

    def mean(key):
        values = [m[key] for m in measured if m.get(key) is not None]
        return sum(values) / len(values) if values else None

    saves = [m["checkpoint_save_s"] for m in lines if "checkpoint_save_s" in m]
    return {
        **row,
        "tokens_per_s_per_gpu": mean("tokens_per_s_per_gpu"),
        "real_tokens_per_s_per_gpu": mean("real_tokens_per_s_per_gpu"),
        "mfu": mean("mfu"),
        "step_time_s": mean("step_time_s"),
        "peak_memory_gib": max(m.get("peak_memory_gib") or 0 for m in measured),  # steady state, not init
        "data_wait_fraction": mean("data_wait_fraction"),
        "checkpoint_save_s": saves[-1] if saves else None,
        "loss_curve": [(m["step"], m["loss"]) for m in windows],
        "step_time_curve": [(m["step"], m["step_time_s"]) for m in windows],  # e.g. a slow first window of a shape
    }


def run_all(rows: list[dict], num_gpus: int, args, on_result=lambda results: None) -> list[dict]:
    """Start each row as soon as enough GPUs are free; larger rows first so they are not starved.

    `on_result(results so far)` runs after each row, so a run cut short still leaves its finished rows.
    """
    work = Path(args.work_dir)
    pending = sorted(rows, key=lambda r: -r["gpus"])
    free, running, results = list(range(num_gpus)), [], []
    while pending or running:
        for row in list(pending):
            if row["gpus"] <= len(free):
                gpu_ids, free = free[: row["gpus"]], free[row["gpus"] :]
                running.append((launch(row, gpu_ids, args, work), row, gpu_ids))
                pending.remove(row)
                print(f"started {row['name']} on GPUs {gpu_ids}", flush=True)
        for proc, row, gpu_ids in list(running):
            if proc.poll() is not None:
                running.remove((proc, row, gpu_ids))
                free += gpu_ids
                result = summarize(row, work / row["name"].replace(" ", "_"), schedule(row, args)[2])
                status = (
                    "FAILED (see error)" if "error" in result else f"{result['tokens_per_s_per_gpu']:.0f} tok/s/GPU"
                )
                print(f"finished {row['name']}: {status}", flush=True)
                results.append(result)
                on_result(sorted(results, key=lambda r: ORDER[r["name"]]))
        time.sleep(1)
    return sorted(results, key=lambda r: ORDER[r["name"]])


def write_results(results: list[dict], notes: str, out: Path, previous: dict | None = None) -> list[dict]:
    """Write results.json and results.md; rows of `previous` (an earlier results.json) that did not run now stay."""
    if previous:  # --append, e.g. one invocation per machine size
        fresh = {r["name"] for r in results}
        results = sorted([r for r in previous["rows"] if r["name"] not in fresh] + results,
                         key=lambda r: ORDER[r["name"]])  # fmt: skip
        notes = f"{previous['notes']}<br>{notes}"
    (out / "results.json").write_text(json.dumps({"notes": notes, "rows": results}, indent=1))
    (out / "results.md").write_text(markdown(results, notes))
    return results


def main():
    """Run the chosen rows, then write results.json, results.md and the plots."""
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text())["rows"], out)
        return
    import torch

    num_gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    rows = chosen_rows(args)
    skipped = [r["name"] for r in rows if r["gpus"] > num_gpus]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    own = ", ".join(f"{r['name']}: {r['steps']}, after step {schedule(r, args)[2]}" for r in rows if r["steps"])
    if own:
        own = f" (rows with their own steps, each logged: {own})"
    notes = (f"{num_gpus} x {device}; `{' '.join(sys.argv)}`; {args.steps} steps per row, means after step "
             f"{args.warmup}{own}. Not run (too few GPUs): {', '.join(skipped) or 'none'}.")  # fmt: skip
    if args.profile_steps:  # the profiler slows the steps it records and writes its trace inside a window
        notes += f" Steps {args.profile_steps[0]}-{args.profile_steps[1]} profiled: compare no tokens/s of this run."
    results_json = out / "results.json"
    previous = json.loads(results_json.read_text()) if args.append and results_json.exists() else None

    def save(results):  # after every row, merged into the results.json this run started from
        for r in results:  # compiled rows keep their eager twin of this same run (results.json may mix runs)
            twin = next((e for e in results if r["group"] == "compile"
                         and e["name"] == r["name"].removesuffix(" compiled") and "error" not in e), None)  # fmt: skip
            if twin:
                r["eager_same_run_tokens_per_s_per_gpu"] = twin["tokens_per_s_per_gpu"]
            r["device"] = device
        return write_results(results, notes, out, previous)

    results = save(run_all([r for r in rows if r["gpus"] <= num_gpus], num_gpus, args, on_result=save))
    print((out / "results.md").read_text())
    plot(results, out)


if __name__ == "__main__":
    main()
