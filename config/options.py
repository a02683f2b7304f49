"""What the builders take that no single config group holds, decided once from the whole config.

    options = check_config(cfg, entrypoint="fsdp2")      # config/checks.py: checks, then `options_from(cfg, use_te)`
    model = create_model(options.model, device)
    dataloader, tokenizer = create_dataloader(dist_config, cfg.dataset, options.batches)

Most builders take their own group of keys (`cfg.adamw_kwargs`, `cfg.checkpoint`, `cfg.profiler`, ...). What is
decided from keys of several groups is decided here and nowhere else: the model (`model.build.ModelOptions`:
top-level keys plus the layout the data gives it), the layout of micro-batches (`data.batches.BatchOptions`:
packing, packed rows, FP8 padding, records held out for validation) and which parameters get no weight decay
(our key and upstream's two).
"""

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from data.batches import BatchOptions
from model.build import ModelOptions


@dataclass(frozen=True)
class Options:
    """`use_te` resolved, and what the model and data builders take."""

    use_te: bool
    model: ModelOptions
    batches: BatchOptions
    no_decay_on: tuple[str, ...]  # parameters without weight decay (`training.optimizer.create_optimizer`)


def packs_rows(cfg: DictConfig, use_te: bool) -> bool:
    """Whether the TE model gets BSHD micro-batches with padding as packed rows (`use_sequence_packing=false`).

    The micro-batches keep their windows (`dataset.micro_batch_size` of them). The model is built for THD;
    one with padding comes as a packed row (the collator lays its windows end to end: pad tokens cost no
    GEMM work), one of equal windows as [B, L] rows, which the model runs in TE's BSHD layout
    (`data.collate.PackedRowsCollator`). Not with context parallelism (it shards padded rows itself), and
    not with `config_kwargs.attn_input_format=bshd`, which keeps upstream's padded BSHD path.
    """
    bshd_asked = OmegaConf.select(cfg, "config_kwargs.attn_input_format") == "bshd"
    return use_te and not cfg.use_sequence_packing and cfg.cp_size == 1 and not bshd_asked


def model_options(cfg: DictConfig, use_te: bool) -> ModelOptions:
    """The model's keys; its attention layout follows the data (THD for packs and packed rows, else BSHD)."""
    thd = cfg.use_sequence_packing or packs_rows(cfg, use_te)
    return ModelOptions(
        config_name_or_path=cfg.config_name_or_path,
        config_kwargs=OmegaConf.to_container(cfg.config_kwargs, resolve=True),
        use_te=use_te,
        attn_input_format="thd" if thd else "bshd",
        fp32_master_weights=cfg.fp32_master_weights,
        loss_chunk_size=cfg.loss_chunk_size,
        use_meta_device=cfg.use_meta_device,
        use_gradient_checkpointing=cfg.use_gradient_checkpointing,
        activation_cpu_offload=cfg.activation_cpu_offload,
        use_torch_compile=cfg.use_torch_compile,
        fp8_config=OmegaConf.to_container(cfg.fp8_config, resolve=True) if cfg.fp8_config.enabled else None,
        spike_no_more_embedding_init=cfg.spike_no_more_embedding_init,
        use_megatron_scaled_init=cfg.use_megatron_scaled_init,
    )


def batch_options(cfg: DictConfig, use_te: bool) -> BatchOptions:
    """The micro-batch layout: packing, packed rows, FP8's multiples of 16, the validation hold-out."""
    holds_out = cfg.validation.enabled and cfg.validation.load_dataset_kwargs is None
    return BatchOptions(
        use_sequence_packing=cfg.use_sequence_packing,
        pack_rows=packs_rows(cfg, use_te),
        pad_for_fp8=cfg.fp8_config.enabled,
        holdout_fraction=cfg.validation.fraction if holds_out else 0.0,  # those records never reach training
    )


def no_decay_on(cfg: DictConfig) -> tuple[str, ...]:
    """Which parameters get no weight decay, from our key or upstream's two (OpenGenome2's defaults turn them on).

    `use_weight_decay_grouping`: none on biases and 1-D parameters (norms), Megatron's grouping;
    `skip_embedding_weight_decay` adds the embeddings to it (upstream reads it only with the grouping on);
    `no_weight_decay_on_norms_biases_embeddings` is both.
    """
    if cfg.no_weight_decay_on_norms_biases_embeddings:
        return ("norms_and_biases", "embeddings")
    if cfg.use_weight_decay_grouping:
        return ("norms_and_biases", "embeddings") if cfg.skip_embedding_weight_decay else ("norms_and_biases",)
    return ()


def options_from(cfg: DictConfig, use_te: bool) -> Options:
    """All of the above for a run."""
    return Options(use_te, model_options(cfg, use_te), batch_options(cfg, use_te), no_decay_on(cfg))
