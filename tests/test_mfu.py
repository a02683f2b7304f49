"""MFU's model FLOPs count the sequences a batch holds (perf_logger.ModelFlops), against hand counts."""

import time

import pytest
import torch
from conftest import build_model_config_of, make_cfg

from model.shape import count_parameters, head_dim_of
from perf_logger import ModelFlops, PerfLogger
from runtime.distributed import DistributedConfig


@pytest.fixture
def config(tmp_path):
    return build_model_config_of(make_cfg(tmp_path), use_te=False)  # L0_sanity's 4-layer Llama


def constants(config):
    """6 N, and 6 L H D per pair of positions (torchtitan's 12 L H D halved: causal attention), written out."""
    n = count_parameters(config, with_embedding=False)
    return 6 * n, 6 * config.num_hidden_layers * config.num_attention_heads * head_dim_of(config)


def test_full_windows_give_the_per_token_formula(config):
    """Two full 1024-token windows: 2 x 1024 x (6N + 6 L H D S), the per-token formula for full windows."""
    dense, pair = constants(config)
    batch = {"input_ids": torch.zeros(2, 1024, dtype=torch.long)}
    assert ModelFlops(config).of_batch(batch) == pytest.approx(2 * 1024 * (dense + pair * 1024), rel=1e-12)


def test_a_pack_counts_each_records_own_attention(config):
    dense, pair = constants(config)
    cu = torch.tensor([0, 100, 400, 1024], dtype=torch.int32)
    flops = ModelFlops(config).of_batch({"input_ids": torch.zeros(1, 1024, dtype=torch.long), "cu_seq_lens_q": cu})
    assert flops == pytest.approx(dense * 1024 + pair * (100**2 + 300**2 + 624**2), rel=1e-12)
    assert flops < 1024 * (dense + pair * 1024)  # what the window-length formula would claim


def test_padding_is_not_work(config):
    dense, pair = constants(config)
    mask = torch.zeros(2, 1024, dtype=torch.long)
    mask[0], mask[1, :200] = 1, 1
    flops = ModelFlops(config).of_batch({"input_ids": torch.zeros(2, 1024, dtype=torch.long), "attention_mask": mask})
    assert flops == pytest.approx(dense * 1224 + pair * (1024**2 + 200**2), rel=1e-12)


def test_context_parallel_ranks_share_their_groups_work(config):
    cu = torch.tensor([0, 300, 1024], dtype=torch.int32)
    whole = ModelFlops(config).of_batch({"input_ids": torch.zeros(1, 1024, dtype=torch.long), "cu_seq_lens_q": cu})
    thd_share = ModelFlops(config, cp_size=2).of_batch({"input_ids": torch.zeros(1, 512), "cu_seq_lens_q": cu})
    assert thd_share == pytest.approx(whole / 2, rel=1e-12)  # THD shards keep the group's cu_seq_lens
    full_row = ModelFlops(config).of_batch({"input_ids": torch.zeros(1, 1024)})
    bshd_share = ModelFlops(config, cp_size=2).of_batch({"input_ids": torch.zeros(1, 512)})  # half of each row
    assert bshd_share == pytest.approx(full_row / 2, rel=1e-12)


def new_perf_logger(tmp_path, config) -> PerfLogger:
    """A one-rank CPU logger writing into `tmp_path`, as the entrypoints make it for L0_sanity."""
    cfg = make_cfg(tmp_path)
    info = {"config": {"num_train_steps": cfg.num_train_steps}}
    return PerfLogger(
        DistributedConfig(0, 0, 1),
        torch.device("cpu"),
        tmp_path,
        config,
        run_info=info,
        frequency=cfg.logger.frequency,
        num_train_steps=cfg.num_train_steps,
    )


def test_logged_mfu_is_the_counted_flops_over_time_and_peak(tmp_path, config):
    perf = new_perf_logger(tmp_path, config)
    perf.peak = 1e12  # CPUs have no peak in the table; pretend
    batch = {"input_ids": torch.zeros(1, 1024, dtype=torch.long), "cu_seq_lens_q": torch.tensor([0, 24, 1024])}
    perf.count_batch(batch, waited_s=0.0)
    perf.count_batch(batch, waited_s=0.0)
    metrics = perf.log_step(1, torch.tensor(1.0), torch.tensor(2048.0), torch.tensor(1.0), 1e-3, force=True)
    expected = 2 * ModelFlops(config).of_batch(batch) / metrics["step_time_s"] / 1e12
    assert metrics["mfu"] == pytest.approx(expected, rel=1e-9)


def test_a_windows_time_includes_waiting_for_the_gpu(tmp_path, config, monkeypatch):
    """The log step reads its device values (the GPU sync) before the clock, so the queued GPU work counts.

    A read that takes 0.2 s stands in for a GPU still busy with the window's steps: reading the clock first
    left that tail out of every window (figures were overstated by up to ~15% at logger.frequency=5).
    """
    perf = new_perf_logger(tmp_path, config)
    read = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: time.sleep(0.2) or read(self))
    metrics = perf.log_step(1, torch.tensor(1.0), torch.tensor(2048.0), torch.tensor(1.0), 1e-3, force=True)
    assert metrics["step_time_s"] >= 0.2


def test_saves_and_validation_are_left_out_of_the_windows_time(tmp_path, config):
    """Time inside `paused()` (a checkpoint save, validation) counts in no window; the pause reports it."""
    perf = new_perf_logger(tmp_path, config)
    with perf.paused() as pause:
        time.sleep(0.3)
    metrics = perf.log_step(1, torch.tensor(1.0), torch.tensor(2048.0), torch.tensor(1.0), 1e-3, force=True)
    assert pause["seconds"] >= 0.3 and metrics["step_time_s"] < 0.1
