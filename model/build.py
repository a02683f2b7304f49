"""Building the model the entrypoints train: its config, the TE or HF model, recomputation and compilation.

    model = create_model(ModelOptions("./model_configs/llama3-tiny", {}, use_te=False), device)
    model = create_model(options.model, device)            # the entrypoints: `config.checks.check_config` made it

`ModelOptions` is the schema: the top-level keys of `defaults.yaml` the model is built from, under their names
(`config.options.model_options` fills it from a run's config). Order (torchtitan's): build -> activation
checkpointing -> compile each decoder layer here; FSDP2/DDP wrapping and meta-device materialisation follow in
the entrypoint (`model/parallelize.py`).
"""

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, LlamaForCausalLM

from model.modeling_llama_te import causal_lm_loss
from model.shape import count_parameters
from runtime.paths import resolve_path

logger = logging.getLogger(__name__)
# config_kwargs that only the TE model's config has (HF's LlamaConfig would drop them).
TE_CONFIG_KEYS = ("attn_input_format", "self_attn_mask_type", "layer_precision", "use_quantized_model_init")
# OpenGenome2's spelling of layer_precision: the first and last layers in BF16 under FP8 (`bf16_layer_precision`).
FIRST_LAST_BF16_KEYS = ("fp8_first_last_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


@dataclass(frozen=True)
class ModelOptions:
    """What the model is built from; each field is the `defaults.yaml` key of the same name."""

    config_name_or_path: str
    config_kwargs: dict = field(default_factory=dict)
    use_te: bool = False
    attn_input_format: str = "thd"  # the layout the TE model gets: "thd" (packed or packed rows) or "bshd" (padded)
    fp32_master_weights: bool = False
    loss_chunk_size: int | None = None
    use_meta_device: bool = False  # TE only: build on meta, each rank materialises its shard after wrapping
    use_gradient_checkpointing: bool = False
    activation_cpu_offload: bool = False
    use_torch_compile: bool = False
    fp8_config: dict | None = None  # the run's FP8 recipe (`fp8_config` group) when FP8 is on, else None
    spike_no_more_embedding_init: bool = False  # embedding std 1.0, untied LM head (OpenGenome2)
    use_megatron_scaled_init: bool = False  # attention output and MLP down projections: std / sqrt(2 x layers)

    @property
    def on_meta(self) -> bool:
        """Whether the model is built on the meta device (TE only: HF's reference model is built directly)."""
        return self.use_te and self.use_meta_device


def te_available() -> bool:
    """True where the TE model can run: TransformerEngine imports and a CUDA GPU is present."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def hf_config_from(config_name_or_path: str, config_kwargs: dict, dtype: torch.dtype):
    """The HF config of a model folder or hub name with `config_kwargs` applied; unknown kwargs are an error.

    `rope_theta` and `rope_scaling`, as Llama configs and the upstream tiers spell them, update the config's
    `rope_parameters` (transformers 5 reads only those: `rope_theta` alone would be dropped, and `rope_scaling`
    would replace them, losing the theta).
    """
    path = resolve_path(config_name_or_path)
    kwargs = {**config_kwargs, "dtype": config_kwargs.get("dtype", dtype)}
    rope = {key: kwargs.pop(key) for key in ("rope_theta", "rope_scaling") if key in kwargs}
    try:
        hf_config, unused = AutoConfig.from_pretrained(
            str(path) if path.exists() else config_name_or_path, return_unused_kwargs=True, **kwargs
        )
    except OSError as e:  # neither a local folder nor a hub name that can be fetched
        raise FileNotFoundError(
            f"config_name_or_path={config_name_or_path!r} is not a model config folder here and could not be "
            f"fetched from the hub ({str(e).splitlines()[0]}). Use e.g. ./model_configs/meta-llama/Llama-3.2-1B."
        ) from e
    if unused:  # from_pretrained drops what the config class lacks: say so instead
        raise ValueError(
            f"config_kwargs {sorted(unused)} are not fields of {type(hf_config).__name__} and would do nothing; "
            "drop them (model fields: e.g. num_hidden_layers, hidden_size, vocab_size)."
        )
    if rope:
        parameters = {**(getattr(hf_config, "rope_parameters", None) or {}), **(rope.get("rope_scaling") or {})}
        if "rope_theta" in rope:
            parameters["rope_theta"] = float(rope["rope_theta"])
        hf_config.rope_parameters = parameters
    return hf_config


def build_model_config(options: ModelOptions):
    """The HF config from `config_name_or_path` + `config_kwargs`, turned into an `NVLlamaConfig` for TE."""
    kwargs = dict(options.config_kwargs)
    te_only = {k: kwargs.pop(k) for k in TE_CONFIG_KEYS if k in kwargs}  # checked by config/checks.py
    first_last = {k: kwargs.pop(k) for k in FIRST_LAST_BF16_KEYS if k in kwargs}
    # Parameters are bf16 on GPUs (TE or the HF reference) unless FSDP2 keeps fp32 master weights; fp32 on CPUs.
    bf16 = torch.cuda.is_available() and not options.fp32_master_weights
    hf_config = hf_config_from(options.config_name_or_path, kwargs, torch.bfloat16 if bf16 else torch.float32)
    if options.spike_no_more_embedding_init:
        hf_config.tie_word_embeddings = False  # a std-1.0 embedding would make a poor LM head (upstream unties it)
    if not options.use_te:
        hf_config._attn_implementation = "sdpa"
        # Without a KV cache HF's sdpa path reads packed THD batches' position_ids as sequence boundaries; with
        # one (its default), tokens attend across the packed sequences.
        hf_config.use_cache = False
        return hf_config
    from model.convert import te_config_from_hf

    te_only["attn_input_format"] = options.attn_input_format  # the layout follows the data (config/options.py)
    te_only["embedding_init_std"] = 1.0 if options.spike_no_more_embedding_init else None
    te_only["use_megatron_scaled_init"] = options.use_megatron_scaled_init
    if first_last.get("fp8_first_last_bf16") and options.fp8_config:  # without FP8 it changes nothing, as upstream
        start, end = first_last.get("num_layers_at_start_in_bf16", 1), first_last.get("num_layers_at_end_in_bf16", 1)
        te_only["layer_precision"] = bf16_layer_precision(hf_config.num_hidden_layers, start, end)
    return te_config_from_hf(hf_config, loss_chunk_size=options.loss_chunk_size, **te_only)


def bf16_layer_precision(num_layers: int, start: int, end: int) -> list[str | None]:
    """`layer_precision` with the first `start` and last `end` layers in BF16 (None), the others FP8.

    OpenGenome2's `fp8_first_last_bf16` counts them so: layer i stays BF16 when i < start or i >= layers - end.
    """
    return [None if i < start or i >= num_layers - end else "fp8" for i in range(num_layers)]


def checkpoint_bytes(options: ModelOptions) -> int:
    """About the bytes of one checkpoint: parameters and AdamW's two moments, in the parameters' dtype."""
    config = build_model_config(options)
    return 3 * count_parameters(config) * (2 if config.dtype == torch.bfloat16 else 4)


def create_model(options: ModelOptions, device: torch.device):
    """The TE model (the product) or HF `LlamaForCausalLM` (the reference), on `device` or on meta.

    With `use_gradient_checkpointing` its decoder layers recompute in backward; with `use_torch_compile`
    each decoder layer is compiled. Wrapping (FSDP2, DDP) is the entrypoint's.
    """
    config = build_model_config(options)
    if options.use_te:
        from model.modeling_llama_te import NVLlamaForCausalLM

        with torch.device("meta") if options.on_meta else nullcontext(), quantized_init(options.fp8_config, config):
            model = NVLlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config).to(device, dtype=config.dtype)  # the constructor ignores config.dtype
        model.loss_function = causal_lm_loss  # HF's loss, plus per-target weights (dataset.lowercase_loss_weight)
        opengenome2_init(model, options)
    if options.use_gradient_checkpointing:
        apply_activation_checkpointing(model, options.use_te, offload_to_cpu=options.activation_cpu_offload)
    if options.use_torch_compile:
        compile_decoder_layers(model)
    logger.info(
        "Model: %s (%s), %.1fM parameters, %s%s",
        type(model).__name__,
        "TransformerEngine" if options.use_te else "HF reference, no TE",
        sum(p.numel() for p in model.parameters()) / 1e6,
        "meta device" if options.on_meta else device,
        ", decoder layers compiled" if options.use_torch_compile else "",
    )
    return model


@torch.no_grad()
def opengenome2_init(hf_model, options: ModelOptions) -> None:
    """OpenGenome2's inits on the HF reference model, as `NVLlamaPreTrainedModel._init_weights` makes them for TE.

    Spike-No-More: the embedding drawn with std 1.0; Megatron's scaled init: the attention output and MLP down
    projections with std initializer_range / sqrt(2 x layers).
    """
    config = hf_model.config
    if options.spike_no_more_embedding_init:
        hf_model.model.embed_tokens.weight.normal_(0.0, 1.0)
    if options.use_megatron_scaled_init:
        std = config.initializer_range / math.sqrt(2.0 * config.num_hidden_layers)
        for layer in hf_model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, std)
            layer.mlp.down_proj.weight.normal_(0.0, std)


def quantized_init(fp8_config: dict | None, config):
    """TE's `quantized_model_init` with the run's FP8 recipe when `config_kwargs.use_quantized_model_init`.

    The weights of the FP8 layers are then created as FP8 tensors (no BF16 copy is kept); the model keeps
    the layers that `layer_precision` leaves in BF16 out of it.
    """
    if not config.use_quantized_model_init:
        return nullcontext()
    import transformer_engine.pytorch as te

    from model.fp8 import recipe_from_config

    return te.quantized_model_init(enabled=True, recipe=recipe_from_config(fp8_config))


def apply_activation_checkpointing(model, use_te: bool, offload_to_cpu: bool = False) -> None:
    """Recompute each decoder layer in backward: `checkpoint_wrapper` around TE layers, HF's own switch.

    With `offload_to_cpu` (`activation_cpu_offload`) each layer's input, the one activation a checkpointed layer
    keeps for its recompute, waits for backward in pinned CPU memory (both models use `checkpoint_wrapper`).
    """
    if not use_te and not offload_to_cpu:
        model.gradient_checkpointing_enable()
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_fn=checkpoint_with_input_on_cpu if offload_to_cpu else None)


def checkpoint_with_input_on_cpu(function, *args, **kwargs):
    """`torch.utils.checkpoint.checkpoint` whose saved inputs go to CPU memory until backward recomputes.

    Non-reentrant checkpointing saves the tensors among `args` through autograd's saved-tensor hooks before it
    runs `function` under its own hooks (which keep nothing), so an outer `save_on_cpu` moves exactly those
    inputs, a [tokens, hidden] activation per layer (2 GiB for a 512k-token window of the 1B body), and none of
    the layer's internals. Their copies wait for the GPU: worth it for long windows only. Keyword arguments
    (rotary embeddings, sequence offsets) stay where they are.
    """
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def compile_decoder_layers(model) -> None:
    """`torch.compile` each decoder layer in place (`nn.Module.compile`).

    In place, so parameter names stay as they are: checkpoints and exports never carry `_orig_mod.`.
    Per layer (not the whole model), as torchtitan does: the layers share one compiled graph, and the
    embedding, the LM head and the loss stay eager. Before FSDP2/DDP wrapping, after activation checkpointing.
    """
    for layer in model.model.layers:
        layer.compile()
