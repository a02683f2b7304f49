"""L0_sanity with the TE model on the GPU.

BF16 and every FP8 recipe the GPU runs, BSHD and THD, DDP and FSDP2, resume, and the final export loaded
back; two-GPU runs through torchrun.

    python -m pytest -m "gpu or multi_gpu" tests/test_train_gpu.py
"""

import json

import pytest
import torch
from conftest import TORCHRUN_2, losses, make_cfg, poison_embedding_gradients, run_command, train_straight_and_resumed

import train_ddp
import train_fsdp2
import train_fsdp2_cp

GPU = ["use_te=true", "dataset.num_workers=1", "logger.frequency=10"]


def gpu_cfg(run_dir, *overrides):
    """L0_sanity with the TE model on the GPU."""
    return make_cfg(run_dir, *overrides, base=GPU)


def supported_recipes():
    import transformer_engine.pytorch as te

    names = []
    if te.is_fp8_available():
        names += ["DelayedScaling", "Float8CurrentScaling"]
    if te.is_fp8_block_scaling_available():
        names.append("Float8BlockScaling")
    if te.is_mxfp8_available():
        names.append("MXFP8BlockScaling")
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2])
def test_l0_sanity_te_bf16(tmp_path, script, packing):
    cfg = gpu_cfg(tmp_path, "num_train_steps=100", f"use_sequence_packing={packing}", "logger.frequency=1")
    final = script.main(cfg)
    assert losses(tmp_path)[1] > 4.5 and final < 1.5


