"""Using a trained model on the CPU, each result checked against the model's own forward pass.

Loading from each place training leaves a model, evaluate.py, score.py (sequences and variants), generate.py.
"""

import math
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ENV, PARQUET, make_cfg

import evaluate
import generate
import score
import train_ddp
import train_fsdp2
from data.dna import is_base, reverse_complement
from use.inference import encode, load_model, token_log_probs

GENOME = pq.read_table(PARQUET).column("sequence").to_pylist()[:2]  # two real records as two "chromosomes"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of L0_sanity with FSDP2 (DCP checkpoint + export) and DDP (one-file checkpoint)."""
    root = tmp_path_factory.mktemp("trained")
    common = ["num_train_steps=4", "checkpoint.save_every_n_steps=4", "checkpoint.save_final_model=true"]
    train_fsdp2.main(make_cfg(root / "fsdp2", *common, f"checkpoint.ckpt_dir={root / 'fsdp2' / 'ckpt'}"))
    train_ddp.main(make_cfg(root / "ddp", *common, f"checkpoint.ckpt_dir={root / 'ddp' / 'ckpt'}"))
    return root


def direct_log_probs(model, tokenizer, sequence: str) -> np.ndarray:
    ids = torch.as_tensor(encode(tokenizer, sequence))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logp.gather(1, ids[0, 1:, None])[:, 0].numpy()


def test_every_saved_form_loads_the_same_model(trained):
    sequence = GENOME[0][:300]
    scores = {}
    for run in ("fsdp2", "ddp"):  # an export (safetensors) and a checkpoint (DCP shards, or one torch file)
        for form in ("final_model", "step_4"):
            model, tokenizer = load_model(trained / run / "ckpt" / form)
            scores[run, form] = token_log_probs(model, [encode(tokenizer, sequence)])[0]
        np.testing.assert_array_equal(scores[run, "final_model"], scores[run, "step_4"])  # the same weights
    np.testing.assert_allclose(scores["ddp", "step_4"], scores["fsdp2", "step_4"], rtol=1e-4)  # same training
    assert scores["fsdp2", "step_4"].mean() > -math.log(256)  # trained a little: better than a uniform guess


