"""Every key of hydra_config/defaults.yaml does what its comment says.

Each test here would fail if its key were read nowhere. Keys whose effect needs a GPU (FP8 recipe keys,
fused AdamW, meta-device init) are checked in tests/test_train_gpu.py; the meta-test below makes sure no
key is left out.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import (
    ENV,
    FAST,
    RECIPE_DIR,
    build_loader,
    build_model,
    build_model_config_of,
    build_optimizer,
    losses,
    make_cfg,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

import train_ddp
import train_fsdp2
from config.checks import DEFAULTS_YAML, validate_config, validate_cp_config
from data.sources import load_raw_dataset
from runtime.distributed import DistributedConfig

CPU = torch.device("cpu")
ONE_RANK = DistributedConfig(0, 0, 1)


def _leaf_keys(group: dict, prefix: str = ""):
    for key, value in group.items():
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_default_key_is_named_in_a_test():
    """A key that no test names is a key whose effect nobody checks."""
    text = "".join(p.read_text() for p in Path(__file__).parent.glob("*.py") if p.name != Path(__file__).name)
    text += Path(__file__).read_text().split("# --- Keys ---", 1)[1]  # this file, without the meta-test
    keys = [k for k in _leaf_keys(yaml.safe_load(DEFAULTS_YAML.read_text())) if k != "defaults"]  # Hydra's list
    assert len(keys) > 50
    assert [k for k in keys if k not in text] == []


# --- Keys ---


def first_batch(cfg) -> dict:
    loader, _ = build_loader(cfg, ONE_RANK)
    return next(iter(loader))


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("+config_kwargs.num_hidden_layers=2", lambda m: len(m.model.layers) == 2),
        ("use_gradient_checkpointing=true", lambda m: m.is_gradient_checkpointing),
        ("use_torch_compile=true", lambda m: all(layer._compiled_call_impl is not None for layer in m.model.layers)),
    ],
)
def test_model_keys(tmp_path, override, check):
    default = build_model(make_cfg(tmp_path), use_te=False, device=CPU, on_meta=False)
    changed = build_model(make_cfg(tmp_path, override), use_te=False, device=CPU, on_meta=False)
    assert check(changed) and not check(default)


@pytest.mark.parametrize("entrypoint", [train_ddp, train_fsdp2], ids=["ddp", "fsdp2"])
def test_activation_cpu_offload_sends_each_layers_input_through_save_on_cpu(tmp_path, monkeypatch, entrypoint):
    """Each training forward sends exactly the decoder layers' [B, L, hidden] inputs through `save_on_cpu`.

    The layers' internals stay with the checkpoint, which keeps none; losses and export equal plain checkpointing.
    """
    packed = []

    class RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: (packed.append(tuple(tensor.shape)), pack(tensor))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    common = ["num_train_steps=3", "use_gradient_checkpointing=true", "checkpoint.save_final_model=true"]
    runs = {}
    for name, offload in (("plain", "false"), ("offload", "true")):
        cfg = make_cfg(tmp_path / name, *common, f"checkpoint.ckpt_dir={tmp_path / name / 'ckpt'}",
                       f"activation_cpu_offload={offload}")  # fmt: skip
        entrypoint.main(cfg)
        runs[name] = losses(tmp_path / name), load_file(tmp_path / name / "ckpt" / "final_model" / "model.safetensors")
    model = build_model(cfg, use_te=False, device=CPU, on_meta=False)
    hidden, layers = model.config.hidden_size, len(model.model.layers)
    assert len(packed) == 3 * layers and all(len(shape) == 3 and shape[-1] == hidden for shape in packed), packed
    assert runs["offload"][0] == runs["plain"][0]  # the same numbers: only where the inputs wait changed
    assert runs["offload"][1].keys() == runs["plain"][1].keys()
    assert all(torch.equal(runs["offload"][1][k], runs["plain"][1][k]) for k in runs["plain"][1])
    with pytest.raises(ValueError, match="use_gradient_checkpointing=true"):
        validate_config(make_cfg(tmp_path, "activation_cpu_offload=true"), use_te=False)
    with pytest.raises(ValueError, match="use_torch_compile=false"):
        validate_config(make_cfg(tmp_path, "activation_cpu_offload=true", "use_gradient_checkpointing=true",
                                 "use_torch_compile=true"), use_te=False)  # fmt: skip


@pytest.mark.parametrize(
    ("entrypoint", "overrides", "needs"),
    [
        ("fsdp2", [], r"train_ddp.py: FSDP2 gathers"),
        ("fsdp2_cp", [], "train_ddp.py"),
        ("ddp", ["use_sequence_packing=true", "dataset.split_samples=false"], "packs of one token count"),
        ("ddp", ["use_gradient_checkpointing=true"], "use_gradient_checkpointing=false"),
        ("ddp", ["use_torch_compile=true"], "use_torch_compile=false"),
        ("ddp", [], "a CUDA GPU"),  # what is left on this CPU machine
    ],
)
def test_use_cuda_graphs_is_refused_where_graphs_cannot_replay(tmp_path, entrypoint, overrides, needs):
    cfg = make_cfg(tmp_path, "use_cuda_graphs=true", *overrides)
    with pytest.raises(ValueError, match=f"use_cuda_graphs=true needs .*{needs}"):
        validate_config(cfg, use_te=True, entrypoint=entrypoint)
    with pytest.raises(ValueError, match="the TE model"):
        validate_config(make_cfg(tmp_path, "use_cuda_graphs=true"), use_te=False, entrypoint="ddp")
    validate_config(make_cfg(tmp_path, *overrides), use_te=True, entrypoint=entrypoint)  # fine without graphs


@pytest.mark.parametrize("packed", [False, True])
def test_use_cuda_graphs_has_train_ddp_capture_the_layers_for_its_micro_batches(tmp_path, monkeypatch, packed):
    """The key's wiring on the CPU (the capture itself needs TE on a GPU: tests/test_*_gpu.py)."""
    import config.checks
    from model.cuda_graphs import LayerShape

    monkeypatch.setattr(config.checks, "_check_cuda_graphs", lambda *a: None)  # the HF model, a CPU
    captured = []
    monkeypatch.setattr(train_ddp, "capture_layer_graphs", lambda model, shape, recipe: captured.append(shape))
    common = [
        "num_train_steps=1",
        f"use_sequence_packing={packed}".lower(),
        f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}",
    ]
    train_ddp.main(make_cfg(tmp_path / "off", *common))
    assert captured == []
    train_ddp.main(make_cfg(tmp_path / "on", *common, "use_cuda_graphs=true"))
    assert captured == [LayerShape.packs(2 * 256, 256) if packed else LayerShape.rows(2, 256)]  # L0: 2 x 256


