"""`fp8_stats_config.*`: FP8 tensor statistics per layer, with TE's own debug tooling (nvdlfw_inspect).

    fp8_stats = FP8Stats(cfg.fp8_stats_config, run_dir, rank)  # before the model is built; nothing unless enabled
    fp8_stats.name_layers(model)              # after it is built
    fp8_stats.step()                          # after each optimizer step (flushes the interval's statistics)
    fp8_stats.close()

What is logged, for which layers and how often is `fp8_stats_config.fp8_stats_file` (default `fp8_stats.yaml`:
underflow %, scale-inverse range and quantization MSE of every GEMM's activation, gradient and weight, and
the tensors' amax and dynamic range, every 10 steps). TE writes one text log per rank under
`fp8_stats_config.fp8_log_dir` (default `<run_dir>/fp8_stats/rank_<R>/nvdlfw_inspect_statistics_logs/`);
layers are named by module path with TE's layer number (from 1): `model.model.layers.3.layernorm_mlp.fc1`.
"""

import logging
from pathlib import Path

from runtime.paths import resolve_path

logger = logging.getLogger(__name__)


class FP8Stats:
    """TE's debug API (`nvdlfw_inspect`) started with the statistics file, or nothing when disabled."""

    def __init__(self, stats_cfg, run_dir: Path, rank: int):
        self.api = None
        if not stats_cfg.enabled:
            return
        try:
            import nvdlfw_inspect.api as debug_api
        except ImportError as e:
            raise ValueError(
                "fp8_stats_config.enabled=true uses TE's debug tools, which need nvdlfw_inspect: "
                "pip install nvdlfw-inspect (or set fp8_stats_config.enabled=false)."
            ) from e
        import transformer_engine

        config_file = resolve_path(stats_cfg.fp8_stats_file)
        if not config_file.exists():
            raise FileNotFoundError(f"fp8_stats_config.fp8_stats_file={stats_cfg.fp8_stats_file!r} does not exist.")
        log_dir = Path(stats_cfg.fp8_log_dir or Path(run_dir) / "fp8_stats") / f"rank_{rank}"
        log_dir.mkdir(parents=True, exist_ok=True)
        debug_api.initialize(
            config_file=str(config_file),
            feature_dirs=[str(Path(transformer_engine.__file__).parent / "debug" / "features")],
            log_dir=str(log_dir),
            default_logging_enabled=True,
        )
        self.api, self.log_dir = debug_api, log_dir
        logger.info("FP8 tensor statistics (%s) go to %s", config_file.name, log_dir)

    def name_layers(self, model) -> None:
        """Give TE layers their module names, which the statistics file selects and the log reports."""
        if self.api is not None:
            self.api.infer_and_assign_layer_names(model)

    def step(self) -> None:
        """Advance TE's debug step (call once per optimizer step)."""
        if self.api is not None:
            self.api.step()

    def close(self) -> None:
        """Flush and stop TE's debug tooling."""
        if self.api is not None:
            self.api.end_debug()
            self.api = None
