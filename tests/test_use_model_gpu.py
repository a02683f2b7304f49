"""The TE paths of evaluate/score/generate on a GPU: packed THD scoring equals HF per-window scoring.

python -m pytest -m gpu tests/test_use_model_gpu.py
"""

import numpy as np
import pytest
from test_use_model import GENOME, trained  # noqa: F401  (the module-scoped trained model fixture)

import generate
from use.inference import encode, load_model, token_log_probs

pytestmark = pytest.mark.gpu


def test_te_packed_scoring_equals_hf_per_window(trained):  # noqa: F811
    model_dir = trained / "fsdp2" / "ckpt" / "final_model"
    te_model, tokenizer = load_model(model_dir, use_te=True)
    hf_model, _ = load_model(model_dir, use_te=False, device="cuda")
    windows = [encode(tokenizer, GENOME[0][i : i + n]) for i, n in ((0, 300), (300, 17), (500, 1000), (2000, 64))]
    te = token_log_probs(te_model, windows, max_tokens=1024)  # two packed micro-batches
    hf = token_log_probs(hf_model, windows)
    for a, b in zip(te, hf):
        np.testing.assert_allclose(a.sum(), b.sum(), rtol=1e-2)
        assert np.corrcoef(a, b)[0, 1] > 0.99


def test_te_generation_with_its_kv_cache(trained):  # noqa: F811
    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    argv = ["--model", model_dir, "--prompt", GENOME[0][:50], "--max-new-tokens", "32", "--greedy"]
    te = generate.main([*argv, "--use-te", "true"])
    hf = generate.main([*argv, "--use-te", "false"])
    assert len(te[0][1]) == 32 and set(te[0][1]) <= set("ACGT")
    assert te[0][1][:8] == hf[0][1][:8]  # greedy: the same first bases (bf16 kernels may diverge later)


def test_fp8_block_scaled_scoring_is_close_to_bf16_and_independent_of_the_pack(trained):  # noqa: F811
    model_dir = trained / "fsdp2" / "ckpt" / "final_model"
    bf16, tokenizer = load_model(model_dir, use_te=True)
    fp8, _ = load_model(model_dir, use_te=True, fp8=True)
    windows = [encode(tokenizer, GENOME[0][i : i + n]) for i, n in ((0, 300), (300, 17), (500, 1000), (2000, 64))]
    reference = token_log_probs(bf16, windows)
    alone = [token_log_probs(fp8, [w])[0] for w in windows]
    packed = token_log_probs(fp8, windows)
    for a, b, c in zip(reference, alone, packed):
        np.testing.assert_allclose(b.sum(), a.sum(), rtol=2e-2)  # FP8 GEMMs: a little off BF16
        np.testing.assert_allclose(c, b, atol=2e-2)  # a window's scores do not depend on its pack neighbours
    assert any(not np.array_equal(a, b) for a, b in zip(reference, alone))  # FP8 GEMMs ran: not BF16's numbers


def test_te_shared_prefix_variant_scores_equal_full_windows(trained, tmp_path, monkeypatch):  # noqa: F811
    from test_use_model import variant_cases, write_reference_and_vcf

    import score
    import use.variants

    cached = []  # the scores are alike either way: check that the shared path ran, on the TE model
    original = use.variants.shared_prefix_log_likelihoods
    monkeypatch.setattr(use.variants, "shared_prefix_log_likelihoods",
                        lambda model, *a: cached.append(model.config.model_type) or original(model, *a))  # fmt: skip

    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    chrom = GENOME[0]  # one cached batch of 7 rows of 4 lengths: SNVs, one near the start, an insertion, a deletion
    snvs = [("chr1", p, f"row{p}", chrom[p - 1], "A" if chrom[p - 1] != "A" else "C") for p in (700, 1300, 1900)]
    reference, vcf = write_reference_and_vcf(tmp_path, variant_cases() + snvs)  # + an insertion, a deletion, ...
    rows = {}
    for shared in (False, True):
        out = tmp_path / f"shared_{shared}.tsv"
        score.main(["variants", "--model", model_dir, "--reference", str(reference), "--vcf", str(vcf),
                    "--window", "101", "--use-te", "true", "--out", str(out),
                    *(["--share-prefix"] if shared else [])])  # fmt: skip
        rows[shared] = np.array(
            [[float(x) for x in line.split("\t")[6:8]] for line in out.read_text().splitlines()[1:]]
        )
    np.testing.assert_allclose(rows[True], rows[False], rtol=1e-2)  # LL(ref), LL(alt): bf16 kernels, other shapes
    assert cached == ["nvllama"]  # one cached batch, on the TE model
