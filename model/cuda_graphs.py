"""CUDA graphs of the decoder layers (`use_cuda_graphs`): captured once, replayed every micro-step.

Each layer's forward and backward is one graph, so a step launches a few graphs instead of every kernel from Python.

    capture_layer_graphs(model, LayerShape.rows(8, 8192), fp8_recipe)      # BSHD rows of whole windows
    capture_layer_graphs(model, LayerShape.packs(16384, 8192), fp8_recipe) # THD packs of an exact token budget

What is graphed: micro-batches of the captured shape. Rows: [micro_batch_size, max_seq_length] tokens without
padding, run in TE's BSHD layout (packed rows or BSHD batches of whole windows). Packs: `use_sequence_packing`
packs of exactly the token budget (the packer fills every pack but a finite stream's last), with up to
`max_sequences` sequences; their boundary tensor is padded to that length with empty sequences (TE's kernels
take a fixed-size `cu_seqlens` in a graph) and attention is set up for the window length (`max_seqlen`), the
longest a sequence can be. Every other micro-batch (a packed-rows pack of short records, a pack of more
sequences, validation) runs the layers eagerly, as without graphs; the first one is logged.

The embedding, the final norm and the loss stay eager. Parameters keep their addresses for the whole run
(DDP; FSDP2 gathers them into fresh memory every step, so `config.checks` refuses it); gradients leave the
graphs as ordinary autograd outputs, so DDP's bucketed all-reduce, gradient accumulation and the optimizer
are unchanged. FP8: TE's `make_graphed_callables` captures the layers under the run's recipe (delayed
scaling's amax history and scales live in tensors the graphs read and write; the amax reduction runs at
each autocast exit, outside the graphs) and restores the FP8 state its warm-up iterations touched.
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """The micro-batches the graphs take: BSHD rows, or THD packs of `tokens` with up to `max_sequences`."""

    layout: str  # "rows" or "packs"
    tokens: int  # rows: micro_batch_size x window; packs: the token budget
    window: int  # max_seq_length: a row's length, the longest sequence of a pack
    max_sequences: int = 0  # packs: the boundary tensor's fixed length - 1

    @classmethod
    def of(cls, dataset, packed: bool, multiple: int = 1) -> "LayerShape":
        """The full micro-batches of the `dataset` group: THD packs of its budget (`packed`) or BSHD rows.

        `multiple`: what the collator pads a pack's token count to (16 for FP8).
        """
        if not packed:
            return cls.rows(dataset.micro_batch_size, dataset.max_seq_length)
        budget = dataset.token_micro_batch_size or dataset.micro_batch_size * dataset.max_seq_length
        return cls.packs(-(-budget // multiple) * multiple, dataset.max_seq_length)

    @classmethod
    def rows(cls, micro_batch_size: int, max_seq_length: int) -> "LayerShape":
        """[micro_batch_size, max_seq_length] BSHD rows."""
        return cls("rows", micro_batch_size * max_seq_length, max_seq_length)

    @classmethod
    def packs(cls, token_budget: int, max_seq_length: int) -> "LayerShape":
        """THD packs of `token_budget` tokens, of sequences of 256 tokens on average or longer.

        (At least room for whole windows and a pad sequence.)
        """
        return cls(
            "packs", token_budget, max_seq_length, max(token_budget // 256, -(-token_budget // max_seq_length) + 1)
        )

    def layer_kwargs(self) -> dict:
        """The layer arguments that stay fixed in the graphs (TE's graphs take tensors as arguments only)."""
        if self.layout == "rows":
            return {"self_attn_mask_type": "causal"}
        return {"self_attn_mask_type": "padding_causal", "max_seqlen_q": self.window, "max_seqlen_kv": self.window}


class _Bound(torch.nn.Module):
    """A decoder layer with the fixed arguments bound in: called with tensors only."""

    def __init__(self, layer, fixed: dict):
        super().__init__()
        self.layer, self.fixed = layer, fixed

    def forward(self, hidden, rope, cu_seqlens_q=None, cu_seqlens_kv=None):
        boundaries = {} if cu_seqlens_q is None else {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_kv": cu_seqlens_kv}
        return self.layer(hidden, rotary_pos_emb=rope, **boundaries, **self.fixed)


class LayerGraphs:
    """The graphed forwards of a model's decoder layers for one `LayerShape` (`NVLlamaModel.forward` calls it)."""

    def __init__(self, forwards: list, shape: LayerShape, rope: torch.Tensor):
        self.forwards, self.shape, self.rope = forwards, shape, rope
        self.replayed = self.eager = 0

    def fits(self, hidden: torch.Tensor, layer_kwargs: dict) -> bool:
        """Whether these layer inputs are the captured kind (checked on the host: no GPU sync)."""
        shape = self.shape
        if shape.layout == "rows":
            fits = hidden.dim() == 3 and hidden.shape[0] * hidden.shape[1] == shape.tokens
            fits = fits and hidden.shape[1] == shape.window and layer_kwargs == shape.layer_kwargs()
        else:
            cu = layer_kwargs.get("cu_seqlens_q")
            fits = hidden.dim() == 2 and hidden.shape[0] == shape.tokens and cu is not None
            fits = fits and cu.numel() <= shape.max_sequences + 1 and layer_kwargs.keys() == _PACK_KEYS
            fits = fits and max(layer_kwargs["max_seqlen_q"], layer_kwargs["max_seqlen_kv"]) <= shape.window
        if not fits and not self.eager:
            logger.info("CUDA graphs: a micro-batch of hidden shape %s runs eagerly; the graphs take %s.",
                        tuple(hidden.shape), shape)  # fmt: skip
        self.replayed += fits
        self.eager += not fits
        return fits

    def __call__(self, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
        """The layers' output: each layer's graph replayed in turn."""
        boundaries = ()
        if self.shape.layout == "packs":  # pad the boundaries with empty sequences: cu_seqlens[-1] is the token count
            pad = self.shape.max_sequences + 1 - layer_kwargs["cu_seqlens_q"].numel()
            boundaries = tuple(F.pad(layer_kwargs[k], (0, pad), value=self.shape.tokens) for k in _BOUNDARIES)
        for forward in self.forwards:
            hidden = forward(hidden, self.rope, *boundaries)
        return hidden


_BOUNDARIES = ("cu_seqlens_q", "cu_seqlens_kv")
_PACK_KEYS = {*_BOUNDARIES, "max_seqlen_q", "max_seqlen_kv", "self_attn_mask_type"}


def capture_layer_graphs(model, shape: LayerShape, fp8_recipe=None, amax_group=None) -> LayerGraphs:
    """Capture `model`'s decoder layers for micro-batches of `shape`; the model replays them from then on.

    `model`: an `NVLlamaForCausalLM` (not its DDP wrapper) on the GPU; call before the first forward of the DDP
    wrapper (DDP's gradient hooks do nothing until that forward arms them, so the warm-up backward passes
    here reduce nothing). `fp8_recipe`: the run's recipe (None: BF16); layers that `layer_precision` keeps
    in BF16 are captured without FP8. `amax_group`: the group delayed scaling reduces amaxes over.
    """
    import transformer_engine.pytorch as te

    model.train()  # the graphs replay in the mode they were captured in
    decoder = model.model
    decoder._set_attention_layout("bshd" if shape.layout == "rows" else "thd")
    param = next(decoder.parameters())
    hidden_size, device = decoder.config.hidden_size, param.device
    if shape.layout == "rows":
        hidden_shape, boundaries = (shape.tokens // shape.window, shape.window, hidden_size), ()
    else:  # whole windows, then empty sequences up to the fixed length
        cu = [*range(0, shape.tokens, shape.window), shape.tokens]
        cu += [shape.tokens] * (shape.max_sequences + 1 - len(cu))
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
        hidden_shape, boundaries = (shape.tokens, hidden_size), (cu, cu.clone())
    rope = decoder.rotary_emb(shape.window, device)
    layers = tuple(_Bound(layer, shape.layer_kwargs()) for layer in decoder.layers)
    sample_args = tuple(
        (torch.randn(hidden_shape, device=device, dtype=param.dtype, requires_grad=True), rope, *boundaries)
        for _ in layers
    )
    enabled = tuple(fp8_recipe is not None and not decoder.config.keeps_bf16(i) for i in range(len(layers)))
    te.make_graphed_callables(layers, sample_args, enabled=enabled, recipe=fp8_recipe, amax_reduction_group=amax_group)
    decoder.layer_graphs = LayerGraphs([layer.forward for layer in layers], shape, rope)  # TE's graphed forwards
    logger.info("CUDA graphs: %d decoder layers captured for %s (%s).", len(layers), shape,
                type(fp8_recipe).__name__ if fp8_recipe else "BF16")  # fmt: skip
    return decoder.layer_graphs
