"""The command line, before Hydra parses it: upstream spellings, free-form groups without `+`, typos.

    if __name__ == "__main__":
        sys.argv = normalize_command_line(sys.argv)   # exits with one line naming the key and the fix
        main()

Users of NVIDIA's upstream `llama3_native_te` recipe bring its keys. Each is either renamed to ours (same
meaning, logged), or refused with a line that says what to use instead: never silently ignored. Keys of
the groups handed to a library as they are (`config_kwargs.*`, `adamw_kwargs.*`, ...) need no `+`, as
upstream's tier files list them. Any other unknown key gets our suggestion instead of Hydra's advice to
add it with `+` (which would only defer the error to the config check).
"""

import argparse
import difflib
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from runtime.paths import RECIPE_DIR

DEFAULTS_YAML = RECIPE_DIR / "hydra_config" / "defaults.yaml"
# `hydra.run.dir` in defaults.yaml: `run_dir` when set, else Hydra's dated folder.
OmegaConf.register_new_resolver("if_null", lambda value, default: default if value is None else value, replace=True)
# Groups passed on to a library as they are: any key inside is theirs to accept (config/checks.py too).
FREE_FORM_GROUPS = (
    "config_kwargs",
    "dataset.load_dataset_kwargs",
    "validation.load_dataset_kwargs",
    "adamw_kwargs",
    "lr_scheduler_kwargs",
    "fp8_config.fp8_recipe_kwargs",
    "wandb_init_args",
)

# Upstream key (or group, ending in ".") -> ours, with the same meaning.
UPSTREAM_RENAMES = {
    "use_fp32_master_weights": "fp32_master_weights",
    "dataset.split_samples_in_token_packing": "dataset.split_samples",
    "dataset.sequence_column": "dataset.text_column",
    "validation.eval_interval": "validation.every_n_steps",
    "validation.data_path": "validation.load_dataset_kwargs.path",
    "wandb.": "wandb_init_args.",  # wandb.name, wandb.project, wandb.mode, wandb.tags, wandb.dir, ...
    # FP8 primary weights, as upstream's recipe versions spelled the switch over time
    "fp8_config.quantized_model_init_kwargs.enabled": "config_kwargs.use_quantized_model_init",
    "fp8_config.fp8_model_init_kwargs.enabled": "config_kwargs.use_quantized_model_init",
}
# Upstream key (or group) -> why it does not apply here and what to use.
_EDEN = "the SQLite window databases are not read here; point dataset.load_dataset_kwargs.path at parquet or FASTA"
_SHUFFLE = "windows are shuffled in blocks of dataset.buffer_size; set that instead"
_QUANTIZED_INIT = "of its quantized-init options only `enabled` applies here (config_kwargs.use_quantized_model_init)"
UPSTREAM_REFUSED = {
    "use_megatron_loss": "the loss here is always the per-token mean over all micro-batches and ranks "
    "(Megatron's reduction); drop the key",
    "use_sharded_eden": _EDEN,
    "sharded_eden.": _EDEN,
    **dict.fromkeys(
        [
            "dataset.shuffle_sequences",
            "dataset.shuffle_windows",
            "dataset.interleaved_shuffle",
            "dataset.interleave_chunks",
            "dataset.interleave_skip",
        ],
        _SHUFFLE,
    ),
    "lr_scheduler_kwargs.num_training_steps": "use lr_scheduler_kwargs.num_decay_steps = num_training_steps - "
    "num_warmup_steps (warmup, then cosine decay over num_decay_steps)",
    "fp8_config.fp8_model_init_kwargs.": _QUANTIZED_INIT,
    "fp8_config.quantized_model_init_kwargs.": _QUANTIZED_INIT,
    "fp4_config.": "NVFP4 training is not available yet (it needs a Blackwell GPU); use fp8_config",
}


def known_keys() -> set[str]:
    """Every dotted key of defaults.yaml (groups included)."""
    keys = set()

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            keys.add(prefix + key)
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(OmegaConf.load(DEFAULTS_YAML), resolve=False), "")
    return keys