@pytest.mark.gpu
@pytest.mark.parametrize("packing", [False, True])
def test_l0_sanity_te_fp8_every_recipe(tmp_path, packing):
    bf16 = tmp_path / "bf16"
    train_fsdp2.main(gpu_cfg(bf16, "num_train_steps=10", f"use_sequence_packing={packing}"))
    recipes = supported_recipes()
    assert recipes, "a Hopper GPU runs at least DelayedScaling and Float8CurrentScaling"
    for recipe in recipes:
        run = tmp_path / recipe
        overrides = ["num_train_steps=100", "fp8_config.enabled=true", f"fp8_config.fp8_recipe={recipe}"]
        final = train_fsdp2.main(gpu_cfg(run, *overrides, f"use_sequence_packing={packing}"))
        assert final < 1.5, f"{recipe}: final loss {final}"
        # FP8 changes the numerics: identical losses to BF16 would mean the recipe never ran.
        assert losses(run)[10] != losses(bf16)[10], recipe


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2, train_fsdp2_cp])
def test_bshd_batches_as_packed_rows_train_like_padded_bshd(tmp_path, monkeypatch, script, fp8):
    """BSHD micro-batches as packed rows (default) train like upstream's padded path (attn_input_format=bshd).

    Both see the same windows and targets, so their losses agree. train_fsdp2_cp.py at cp_size=1 too.
    Micro-batches of full windows run in TE's BSHD layout inside training, padded ones as a THD row.
    """
    from model.modeling_llama_te import NVLlamaModel

    layouts, set_layout = [], NVLlamaModel._set_attention_layout
    monkeypatch.setattr(NVLlamaModel, "_set_attention_layout", lambda m, f: layouts.append(f) or set_layout(m, f))
    common = [
        "num_train_steps=20",
        "use_sequence_packing=false",
        "logger.frequency=1",
        f"fp8_config.enabled={str(fp8).lower()}",
        "checkpoint.save_every_n_steps=null",
    ]
    script.main(gpu_cfg(tmp_path / "packed", *common))
    assert "bshd" in layouts  # the L0 loader's micro-batches are mostly full windows
    script.main(gpu_cfg(tmp_path / "padded", *common, "+config_kwargs.attn_input_format=bshd"))
    packed, padded = losses(tmp_path / "packed"), losses(tmp_path / "padded")
    assert any(packed[s] != padded[s] for s in packed)  # two different paths ran (the key did something)
    tolerance = 0.03 if fp8 else 0.01  # different attention kernels and GEMM shapes; FP8 scales see pad rows
    for step in (1, 5, 10, 20):
        assert packed[step] == pytest.approx(padded[step], rel=tolerance), step
    assert packed[1] != packed[20]  # it trained

    def input_per_target(run):  # input tokens (pads included) per prediction target, over the whole run
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        windows = [m for m in records if "tokens_per_s_per_gpu" in m]
        return sum(m["tokens_per_s_per_gpu"] for m in windows) / sum(m["real_tokens_per_s_per_gpu"] for m in windows)

    # The loader really packed the rows: the padded run fed pad tokens, the packed one (almost) none
    # (the L0 loader's batches counted on the CPU: 1.002 and 1.05).
    assert input_per_target("packed") < 1.01 and input_per_target("padded") > 1.03


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("layout", "recipe", "extra"),
    [("rows", None, []), ("rows", "DelayedScaling", []), ("rows", "Float8CurrentScaling", []), ("packs", None, []),
     ("packs", "DelayedScaling", []), ("packs", "Float8CurrentScaling", ["+config_kwargs.fp8_first_last_bf16=true"])],
)  # fmt: skip
def test_cuda_graphs_train_like_eager(tmp_path, layout, recipe, extra):
    """use_cuda_graphs=true (train_ddp.py): 20 steps of 2 micro-batches, the losses of the run without graphs.

    Rows: the L0 loader's micro-batches are mostly two full windows (replayed), some hold a record's short
    last window (a packed row, eager). Packs: every pack holds the 2,048-token budget (replayed). The last case
    keeps the first and last layer in BF16 (layer_precision): those two are captured without FP8.
    """
    from model.modeling_llama_te import NVLlamaModel

    seen = []
    original = NVLlamaModel.forward
    NVLlamaModel.forward = lambda m, *a, **k: seen.append(m.layer_graphs) or original(m, *a, **k)
    try:
        fp8 = [
            f"fp8_config.enabled={recipe is not None}".lower(),
            *([f"fp8_config.fp8_recipe={recipe}"] if recipe else []),
        ]
        common = ["num_train_steps=20", "grad_acc_steps=2", "logger.frequency=1", "checkpoint.save_every_n_steps=null",
                  f"use_sequence_packing={layout == 'packs'}".lower(), *fp8, *extra]  # fmt: skip
        train_ddp.main(gpu_cfg(tmp_path / "eager", *common))
        assert set(seen) == {None}
        train_ddp.main(gpu_cfg(tmp_path / "graphs", *common, "use_cuda_graphs=true"))
    finally:
        NVLlamaModel.forward = original
    graphs = seen[-1]
    assert graphs.shape.layout == layout
    assert graphs.replayed >= (38 if layout == "packs" else 20), (graphs.replayed, graphs.eager)  # of 40
    eager, graphed = losses(tmp_path / "eager"), losses(tmp_path / "graphs")
    tolerance = 0.02 if recipe else 2e-3  # the same kernels but THD's max_seqlen; FP8 scales see the warm-up
    for step in (1, 5, 10, 20):
        assert graphed[step] == pytest.approx(eager[step], rel=tolerance), step
    assert graphed[1] != graphed[20]  # it trained


@pytest.mark.gpu
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2])
def test_resume_on_gpu_and_export(tmp_path, script):
    common = [
        "num_train_steps=20",
        "use_sequence_packing=true",
        "fp8_config.enabled=true",
        "checkpoint.save_every_n_steps=10",
        "logger.frequency=1",
    ]
    straight = tmp_path / "straight"
    script.main(gpu_cfg(straight, *common, f"checkpoint.ckpt_dir={straight / 'ckpt'}"))
    resumed = tmp_path / "resumed"
    ckpt = f"checkpoint.ckpt_dir={resumed / 'ckpt'}"
    script.main(gpu_cfg(resumed, *common, ckpt, "num_train_steps=10"))
    script.main(gpu_cfg(resumed, *common, ckpt, "checkpoint.save_final_model=true"))
    a, b = losses(straight), losses(resumed)
    assert [b[s] for s in range(11, 21)] == [a[s] for s in range(11, 21)]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resumed / "ckpt" / "final_model", trust_remote_code=True)
    model = model.cuda().eval()
    ids = torch.tensor([[2] + [ord(c) for c in "ACGTACGTAC"]], device="cuda")
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.0  # trained: far below ln(256) = 5.5