def test_layer_graphs_take_their_shape_only_and_count_them(tmp_path):
    from model.cuda_graphs import LayerGraphs, LayerShape

    calls = []
    fake = [lambda h, rope, *cu: calls.append(cu) or h + 1] * 3  # three "layers"
    rows = LayerGraphs(fake, LayerShape.rows(2, 8), rope=torch.ones(1))
    hidden, causal = torch.zeros(2, 8, 4), {"self_attn_mask_type": "causal"}
    assert rows.fits(hidden, causal) and torch.equal(rows(hidden, causal), hidden + 3) and calls == [()] * 3
    assert not rows.fits(torch.zeros(1, 8, 4), causal)  # another batch size
    assert not rows.fits(hidden, {"attention_mask": None, "self_attn_mask_type": "padding_causal"})  # padded rows
    assert (rows.replayed, rows.eager) == (1, 2)

    shape = LayerShape.of(make_cfg(tmp_path, "dataset.token_micro_batch_size=1000").dataset, packed=True, multiple=16)
    assert (shape.tokens, shape.window, shape.max_sequences) == (1008, 256, 5)  # the budget padded for FP8
    packs, calls[:] = LayerGraphs(fake, shape, rope=torch.ones(1)), []
    cu = torch.tensor([0, 256, 512, 768, 1008], dtype=torch.int32)
    thd = {"cu_seqlens_q": cu, "cu_seqlens_kv": cu, "max_seqlen_q": 256, "max_seqlen_kv": 256}
    thd["self_attn_mask_type"] = "padding_causal"
    assert packs.fits(torch.zeros(1008, 4), thd)
    packs(torch.zeros(1008, 4), thd)  # the boundaries padded with empty sequences to a fixed length
    padded = torch.tensor([0, 256, 512, 768, 1008, 1008], dtype=torch.int32)
    assert len(calls) == 3 and all(torch.equal(c, padded) for cu in calls for c in cu)
    assert not packs.fits(torch.zeros(992, 4), thd)  # a finite stream's short last pack
    assert not packs.fits(torch.zeros(1008, 4), {**thd, "cu_seqlens_q": torch.arange(7, dtype=torch.int32)})  # 6 seqs
    assert not packs.fits(torch.zeros(1008, 4), {**thd, "max_seqlen_q": 2000})  # longer than the window
    assert not packs.fits(torch.zeros(1008, 4), {**thd, "cu_seqlens_q_padded": cu})  # context parallelism


