"""scripts/restate_mfu.py: old rows get the causal count, kept rows stay, the old figure is kept beside it."""

import json
import sys
from pathlib import Path

import pytest
from conftest import build_model_config_of, make_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_a_full_window_row_is_restated_in_closed_form(tmp_path, monkeypatch):
    import restate_mfu

    from model.shape import count_parameters, head_dim_of
    from perf_logger import PEAK_BF16_FLOPS

    cp_row = {"group": "cp", "name": "CP 2 GPU seq 16k", "gpus": 2, "tokens_per_s_per_gpu": 44_000.0, "mfu": 0.55,
              "overrides": "cp_size=2 dataset.max_seq_length=16384"}  # fmt: skip
    done = {"group": "model", "name": "TE BF16 THD", "gpus": 1, "tokens_per_s_per_gpu": 80_000.0, "mfu": 0.5,
            "overrides": "use_sequence_packing=true", "mfu_convention": "causal"}  # fmt: skip
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"notes": "", "rows": [cp_row, done]}))
    monkeypatch.setattr(sys, "argv", ["restate_mfu.py", str(path)])
    restate_mfu.main()
    cp, kept = json.loads(path.read_text())["rows"]

    config = build_model_config_of(make_cfg(tmp_path, name="L1_genomic_1b"), use_te=False)
    layers, heads, head_dim = config.num_hidden_layers, config.num_attention_heads, head_dim_of(config)
    per_token = 6 * count_parameters(config, with_embedding=False) + 6 * layers * heads * head_dim * 16384
    assert cp["mfu"] == pytest.approx(44_000 * per_token / PEAK_BF16_FLOPS["H200"], rel=1e-9)
    assert cp["mfu_full_attention_window"] == 0.55 and cp["mfu_convention"] == "causal"
    assert cp["mfu"] < 0.55  # the full square counted twice the attention
    assert kept == done  # measured under the causal count already: untouched