def _matches(key: str, table: dict) -> str | None:
    """The table entry for `key`: an exact key, or a group ("name.") that holds it or is it."""
    for name in table:
        if key == name or (name.endswith(".") and (key.startswith(name) or key == name[:-1])):
            return name
    return None


def upstream_hint(key: str) -> str | None:
    """For an upstream key: what to use here instead (None for keys upstream does not have)."""
    name = _matches(key, UPSTREAM_REFUSED)
    if name:
        return f"{key!r} is a key of the upstream recipe: {UPSTREAM_REFUSED[name]}."
    ours = _renamed(key)
    return f"{key!r} is spelled {ours} here." if ours else None


def _renamed(key: str) -> str | None:
    """Our name for an upstream key of the same meaning, else None."""
    name = _matches(key, UPSTREAM_RENAMES)
    if name is None:
        return None
    return UPSTREAM_RENAMES[name] + key[len(name) :] if name.endswith(".") else UPSTREAM_RENAMES[name]


OVERRIDE = re.compile(r"^(\+\+|\+|~)?([A-Za-z_][\w.\-]*)(=.*)?$", re.S)


def normalize_command_line(argv: list[str]) -> list[str]:
    """`argv` with upstream keys renamed and free-form keys made addable; exits on an unknown key."""
    keys = known_keys()
    out = argv[:1]
    # Another folder's config files (e.g. a copy of upstream's hydra_config/) may lack our keys: add or set them.
    foreign = any(a in ("--config-path", "-cp", "--config-dir", "-cd") or a.startswith("--config-path=") for a in argv)
    for arg in argv[1:]:
        match = OVERRIDE.match(arg)
        if arg.startswith("-") or not match or "=" not in arg and not match.group(1):
            out.append(arg)  # a flag, a flag's value, or not an override
            continue
        op, key, value = match.group(1) or "", match.group(2), match.group(3) or ""
        if key == "hydra" or key.startswith("hydra."):
            out.append(arg)
            continue
        ours = _renamed(key)
        if ours:
            print(f"Upstream key {key} -> {ours}", file=sys.stderr)
            if key == "validation.data_path" and value in ("=null", "=None", "="):
                continue  # no separate validation set: the default
            key = ours
        if _matches(key, UPSTREAM_REFUSED):
            _exit(upstream_hint(key))
        free_form = any(key.startswith(group + ".") for group in FREE_FORM_GROUPS)
        if (free_form or foreign) and op == "":
            op = "++"  # add or replace, whether or not the tier file lists the key
        elif key not in keys and op == "" and not free_form:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f"; did you mean {close[0]}?" if close else "."
            _exit(
                f"Unknown config key {key!r}{hint} Every key is listed, with what it does, in "
                "hydra_config/defaults.yaml."
            )
        out.append(f"{op}{key}{value}")
    return out


_ABSENT = object()


def adopt_config_file(cfg: DictConfig) -> DictConfig:
    """A config composed from another folder's files (`--config-path` to a copy of upstream's `hydra_config/`).

    Upstream spellings in the files are renamed as on the command line (logged; a command-line value under
    our name wins), and every key of ours that the files lack takes our default. Our own tiers pass unchanged.
    """
    container = OmegaConf.to_container(cfg, resolve=False)
    ours = OmegaConf.to_container(OmegaConf.load(DEFAULTS_YAML), resolve=False)
    ours.pop("defaults", None)
    ours.pop("hydra", None)
    renamed = [(key, new) for key in _leaf_keys(container) if (new := _renamed(key))]
    missing = [key for key in _leaf_keys(ours) if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT]
    if not renamed and not missing:
        return cfg
    for key, new in renamed:
        value = _pop(container, key)
        print(f"Upstream key {key} -> {new} (config file)", file=sys.stderr)
        if key == "validation.data_path" and value is None:
            continue  # no separate validation set: the default
        *groups, leaf = new.split(".")
        node = functools.reduce(lambda group, name: group.setdefault(name, {}), groups, container)
        node.setdefault(leaf, value)  # a command-line value under our name wins
    return OmegaConf.merge(OmegaConf.create(ours), OmegaConf.create(container))


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def _pop(node: dict, key: str):
    """Remove a dotted key from nested dicts (and the groups it leaves empty); returns its value."""
    head, _, rest = key.partition(".")
    if not rest:
        return node.pop(head)
    value = _pop(node[head], rest)
    if not node[head]:
        del node[head]
    return value