class PackedHF(torch.nn.Module):
    """An HF model behind the TE model's THD interface, each packed sequence run on its own.

    token_log_probs' packing and unpacking, checked on the CPU against the model's own per-sequence scores.
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, SimpleNamespace(attn_input_format="thd")
        self.packs = []

    def forward(self, input_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k):
        """Logits of the packed sequences, each computed alone."""
        bounds = cu_seq_lens_q.tolist()
        self.packs.append(len(bounds) - 1)
        logits = [self.model(input_ids=input_ids[:, a:b]).logits for a, b in zip(bounds[:-1], bounds[1:])]
        return SimpleNamespace(logits=torch.cat(logits, dim=1))


def test_packed_scoring_equals_one_by_one(trained):
    model, tokenizer = load_model(trained / "fsdp2" / "ckpt" / "final_model", use_te=False)
    windows = [encode(tokenizer, GENOME[0][i : i + n]) for i, n in ((0, 300), (300, 17), (500, 1000), (9, 0), (7, 64))]
    packed = PackedHF(model)
    got = token_log_probs(packed, windows, max_tokens=400)
    assert packed.packs == [2, 1, 2]  # 301 + 18 tokens, then 1001 alone, then 1 + 65
    for a, b in zip(got, token_log_probs(model, windows)):
        np.testing.assert_array_equal(a, b)
    assert [len(x) for x in got] == [300, 17, 1000, 0, 64]


def test_fp8_scoring_is_refused_where_the_hf_model_runs(trained, tmp_path):
    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    with pytest.raises(ValueError, match="--fp8 scores with the TE model on a GPU"):
        evaluate.main(["--model", model_dir, "--data", PARQUET, "--use-te", "false", "--fp8"])
    with pytest.raises(ValueError, match="--fp8 with --share-prefix"):
        score.main(["variants", "--model", model_dir, "--reference", "r.fa", "--vcf", "c.vcf", "--out", "x.tsv",
                    "--fp8", "--share-prefix"])  # fmt: skip


def test_sliding_windows_score_every_base_once_with_the_stated_context():
    assert list(evaluate.sliding_windows(10, window=5, context=2)) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert list(evaluate.sliding_windows(11, 5, 2))[-1] == (8, 11, 10)  # a short last window
    assert list(evaluate.sliding_windows(10, 5, 0)) == [(0, 4, 0), (4, 8, 4), (8, 10, 8)]  # consecutive
    for length, window, context in [(1, 3, 0), (1000, 200, 99), (1001, 64, 63 - 1), (57, 1024, 512)]:
        windows = list(evaluate.sliding_windows(length, window, context))
        scored = [i for _, end, first in windows for i in range(first, end)]
        assert scored == list(range(length))  # every base once, in order
        assert all(end - start <= window - 1 for start, end, _ in windows)
        assert all(first - start >= context for start, _, first in windows[1:])


@pytest.mark.parametrize("context", [0, 50])
def test_evaluate_matches_a_hand_computation(trained, tmp_path, context):
    model_dir = trained / "fsdp2" / "ckpt" / "final_model"
    out = tmp_path / "eval.tsv"
    records = [GENOME[0][:700], GENOME[1][:450].lower() + "NNRYacgt"]  # soft-masked, N and IUPAC characters
    fasta = tmp_path / "records.fa"
    fasta.write_text("".join(f">r{i}\n{r}\n" for i, r in enumerate(records)))
    summary = evaluate.main(["--model", str(model_dir), "--data", str(fasta), "--window", "200", "--context",
                             str(context), "--out", str(out)])  # fmt: skip
    model, tokenizer = load_model(model_dir)
    nll, bases, excluded, per_record = 0.0, 0, 0, []
    for record in records:
        record, start = record.upper(), 0  # soft-masked bases are read as uppercase
        nll_before, bases_before = nll, bases
        while start < len(record):  # windows of <BOS> + 199 bases, the first `context` of later ones not scored
            begin = max(0, start - context)
            chunk = record[begin : begin + 199]
            skip = start - begin
            base = is_base(np.frombuffer(chunk.encode(), dtype=np.uint8))[skip:]
            nll -= direct_log_probs(model, tokenizer, chunk)[skip:][base].sum()
            bases, excluded, start = bases + int(base.sum()), excluded + int((~base).sum()), begin + len(chunk)
        per_record.append((nll - nll_before) / (bases - bases_before))
    assert (summary["bases"], summary["excluded"]) == (bases, excluded) == (1154, 4)
    assert summary["per_record_nll_nats"] == pytest.approx(sum(per_record) / 2, rel=1e-6)  # OpenGenome2's metric
    assert summary["token_weighted_nll_nats"] == pytest.approx(nll / bases, rel=1e-6)
    assert summary["bits_per_base"] == pytest.approx(nll / bases / math.log(2), rel=1e-6)
    assert out.read_text().splitlines()[0].split("\t") == ["name", "length", "bases", "excluded", "nll_nats",
                                                           "bits_per_base"]  # fmt: skip
    if context:  # context helps a trained model: the bases after each window boundary are predicted better
        no_context = evaluate.main(["--model", str(model_dir), "--data", str(fasta), "--window", "200",
                                    "--context", "0"])  # fmt: skip
        assert summary["bits_per_base"] != no_context["bits_per_base"]


def test_evaluate_reads_soft_masked_bases_as_uppercase_and_defaults_to_the_training_window(trained, tmp_path):
    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    upper, lower = tmp_path / "upper.fa", tmp_path / "lower.fa"
    upper.write_text(f">r\n{GENOME[0][:600].upper()}\n")
    lower.write_text(f">r\n{GENOME[0][:600].lower()}\n")
    a, b = (evaluate.main(["--model", model_dir, "--data", str(f)]) for f in (upper, lower))
    assert a["bits_per_base"] == b["bits_per_base"] and a["bases"] == b["bases"] == 600
    assert (a["window"], a["context"]) == (256, 127)  # L0_sanity as the fixture trained it: max_seq_length=256
    kept = evaluate.main(["--model", model_dir, "--data", str(lower), "--keep-case"])
    assert kept["bases"] == 600 and kept["bits_per_base"] != a["bits_per_base"]  # lowercase tokens, other ids
    with pytest.raises(ValueError, match="--window 256 --context 255: need"):
        evaluate.main(["--model", model_dir, "--data", str(upper), "--context", "255"])


def test_score_sequences_matches_a_hand_computation(trained, tmp_path):
    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    fasta = tmp_path / "seqs.fa"
    fasta.write_text(">a\nACGTACGGTTCA\n>b\nGGGCCCAATTAACG\n")
    score.main(["sequences", "--model", model_dir, "--input", str(fasta), "--out", str(tmp_path / "s.tsv")])
    rows = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()[1:]]
    model, tokenizer = load_model(model_dir)
    for (_, _, ll, per_base), seq in zip(rows, ["ACGTACGGTTCA", "GGGCCCAATTAACG"]):
        expected = direct_log_probs(model, tokenizer, seq).sum()
        assert float(ll) == pytest.approx(expected, rel=1e-6) and float(per_base) == pytest.approx(expected / len(seq))


def write_reference_and_vcf(tmp_path, variants):
    reference = tmp_path / "ref.fa"
    reference.write_text("".join(f">chr{i + 1}\n{seq}\n" for i, seq in enumerate(GENOME)))
    header = ["##fileformat=VCFv4.2", *(f"##contig=<ID=chr{i + 1},length={len(s)}>" for i, s in enumerate(GENOME)),
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]  # fmt: skip
    body = [f"{c}\t{p}\t{i}\t{r}\t{a}\t.\t.\t." for c, p, i, r, a in variants]
    vcf = tmp_path / "calls.vcf"
    vcf.write_text("\n".join(header + body) + "\n")
    return reference, vcf


def variant_cases():
    chrom = GENOME[0]
    snv_ref, ins_ref, del_ref = chrom[499], chrom[999], chrom[1499:1503]
    snv_alt = "A" if snv_ref != "A" else "C"
    return [("chr1", 500, "snv", snv_ref, snv_alt), ("chr1", 1000, "ins", ins_ref, ins_ref + "GATTACA"),
            ("chr1", 1500, "del", del_ref, del_ref[0]), ("chr1", 10, "near_start", chrom[9], "T")]  # fmt: skip


@pytest.mark.parametrize(
    ("both_strands", "share_prefix"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_variant_scores_are_ll_alt_minus_ll_ref(trained, tmp_path, both_strands, share_prefix, monkeypatch):
    import use.variants

    shared_calls = []  # the scores are the same either way: check which path ran
    original = use.variants.shared_prefix_log_likelihoods
    monkeypatch.setattr(
        use.variants, "shared_prefix_log_likelihoods", lambda *a: shared_calls.append(1) or original(*a)
    )
    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    cases = variant_cases()
    extra = [("chr2", 100, "mismatch", "N", "A"), ("chr2", 200, "symbolic", GENOME[1][199], "<DEL>")]
    reference, vcf = write_reference_and_vcf(tmp_path, [*cases, *extra])
    out = tmp_path / "scored.tsv"
    argv = ["variants", "--model", model_dir, "--reference", str(reference), "--vcf", str(vcf), "--window", "101",
            "--out", str(out), *(["--both-strands"] if both_strands else []),
            *(["--share-prefix"] if share_prefix else [])]  # fmt: skip
    summary = score.main(argv)
    assert (summary["scored"], summary["ref_mismatch"], summary["symbolic_alt"]) == (4, 1, 1)
    assert bool(shared_calls) == share_prefix
    model, tokenizer = load_model(model_dir)
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert [row[9] for row in rows] == ["scored"] * 4 + ["ref_mismatch", "symbolic_alt"]  # every record, in order
    for (_, pos, name, ref, alt), row in zip(cases, rows):
        start = int(row[5])
        ref_window = GENOME[0][start : start + 100]
        assert len(ref_window) == 100 and ref_window[pos - 1 - start :].startswith(ref)
        alt_window = ref_window[: pos - 1 - start] + alt + ref_window[pos - 1 - start + len(ref) :]
        strands = (lambda s: s, reverse_complement) if both_strands else (lambda s: s,)
        expected = np.mean([direct_log_probs(model, tokenizer, f(alt_window)).sum()
                            - direct_log_probs(model, tokenizer, f(ref_window)).sum() for f in strands])  # fmt: skip
        # The shared path pads its rows (another order of fp32 sums): ~1e-7 of each LL of ~-70 nats.
        assert float(row[8]) == pytest.approx(expected, rel=1e-5, abs=2e-5 if share_prefix else 1e-6), name


def test_each_distinct_window_is_scored_once(trained, tmp_path, monkeypatch):
    import use.variants

    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    ref = GENOME[0][499]
    alts = [b for b in "ACGT" if b != ref]
    single = [("chr1", 500, f"snv{i}", ref, alt) for i, alt in enumerate(alts)]
    multi = [("chr1", 500, "multi", ref, ",".join(alts)), ("chr1", 500, "again", ref, alts[0])]
    scored_windows = []
    original = use.variants.token_log_probs
    monkeypatch.setattr(use.variants, "token_log_probs", lambda m, w: scored_windows.extend(w) or original(m, w))
    scores = {}
    for name, records in (("single", single), ("multi", multi)):
        reference, vcf = write_reference_and_vcf(tmp_path, records)
        out = tmp_path / f"{name}.tsv"
        score.main(["variants", "--model", model_dir, "--reference", str(reference), "--vcf", str(vcf),
                    "--window", "101", "--out", str(out)])  # fmt: skip
        scores[name] = [float(line.split("\t")[8]) for line in out.read_text().splitlines()[1:]]
    assert len(scored_windows) == 2 * (1 + len(alts))  # one REF window per run, one window per distinct ALT
    assert scores["multi"] == [*scores["single"], scores["single"][0]]  # the repeated record: the same score


def test_shared_prefix_rows_equal_full_windows(trained, monkeypatch):
    import use.shared_prefix
    from use.shared_prefix import shared_prefix_log_likelihoods

    monkeypatch.setattr(use.shared_prefix, "LENGTH_MULTIPLE", 16)  # rows padded to 16: pads in the cache too
    model, tokenizer = load_model(trained / "fsdp2" / "ckpt" / "final_model")
    # Three rows of one call, each of its own length: prefixes of 50, 37 and 12 bases, REF tails of 30, 19
    # and 1 bases, ALT tails of 25, 40 and 3 (an indel's windows differ in length).
    rows = [(0, 50, 30, 25), (700, 37, 19, 40), (1400, 12, 1, 3)]
    prefixes = [encode(tokenizer, GENOME[0][a : a + p]) for a, p, _, _ in rows]
    tails = [
        [GENOME[0][a + p : a + p + r] for a, p, r, _ in rows],
        ["T" + GENOME[1][a + 1 : a + x] for a, _, _, x in rows],
    ]
    ids = [[np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in k] for k in tails]
    got = shared_prefix_log_likelihoods(model, prefixes, ids, rows=4)
    for k, tail in enumerate(tails):
        whole = [encode(tokenizer, GENOME[0][a : a + p] + t) for (a, p, _, _), t in zip(rows, tail)]
        np.testing.assert_allclose(got[k], [x.sum() for x in token_log_probs(model, whole)], rtol=1e-5)


def test_ref_mismatch_can_stop_vcf_output_carries_llr_and_length_matched_scores(trained, tmp_path):
    import pysam

    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    reference, vcf = write_reference_and_vcf(tmp_path, [*variant_cases(), ("chr2", 100, "mismatch", "N", "A")])
    with pytest.raises(ValueError, match=r"chr2:100 N>A cannot be scored \(ref_mismatch: the reference reads"):
        score.main(["variants", "--model", model_dir, "--reference", str(reference), "--vcf", str(vcf),
                    "--window", "101", "--out", str(tmp_path / "x.tsv"), "--on-ref-mismatch", "stop"])  # fmt: skip
    score.main(["variants", "--model", model_dir, "--reference", str(reference), "--vcf", str(vcf), "--window", "101",
                "--out", str(tmp_path / "scored.vcf")])  # fmt: skip
    with pysam.VariantFile(str(tmp_path / "scored.vcf")) as scored:
        llr = {r.id: r.info.get("LLR") for r in scored}
    assert all(llr[name] is not None for _, _, name, _, _ in variant_cases()) and llr["mismatch"] == (None,)
    score.main(["variants", "--model", model_dir, "--reference", str(reference), "--vcf", str(vcf), "--window", "101",
                "--out", str(tmp_path / "matched.tsv"), "--length-matched"])  # fmt: skip
    rows = {row.split("\t")[2]: row.split("\t") for row in (tmp_path / "matched.tsv").read_text().splitlines()[1:]}
    model, tokenizer = load_model(model_dir)
    for name, pos, ref, alt in [(c[2], c[1], c[3], c[4]) for c in variant_cases() if c[2] in ("ins", "del")]:
        start = int(rows[name][5])
        window = GENOME[0][start : start + 100]
        alt_window = (window[: pos - 1 - start] + alt + GENOME[0][pos - 1 + len(ref) :])[:100]  # same length
        expected = (
            direct_log_probs(model, tokenizer, alt_window).sum() - direct_log_probs(model, tokenizer, window).sum()
        )
        assert float(rows[name][8]) == pytest.approx(expected, abs=1e-5), name  # float32 sums of ~100 nats


def test_generation_is_reproducible_and_stops_at_eos(trained, tmp_path):
    model_dir = str(trained / "fsdp2" / "ckpt" / "final_model")
    sample = ["--model", model_dir, "--prompt", GENOME[0][:50], "--max-new-tokens", "40", "--top-k", "4"]
    a, b = generate.main([*sample, "--seed", "5"]), generate.main([*sample, "--seed", "5"])
    c = generate.main([*sample, "--seed", "6"])
    assert a == b and a != c and set(a[0][1]) <= set("ACGT") and len(a[0][1]) == 40
    stopped = generate.main([*sample, "--alphabet", "", "--out", str(tmp_path / "g.fa")])  # only <EOS> allowed
    assert stopped == [("prompt_generated", "")] and (tmp_path / "g.fa").read_text() == ">prompt_generated\n\n"
    assert generate.continuation([65, 67, 0, 71, 1], eos_id=0) == [65, 67]


def test_markov_baseline_probabilities_and_evaluate_path(tmp_path):
    from use.baselines import MarkovModel

    model = MarkovModel(order=1, alpha=1.0).fit(["AACAGT", "acgN"])  # lowercase counts; N breaks a context
    counts_after_a = {"A": 1, "C": 2, "G": 1, "T": 0}  # AA, AC, AG (from AACAGT) and ac (from acgN)
    ids = np.frombuffer(b"\x02AT", dtype=np.uint8).astype(np.int64)  # <BOS> A T
    logp = model.log_probs(ids)
    order0 = (model.counts[0][0, 0] + 1) / (model.counts[0][0].sum() + 4)  # A after <BOS>: base composition
    assert logp[0] == pytest.approx(math.log(order0))
    assert logp[1] == pytest.approx(math.log((counts_after_a["T"] + 1) / (sum(counts_after_a.values()) + 4)))

    fasta = tmp_path / "train.fa"
    fasta.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(GENOME)))
    summary = evaluate.main(["--model", "markov:0", "--train-data", str(fasta), "--data", str(fasta)])
    assert 1.8 < summary["bits_per_base"] < 2.0  # base composition: under 2 bits (these records are GC-rich)


TOOL_ERRORS = [  # (command, the error's line); files made by the test: empty.fa, headers.fa, ref.fa, an empty folder
    (
        ["evaluate.py", "--model", "markov:1", "--train-data", "headers.fa", "--data", "empty.fa"],
        "No FASTA/FASTQ records",
    ),
    (["evaluate.py", "--model", "no_weights", "--data", "headers.fa"], "--data headers.fa holds no bases"),
    (["evaluate.py", "--model", "no_weights", "--data", PARQUET], "no_weights is neither an exported model"),
    (
        ["evaluate.py", "--model", "markov:1", "--train-data", "headers.fa", "--data", "nope.fa"],
        "--data nope.fa does not exist",
    ),
    (
        ["score.py", "sequences", "--model", "no_weights", "--input", "headers.fa", "--out", "x.tsv"],
        "is neither an exported model",
    ),
    (  # inputs are checked before the model is loaded
        [
            "score.py",
            "variants",
            "--model",
            "no_weights",
            "--reference",
            "ref.fa",
            "--vcf",
            "nope.vcf",
            "--out",
            "x.vcf",
        ],
        "--vcf nope.vcf does not exist",
    ),
    (
        [
            "score.py",
            "variants",
            "--model",
            "no_weights",
            "--reference",
            "headers.fa",
            "--vcf",
            "x.vcf",
            "--out",
            "x.vcf",
        ],
        "--reference headers.fa could not be read as FASTA",
    ),
    (["generate.py", "--model", "no_weights", "--prompt", "ACGT"], "no_weights is neither an exported model"),
    (["generate.py", "--model", "no_weights", "--prompts", "nope.fa"], "--prompts nope.fa does not exist"),
    (
        ["generate.py", "--model", "no_weights", "--prompt", "prompts.fa"],
        "--prompt 'prompts.fa' holds characters that",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("argv", "message"), TOOL_ERRORS, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(TOOL_ERRORS)])
def test_tool_user_errors_are_one_line_exit_2(tmp_path, argv, message):
    import sys

    (tmp_path / "empty.fa").write_text("")
    (tmp_path / "headers.fa").write_text(">a\n>b\n")
    (tmp_path / "ref.fa").write_text(">c\nACGTACGT\n")
    (tmp_path / "no_weights").mkdir()
    recipe = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(recipe / argv[0]), *argv[1:]]
    result = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_checkpoint_folder_as_model_names_what_it_holds(tmp_path):
    (tmp_path / "final_model").mkdir()
    (tmp_path / "final_model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"it holds final_model: pass one of those \(e.g. .*final_model\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("run", ["fsdp2", "ddp"])  # DCP shards, one torch file
def test_a_damaged_checkpoint_as_model_is_one_error_naming_the_others(trained, tmp_path, run):
    damaged = tmp_path / "ckpt" / "step_4"
    shutil.copytree(trained / run / "ckpt" / "step_4", damaged)
    shutil.copytree(trained / run / "ckpt" / "final_model", tmp_path / "ckpt" / "final_model")
    for f in damaged.rglob("*"):
        if f.suffix in (".distcp", ".pt") and f.name != "rank_0.pt":  # the weights' files, cut short
            f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=r"step_4 could not be read \(.*\): the checkpoint is damaged. .*\(final_model\)"
    ):
        load_model(damaged)


def test_convert_writes_a_plain_llama_that_scores_like_the_export(trained, tmp_path):
    """`python convert.py final_model out/`: LlamaForCausalLM without remote code (vLLM, SGLang), same weights."""
    import json

    from transformers import AutoModelForCausalLM

    import convert

    export = trained / "fsdp2" / "ckpt" / "final_model"
    out = convert.main([str(export), str(tmp_path / "llama")])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    model, tokenizer = load_model(export, use_te=False)  # (FP32 weights here: a CPU run trains in FP32)
    ids = encode(tokenizer, GENOME[0][:300])
    for parameter in model.parameters():  # the same weights rounded to BF16 (not RoPE's buffer)
        parameter.data = parameter.data.to(torch.bfloat16).float()
    expected = token_log_probs(model, [ids])[0]
    np.testing.assert_allclose(token_log_probs(plain, [ids])[0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="already holds a model"):
        convert.main([str(export), str(out)])
