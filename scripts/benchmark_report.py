"""Tables, target ratios and plots of `benchmark_training.py` results (rows as its `summarize` returns them)."""

from pathlib import Path


def find(results, name):
    """The successful row called `name`, or None."""
    return next((r for r in results if r["name"] == name and "error" not in r), None)


def ratio(results, numerator: str, denominator: str, key="tokens_per_s_per_gpu", scale=1):
    """`key` of one row over another's (None if either is missing or failed)."""
    a, b = find(results, numerator), find(results, denominator)
    return a[key] * scale / b[key] if a and b else None


def compile_ratio(results, eager_name: str) -> float | None:
    """Compiled over eager tokens/s, with the eager row measured in the same invocation."""
    compiled = find(results, f"{eager_name} compiled")
    eager = compiled and compiled.get("eager_same_run_tokens_per_s_per_gpu")
    return compiled["tokens_per_s_per_gpu"] / eager if eager else None


def window_k(row) -> int:
    """A long-context row's window length in thousand tokens (its name: "long <k>k ...")."""
    return int(row["name"].split()[1].removesuffix("k"))


def gpu_of(rows) -> str:
    """The short GPU name of the first row that names one ("NVIDIA H100 80GB HBM3" -> "H100"), else "GPU"."""
    device = next((r["device"] for r in rows if r.get("device")), "NVIDIA GPU")
    return device.removeprefix("NVIDIA ").split(" ")[0]


def trained_long_rows(results, suffix: str) -> list[dict]:
    """The long-context rows ending in `suffix` ("1 GPU", "1 GPU offload", "CP 2 GPU") that trained, shortest first."""
    done = [r for r in results if r["group"] == "long" and r["name"].endswith(suffix) and "error" not in r]
    return sorted(done, key=window_k)


def longest(results, suffix: str) -> int | None:
    """The longest window (thousand tokens) of `trained_long_rows(results, suffix)`."""
    done = trained_long_rows(results, suffix)
    return window_k(done[-1]) if done else None


def long_context_series(results) -> dict[str, list[dict]]:
    """The one-GPU long-context plot's lines: the rows that trained, by memory option."""
    return {
        label: trained_long_rows(results, suffix)
        for label, suffix in (("checkpointing", "1 GPU"), ("+ activation_cpu_offload", "1 GPU offload"))
    }


