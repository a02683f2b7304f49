"""Upstream users' keys and commands: renamed with the same meaning, or refused with the replacement named.

The command line is rewritten before Hydra sees it (`command_line.normalize_command_line`); typos get our
suggestion, from the real command line, as one line and exit code 2.
"""

import re
import subprocess
import sys

import pytest
import torch
from conftest import ENV, FAST, PARQUET, RECIPE_DIR, build_model, build_model_config_of, losses, make_cfg, run_command

from checkpointing.run_record import read_run_info
from config.checks import validate_config
from config.command_line import normalize_command_line
from runtime.distributed import DistributedConfig


def normalized(*args):
    return normalize_command_line(["train_fsdp2.py", *args])[1:]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("config_kwargs.num_hidden_layers=2", "++config_kwargs.num_hidden_layers=2"),  # no + needed
        ("adamw_kwargs.amsgrad=true", "++adamw_kwargs.amsgrad=true"),
        ("use_fp32_master_weights=true", "fp32_master_weights=true"),
        ("dataset.split_samples_in_token_packing=false", "dataset.split_samples=false"),
        ("dataset.sequence_column=text", "dataset.text_column=text"),
        ("validation.eval_interval=500", "validation.every_n_steps=500"),
        ("validation.data_path=/data/val.fa", "++validation.load_dataset_kwargs.path=/data/val.fa"),
        ("wandb.project=dna", "++wandb_init_args.project=dna"),
        ("wandb.tags=[a,b]", "++wandb_init_args.tags=[a,b]"),
        ("+config_kwargs.num_hidden_layers=2", "+config_kwargs.num_hidden_layers=2"),  # Hydra's own forms stay
        ("num_train_steps=3", "num_train_steps=3"),
        ("hydra.run.dir=/tmp/x", "hydra.run.dir=/tmp/x"),
        ("fp8_config.quantized_model_init_kwargs.enabled=true", "++config_kwargs.use_quantized_model_init=true"),
        ("fp8_config.fp8_model_init_kwargs.enabled=true", "++config_kwargs.use_quantized_model_init=true"),
    ],  # fmt: skip
)
def test_upstream_spellings_are_rewritten(given, expected):
    assert normalized("--config-name", "L0_sanity", given) == ["--config-name", "L0_sanity", expected]


def test_rewritten_overrides_compose():
    """`++` adds into groups whether the tier file lists the key or the group is null."""
    overrides = normalized("validation.data_path=/data/val.fa", "config_kwargs.num_hidden_layers=2", "wandb.tags=[a]")
    cfg = make_cfg(RECIPE_DIR / "unused", *overrides)
    assert cfg.validation.load_dataset_kwargs.path == "/data/val.fa" and cfg.config_kwargs.num_hidden_layers == 2
    assert list(cfg.wandb_init_args.tags) == ["a"]


def test_no_separate_validation_set_is_the_default():
    assert normalized("validation.data_path=null") == []


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("num_train_step=3", "Unknown config key 'num_train_step'; did you mean num_train_steps?"),
        ("dataset.micro_batchsize=4", "did you mean dataset.micro_batch_size?"),
        ("use_megatron_loss=true", "always the per-token mean over all micro-batches and ranks"),
        ("fp8_config.quantized_model_init_kwargs.preserve_high_precision_init_val=true", "only `enabled` applies"),
        ("lr_scheduler_kwargs.num_training_steps=1000", "num_decay_steps = num_training_steps - num_warmup_steps"),
        ("dataset.shuffle_windows=true", "dataset.buffer_size"),
        ("use_sharded_eden=true", "parquet or FASTA"),
        ("fp4_config.enabled=true", "NVFP4 training is not available yet"),
    ],  # fmt: skip
)
def test_unknown_and_refused_keys_exit_with_one_line(given, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        normalized(given)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_typo_on_the_real_command_line_gets_our_suggestion():
    result = subprocess.run([sys.executable, "train_fsdp2.py", "--config-name", "L0_sanity", "num_train_step=3"],
                            cwd=RECIPE_DIR, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: Unknown config key 'num_train_step'; did you mean num_train_steps?"), last
    assert "Traceback" not in result.stderr and "+num_train_step" not in result.stderr


@pytest.mark.slow
def test_an_upstream_command_line_trains_with_the_same_meaning(tmp_path):
    """Upstream spellings, `config_kwargs.*` without `+`, save_every_n_steps=null (never); a clean run folder."""
    ckpt, cwd = tmp_path / "ckpt", tmp_path / "cwd"
    cwd.mkdir()
    command = [sys.executable, str(RECIPE_DIR / "train_fsdp2.py"), "--config-name", "L0_sanity", *FAST,
               "num_train_steps=3", "config_kwargs.num_hidden_layers=1", "use_fp32_master_weights=false",
               "wandb.mode=disabled", "dataset.split_samples_in_token_packing=false",
               "checkpoint.save_every_n_steps=null",
               f"checkpoint.ckpt_dir={ckpt}", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The run folder holds what the run wrote, and nothing else appears: no outputs/<date> (hydra.run.dir follows
    # run_dir), no .hydra (hydra.output_subdir: null), no empty <script>.log (hydra/job_logging: none).
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "metrics.jsonl", "run_info.yaml"]
    assert not list(cwd.iterdir())
    assert "set_vital" not in result.stderr  # no deprecation noise from the loader
    # Not a terminal: no progress bar, so every log line stands on its own line.
    assert "it/s" not in result.stderr
    assert [x[:7] for x in result.stdout.splitlines()] == ["step=1 ", "step=2 ", "step=3 "]
    info = read_run_info(tmp_path / "run")
    assert info["model_shape"]["num_hidden_layers"] == 1  # reached the model, not just the config
    assert info["config"]["dataset"]["split_samples"] is False
    assert info["config"]["wandb_init_args"]["mode"] == "disabled"
    assert not list(ckpt.glob("step_*"))  # null: no interval saves


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["use_sequence_packing=true", "+config_kwargs.attn_input_format=bshd"], "set use_sequence_packing=false"),
        (["+config_kwargs.self_attn_mask_type=no_mask"], "is not causal"),
        (["dataset.max_seq_length=2"], "dataset.max_seq_length=2 leaves no room"),
        (["+use_megatron_loss=true"], "'use_megatron_loss' is a key of the upstream recipe"),
    ],  # fmt: skip
)
def test_config_errors_for_upstream_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(make_cfg(tmp_path, *overrides), use_te=False)


