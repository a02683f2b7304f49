"""CUDA graphs of the decoder layers (`use_cuda_graphs`): captured once, replayed every micro-step.

Each layer's forward and backward is one graph, so a step launches a few graphs instead of every kernel from Python.

    capture_layer_graphs(model, micro_batch_size, max_seq_length, fp8_recipe)  # after DDP wrapping, before the loop

What is graphed: full-window micro-batches, [micro_batch_size, max_seq_length] tokens without padding, run in
TE's BSHD layout (packed rows or BSHD batches of whole windows; `data.collate.PackedRowsCollator`). Every
other micro-batch (a THD pack of short records, the last short batch of a finite epoch, validation) runs the
layers eagerly, as without graphs; the first one is logged. The embedding, the final norm and the loss stay
eager (one launch each). Parameters keep their addresses for the whole run (DDP; FSDP2 gathers them into
fresh memory each step, so `config.checks` refuses it), and gradients leave the graphs as ordinary autograd
outputs, so DDP's bucketed all-reduce, gradient accumulation and the optimizer are unchanged.

FP8: TE's `make_graphed_callables` captures the layers under the run's recipe (delayed scaling's amax
history and scales live in tensors the graphs read and write; the amax reduction runs at each autocast
exit, outside the graphs) and restores the FP8 state its warm-up iterations touched.
"""

import logging

import torch

logger = logging.getLogger(__name__)


class LayerGraphs:
    """The graphed forwards of a model's decoder layers, for hidden states of one shape (`NVLlamaModel` calls it)."""

    def __init__(self, forwards: list, shape: tuple[int, ...]):
        self.forwards, self.shape = forwards, shape
        self.replayed = self.eager = 0

    def fits(self, hidden: torch.Tensor, layer_kwargs: dict) -> bool:
        """Whether these layer inputs are the captured kind: that shape, unpadded BSHD."""
        fits = tuple(hidden.shape) == self.shape and layer_kwargs == {"self_attn_mask_type": "causal"}
        if not fits and not self.eager:
            logger.info(
                "CUDA graphs: a micro-batch of hidden shape %s (%s) runs eagerly; the graphs are for %s rows.",
                tuple(hidden.shape), layer_kwargs.get("self_attn_mask_type", "thd"), self.shape,
            )  # fmt: skip
        self.replayed += fits
        self.eager += not fits
        return fits

    def __call__(self, hidden: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """The layers' output: each layer's graph replayed in turn."""
        for forward in self.forwards:
            hidden = forward(hidden, rotary_pos_emb=rope)  # "causal" is in the graph
        return hidden


def capture_layer_graphs(model, micro_batch_size: int, max_seq_length: int, fp8_recipe=None, amax_group=None):
    """Capture `model`'s decoder layers for [micro_batch_size, max_seq_length] micro-batches; returns the graphs.

    `model`: an `NVLlamaForCausalLM` (not its DDP wrapper) on the GPU, in training mode. `fp8_recipe`: the
    run's recipe (None: BF16); layers that `layer_precision` keeps in BF16 are captured without FP8.
    `amax_group`: the process group delayed scaling reduces its amaxes over (None: all ranks).
    """
    import transformer_engine.pytorch as te

    decoder = model.model
    config = decoder.config
    layers = tuple(decoder.layers)
    model.train()  # the graphs replay in the mode they were captured in
    decoder._set_attention_layout("bshd")
    param = next(decoder.parameters())
    shape = (micro_batch_size, max_seq_length, config.hidden_size)
    sample_args = tuple(
        (torch.randn(shape, device=param.device, dtype=param.dtype, requires_grad=True),) for _ in layers
    )
    rope = decoder.rotary_emb(max_seq_length, param.device)
    sample_kwargs = tuple({"rotary_pos_emb": rope} for _ in layers)  # TE graphs take tensors only
    enabled = tuple(fp8_recipe is not None and not config.keeps_bf16(i) for i in range(len(layers)))
    mask_types = [layer.self_attn_mask_type for layer in layers]
    for layer in layers:  # what full-window rows run with (the model passes it; the graphs keep it)
        layer.self_attn_mask_type = "causal"
    try:
        # Before the first DDP forward: DDP's gradient hooks do nothing until a forward of the wrapper arms them,
        # so the warm-up backward passes here reduce nothing.
        te.make_graphed_callables(
            layers,
            sample_args,
            sample_kwargs=sample_kwargs,
            enabled=enabled,
            recipe=fp8_recipe,
            amax_reduction_group=amax_group,
        )
    finally:
        for layer, mask_type in zip(layers, mask_types):
            layer.self_attn_mask_type = mask_type
    # TE installed each layer's graphed forward in place; keep them here and give the layers their eager
    # forward back, for every micro-batch of another shape (and validation).
    forwards = [layer.forward for layer in layers]
    for layer in layers:
        del layer.forward
    decoder.layer_graphs = LayerGraphs(forwards, shape)
    logger.info(
        "CUDA graphs: %d decoder layers captured for %d x %d-token micro-batches (%s).",
        len(layers), micro_batch_size, max_seq_length, type(fp8_recipe).__name__ if fp8_recipe else "BF16",
    )  # fmt: skip
    return decoder.layer_graphs