@pytest.mark.parametrize(
    ("world_size", "checkpointing", "reshard"), [(1, False, False), (1, True, True), (2, False, True)]
)
def test_fsdp2_reshards_after_forward_unless_one_rank_has_memory_to_spare(tmp_path, monkeypatch, world_size,
                                                                          checkpointing, reshard):  # fmt: skip
    """One rank keeps gathered parameters to backward, unless use_gradient_checkpointing asks for memory first."""
    import torch.distributed.fsdp as fsdp

    from model.parallelize import shard_with_fsdp2

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kwargs: calls.append(kwargs["reshard_after_forward"]))
    monkeypatch.setattr(torch.distributed.device_mesh, "init_device_mesh", lambda *args: None)
    cfg = make_cfg(tmp_path, f"use_gradient_checkpointing={str(checkpointing).lower()}")
    model = build_model(cfg, use_te=False, device=CPU, on_meta=False)
    shard_with_fsdp2(model, world_size, CPU, fp32_master_weights=False, use_gradient_checkpointing=checkpointing)
    assert calls == [reshard] * (len(model.model.layers) + 1)


@pytest.mark.slow
def test_torch_compile_with_ddp_trains_like_eager_and_exports_plain_names(tmp_path):
    """The compiled layers (inductor on the CPU) give eager's losses, and the export has no `_orig_mod.`."""
    common = ["num_train_steps=2", "checkpoint.save_final_model=true", "checkpoint.save_every_n_steps=2"]
    train_ddp.main(make_cfg(tmp_path / "eager", *common, f"checkpoint.ckpt_dir={tmp_path / 'eager' / 'ckpt'}"))
    ckpt = tmp_path / "compiled" / "ckpt"
    train_ddp.main(make_cfg(tmp_path / "compiled", *common, f"checkpoint.ckpt_dir={ckpt}", "use_torch_compile=true"))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-5)
    names = load_file(ckpt / "final_model" / "model.safetensors").keys()
    assert names == load_file(tmp_path / "eager" / "ckpt" / "final_model" / "model.safetensors").keys()
    assert not any("_orig_mod" in name for name in names)


def test_config_name_or_path_picks_the_shape(tmp_path):
    cfg = make_cfg(tmp_path, "config_name_or_path=./model_configs/meta-llama/Llama-3.2-1B")
    assert build_model_config_of(cfg, use_te=False).hidden_size == 2048
    assert build_model_config_of(make_cfg(tmp_path), use_te=False).hidden_size == 384


def test_optimizer_keys(tmp_path):
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(4, 4), "proj": torch.nn.Linear(4, 4)})
    overrides = ["adamw_kwargs.lr=0.5", "adamw_kwargs.betas=[0.8,0.9]", "adamw_kwargs.eps=0.25",
                 "adamw_kwargs.weight_decay=0.3", "adamw_kwargs.fused=true"]  # fmt: skip
    optimizer = build_optimizer(make_cfg(tmp_path, *overrides), model)
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (0.5, (0.8, 0.9), 0.25, 0.3)
    assert not group["fused"]  # fused AdamW is for GPUs (checked there: tests/test_train_gpu.py)

    exempt = make_cfg(tmp_path, *overrides, "no_weight_decay_on_norms_biases_embeddings=true")
    decay, no_decay = build_optimizer(exempt, model).param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(model.embed_tokens.weight), id(model.proj.bias)}