def targets(results) -> list[tuple[str, float | None, float | None]]:
    """(what, measured, target) for each of the recipe's speed targets; target None: context, not a goal."""
    best_fp8_bshd = max(
        (r for r in results if r["group"] == "model" and r["format"] == "BSHD" and "FP8" in r["precision"]
         and "error" not in r), key=lambda r: r["real_tokens_per_s_per_gpu"], default=None)  # fmt: skip
    real = "real_tokens_per_s_per_gpu"  # comparable across padded rows, packed rows and THD packs
    plain, offload = longest(results, "1 GPU"), longest(results, "1 GPU offload")  # one GPU, thousand tokens
    model_rows = [r for r in results if r["group"] in ("model", "scaling") and "error" not in r]
    te_rows = [r for r in model_rows if not r["name"].startswith("HF")]
    rows = [
        ("TE BF16 / HF real tokens/s (BSHD)", ratio(results, "TE BF16 BSHD", "HF BF16 BSHD", key=real), 1.25),
        (f"TE FP8 ({best_fp8_bshd['name'] if best_fp8_bshd else '-'}) / HF real tokens/s (BSHD)",
         ratio(results, best_fp8_bshd["name"], "HF BF16 BSHD", key=real) if best_fp8_bshd else None, 1.6),
        # Goals 0.60 and 0.76 under the old full-attention-window count, times 0.822 (its ratio to the causal
        # count for full 8k windows of this model): the same work rate.
        ("TE BF16 MFU, best row",
         max((r["mfu"] for r in te_rows if r["precision"] == "BF16" and r.get("mfu")), default=None), 0.49),
        ("TE FP8 best MFU (BF16-equivalent)",
         max((r["mfu"] for r in te_rows if "FP8" in r["precision"] and r.get("mfu")), default=None), 0.62),
        ("THD / padded BSHD real tokens/s (BF16)",
         ratio(results, "TE BF16 THD", "TE BF16 BSHD padded", key="real_tokens_per_s_per_gpu"), 1.7),
        *[(f"recipe{script} / bare TE stack tokens/s, {p} {f} (full windows)",
           ratio(results, f"TE {p} {f} full windows{script}", f"bare TE stack {p} {f}"), 0.99)
          for script in ("", " DDP") for p in ("BF16", "FP8 current") for f in ("BSHD", "THD")],
        *[(f"BSHD (packed rows) / THD real tokens/s, {p}, {data}",
           ratio(results, f"TE {p} BSHD{suffix}", f"TE {p} THD{suffix}", key="real_tokens_per_s_per_gpu"), 0.95)
          for p in ("BF16", "FP8 current") for data, suffix in (("bundled data", ""), ("mixed 8k + 2k", " mixed"))],
        *[(f"BSHD packed rows / padded, real tokens/s, {p}, mixed 8k + 2k",
           ratio(results, f"TE {p} BSHD mixed", f"TE {p} BSHD padded mixed", key="real_tokens_per_s_per_gpu"), None)
          for p in ("BF16", "FP8 current")],
        ("longest window trained on 1 GPU, checkpointing (thousand tokens)", plain, None),
        ("longest window trained on 1 GPU, + activation_cpu_offload (thousand tokens)", offload, None),
        ("longest window trained on 1 GPU, either (thousand tokens)", max(plain or 0, offload or 0) or None, 512),
        ("longest window trained on 2 GPUs with cp=2 (thousand tokens)", longest(results, "CP 2 GPU"), 1024),
        ("FSDP2 2 GPUs / 1 GPU tokens/s (FP8 current)",
         ratio(results, "fsdp2 FP8 current 2 GPU", "fsdp2 FP8 current 1 GPU", scale=2), 1.9),
        ("FSDP2 8 GPUs / 1 GPU per-GPU efficiency (FP8 current)",
         ratio(results, "fsdp2 FP8 current 8 GPU", "fsdp2 FP8 current 1 GPU"), 0.9),
        *[(f"CP 2 GPUs at {2 * s}k / CP 1 GPU at {s}k, tokens/s/GPU",
           ratio(results, f"CP 2 GPU seq {2 * s}k", f"CP 1 GPU seq {s}k"), 0.9) for s in (4, 8)],
        *[(f"CP 1 GPU at {2 * s}k / at {s}k: the most any CP can reach above (attention per token doubles)",
           ratio(results, f"CP 1 GPU seq {2 * s}k", f"CP 1 GPU seq {s}k"), None) for s in (4, 8)],
        # Goal 0.9 under the old full-attention count; x0.898 (0.738 at 16k over 0.822 at 8k) under the causal one.
        ("CP 2 GPUs at 16k / CP 1 GPU at 8k, MFU (counts the longer attention)",
         ratio(results, "CP 2 GPU seq 16k", "CP 1 GPU seq 8k", key="mfu"), 0.81),
        *[(f"CP 2 / DP 2 GPUs, both at {s}k, {comm} (the cost of CP itself)",
           ratio(results, f"CP 2 GPU seq {s}k{suffix}", f"DP 2 GPU seq {s}k"), 0.9)
          for s in (8, 16) for comm, suffix in (("p2p", ""), ("a2a", " a2a"))],
        *[(f"use_torch_compile / eager tokens/s, {name} (same run)", compile_ratio(results, f"TE {name}"), None)
          for name in ("BF16 THD", "FP8 delayed THD", "BF16 BSHD")],
        ("data-loader wait, worst row (fraction of step time)",
         max((r["data_wait_fraction"] for r in model_rows if r.get("data_wait_fraction") is not None),
             default=None), 0.02),
    ]  # fmt: skip
    return rows