def _exit(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)


def exit_on_user_error(main):
    """Decorate a Hydra task: a bad key, value, path or data ends the run in one line, exit code 2.

    A `ValueError`/`FileNotFoundError` prints its message instead of Hydra's traceback; only when Hydra
    launched the run from the command line (`main(cfg)` called in code raises as usual).
    `HYDRA_FULL_ERROR=1` shows the traceback (for an error that is not the user's).
    """

    @functools.wraps(main)
    def run(cfg):
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return main(cfg)
        cfg = adopt_config_file(cfg)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return main(cfg)
        try:
            return main(cfg)
        except (ValueError, FileNotFoundError) as e:
            _fail(user_message(e), code=2)
        except torch.OutOfMemoryError as e:
            _fail(out_of_memory_message(cfg, e), code=1)

    return run


class ToolHelp(argparse.RawDescriptionHelpFormatter):
    """A tool's --help: its docstring as written, and each option's default where it has one."""

    def _get_help_string(self, action):
        shown = action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in (action.help or "")
        return f"{action.help or ''} (default: %(default)s)" if shown else action.help


def run_tool(main) -> None:
    """Run a tool's `main()` (evaluate.py, score.py, generate.py): a user error ends it in one line, exit 2.

    A bad option, path or input prints its message, not a traceback (`HYDRA_FULL_ERROR=1` shows it).
    """
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return main()
    try:
        main()
    except (ValueError, FileNotFoundError, NotADirectoryError, UnicodeDecodeError) as e:
        _fail(user_message(e), code=2)


def user_message(error: Exception) -> str:
    """The error's own message; for one re-raised from a loader worker, without the worker's traceback.

    (PyTorch re-raises a worker's exception as "Caught X in DataLoader worker process N. Original Traceback
    ...", the original message on the last line.)
    """
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(error).__name__}: ") else last


def out_of_memory_message(cfg, error: Exception) -> str:
    """Out of GPU memory, in one line: how much was asked for, and the memory options this run has not used."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
    options = []
    if not cfg.get("use_gradient_checkpointing"):
        options.append("use_gradient_checkpointing=true (recompute each layer in backward)")
    if not cfg.get("activation_cpu_offload"):
        options.append("activation_cpu_offload=true with use_gradient_checkpointing (layer inputs in CPU memory)")
    if not cfg.get("loss_chunk_size"):
        options.append("loss_chunk_size=4096 (never hold the full logits)")
    if cfg.dataset.micro_batch_size > 1:
        options.append(f"a smaller dataset.micro_batch_size (now {cfg.dataset.micro_batch_size}) with grad_acc_steps")
    options.append("context parallelism over more GPUs (torchrun --nproc_per_node=N train_fsdp2_cp.py cp_size=N)")
    return (
        f"Out of GPU memory at dataset.max_seq_length={cfg.dataset.max_seq_length} ({first[:120]}). "
        f"Turn on: {'; '.join(options)}."
    )


def _fail(message: str, code: int) -> None:
    """End the run with `Error: message` as the last line (also in torchrun's closing report)."""
    print(f"Error: {message}\n(HYDRA_FULL_ERROR=1 shows the traceback.)", file=sys.stderr)
    _tell_torchrun(f"Error: {message}")
    sys.exit(code)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, put `message` in this rank's error file.

    torchrun's closing failure report, the last thing on screen, then quotes it in place of a traceback.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
        Path(path).write_text(json.dumps({"message": record}))