@pytest.mark.multi_gpu
@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp2.py"])
def test_two_gpus_fp8_thd(tmp_path, script):
    cmd = [
        *TORCHRUN_2,
        script,
        "--config-name",
        "L0_sanity",
        *GPU,
        "num_train_steps=60",
        "fp8_config.enabled=true",
        "use_sequence_packing=true",
        f"run_dir={tmp_path}",
        f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_every_n_steps=30",
    ]
    run_command(cmd, timeout=900)
    assert losses(tmp_path)[60] < 2.0
    assert len(list((tmp_path / "ckpt" / "step_60").glob("rank_*.pt"))) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2])
def test_nan_steps_are_skipped_on_the_gpu(tmp_path, monkeypatch, script):
    """The fused-AdamW skip under FP8: skipped updates leave no trace, and too many in a row stop the run.

    The skip (`found_inf`, read back one step late) with plain tensors (DDP) and DTensors (FSDP2).
    """
    poisoned_steps, created, make_model = set(), [], script.create_model

    def create_poisoned_model(*args, **kwargs):
        model = make_model(*args, **kwargs)
        poison_embedding_gradients(model, poisoned_steps)
        created.append(model)
        return model

    monkeypatch.setattr(script, "create_model", create_poisoned_model)
    fp8 = ["fp8_config.enabled=true", "use_sequence_packing=true", "on_nonfinite.max_consecutive_skips=2"]
    poisoned_steps.update({3, 4})
    final = script.main(gpu_cfg(tmp_path / "skip", *fp8, "num_train_steps=30"))
    assert final < 4.0 and all(torch.isfinite(p.detach().float()).all() for p in created[0].parameters())
    poisoned_steps.add(5)
    with pytest.raises(FloatingPointError, match="step 5.*max_consecutive_skips=2"):
        script.main(gpu_cfg(tmp_path / "stop", *fp8, "num_train_steps=30"))


@pytest.mark.gpu
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2], ids=["train_ddp", "train_fsdp2"])
def test_dna_switches_on_the_te_path_learn_and_resume_exactly(tmp_path, script):
    """OpenGenome2's DNA switches all at once on TE: the run learns, and resumes exactly.

    FP8 with the first and last layers in BF16 (THD), reverse-complement augmentation, down-weighted soft-masked
    targets, <EOS> masking and <BOS>/<EOS> at record ends only; validation reports the strand gap.
    """
    common = [
        "num_train_steps=16",
        "use_sequence_packing=true",
        "fp8_config.enabled=true",
        "+config_kwargs.fp8_first_last_bf16=true",
        "dataset.reverse_complement_prob=0.5",
        "dataset.lowercase_loss_weight=0.1",
        "dataset.mask_eos_label=true",
        "dataset.bos_eos_only_at_record_ends=true",
        "checkpoint.save_every_n_steps=8",
        "logger.frequency=1",
        "validation.enabled=true",
        "validation.every_n_steps=8",
        "validation.num_windows=16",
    ]
    a, b = train_straight_and_resumed(script.main, gpu_cfg, tmp_path, common, stop_at=8)
    assert [b[s] for s in range(9, 17)] == [a[s] for s in range(9, 17)]
    assert a[16] < a[1] - 1.0, a
    events = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    gaps = [e["val_rc_gap"] for e in events if "val_rc_gap" in e]
    assert len(gaps) == 2 and all(0.0 < g < 1.0 for g in gaps), gaps  # a trained model is not strand-symmetric


@pytest.mark.gpu
def test_two_data_streams_on_one_gpu_resume_exactly(tmp_path):
    """`dataset.data_streams=2` on one GPU (FP8 THD): the rank alternates two streams; a resume is exact."""
    common = [
        "num_train_steps=8",
        "use_sequence_packing=true",
        "fp8_config.enabled=true",
        "dataset.data_streams=2",
        "checkpoint.save_every_n_steps=4",
        "logger.frequency=1",
    ]
    a, b = train_straight_and_resumed(train_fsdp2.main, gpu_cfg, tmp_path, common, stop_at=4)
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    assert a[8] < a[1] - 1.0
    saved = torch.load(tmp_path / "resumed" / "ckpt" / "step_4" / "rank_0.pt", weights_only=False)["dataloader"]
    assert saved["num_streams"] == 2 and sorted(saved["streams"]) == [0, 1]  # one rank, both streams' positions
