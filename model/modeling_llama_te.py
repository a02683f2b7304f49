"""Llama 3 built from TransformerEngine layers, numerically the same model as HF `LlamaForCausalLM`.

    from model.modeling_llama_te import NVLlamaConfig, NVLlamaForCausalLM
    model = NVLlamaForCausalLM(NVLlamaConfig.from_pretrained("model_configs/meta-llama/Llama-3.2-1B"))

Architecture only: no distributed code (wrapping happens in the training scripts). Each decoder layer
is one `te.TransformerLayer` (fused RMSNorm + interleaved QKV, GQA, RoPE, SwiGLU MLP, no bias, no
dropout). Inputs are BSHD ([B, S] with an optional padding mask) or THD (a packed [1, T] row with
`cu_seq_lens_q/k` and `max_length_q/k`, as `collator.ThdCollator` makes them). A THD model given
padded BSHD input (HF `generate` with left padding) unpads internally and pads the output back; given
BSHD input without padding it runs TE's BSHD kernels.

Generation uses TE's `InferenceParams` as the KV cache (`HFInferenceParams` adds what HF `generate`
asks of a cache):

    past_key_values = HFInferenceParams(max_batch_size=1, max_sequence_length=256, num_heads_kv=8,
                                        head_dim_k=64, dtype=torch.bfloat16, qkv_format="thd", max_ctx_len=256)
    for layer_number in range(1, config.num_hidden_layers + 1):
        past_key_values.allocate_memory(layer_number)
    model.generate(**inputs, max_new_tokens=16, use_cache=True, past_key_values=past_key_values)

This file is copied into exported checkpoints, so it imports nothing from the recipe.
"""

import math
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

try:  # optional so that configs and exports can be handled on machines without TE
    import transformer_engine.pytorch as te
    from transformer_engine.pytorch.attention import InferenceParams
except ImportError:
    te = None
    InferenceParams = object

IGNORE_INDEX = -100  # HF's label value for "no loss here" (collator.IGNORE_INDEX; this file imports no recipe code)

AUTO_MAP = {
    "AutoConfig": "modeling_llama_te.NVLlamaConfig",
    "AutoModel": "modeling_llama_te.NVLlamaModel",
    "AutoModelForCausalLM": "modeling_llama_te.NVLlamaForCausalLM",
}


class NVLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus how TE attention receives its input.

    attn_input_format: "thd" (packed sequences, also accepts padded BSHD) or "bshd".
    loss_chunk_size: with labels, compute the LM head and the loss this many tokens at a time and
        return no logits (`chunked_cross_entropy`); None: full logits and HF's loss.
    self_attn_mask_type: TE mask type for BSHD input with padding ("padding_causal"); unpadded
        BSHD batches use plain "causal" and THD always uses "padding_causal".
    layer_precision: per decoder layer "fp8" (runs under the caller's FP8 autocast) or None (kept in BF16
        even inside it); None for the whole list: every layer follows the caller's autocast.
    use_quantized_model_init: the weights of "fp8" layers are created as FP8 tensors (TE's
        `quantized_model_init`, entered by the caller with its recipe around construction): no BF16 copy.
    embedding_init_std: the embedding's initial std (None: initializer_range; 1.0: Spike-No-More, as OpenGenome2).
    use_megatron_scaled_init: the attention output and MLP down projections start with std
        initializer_range / sqrt(2 x layers) (Megatron's scaled init, as OpenGenome2), the residual branches.
    """

    model_type = "nvllama"

    def __init__(
        self,
        attn_input_format: str = "thd",
        self_attn_mask_type: str = "padding_causal",
        loss_chunk_size: int | None = None,
        layer_precision: list[str | None] | None = None,
        use_quantized_model_init: bool = False,
        embedding_init_std: float | None = None,
        use_megatron_scaled_init: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attn_input_format not in ("bshd", "thd"):
            raise ValueError(f"attn_input_format must be 'bshd' or 'thd', got {attn_input_format!r}.")
        self.attn_input_format = attn_input_format
        self.self_attn_mask_type = self_attn_mask_type
        self.loss_chunk_size = loss_chunk_size
        if layer_precision is not None and (
            len(layer_precision) != self.num_hidden_layers or any(p not in ("fp8", None) for p in layer_precision)
        ):
            raise ValueError(
                f"layer_precision={list(layer_precision)!r} must list 'fp8' or null for each of the "
                f"{self.num_hidden_layers} layers."
            )
        self.layer_precision = list(layer_precision) if layer_precision is not None else None
        self.use_quantized_model_init = use_quantized_model_init
        self.embedding_init_std = embedding_init_std
        self.use_megatron_scaled_init = use_megatron_scaled_init

    @property
    def embedding_std(self) -> float:
        """The embedding's initial std."""
        return self.initializer_range if self.embedding_init_std is None else self.embedding_init_std

    @property
    def output_layer_std(self) -> float:
        """The initial std of the attention output and MLP down projections (scaled with Megatron's init)."""
        scale = math.sqrt(2.0 * self.num_hidden_layers) if self.use_megatron_scaled_init else 1.0
        return self.initializer_range / scale

    def keeps_bf16(self, layer_index: int) -> bool:
        """Whether decoder layer `layer_index` (from 0) stays in BF16 under an FP8 autocast."""
        return self.layer_precision is not None and self.layer_precision[layer_index] is None


class HFInferenceParams(InferenceParams):
    """TE's KV cache with the methods HF `generate` calls on a cache object."""

    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached so far (the longest sequence)."""
        return max(self.sequences.values(), default=0)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: reorder the cached sequences along the batch dimension."""
        for layer_number, (k, v) in self.cache_manager.cache.items():
            self.cache_manager.cache[layer_number] = (k.index_select(0, beam_idx), v.index_select(0, beam_idx))


class RotaryEmbedding(nn.Module):
    """RoPE frequencies for TE, from HF's `inv_freq` (so Llama 3 rope scaling is exactly HF's).

    Computed in fp32 once per (length, device) and kept: a forward asks only for a slice.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        with torch.device("cpu"):  # also under a meta-device context: these are computed, not loaded
            hf_rope = LlamaRotaryEmbedding(config)
        # HF's attention_scaling is 1.0 for the default and llama3 rope types; TE has no knob for it.
        if getattr(hf_rope, "attention_scaling", 1.0) != 1.0:
            raise ValueError(f"rope attention_scaling={hf_rope.attention_scaling} is not supported by TE attention.")
        # A plain attribute, not a buffer: `to_empty()` and `from_pretrained` (which build on the meta
        # device) would leave a buffer uninitialised; this constant is moved to the GPU on first use.
        self.inv_freq = hf_rope.inv_freq.float().clone()
        self._cache: torch.Tensor | None = None

    def forward(self, length: int, device: torch.device) -> torch.Tensor:
        """The [length, 1, 1, head_dim] fp32 frequencies TE's attention takes as `rotary_pos_emb`."""
        cache = self._cache
        if cache is None or cache.shape[0] < length or cache.device != device:
            inv_freq = self.inv_freq.to(device=device, dtype=torch.float32)
            if inv_freq.device.type == "meta" or device.type == "meta":
                raise RuntimeError("RoPE asked for on the meta device; materialise the model first.")
            positions = torch.arange(max(length, 1), device=device, dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)
            self._cache = cache = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [S, 1, 1, head_dim]
        return cache[:length]


class NVLlamaPreTrainedModel(PreTrainedModel):
    """HF plumbing shared by the TE models: config class, HF Llama initialisation, meta-device materialisation."""

    config_class = NVLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # TE keeps FP8 scaling state in `_extra_state`; it is training state, not part of HF checkpoints.
    _keys_to_ignore_on_load_missing = [r"_extra_state"]
    _keys_to_ignore_on_load_unexpected = [r"_extra_state"]

    def _init_weights(self, module):
        """HF Llama's initialisation: normal(0, initializer_range) matrices, unit norms, no biases.

        The embedding takes `config.embedding_std`, the attention output and MLP down projections
        `config.output_layer_std` (both initializer_range unless the config asks for OpenGenome2's inits).
        """
        std, config = self.config.initializer_range, self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, config.embedding_std if isinstance(module, nn.Embedding) else std)
        if te is None:
            return
        if isinstance(module, te.RMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, te.TransformerLayer) and not config.use_quantized_model_init:
            # (FP8 weights are initialised by TE itself, from the init methods the layers were built with.)
            attn, mlp, out = module.self_attention.layernorm_qkv, module.layernorm_mlp, config.output_layer_std
            for weight, weight_std in (
                (attn.weight, std),
                (module.self_attention.proj.weight, out),
                (mlp.fc1_weight, std),
                (mlp.fc2_weight, out),
            ):
                weight.data.normal_(0.0, weight_std)
            attn.layer_norm_weight.data.fill_(1.0)
            mlp.layer_norm_weight.data.fill_(1.0)

    def init_empty_weights(self, device: torch.device | str = "cuda"):
        """Materialise a model built on the meta device and initialise it as direct construction would."""
        if self.config.use_quantized_model_init:  # `to_empty` would not keep FP8 weights FP8: TE's own reset does
            for module in self.modules():
                if type(module).__module__.startswith("transformer_engine") and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            for module in (self.get_input_embeddings(), self.get_output_embeddings()):
                if module is not None:
                    module.to_empty(device=device)
                    self._init_weights(module)
            self.tie_weights()
            return
        self.to_empty(device=device)
        for module in self.modules():
            self._init_weights(module)
        self.tie_weights()

    def save_pretrained(self, save_directory, **kwargs):
        """HF's `save_pretrained` without TE's FP8 training state (`_extra_state`)."""
        state_dict = kwargs.pop("state_dict", None) or self.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)