def markdown(results, notes: str) -> str:
    """The results table and the targets table, as Markdown."""

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    out = [notes, "", "| row | GPUs | tokens/s/GPU | real tokens/s/GPU | MFU | step time (ms) | peak memory (GiB) "
           "| data wait | checkpoint save (s) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if "error" in r:
            failure = "out of memory" if "out of memory" in r["error"].lower() else "failed"
            out.append(f"| {r['name']} | {r['gpus']} | {failure} | | | | | | |")
            continue
        out.append(
            f"| {r['name']} | {r['gpus']} | {fmt(r['tokens_per_s_per_gpu'], ',.0f')} | "
            f"{fmt(r['real_tokens_per_s_per_gpu'], ',.0f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['step_time_s'] * 1000, '.0f')} | {fmt(r['peak_memory_gib'], '.1f')} | "
            f"{fmt(r['data_wait_fraction'], '.2%')} | {fmt(r['checkpoint_save_s'], '.1f')} |"
        )
    out += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for what, measured, goal in targets(results):
        lower_is_better = "wait" in what
        met = None if None in (measured, goal) else (measured <= goal if lower_is_better else measured >= goal)
        bound = "-" if goal is None else f"{'<=' if lower_is_better else '>='} {goal}"
        out.append(f"| {what} | {fmt(measured, '.3f')} | {bound} | {'-' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(out) + "\n"


def plot(results, out: Path) -> None:
    """Throughput bars per group and the loss curves of the model rows, as PNGs in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    for group, title in (("model", f"1 {gpu_of(ok)}, Llama-3.2-1B body, 8k windows"),
                         ("scaling", "THD, FP8 current / BF16, per GPU"),
                         ("cp", "Context parallelism, BF16, one long record")):  # fmt: skip
        rows = [r for r in ok if r["group"] == group]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.5))
        names = [r["name"] for r in rows]
        axes[0].barh(names, [r["tokens_per_s_per_gpu"] / 1e3 for r in rows], label="padded")
        axes[0].barh(names, [r["real_tokens_per_s_per_gpu"] / 1e3 for r in rows], label="real", alpha=0.7)
        axes[0].set_xlabel("thousand tokens/s/GPU")
        axes[0].legend()
        axes[0].invert_yaxis()
        axes[1].barh(names, [r["step_time_s"] * 1e3 for r in rows], color="gray")
        axes[1].set_xlabel("step time (ms)")
        axes[1].set_yticks([])
        axes[1].invert_yaxis()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / f"throughput_{group}.png", dpi=80)
        plt.close(fig)
    series = long_context_series(results)
    if any(series.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        memory = ax.twinx()
        for (label, rows), marker in zip(series.items(), ("o", "^")):
            lengths = [window_k(r) for r in rows]
            ax.plot(lengths, [r["tokens_per_s_per_gpu"] / 1e3 for r in rows], f"{marker}-", color="tab:blue",
                    label=f"tokens/s, {label}")  # fmt: skip
            memory.plot(lengths, [r["peak_memory_gib"] for r in rows], f"{marker}--", color="tab:red",
                        label=f"memory, {label}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ticks = sorted({window_k(r) for rows in series.values() for r in rows})
        ax.set_xticks(ticks, [f"{k}k" for k in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)  # from zero, so a 2% difference looks like one
        memory.set_ylim(bottom=0)
        ax.set_xlabel("window length (thousand tokens)")
        ax.set_ylabel("thousand tokens/s", color="tab:blue")
        memory.set_ylabel("peak memory (GiB)", color="tab:red")
        fig.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.88))
        long_gpu = gpu_of([r for rows in series.values() for r in rows])
        ax.set_title(f"1 {long_gpu}, BF16 THD, activation checkpointing, one window per step")
        fig.tight_layout()
        fig.savefig(out / "long_context.png", dpi=80)
        plt.close(fig)
    model_rows = [r for r in ok if r["group"] == "model"]
    if not model_rows:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in model_rows:
        steps, losses = zip(*r["loss_curve"])
        ax.plot(steps, losses, label=r["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("Training loss, 1 GPU, same data order")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=80)
    plt.close(fig)