@pytest.mark.parametrize(
    ("packing", "layout", "built"),
    [(True, "thd", "thd"), (False, "bshd", "bshd"), (False, "thd", "thd"), (False, None, "thd"), (True, None, "thd")],
)
def test_attn_input_format_decides_how_bshd_batches_run(tmp_path, packing, layout, built):
    """Padded BSHD by asking for bshd; otherwise the TE model takes BSHD micro-batches as packed rows (thd)."""
    from config.options import packs_rows

    extra = [f"+config_kwargs.attn_input_format={layout}"] if layout else []
    cfg = make_cfg(tmp_path, f"use_sequence_packing={packing}", *extra, "+config_kwargs.self_attn_mask_type=causal",
                   "checkpoint.save_every_n_steps=null")  # fmt: skip
    validate_config(cfg, use_te=False)
    te_config = build_model_config_of(cfg, use_te=True)  # what the TE model is built from
    assert te_config.attn_input_format == built and te_config.self_attn_mask_type == "causal"
    assert packs_rows(cfg, use_te=True) == (not packing and built == "thd")
    assert not packs_rows(cfg, use_te=False)  # the HF reference keeps padded BSHD
    cfg.cp_size = 2
    assert not packs_rows(cfg, use_te=True)  # CP shards padded BSHD rows itself