def _require_te():
    if te is None:
        raise ImportError(
            "NVLlamaModel needs TransformerEngine (pip install 'transformer_engine[pytorch]', or the NGC PyTorch "
            "container). Without it, use the HF model: use_te=false."
        )


class NVLlamaModel(NVLlamaPreTrainedModel):
    """The decoder: embedding, `te.TransformerLayer`s with RoPE, final RMSNorm; returns the last hidden state."""

    def __init__(self, config: NVLlamaConfig):
        _require_te()
        super().__init__(config)
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.bfloat16
        device = "meta" if torch.get_default_device().type == "meta" else "cuda"
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        std, output_std = config.initializer_range, config.output_layer_std

        def init_method(weight):
            nn.init.normal_(weight, 0.0, std)

        def output_init_method(weight):  # attention output and MLP down projections
            nn.init.normal_(weight, 0.0, output_std)

        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            self._layer(config, i, head_dim, (init_method, output_init_method), dtype, device)
            for i in range(config.num_hidden_layers)
        )
        self.norm = te.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(config)
        self.cp_size = 1
        self.layer_graphs = None  # set by the recipe's model/cuda_graphs.py (`use_cuda_graphs`); not saved
        self.post_init()

    @staticmethod
    def _layer(config, i, head_dim, init_methods, dtype, device):
        # A layer kept in BF16 holds BF16 weights even inside the caller's `te.quantized_model_init`.
        with te.quantized_model_init(enabled=False) if config.keeps_bf16(i) else nullcontext():
            return te.TransformerLayer(
                hidden_size=config.hidden_size,
                ffn_hidden_size=config.intermediate_size,
                num_attention_heads=config.num_attention_heads,
                num_gqa_groups=config.num_key_value_heads,
                kv_channels=head_dim,
                layernorm_epsilon=config.rms_norm_eps,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                bias=False,
                normalization="RMSNorm",
                activation="swiglu",
                fuse_qkv_params=True,
                qkv_weight_interleaved=True,
                attn_input_format=config.attn_input_format,
                self_attn_mask_type=config.self_attn_mask_type,
                layer_number=i + 1,
                init_method=init_methods[0],
                output_layer_init_method=init_methods[1],
                params_dtype=dtype,
                device=device,
            )

    def set_context_parallel_group(self, cp_group, cp_global_ranks: list[int], cp_stream, cp_comm_type: str = "p2p"):
        """Context parallelism: every layer's attention exchanges keys and values with the ranks of `cp_group`.

        Each rank then gets its part of every sequence (`collator.shard_batch_for_cp`).
        """
        for layer in self.layers:
            layer.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)
        self.cp_size = len(cp_global_ranks)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: InferenceParams | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The final hidden states (and, with `output_hidden_states`, every layer's input), in the input's shape.

        BSHD input is [B, S] ids with an optional padding mask; THD input is a packed [1, T] row with
        `cu_seq_lens_q/k`, `max_length_q/k` and, under context parallelism, their `_padded` forms.
        """
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, S, H]
        inference = (
            past_key_values if isinstance(past_key_values, InferenceParams) and use_cache is not False else None
        )
        unpad_index = None
        # Rows without padding run in BSHD even in a THD model: TE's BSHD kernels are a few percent faster on
        # them (the training loader keeps micro-batches of equal windows as rows: `collator.PackedRowsCollator`).
        rows = attention_mask is None and inference is None and kwargs.get("cu_seq_lens_q") is None
        thd = self.config.attn_input_format == "thd" and not (rows and self.cp_size == 1)
        self._set_attention_layout("thd" if thd else "bshd")
        if thd:
            hidden, layer_kwargs, rope_length, unpad_index = self._thd_inputs(
                hidden, attention_mask, inference, kwargs
            )
        else:
            layer_kwargs, rope_length = self._bshd_inputs(hidden, attention_mask, inference)
        rope = self.rotary_emb(rope_length, hidden.device)
        all_hidden = []  # as HF: the embedding output and each layer's output, the last one after the final norm
        graphs = self.layer_graphs  # CUDA graphs of the layers for one shape, if the trainer captured them
        if graphs is not None and self.training and not output_hidden_states and graphs.fits(hidden, layer_kwargs):
            hidden = graphs(hidden, layer_kwargs)
        else:
            for i, layer in enumerate(self.layers):
                if output_hidden_states:
                    all_hidden.append(hidden)
                with te.autocast(enabled=False) if self.config.keeps_bf16(i) else nullcontext():  # layer_precision
                    hidden = layer(hidden, rotary_pos_emb=rope, inference_params=inference, **layer_kwargs)
        all_hidden.append(self.norm(hidden))

        packed = self.config.attn_input_format == "thd" and kwargs.get("cu_seq_lens_q") is not None
        shape = (1, -1) if packed else (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
        all_hidden = tuple(self._to_input_shape(h, shape, unpad_index) for h in all_hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=all_hidden[-1],
            past_key_values=past_key_values,
            hidden_states=all_hidden if output_hidden_states else None,
        )

    def _set_attention_layout(self, qkv_format: str) -> None:
        """Have every layer's attention take `qkv_format` input from this call on.

        TE reads the layout from `self_attention.qkv_format` at each call (TE 2.x). It is left set, not
        restored after the forward: activation checkpointing recomputes the layers in backward.
        """
        for layer in self.layers:
            layer.self_attention.qkv_format = qkv_format

    def _thd_inputs(self, hidden, attention_mask, inference, kwargs):
        """[T, H] hidden states, the THD layer arguments, the RoPE length and `unpad_index`.

        Padded BSHD input (e.g. `generate` with left padding) is unpadded here; `unpad_index` says where its
        real tokens were (None for packed input).
        """
        cu_seq_lens_q, max_length_q = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        cu_seq_lens_k, max_length_k = kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_k")
        unpad_index = None
        if cu_seq_lens_q is None:  # BSHD input: every row is one sequence
            batch, seq_len, hidden_size = hidden.shape
            hidden = hidden.reshape(batch * seq_len, hidden_size)
            if attention_mask is None:  # no padding (KV-cache decoding; CP): no index to build, no GPU sync
                lengths = torch.full((batch,), seq_len, device=hidden.device, dtype=torch.int32)
            else:  # drop the pad tokens; nonzero() waits for the GPU (training feeds packed rows instead)
                mask = attention_mask[:, -seq_len:].bool()  # decoding: the mask covers the cache too
                lengths = mask.sum(dim=1, dtype=torch.int32)
                unpad_index = mask.flatten().nonzero().squeeze(1)
                hidden = hidden[unpad_index]
            cu_seq_lens_q = cu_seq_lens_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            max_length_q = max_length_k = seq_len
            if inference is not None:
                inference.pre_step(OrderedDict(enumerate(lengths.tolist())))
                # Attention takes both boundaries from the cache (`inference.step`); the layer's RoPE splits the
                # new keys by `cu_seqlens_kv`, so it must be the new tokens' (with the cached totals, every
                # sequence after the first got shifted positions once sequences add more than one token).
                cu_seq_lens_q = cu_seq_lens_k = inference.cu_seqlens_q
                max_length_k = inference.max_sequence_length
        else:
            hidden = hidden.squeeze(0)  # [1, T, H] -> [T, H]
        layer_kwargs = dict(
            cu_seqlens_q=cu_seq_lens_q,
            cu_seqlens_kv=cu_seq_lens_k,
            max_seqlen_q=max_length_q,
            max_seqlen_kv=max_length_k,
            self_attn_mask_type="padding_causal",
        )
        if kwargs.get("cu_seq_lens_q_padded") is not None:  # context parallelism: sequences padded for the split
            layer_kwargs.update(
                cu_seqlens_q_padded=kwargs["cu_seq_lens_q_padded"],
                cu_seqlens_kv_padded=kwargs["cu_seq_lens_k_padded"],
                pad_between_seqs=kwargs.get("pad_between_seqs"),
            )
        return hidden, layer_kwargs, max(max_length_q, max_length_k), unpad_index

    def _bshd_inputs(self, hidden, attention_mask, inference):
        """The BSHD layer arguments and the RoPE length."""
        if inference is not None:
            raise ValueError("KV-cache generation needs attn_input_format='thd'; load the model with it.")
        rope_length = hidden.shape[1] * self.cp_size  # with CP, this rank holds 1/cp_size of each sequence
        if attention_mask is None:
            return {"self_attn_mask_type": "causal"}, rope_length
        # TE padding masks are True where attention is *not* allowed. Checking for an all-ones mask here would
        # sync with the GPU every forward; callers leave out masks without padding.
        mask = ~attention_mask.bool()[:, None, None, :]
        return {"attention_mask": mask, "self_attn_mask_type": "padding_causal"}, rope_length

    def _to_input_shape(self, hidden, shape, unpad_index):
        """THD's [T, H] back to the input's shape: [1, T, H] (packed) or [B, S, H] (BSHD, pads as zeros)."""
        if self.config.attn_input_format != "thd":
            return hidden
        if unpad_index is not None:
            padded = hidden.new_zeros(shape[0] * shape[1], hidden.shape[-1])
            hidden = padded.index_copy(0, unpad_index, hidden)
        return hidden.view(*shape, hidden.shape[-1])


class NVLlamaForCausalLM(NVLlamaPreTrainedModel, GenerationMixin):
    """`NVLlamaModel` plus a bf16 LM head and HF's causal-LM loss (or the chunked loss); works with `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NVLlamaConfig):
        super().__init__(config)
        self.model = NVLlamaModel(config)
        dtype = self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        # A plain torch Linear, so the LM head stays in BF16 under FP8 autocast (FP8 logits hurt the loss).
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: InferenceParams | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (bf16 LM head) and, with `labels` or `shift_labels`, the loss.

        Inputs as `NVLlamaModel.forward` takes them, plus `num_items_in_batch` (the loss divisor shared by the
        micro-batches of a step); with `loss_chunk_size` and targets, no logits are returned.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        num_items = kwargs.get("num_items_in_batch")
        shift_labels = kwargs.get("shift_labels")  # targets already shifted (context parallelism shards them)
        weights = {k: kwargs[k] for k in ("loss_weights", "shift_loss_weights") if kwargs.get(k) is not None}
        has_targets = labels is not None or shift_labels is not None
        if has_targets and self.config.loss_chunk_size:
            loss = chunked_cross_entropy(
                hidden, self.lm_head.weight, labels, self.config.loss_chunk_size, num_items, shift_labels, **weights
            )
            return CausalLMOutputWithPast(
                loss=loss, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
            )
        logits = self.lm_head(hidden)  # nn.Linear: TE's FP8 autocast never quantizes it
        loss = None
        if has_targets:
            loss = causal_lm_loss(
                logits,
                labels,
                self.config.vocab_size,
                num_items_in_batch=num_items,
                shift_labels=shift_labels,
                **weights,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )

    def generate(self, *args, past_key_values=None, **kwargs):
        """HF `generate`; a plain TE `InferenceParams` cache (upstream's README snippet) is accepted as is.

        HF asks its cache for methods TE's class lacks (`is_compileable`, `get_seq_length`): such an object
        is given them in place (its class becomes `HFInferenceParams`, which only adds methods).
        """
        if te is not None and type(past_key_values) is InferenceParams:
            past_key_values.__class__ = HFInferenceParams
        return super().generate(*args, past_key_values=past_key_values, **kwargs)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, one chunk of tokens at a time.

    The forward pass also computes the gradients (softmax minus one-hot), so the [tokens, vocab] logits
    exist only one chunk at a time, in fp32, and nothing is recomputed in the backward pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, target_weights=None):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            valid = y != IGNORE_INDEX
            if target_weights is not None:  # per-target loss weights (0 where there is no target)
                valid = target_weights[start : start + chunk_size].float()
            y = torch.where(y != IGNORE_INDEX, y, 0)
            probs = (h @ weight.t()).float()
            log_norm = torch.logsumexp(probs, dim=-1)
            target_logit = probs.gather(1, y[:, None]).squeeze(1)
            loss += ((log_norm - target_logit) * valid).sum()
            probs.sub_(log_norm[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_logits = (probs * valid[:, None]).to(hidden.dtype)
            grad_hidden[start : start + chunk_size] = grad_logits @ weight
            grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden,
    weight,
    labels,
    chunk_size: int,
    num_items_in_batch=None,
    shift_labels=None,
    loss_weights=None,
    shift_loss_weights=None,
) -> torch.Tensor:
    """HF's causal LM loss without ever holding the full logits.

    Labels are shifted left (or `shift_labels` taken as given), -100 is ignored, and the sum is divided by
    `num_items_in_batch` (or the target count). For a 128k vocabulary the full logits are 1 GiB of fp32 per
    2k tokens, plus their gradient. `loss_weights` (aligned with `labels`) or `shift_loss_weights` weigh each
    target (`causal_lm_loss`).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        if loss_weights is not None:
            shift_loss_weights = F.pad(loss_weights, (0, 1), value=0.0)[..., 1:]
    targets = shift_labels.reshape(-1)
    target_weights = shift_loss_weights.reshape(-1) if shift_loss_weights is not None else None
    loss = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk_size, target_weights)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss / (target_weights.sum() if target_weights is not None else (targets != IGNORE_INDEX).sum())


def causal_lm_loss(
    logits,
    labels,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels=None,
    loss_weights=None,
    shift_loss_weights=None,
    **kwargs,
) -> torch.Tensor:
    """HF's causal-LM loss (`ForCausalLMLoss`, the same numbers), with optional per-target weights.

    `loss_weights` are aligned with `labels` (or `shift_loss_weights` with `shift_labels`): the weighted sum of
    the targets' losses is divided by `num_items_in_batch` (the step's summed weights), else by the weights' sum.
    """
    if loss_weights is None and shift_loss_weights is None:
        return ForCausalLMLoss(
            logits,
            labels,
            vocab_size,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            **kwargs,
        )
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        shift_loss_weights = F.pad(loss_weights, (0, 1), value=0.0)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    nll = F.cross_entropy(logits.float().reshape(-1, vocab_size), targets, ignore_index=ignore_index, reduction="none")
    weights = shift_loss_weights.reshape(-1).to(nll)
    return (nll * weights).sum() / (num_items_in_batch if num_items_in_batch is not None else weights.sum())


# `save_pretrained` then copies this file next to the weights and writes `auto_map` into config.json, so
# `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads what any TE model saves.
NVLlamaConfig.register_for_auto_class()
NVLlamaModel.register_for_auto_class("AutoModel")
NVLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