@pytest.mark.parametrize(
    ("overrides", "exempt"),
    [
        (["use_weight_decay_grouping=true"], {"proj.bias", "norm.weight"}),
        (["use_weight_decay_grouping=true", "skip_embedding_weight_decay=true"],
         {"proj.bias", "norm.weight", "embed_tokens.weight"}),
        (["skip_embedding_weight_decay=true"], set()),  # upstream reads it only with the grouping on
        (["no_weight_decay_on_norms_biases_embeddings=true"], {"proj.bias", "norm.weight", "embed_tokens.weight"}),
    ],
)  # fmt: skip
def test_upstream_weight_decay_grouping_keys(tmp_path, overrides, exempt):
    """OpenGenome2's `use_weight_decay_grouping` and `skip_embedding_weight_decay`, with upstream's meaning."""
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(4, 4), "proj": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4, bias=False)})  # fmt: skip
    groups = build_optimizer(make_cfg(tmp_path, *overrides), model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == exempt
    assert sum(len(g["params"]) for g in groups) == len(names)  # every parameter once


@pytest.mark.parametrize("every", [2, None])
def test_gc_collect_every_n_steps_schedules_the_collector(tmp_path, monkeypatch, every):
    """2: no automatic GC in the loop, full collections before it and after steps 2 and 4; null: untouched."""
    import gc

    import training.gc_schedule as python_gc

    calls, enabled_in_loop = [], []
    proxy = types.SimpleNamespace(**{name: getattr(gc, name) for name in ("disable", "enable", "freeze", "unfreeze")})
    proxy.collect = lambda generation=2: calls.append(generation)
    monkeypatch.setattr(python_gc, "gc", proxy)
    step = python_gc.ScheduledGC.step
    monkeypatch.setattr(
        python_gc.ScheduledGC, "step", lambda self, n: enabled_in_loop.append(gc.isenabled()) or step(self, n)
    )
    train_fsdp2.main(make_cfg(tmp_path, "num_train_steps=4", f"gc_collect_every_n_steps={every or 'null'}"))
    assert calls == ([2, 2, 2] if every else [])
    assert enabled_in_loop == [not every] * 4
    assert gc.isenabled() and gc.get_freeze_count() == 0  # back to normal after the loop


def test_lr_schedule_keys_reach_the_loop(tmp_path):
    """Logged LR after step N is the schedule at N: warmup of 2, then decay over 1 step to min_lr_ratio."""
    overrides = ["num_train_steps=3", "adamw_kwargs.lr=0.002", "lr_scheduler_kwargs.num_warmup_steps=2",
                 "lr_scheduler_kwargs.num_decay_steps=1", "lr_scheduler_kwargs.min_lr_ratio=0.25"]  # fmt: skip
    train_fsdp2.main(make_cfg(tmp_path, *overrides))
    lrs = [m["lr"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in m]
    assert lrs == pytest.approx([0.001, 0.002, 0.0005])


@pytest.mark.parametrize("override", ["seed=7", "max_grad_norm=1e-12"])
def test_seed_and_clipping_change_the_losses(tmp_path, override):
    train_fsdp2.main(make_cfg(tmp_path / "default", "num_train_steps=3"))
    train_fsdp2.main(make_cfg(tmp_path / "changed", "num_train_steps=3", override))
    step = 1 if override.startswith("seed") else 3  # step 1 runs at LR 0 (warmup); its clipped update shows at 3
    assert losses(tmp_path / "changed")[step] != losses(tmp_path / "default")[step]


@pytest.mark.parametrize("fp32_master_weights", [False, True])
def test_fp32_master_weights_keeps_fp32_parameters_and_computes_in_bf16(tmp_path, monkeypatch, fp32_master_weights):
    """FSDP2 with fp32_master_weights: fp32 sharded parameters (what the optimizer updates), bf16 layer compute."""
    seen, make = {}, train_fsdp2.create_model

    def create_and_watch(*args, **kwargs):
        model = make(*args, **kwargs)
        model.model.layers[0].register_forward_hook(lambda m, i, out: seen.update(dtype=out.dtype))  # returns None
        seen["model"] = model
        return model

    monkeypatch.setattr(train_fsdp2, "create_model", create_and_watch)
    train_fsdp2.main(make_cfg(tmp_path, "num_train_steps=1", f"fp32_master_weights={fp32_master_weights}"))
    assert {p.dtype for p in seen["model"].parameters()} == {torch.float32}
    assert seen["dtype"] == (torch.bfloat16 if fp32_master_weights else torch.float32)
    with pytest.raises(ValueError, match="fp32_master_weights=true is an FSDP2 option"):
        validate_config(make_cfg(tmp_path, "fp32_master_weights=true"), use_te=False, entrypoint="ddp")


def test_max_checkpoints_prunes_old_ones(tmp_path):
    ckpt = tmp_path / "ckpt"
    overrides = ["num_train_steps=4", f"checkpoint.ckpt_dir={ckpt}", "checkpoint.save_every_n_steps=1"]
    train_fsdp2.main(make_cfg(tmp_path, *overrides, "checkpoint.max_checkpoints=2"))
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_3", "step_4"]


def test_wandb_init_args_reach_wandb(tmp_path, monkeypatch):
    """With a mode other than disabled, wandb.init gets the arguments and every log line.

    Disabled never imports wandb (not installed in CI), so a stand-in module records the calls.
    """
    calls = []
    run = types.SimpleNamespace(log=lambda metrics, step: calls.append(("log", step, metrics)), finish=lambda: None)
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    overrides = ["wandb_init_args.mode=offline", "wandb_init_args.project=dna", "wandb_init_args.name=run-1"]
    train_fsdp2.main(make_cfg(tmp_path, "num_train_steps=2", *overrides))
    init = calls[0][1]
    assert (init["mode"], init["project"], init["name"]) == ("offline", "dna", "run-1")
    assert init["config"]["num_train_steps"] == 2  # the resolved config travels with the run
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2]
    # The upstream recipe's metric names, so its dashboards carry over.
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/step_time",
            "train/tokens_per_second_per_gpu", "train/global_step"} <= set(logs[-1][2])  # fmt: skip
    assert logs[-1][2]["train/global_step"] == 2