def test_config_kwargs_the_model_config_lacks_are_refused(tmp_path):
    cfg = make_cfg(tmp_path, "+config_kwargs.num_hiden_layers=2")
    with pytest.raises(ValueError, match=r"config_kwargs \['num_hiden_layers'\] are not fields of LlamaConfig"):
        build_model_config_of(cfg, use_te=False)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], None),  # OpenGenome2's default (false): every layer follows the FP8 autocast
        (["+config_kwargs.fp8_first_last_bf16=true"], [None, "fp8", "fp8", None]),
        (["+config_kwargs.fp8_first_last_bf16=true", "+config_kwargs.num_layers_at_start_in_bf16=2",
          "+config_kwargs.num_layers_at_end_in_bf16=0"], [None, None, "fp8", "fp8"]),
        (["+config_kwargs.fp8_first_last_bf16=false", "+config_kwargs.num_layers_at_start_in_bf16=3"], None),
    ],
)  # fmt: skip
def test_fp8_first_last_bf16_keeps_layers_in_bf16_as_upstream_counts_them(tmp_path, overrides, expected):
    """OpenGenome2's keys (at its defaults too) become the TE config's layer_precision; the HF path ignores them."""
    cfg = make_cfg(tmp_path, "fp8_config.enabled=true", *overrides)  # L0_sanity: 4 layers
    assert build_model_config_of(cfg, use_te=True).layer_precision == expected
    assert not hasattr(build_model_config_of(cfg, use_te=False), "fp8_first_last_bf16")
    both = make_cfg(tmp_path, "fp8_config.enabled=true", "+config_kwargs.fp8_first_last_bf16=true",
                    "+config_kwargs.layer_precision=[null,fp8,fp8,fp8]")  # fmt: skip
    with pytest.raises(ValueError, match="both choose the BF16 layers"):
        validate_config(both, use_te=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grad_acc_steps=0"], "Error: grad_acc_steps=0 must be a positive integer."),
        (
            ["dataset.load_dataset_kwargs.path=/no/such.parquet"],
            "Error: dataset.load_dataset_kwargs.path='/no/such.parquet' does not exist",
        ),
        (
            ["dataset.tokenizer_name_or_path=no-such/tokenizer"],
            "Error: dataset.tokenizer_name_or_path='no-such/tokenizer' is not a tokenizer folder here",
        ),
    ],  # fmt: skip
)
def test_user_errors_are_one_line_before_the_model_is_built(tmp_path, args, message):
    """What the user got wrong: one line, exit code 2, no traceback; paths and tokenizer checked before the model."""
    command = [sys.executable, "train_fsdp2.py", "--config-name", "L0_sanity", *FAST, f"run_dir={tmp_path}", *args]
    result = subprocess.run(command, cwd=RECIPE_DIR, env={**ENV, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "Model:" not in result.stderr + result.stdout  # nothing heavy was built first


def test_the_run_and_the_tests_install_the_same_library_versions():
    """requirements-dev.txt adds test tools only: the versions a run installs are the ones tested."""

    def names(path):
        lines = (RECIPE_DIR / path).read_text().splitlines()
        return {re.split(r"[<>=!~\[ ]", x.strip())[0].lower() for x in lines if x.strip() and x[0] not in "#-"}

    assert "-c constraints.txt" in (RECIPE_DIR / "requirements.txt").read_text()
    assert "-r requirements.txt" in (RECIPE_DIR / "requirements-dev.txt").read_text()
    assert not names("requirements-dev.txt") & (names("requirements.txt") | names("constraints.txt"))
    assert names("constraints.txt") <= names("requirements.txt")


@pytest.mark.slow
def test_under_torchrun_the_error_is_the_last_thing_on_screen(tmp_path):
    """The closing failure report of torchrun quotes the rank's one-line error instead of a traceback."""
    from conftest import TORCHRUN_2

    command = [*TORCHRUN_2, "train_fsdp2.py", "--config-name", "L0_sanity", *FAST, f"run_dir={tmp_path}",
               "grad_acc_steps=0"]  # fmt: skip
    result = subprocess.run(command, cwd=RECIPE_DIR, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [x.strip() for x in (result.stdout + result.stderr).splitlines() if x.strip().strip("=")]
    assert result.returncode != 0
    assert lines[-1] == "traceback : Error: grad_acc_steps=0 must be a positive integer.", lines[-12:]


@pytest.mark.parametrize(
    ("overrides", "use_te", "message"),
    [
        (["+config_kwargs.layer_precision=[fp8,null]"], False, "layer_precision is a TE-model option"),
        (["+config_kwargs.layer_precision=[fp8,null]"], True, "layer_precision needs fp8_config.enabled=true"),
        (["+config_kwargs.layer_precision=[fp4,fp8]"], True, "NVFP4 needs a Blackwell GPU"),
        (["+config_kwargs.use_quantized_model_init=true"], True, "use_quantized_model_init=true needs fp8_config"),
    ],  # fmt: skip
)
def test_per_layer_precision_and_quantized_init_are_checked(tmp_path, overrides, use_te, message):
    with pytest.raises(ValueError, match=message):
        validate_config(make_cfg(tmp_path, *overrides), use_te=use_te)


def test_per_layer_precision_reaches_the_te_model_config(tmp_path):
    from model.convert import hf_config_from_te
    from model.modeling_llama_te import NVLlamaConfig

    cfg = make_cfg(tmp_path, "+config_kwargs.num_hidden_layers=3", "+config_kwargs.layer_precision=[null,fp8,null]",
                   "+config_kwargs.use_quantized_model_init=true")  # fmt: skip
    config = build_model_config_of(cfg, use_te=True)
    assert [config.keeps_bf16(i) for i in range(3)] == [True, False, True] and config.use_quantized_model_init
    assert not hasattr(hf_config_from_te(config), "layer_precision")  # the plain-Llama export drops them
    with pytest.raises(ValueError, match="must list 'fp8' or null for each of the 3 layers"):
        NVLlamaConfig(num_hidden_layers=3, layer_precision=["fp8"])


def test_out_of_memory_ends_in_one_line_naming_the_memory_options(tmp_path, monkeypatch, capsys):
    import torch
    from hydra.core.hydra_config import HydraConfig

    from config.command_line import exit_on_user_error

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))  # as when launched by Hydra

    @exit_on_user_error
    def main(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB.\nmore detail")

    with pytest.raises(SystemExit) as exit_info:
        main(make_cfg(tmp_path, "use_gradient_checkpointing=true"))
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("Error: Out of GPU memory at dataset.max_seq_length=256 (CUDA out of memory. Tried")
    assert "loss_chunk_size=4096" in error and "cp_size=N" in error
    assert "use_gradient_checkpointing=true (" not in error  # already on: not suggested
    assert "activation_cpu_offload=true" in error


def init_stds(model) -> dict[str, float]:
    """The std of each parameter group of a built HF Llama (embedding, output projections, other matrices)."""
    layers = model.model.layers
    groups = {
        "embedding": [model.model.embed_tokens.weight],
        "output": [w for layer in layers for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)],
        "other": [w for layer in layers for w in (layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight)],
    }
    return {name: torch.cat([w.detach().flatten() for w in weights]).std().item() for name, weights in groups.items()}


def test_opengenome2_inits_set_each_groups_std(tmp_path):
    """Spike-No-More (embedding std 1.0, untied head) and Megatron's scaled init (std / sqrt(2 x 4 layers)).

    On the HF reference model as built; the TE model's config carries the same stds for `_init_weights` (its
    built weights are measured in tests/test_upstream_gpu.py, with and without the meta device).
    """
    torch.manual_seed(0)
    default = init_stds(build_model(make_cfg(tmp_path)))
    og2 = make_cfg(tmp_path, "spike_no_more_embedding_init=true", "use_megatron_scaled_init=true")
    torch.manual_seed(0)
    model = build_model(og2)
    scaled = init_stds(model)
    assert default == pytest.approx({"embedding": 0.02, "output": 0.02, "other": 0.02}, rel=0.03)
    assert scaled == pytest.approx({"embedding": 1.0, "output": 0.02 / 8**0.5, "other": 0.02}, rel=0.03)
    assert not model.config.tie_word_embeddings and model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.03)
    te_config = build_model_config_of(og2, use_te=True)
    assert (te_config.embedding_std, te_config.output_layer_std) == (1.0, pytest.approx(0.02 / 8**0.5))
    assert not te_config.tie_word_embeddings


