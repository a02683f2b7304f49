"""FP8 recipes from the config, by TE class name, with a clear error where the GPU cannot run them.

recipe = build_fp8_recipe("Float8CurrentScaling", "HYBRID", {})
fp8_autocast = fp8_autocast_factory(cfg.fp8_config, use_te)     # the training loop's context
with fp8_autocast(): ...
"""

import functools
from contextlib import nullcontext

# recipe class name -> (TE availability check, the GPUs that run it)
_REQUIREMENTS = {
    "DelayedScaling": ("is_fp8_available", "compute capability 8.9 or newer (Ada, Hopper or Blackwell)"),
    "Float8CurrentScaling": ("is_fp8_available", "compute capability 8.9 or newer (Ada, Hopper or Blackwell)"),
    "Float8BlockScaling": ("is_fp8_block_scaling_available", "compute capability 9.0 or newer (Hopper or Blackwell)"),
    "MXFP8BlockScaling": ("is_mxfp8_available", "compute capability 10.0 or newer (Blackwell)"),
    "NVFP4BlockScaling": ("is_nvfp4_available", "compute capability 10.0 or newer (Blackwell)"),
}


def recipe_from_config(fp8_config):
    """The recipe of the `fp8_config` group (`fp8_recipe`, `fp8_format`, `fp8_recipe_kwargs`); None with FP8 off."""
    if not fp8_config or not fp8_config["enabled"]:
        return None
    return build_fp8_recipe(fp8_config["fp8_recipe"], fp8_config["fp8_format"], dict(fp8_config["fp8_recipe_kwargs"]))


def fp8_autocast_factory(fp8_config, use_te: bool):
    """A no-argument context factory: TE autocast with the `fp8_config` group's recipe, or a null context."""
    if not use_te:
        return nullcontext
    import transformer_engine.pytorch as te

    recipe = recipe_from_config(fp8_config)
    return lambda: te.autocast(enabled=recipe is not None, recipe=recipe)


@functools.cache
def _quantized_tensor_class():
    try:
        from transformer_engine.pytorch.tensor import QuantizedTensor
    except ImportError:  # no TE, no FP8 tensors
        return None
    return QuantizedTensor


def is_fp8_tensor(tensor) -> bool:
    """A TE quantized (FP8) tensor, or an FSDP2 shard (DTensor) of one: `use_quantized_model_init` weights."""
    cls = _quantized_tensor_class()
    return cls is not None and isinstance(getattr(tensor, "_local_tensor", tensor), cls)


def build_fp8_recipe(fp8_recipe: str, fp8_format: str = "HYBRID", fp8_recipe_kwargs: dict | None = None):
    """`fp8_recipe`: a class of `transformer_engine.common.recipe`, short ("DelayedScaling") or dotted."""
    import transformer_engine.common.recipe as te_recipe
    import transformer_engine.pytorch as te

    name = str(fp8_recipe).rsplit(".", 1)[-1]
    if name not in _REQUIREMENTS:
        raise ValueError(f"fp8_config.fp8_recipe={fp8_recipe!r} is not one of {sorted(_REQUIREMENTS)}.")
    check, needs = _REQUIREMENTS[name]
    available, reason = getattr(te, check)(return_reason=True)
    if not available:
        raise ValueError(
            f"fp8_config.fp8_recipe={name} needs a GPU of {needs}; this one cannot run it ({reason}). "
            "Pick another recipe (Float8CurrentScaling or DelayedScaling on Hopper) or fp8_config.enabled=false."
        )
    kwargs = dict(fp8_recipe_kwargs or {})
    if name != "NVFP4BlockScaling":
        if fp8_format not in te_recipe.Format.__members__:
            raise ValueError(
                f"fp8_config.fp8_format={fp8_format!r} must be one of {list(te_recipe.Format.__members__)}."
            )
        kwargs.setdefault("fp8_format", te_recipe.Format[fp8_format])
    return getattr(te_recipe, name)(**kwargs)