# --- Data keys ---


def test_dataset_prefetch_factor_reaches_the_loader(tmp_path):
    loader, _ = build_loader(make_cfg(tmp_path, "dataset.num_workers=1", "dataset.prefetch_factor=2"), ONE_RANK)
    assert loader.loaders[0].prefetch_factor == 2  # the rank's one data stream (data/streams.py)


def test_dataset_pad_sequences_to_be_divisible_by_pads_each_packed_sequence(tmp_path):
    assert "cu_seq_lens_q_padded" not in first_batch(make_cfg(tmp_path, "use_sequence_packing=true"))
    batch = first_batch(make_cfg(tmp_path, "use_sequence_packing=true", "dataset.pad_sequences_to_be_divisible_by=96"))
    offsets = batch["cu_seq_lens_q_padded"]
    assert batch["pad_between_seqs"] and all(n % 96 == 0 for n in (offsets[1:] - offsets[:-1]).tolist())
    with pytest.raises(ValueError, match="must be a positive integer"):
        validate_config(make_cfg(tmp_path, "dataset.pad_sequences_to_be_divisible_by=0"), use_te=False)


def test_dataset_pad_sequences_to_be_divisible_by_pads_bshd_micro_batches(tmp_path):
    """Without packing, each micro-batch's length is padded to the multiple (upstream pads BSHD too, for FP8)."""
    lengths = {first_batch(make_cfg(tmp_path, f"dataset.seed={s}", "dataset.pad_sequences_to_be_divisible_by=100"))[
        "input_ids"].shape[1] for s in range(6)}  # fmt: skip
    assert lengths and all(n % 100 == 0 for n in lengths)


def test_dataset_tokenizer_name_or_path_is_used(tmp_path):
    with pytest.raises(OSError, match="no_such_tokenizer"):
        first_batch(make_cfg(tmp_path, "dataset.tokenizer_name_or_path=./no_such_tokenizer"))


@pytest.mark.parametrize("override", ["dataset.seed=7", "dataset.buffer_size=1"])
def test_shuffle_keys_change_the_order(tmp_path, override):
    default = first_batch(make_cfg(tmp_path))["input_ids"]
    assert not torch.equal(first_batch(make_cfg(tmp_path, override))["input_ids"], default)