@pytest.mark.parametrize("streaming", [True, False])
def test_upstream_create_tokenized_dataset_yields_lists(tokenizer, streaming):
    """`dataset.create_tokenized_dataset` rows hold lists of ints, streamed or not, as upstream's loader yields."""
    import dataset

    source = {"path": PARQUET, "split": "train", "streaming": streaming}
    rows = dataset.create_tokenized_dataset(DistributedConfig(), tokenizer, source, 64, 8)
    first = next(iter(rows))["input_ids"]
    assert type(first) is list and type(first[0]) is int and len(first) == 64 and first[0] == tokenizer.bos_token_id


UPSTREAM_STYLE_DEFAULTS = """
config_name_or_path: ./model_configs/llama3-tiny
use_te: false
use_fp32_master_weights: false
num_train_steps: 2
dataset:
  tokenizer_name_or_path: ./tokenizers/nucleotide_fast_tokenizer
  micro_batch_size: 2
  max_seq_length: 256
  stride: 16
  num_workers: 0
  load_dataset_kwargs:
    path: ./test_genomic_sequences.parquet
validation:
  enabled: true
  eval_interval: 5
  data_path: null
wandb:
  name: upstream_style
  mode: disabled
fp8_config:
  enabled: false
  quantized_model_init_kwargs:
    enabled: false
"""


@pytest.mark.slow
def test_a_config_folder_in_upstream_spelling_runs_with_our_defaults_for_the_rest(tmp_path):
    """`--config-path` to config files written as upstream's are (its spellings, its own defaults file)."""
    from omegaconf import OmegaConf

    folder = tmp_path / "upstream_configs"
    folder.mkdir()
    (folder / "defaults.yaml").write_text(UPSTREAM_STYLE_DEFAULTS)
    (folder / "tier.yaml").write_text("defaults:\n  - defaults\n  - _self_\n\nadamw_kwargs:\n  lr: 0.001\n")
    run = tmp_path / "run"
    result = run_command(
        [
            sys.executable,
            "train_fsdp2.py",
            "--config-path",
            str(folder),
            "--config-name",
            "tier",
            f"run_dir={run}",
            "validation.eval_interval=2",
            "validation.num_windows=4",
        ]
    )
    for key, ours in [
        ("use_fp32_master_weights", "fp32_master_weights"),
        ("wandb.name", "wandb_init_args.name"),
        ("validation.eval_interval", "validation.every_n_steps"),
    ]:
        assert f"Upstream key {key} -> {ours} (config file)" in result.stderr
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.validation.every_n_steps == 2  # the command line's value, given in upstream's spelling, wins
    assert saved.wandb_init_args.name == "upstream_style" and saved.fp32_master_weights is False
    assert saved.validation.load_dataset_kwargs is None and saved.adamw_kwargs.lr == 0.001
    assert saved.dataset.data_streams is None and saved.checkpoint.save_every_n_steps == 50  # ours, not in the files
    assert max(losses(run)) == 2
