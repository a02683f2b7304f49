"""Using a trained model: load it from wherever training left one, and score DNA with it.

    model, tokenizer = load_model("ckpt/final_model")   # or ckpt/best_model, an HF directory, ckpt/step_500
    logps = token_log_probs(model, [ids_a, ids_b])      # per sequence: log p(token t | tokens before t)

On a GPU with TransformerEngine the TE model runs and sequences are packed into THD micro-batches (no
padding, no attention across sequences); elsewhere, or with `use_te=False`, the same weights run as HF
`LlamaForCausalLM`, one sequence at a time. `evaluate.py`, `score.py` and `generate.py` build on this.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from checkpointing.folders import last_line
from checkpointing.format import MARKER, is_complete, read_model_weights
from checkpointing.run_record import read_run_info
from data.sources import load_tokenizer
from model.build import ModelOptions, build_model_config, te_available
from model.convert import hf_config_from_te, hf_to_te_state_dict, te_config_from_hf, te_to_hf_state_dict


def load_model(path, use_te: bool | None = None, device=None, dtype=torch.bfloat16, fp8: bool = False):
    """`(model, tokenizer)` from an exported directory or a `step_N` checkpoint, in eval mode on `device`.

    Exported: `final_model`, `best_model`, any HF Llama directory. TE on a GPU with TE, else HF.
    `fp8`: `token_log_probs` runs the model's FP8 layers under a block-scaled recipe (`scoring_fp8_recipe`).
    """
    path = Path(path)
    use_te = te_available() if use_te is None else use_te
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype if device.type == "cuda" else torch.float32
    if is_complete(path):
        hf_config, state, tokenizer = _from_checkpoint(path)
    elif (path / "config.json").exists():
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        hf_config = hf_config_from_te(config) if config.model_type == "nvllama" else config
        state = _read_weights(path)
        if config.model_type != "nvllama":
            state = hf_to_te_state_dict(state, hf_config)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # our export: its config has auto_map
    else:
        inside = saved_models_in(path)
        raise FileNotFoundError(
            f"{path} is neither an exported model (config.json) nor a complete step_N checkpoint ({MARKER}); "
            + (
                f"it holds {', '.join(inside)}: pass one of those (e.g. "
                f"{path / ('final_model' if 'final_model' in inside else inside[-1])})."
                if inside
                else "point it at <ckpt_dir>/final_model, <ckpt_dir>/best_model, an HF directory or <ckpt_dir>/step_N."
            )
        )
    if not hf_config.tie_word_embeddings and "lm_head.weight" not in state:
        raise ValueError(f"{path} holds no lm_head.weight but its config says the embeddings are not tied.")
    if use_te:
        from model.modeling_llama_te import NVLlamaForCausalLM

        config = te_config_from_hf(hf_config, attn_input_format="thd", dtype=dtype)
        model = NVLlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
    else:
        hf_config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_config)
        missing, unexpected = model.load_state_dict(te_to_hf_state_dict(state, hf_config), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model = model.to(device=device, dtype=dtype).eval()
    if fp8:
        model.scoring_fp8_recipe = scoring_fp8_recipe(use_te, device)
    return model, tokenizer


def scoring_fp8_recipe(use_te: bool, device: torch.device):
    """The FP8 recipe scoring runs under: block scaling (MXFP8 on Blackwell, else 1x128 blocks on Hopper).

    Each token's activations are quantized with scales of their own, so a window's score does not depend
    on the other windows of its pack, as it would with a per-tensor recipe (delayed or current scaling).
    """
    if not (use_te and device.type == "cuda"):
        raise ValueError("--fp8 scores with the TE model on a GPU: drop --fp8 here, or run on a GPU with TE.")
    import transformer_engine.pytorch as te

    from model.fp8 import build_fp8_recipe

    return build_fp8_recipe("MXFP8BlockScaling" if te.is_mxfp8_available() else "Float8BlockScaling")


def training_window(path) -> int | None:
    """The window (`dataset.max_seq_length`) the model at `path` was trained on, from its run record, if any."""
    info = read_run_info(Path(path)) if Path(path).is_dir() else None
    return ((info or {}).get("config") or {}).get("dataset", {}).get("max_seq_length")


def saved_models_in(folder: Path) -> list[str]:
    """The names of what `load_model` takes inside `folder`: exports (config.json) and complete checkpoints."""
    return sorted(p.name for p in folder.glob("*") if (p / "config.json").exists() or is_complete(p))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights.")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def _from_checkpoint(path: Path):
    """The HF config, TE-named weights and tokenizer of a `step_N` checkpoint (DDP or FSDP2 DCP)."""
    info = read_run_info(path)
    if info is None:
        raise ValueError(f"{path} has no run_info.yaml (written by this recipe since it records its config).")
    cfg = info["config"]
    hf_config = build_model_config(ModelOptions(cfg["config_name_or_path"], cfg["config_kwargs"]))
    te_weights = info.get("model") == "TE"  # TE names (fused QKV) in the checkpoint, else HF names
    template = LlamaForCausalLM(hf_config).state_dict()  # the tensors' names and shapes, for DCP's shards
    if hf_config.tie_word_embeddings:
        template.pop("lm_head.weight")
    try:
        weights = read_model_weights(path, hf_to_te_state_dict(template, hf_config) if te_weights else template)
    except (Exception, CheckpointException) as e:  # a damaged or truncated file (DCP's error is a BaseException)
        others = [name for name in saved_models_in(path.parent) if name != path.name]
        raise ValueError(
            f"The weights of {path} could not be read ({last_line(e)}): the checkpoint is damaged. "
            f"Point --model at another checkpoint{' (' + ', '.join(others) + ')' if others else ''} or an export."
        ) from e
    if not te_weights:
        weights = hf_to_te_state_dict(weights, hf_config)
    return hf_config, weights, load_tokenizer(cfg["dataset"]["tokenizer_name_or_path"])


def encode(tokenizer, sequence: str) -> np.ndarray:
    """`<BOS>` + one id per character (no `<EOS>`: the sequence goes on), as int64."""
    ids = tokenizer(sequence, add_special_tokens=False)["input_ids"]
    return np.asarray([tokenizer.bos_token_id, *ids], dtype=np.int64)


def record_windows(tokenizer, sequence: str, window: int) -> list[np.ndarray]:
    """`<BOS>` + consecutive chunks of `window - 1` characters: every base predicted exactly once."""
    return [encode(tokenizer, sequence[i : i + window - 1]) for i in range(0, len(sequence), window - 1)]


@torch.no_grad()
def token_log_probs(model, sequences: list[np.ndarray], max_tokens: int = 16384) -> list[np.ndarray]:
    """For each id sequence, log p(id_t | ids before t) for t = 1..n-1 (float64 on the CPU).

    `model`: a TE or HF model, or a `use.baselines.MarkovModel` (scored through the same path). A THD model
    gets the sequences packed into micro-batches of up to `max_tokens` tokens, one log-softmax and one copy
    to the host each; the copy of one micro-batch is collected while the GPU runs the next.
    """
    if not isinstance(model, torch.nn.Module):  # a k-mer baseline
        return [model.log_probs(np.asarray(s)) for s in sequences]
    device = next(model.parameters()).device
    if getattr(model.config, "attn_input_format", None) != "thd":
        return [_log_probs(model(input_ids=torch.as_tensor(s, device=device)[None]).logits[0], s) for s in sequences]
    out, in_flight = [], None
    for group in _packs(sequences, max_tokens):
        launched = _launch_pack(model, group, device)
        if in_flight is not None:
            out += _collect(*in_flight)
        in_flight = launched
    return out + (_collect(*in_flight) if in_flight is not None else [])


def _packs(sequences: list[np.ndarray], max_tokens: int):
    """Consecutive groups of sequences holding up to `max_tokens` tokens (a longer sequence alone)."""
    group, tokens = [], 0
    for seq in sequences:
        if group and tokens + len(seq) > max_tokens:
            yield group
            group, tokens = [], 0
        group.append(seq)
        tokens += len(seq)
    if group:
        yield group


def _launch_pack(model, group: list[np.ndarray], device):
    """Queue one packed THD forward and the copy of its log-probs to the host; returns what `_collect` needs."""
    lengths = np.cumsum([0] + [len(s) for s in group])
    cu = torch.as_tensor(lengths, dtype=torch.int32).to(device, non_blocking=True)
    ids = torch.as_tensor(np.concatenate(group)).to(device, non_blocking=True)
    longest = max(map(len, group))
    recipe = getattr(model, "scoring_fp8_recipe", None)
    if recipe is not None:  # FP8 GEMMs want the token count a multiple of 128 here: a pad sequence at the end
        pad = -len(ids) % 128
        ids = torch.cat([ids, ids.new_full((pad,), model.config.pad_token_id or 0)])
        cu, longest = (torch.cat([cu, cu[-1:] + pad]), max(longest, pad)) if pad else (cu, longest)
    with _autocast(recipe):
        logits = model(
            input_ids=ids[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest
        ).logits[0]
    # Position t predicts token t + 1 of the pack; at each sequence's last position that is the next
    # sequence's first token, a value `_collect` drops.
    logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, ids[1:, None])[:, 0]
    host = torch.empty(logp.shape, dtype=logp.dtype, pin_memory=device.type == "cuda")
    host.copy_(logp, non_blocking=True)
    done = torch.cuda.Event() if device.type == "cuda" else None
    if done is not None:
        done.record()
    return host, done, lengths


def _autocast(recipe):
    """TE's FP8 autocast with `recipe`, or nothing."""
    if recipe is None:
        return nullcontext()
    import transformer_engine.pytorch as te

    return te.autocast(enabled=True, recipe=recipe)


def _collect(host: torch.Tensor, done, lengths: np.ndarray) -> list[np.ndarray]:
    """Wait for one pack's copy; each sequence's log-probs (its own targets only) as float64."""
    if done is not None:
        done.synchronize()
    flat = host.numpy().astype(np.float64)
    return [flat[a : b - 1] for a, b in zip(lengths[:-1], lengths[1:])]


def _log_probs(logits: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    targets = torch.as_tensor(ids[1:], device=logits.device)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, targets[:, None])[:, 0]
    return logp.double().cpu().numpy()