def test_genomic_label_keys(tmp_path):
    data = tmp_path / "soft_masked.parquet"
    pq.write_table(pa.table({"sequence": ["ACGTacgtNNRYacgt" * 4]}), data)
    base = [f"dataset.load_dataset_kwargs.path={data}"]
    plain = first_batch(make_cfg(tmp_path, *base))
    upper = first_batch(make_cfg(tmp_path, *base, "dataset.uppercase_labels=true"))
    masked = first_batch(make_cfg(tmp_path, *base, "dataset.mask_degenerate_bases=true"))
    ids, lower = plain["input_ids"], (plain["input_ids"] >= ord("a")) & (plain["input_ids"] <= ord("z"))
    assert torch.equal(plain["labels"], ids)
    assert torch.equal(upper["labels"][lower], ids[lower] - 32)
    assert (masked["labels"][(ids == ord("N")) | (ids == ord("R"))] == -100).all()
    assert (masked["labels"][ids == ord("A")] == ord("A")).all()
    assert (masked["labels"][ids == 0] == 0).all() and (ids == 0).any()  # <EOS> stays a target
    no_eos = first_batch(
        make_cfg(tmp_path, *base, "dataset.mask_degenerate_bases=true", "dataset.mask_eos_label=true")
    )
    assert (no_eos["labels"][ids == 0] == -100).all()
    assert torch.equal(no_eos["labels"][ids != 0], masked["labels"][ids != 0])


def test_dataset_reverse_complement_prob_reaches_the_loader(tmp_path):
    """1.0: every window on the other strand (the loader's own test covers 0.5 and resume)."""
    plain = first_batch(make_cfg(tmp_path))
    flipped = first_batch(make_cfg(tmp_path, "dataset.reverse_complement_prob=1.0"))
    assert (
        not torch.equal(plain["input_ids"], flipped["input_ids"])
        and plain["input_ids"].shape == flipped["input_ids"].shape
    )
    with pytest.raises(ValueError, match="dataset.reverse_complement_prob=1.5 is a probability"):
        validate_config(make_cfg(tmp_path, "dataset.reverse_complement_prob=1.5"), use_te=False)


def test_dataset_bos_eos_only_at_record_ends_reaches_the_loader(tmp_path):
    """Interior windows of the bundled long records lose their <BOS> and <EOS>."""
    overrides = ["dataset.micro_batch_size=1", "dataset.buffer_size=1"]  # stream order: one record's windows in turn

    def specials(*more):
        loader, _ = build_loader(make_cfg(tmp_path, *overrides, *more), ONE_RANK)
        windows = [b["input_ids"][0] for b, _ in zip(loader, range(30))]
        return sum(int(w[0] == 2) + int(w[-1] == 0) for w in windows)

    assert specials() == 60 and specials("dataset.bos_eos_only_at_record_ends=true") < 30


@pytest.mark.parametrize("entrypoint", [train_ddp, train_fsdp2], ids=["ddp", "fsdp2"])
def test_dataset_lowercase_loss_weight_weighs_soft_masked_targets(tmp_path, entrypoint):
    """Step 1's loss (before any update) is the weighted mean: it moves with the weight on soft-masked data."""
    rng = np.random.default_rng(0)
    records = [
        "".join(c.lower() if i // 50 % 2 else c for i, c in enumerate(rng.choice(list("ACGT"), 3000)))
        for _ in range(8)
    ]  # runs of 50 lowercase (repeat) bases
    data = tmp_path / "soft_masked.parquet"
    pq.write_table(pa.table({"sequence": records}), data)
    step_one = {}
    for weight in (1.0, 0.1, 0.0):
        run = tmp_path / f"w{weight}"
        keys = [f"dataset.load_dataset_kwargs.path={data}", "dataset.uppercase_labels=true", "num_train_steps=1"]
        entrypoint.main(make_cfg(run, *keys, f"dataset.lowercase_loss_weight={weight}"))
        step_one[weight] = losses(run)[1]
    assert len(set(step_one.values())) == 3
    with pytest.raises(ValueError, match="dataset.lowercase_loss_weight=-1 must be >= 0"):
        validate_config(make_cfg(tmp_path, "dataset.lowercase_loss_weight=-1"), use_te=False)


def test_split_samples_keeps_the_budget_exact(tmp_path):
    packs = ["use_sequence_packing=true", "dataset.token_micro_batch_size=300"]  # 256-token windows
    loader, _ = build_loader(make_cfg(tmp_path, *packs), ONE_RANK)
    assert {b["input_ids"].shape[1] for b, _ in zip(loader, range(20))} == {300}
    loader, _ = build_loader(make_cfg(tmp_path, *packs, "dataset.split_samples=false"), ONE_RANK)
    sizes = [b["input_ids"].shape[1] for b, _ in zip(loader, range(20))]
    assert max(sizes) < 300  # whole windows only: packs end short


def test_packing_lookahead_balances_the_packs_of_the_loader(tmp_path):
    """On the bundled data (records of 300 bp to 30 kbp, 256-token windows): same budget, cheaper worst pack."""
    packs = ["use_sequence_packing=true", "dataset.token_micro_batch_size=1024", "dataset.buffer_size=1"]

    def costs(*overrides):
        loader, _ = build_loader(make_cfg(tmp_path, *packs, *overrides), ONE_RANK)
        batches = [b for b, _ in zip(loader, range(60))]
        assert {b["input_ids"].shape[1] for b in batches} == {1024}
        return [float((torch.diff(b["cu_seq_lens_q"].long()) ** 2).sum()) for b in batches]

    in_order, balanced = costs(), costs("dataset.packing_lookahead=32")
    assert max(balanced) < max(in_order) and torch.tensor(balanced).std() < torch.tensor(in_order).std()
    with pytest.raises(ValueError, match="dataset.packing_lookahead=8 balances packed"):
        validate_config(make_cfg(tmp_path, "dataset.packing_lookahead=8"), use_te=False)  # BSHD: nothing to pack


def test_use_stateful_dataloader(tmp_path):
    assert type(build_loader(make_cfg(tmp_path), ONE_RANK)[0].loaders[0]) is StatefulDataLoader
    loader, _ = build_loader(make_cfg(tmp_path, "dataset.use_stateful_dataloader=false"), ONE_RANK)
    assert type(loader) is DataLoader


def test_load_dataset_kwargs_split_and_streaming(tmp_path):
    overrides = ["dataset.load_dataset_kwargs.streaming=false", "dataset.load_dataset_kwargs.split='train[:3]'"]
    ds = load_raw_dataset(dict(make_cfg(tmp_path, *overrides).dataset.load_dataset_kwargs), "sequence")
    assert len(ds) == 3  # map-style (not streamed), three records
    streamed = load_raw_dataset(dict(make_cfg(tmp_path).dataset.load_dataset_kwargs), "sequence")
    assert not hasattr(streamed, "__len__")


def test_cp_comm_type_is_checked(tmp_path):
    cfg = make_cfg(tmp_path, name="L0_sanity_cp", base=["cp_comm_type=ring"])
    with pytest.raises(ValueError, match="cp_comm_type='ring' must be one of"):
        validate_cp_config(cfg, use_te=True, world_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("chdir", [False, True])
def test_hydra_job_chdir(tmp_path, chdir):
    """Hydra's own key: with chdir the run works in its output folder, so a relative run_dir lands there.

    The recipe's relative paths (./model_configs, ./tokenizers, the bundled data) resolve either way.
    """
    out = tmp_path / "hydra_out"
    cmd = [sys.executable, str(RECIPE_DIR / "train_fsdp2.py"), "--config-name", "L0_sanity", *FAST,
           "num_train_steps=1", "run_dir=relative_run", f"hydra.run.dir={out}",
           f"hydra.job.chdir={str(chdir).lower()}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ((out if chdir else tmp_path) / "relative_run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_logger_frequency_makes_one_event_per_window(tmp_path, capsys):
    """logger.frequency=4: records at steps 4 and 8, each the mean over its 4 steps; step 1 only on the console."""
    common = ["num_train_steps=8", "use_sequence_packing=true"]
    train_fsdp2.main(make_cfg(tmp_path / "every", *common))  # FAST: logger.frequency=1
    capsys.readouterr()
    train_fsdp2.main(make_cfg(tmp_path / "windows", *common, "logger.frequency=4"))
    assert "step=1 |" in capsys.readouterr().out
    every, windows = losses(tmp_path / "every"), losses(tmp_path / "windows")
    assert sorted(windows) == [4, 8]
    for end in (4, 8):  # packed steps hold almost the same number of target tokens: ~ the plain mean
        assert windows[end] == pytest.approx(sum(every[s] for s in range(end - 3, end + 1)) / 4, rel=2e-3)


def test_profiler_writes_a_trace_of_the_chosen_steps(tmp_path):
    cfg = make_cfg(tmp_path, "num_train_steps=4", "profiler.enabled=true", "profiler.start_step=2",
                   "profiler.end_step=3")  # fmt: skip
    train_fsdp2.main(cfg)
    trace = json.loads((tmp_path / "profiler" / "rank0.json").read_text())
    optimizer_steps = [e for e in trace["traceEvents"] if e.get("name") == "Optimizer.step#AdamW.step"]
    assert len(optimizer_steps) == 2  # steps 2 and 3, nothing else
    summary = (tmp_path / "profiler" / "rank0_summary.txt").read_text()
    assert summary.startswith("steps 2-3: wall ") and "Self CPU" in summary  # the ops table (no GPU: no busy share)
    bad = make_cfg(tmp_path, "profiler.enabled=true", "profiler.start_step=5", "profiler.end_step=3")
    with pytest.raises(ValueError, match="profiler.start_step=5 and profiler.end_step=3"):
        validate_config(bad, use_te=False)


def test_fp8_stats_config_is_checked_before_anything_runs(tmp_path, monkeypatch):
    """fp8_stats_config.enabled needs TE + FP8, and nvdlfw_inspect; its effect is tests/test_keys_gpu.py's."""
    from training.fp8_stats import FP8Stats

    with pytest.raises(ValueError, match="needs the TE model and fp8_config.enabled=true"):
        validate_config(make_cfg(tmp_path, "fp8_stats_config.enabled=true"), use_te=True)
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect.api", None)
    cfg = make_cfg(tmp_path, "fp8_stats_config.enabled=true", "fp8_stats_config.fp8_log_dir=null",
                   "fp8_stats_config.fp8_stats_file=fp8_stats.yaml")  # fmt: skip
    with pytest.raises(ValueError, match="pip install nvdlfw-inspect"):
        FP8Stats(cfg.fp8_stats_config, tmp_path, rank=0)
    disabled = FP8Stats(make_cfg(tmp_path).fp8_stats_config, tmp_path, rank=0)
    assert not disabled.api  # nothing is imported or started


def test_fp8_stats_file_and_log_dir_reach_tes_debug_tools(tmp_path, monkeypatch):
    """What FP8Stats hands nvdlfw_inspect (faked here; the real run is tests/test_upstream_gpu.py)."""
    from training.fp8_stats import FP8Stats

    calls = {}
    api = types.ModuleType("nvdlfw_inspect.api")
    api.initialize = lambda **kwargs: calls.update(kwargs)
    package = types.ModuleType("nvdlfw_inspect")
    package.api = api
    te = types.ModuleType("transformer_engine")
    te.__file__ = str(tmp_path / "te" / "__init__.py")
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect", package)
    monkeypatch.setitem(sys.modules, "nvdlfw_inspect.api", api)
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    stats_file = tmp_path / "my_stats.yaml"
    stats_file.write_text("{}\n")
    cfg = make_cfg(tmp_path, "fp8_stats_config.enabled=true", f"fp8_stats_config.fp8_stats_file={stats_file}",
                   f"fp8_stats_config.fp8_log_dir={tmp_path / 'logs'}")  # fmt: skip
    FP8Stats(cfg.fp8_stats_config, tmp_path / "run", rank=3)
    assert calls["config_file"] == str(stats_file) and calls["log_dir"] == str(tmp_path / "logs" / "rank_3")
    assert calls["feature_dirs"] == [str(tmp_path / "te" / "debug" / "features")]
    FP8Stats(make_cfg(tmp_path, "fp8_stats_config.enabled=true").fp8_stats_config, tmp_path / "run", rank=0)
    assert calls["config_file"].endswith("fp8_stats.yaml")
    assert calls["log_dir"] == str(tmp_path / "run" / "fp8_stats" / "rank_0")
    with pytest.raises(FileNotFoundError, match="fp8_stats_config.fp8_stats_file='nope.yaml' does not exist"):
        cfg = make_cfg(tmp_path, "fp8_stats_config.enabled=true", "fp8_stats_config.fp8_stats_file=nope.yaml")
        FP8Stats(cfg.fp8_stats_config, tmp_path, rank=0)


def test_gpu_busy_fraction_is_the_union_of_kernel_intervals():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from training.profiling import gpu_busy_fraction

    def event(start, end, device=DeviceType.CUDA):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device)

    # Kernels at 0-10 and 5-20 overlap (busy 0-20), 30-40 after a gap; a CPU op spanning everything is not GPU time.
    events = [event(30, 40), event(0, 10), event(5, 20), event(0, 100, DeviceType.CPU)]
    assert gpu_busy_fraction(events, wall_us=100) == pytest.approx(0.30)
    assert gpu_busy_fraction([event(0, 100, DeviceType.CPU)], wall_us=100) is None
