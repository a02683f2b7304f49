"""TE model against the HF reference on a GPU: logits, losses, packing, FP8, generation, init, exports.

    python -m pytest -m gpu tests/test_model_gpu.py      # on a CUDA GPU with TransformerEngine

Tolerances: both models run in BF16, whose unit round-off is 2^-8 (0.4%); over 4 layers the logits
of two correct implementations (different kernels, fusions and summation orders) differ by about
1% of their scale. We require cosine similarity > 0.999 between logit tensors, mean absolute
difference below 2% of the logits' mean magnitude, and losses within 0.01 (the loss near ln 256 = 5.5).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.gpu

SEQ_LENS = [37, 128, 5, 90]  # ragged lengths (THD packs them)


def hf_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=2,
        eos_token_id=0, pad_token_id=1, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )  # fmt: skip
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = hf_config()
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():  # larger than default init so that the layers matter to the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    return model


def te_from_hf(hf_model, **overrides):
    from model.convert import convert_llama_hf_to_te

    return convert_llama_hf_to_te(hf_model, **overrides).eval()


def sequences(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=g) for n in SEQ_LENS]


def assert_close_logits(a, b):
    a, b = a.float().flatten(), b.float().flatten()
    cos = F.cosine_similarity(a, b, dim=0).item()
    rel = ((a - b).abs().mean() / a.abs().mean()).item()
    assert cos > 0.999 and rel < 0.02, f"cosine {cos:.6f}, mean relative difference {rel:.4f}"


def per_seq_loss(logits, ids):  # logits [S, V], ids [S]
    return F.cross_entropy(logits[:-1].float(), ids[1:].cuda()).item()


@torch.no_grad()
def test_bshd_logits_and_loss_match_hf(hf_model):
    te_model = te_from_hf(hf_model, attn_input_format="bshd")
    ids = torch.randint(4, 256, (2, 256), device="cuda")
    hf_out = hf_model(input_ids=ids, labels=ids)
    te_out = te_model(input_ids=ids, labels=ids)
    assert_close_logits(te_out.logits, hf_out.logits)
    assert abs(te_out.loss.item() - hf_out.loss.item()) < 0.01


@torch.no_grad()
def test_thd_packed_equals_sequences_one_by_one(hf_model):
    from data.collate import ThdCollator

    te_thd = te_from_hf(hf_model, attn_input_format="thd")
    te_bshd = te_from_hf(hf_model, attn_input_format="bshd")
    seqs = sequences()
    batch = ThdCollator(pad_token_id=1)([{"input_ids": s.numpy()} for s in seqs])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    logits = te_thd(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    cu = batch["cu_seq_lens_q"].tolist()
    for i, seq in enumerate(seqs):
        packed = logits[cu[i] : cu[i + 1]]
        alone_te = te_bshd(input_ids=seq[None].cuda()).logits[0]
        alone_hf = hf_model(input_ids=seq[None].cuda()).logits[0]
        assert_close_logits(packed, alone_hf)
        assert_close_logits(packed, alone_te)
        assert abs(per_seq_loss(packed, seq) - per_seq_loss(alone_hf, seq)) < 0.01
    # The packed loss from the collator's labels is the token-weighted mean of the per-sequence losses.
    loss = te_thd(**batch).loss.item()
    expected = sum(per_seq_loss(hf_model(input_ids=s[None].cuda()).logits[0], s) * (len(s) - 1) for s in seqs)
    assert abs(loss - expected / sum(len(s) - 1 for s in seqs)) < 0.01


def test_chunked_loss_matches_full_logits_loss(hf_model):
    """`loss_chunk_size` (no [tokens, vocab] logits) gives HF's loss and the same gradients, in BF16."""
    from data.collate import ThdCollator

    batch = ThdCollator(pad_token_id=1)([{"input_ids": s.numpy()} for s in sequences()])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    results = []
    for chunk in (None, 64):
        model = te_from_hf(hf_model, attn_input_format="thd", loss_chunk_size=chunk).train()
        out = model(**batch, num_items_in_batch=torch.tensor(200.0, device="cuda"))
        out.loss.backward()
        assert (out.logits is None) == (chunk is not None)
        results.append((out.loss.item(), model.lm_head.weight.grad.float()))
    (full_loss, full_grad), (chunk_loss, chunk_grad) = results
    assert abs(full_loss - chunk_loss) < 1e-3 * full_loss
    assert_close_logits(chunk_grad, full_grad)  # same cosine / relative-difference bounds as the logits


@torch.no_grad()
def test_thd_with_padding_between_sequences(hf_model):
    from data.collate import ThdCollator

    te_model = te_from_hf(hf_model, attn_input_format="thd")
    seqs = sequences(2)
    plain = ThdCollator(pad_token_id=1)([{"input_ids": s.numpy()} for s in seqs])
    padded = ThdCollator(pad_token_id=1, pad_sequences_to_be_divisible_by=16)([{"input_ids": s.numpy()} for s in seqs])
    run = lambda b: te_model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()})  # noqa: E731
    out_plain, out_padded = run(plain), run(padded)
    cu, cu_pad = plain["cu_seq_lens_q"].tolist(), padded["cu_seq_lens_q_padded"].tolist()
    for i, seq in enumerate(seqs):
        a = out_plain.logits[0, cu[i] : cu[i + 1]]
        b = out_padded.logits[0, cu_pad[i] : cu_pad[i] + len(seq)]
        assert_close_logits(b, a)
    assert abs(out_plain.loss.item() - out_padded.loss.item()) < 0.01


@torch.no_grad()
def test_thd_model_unpads_left_padded_bshd(hf_model):
    te_model = te_from_hf(hf_model, attn_input_format="thd")
    seqs = sequences(3)[:3]
    width = max(len(s) for s in seqs)
    ids = torch.full((3, width), 1, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):  # left padding, as generate() uses
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
    logits = te_model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    for i, s in enumerate(seqs):
        assert_close_logits(logits[i, width - len(s) :], hf_model(input_ids=s[None].cuda()).logits[0])


def test_thd_model_runs_unpadded_rows_in_bshd(hf_model):
    """A THD model runs [B, S] rows without padding in TE's BSHD layout, and packed input in THD after them.

    Rows give the BSHD model's logits exactly; with activation checkpointing the recompute in backward keeps
    the forward's layout (same gradients).
    """
    from data.collate import ThdCollator
    from model.build import apply_activation_checkpointing

    thd_model, bshd_model = (te_from_hf(hf_model, attn_input_format=f) for f in ("thd", "bshd"))
    rows = torch.stack([s[:96] for s in sequences(7) if len(s) >= 96] * 2).cuda()  # [2, 96], no padding
    with torch.no_grad():
        assert torch.equal(thd_model(input_ids=rows).logits, bshd_model(input_ids=rows).logits)
        assert {layer.self_attention.qkv_format for layer in thd_model.model.layers} == {"bshd"}
        seqs = sequences(8)
        packed = ThdCollator(pad_token_id=1)([{"input_ids": s.numpy()} for s in seqs])
        packed = {k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()}
        logits = thd_model(**packed).logits[0]
        assert {layer.self_attention.qkv_format for layer in thd_model.model.layers} == {"thd"}
        for s, start in zip(seqs, packed["cu_seq_lens_q"].tolist()):
            assert_close_logits(logits[start : start + len(s)], hf_model(input_ids=s[None].cuda()).logits[0])

    grads = []
    for checkpointed in (False, True):
        model = te_from_hf(hf_model, attn_input_format="thd").train()
        if checkpointed:
            apply_activation_checkpointing(model, use_te=True)
        model(**packed).loss.backward()  # leaves the layers in THD; the rows' forward switches them to BSHD
        model.zero_grad()
        model(input_ids=rows, labels=rows).loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_activation_cpu_offload_frees_the_layer_inputs_and_keeps_the_gradients(hf_model):
    """activation_cpu_offload: after the forward the checkpointed layers' inputs are off the GPU.

    Each [T, hidden] BF16 input waits in CPU memory; backward brings it back and gives the gradients of plain
    checkpointing, up to the run-to-run noise of TE's attention backward (not deterministic by default), which
    two plain runs measure here.
    """
    from model.build import apply_activation_checkpointing

    rows = torch.randint(4, 256, (1, 16384), generator=torch.Generator().manual_seed(3)).cuda()
    held, grads = {}, {}
    for run, offload in (("plain", False), ("plain again", False), ("offload", True)):
        model = te_from_hf(hf_model, attn_input_format="thd").train()
        apply_activation_checkpointing(model, use_te=True, offload_to_cpu=offload)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=rows, labels=rows).loss
        held[run] = torch.cuda.memory_allocated() - before
        loss.backward()
        grads[run] = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        del model, loss
    layer_inputs = len(hf_model.model.layers) * rows.numel() * hf_model.config.hidden_size * 2  # BF16 bytes
    assert held["plain"] - held["offload"] >= 0.9 * layer_inputs, (held, layer_inputs)
    noise = (grads["plain again"] - grads["plain"]).abs().max().item()
    diff = (grads["offload"] - grads["plain"]).abs().max().item()
    scale = grads["plain"].abs().max().item()
    assert diff <= 2 * noise + 1e-6 * scale, (diff, noise, scale)


def _train_losses(hf_model, fp8_recipe, steps=8):
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    model = te_from_hf(hf_model, attn_input_format="thd").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    from data.collate import ThdCollator

    batch = ThdCollator(pad_token_id=1, pad_to_multiple_of=16)(
        [{"input_ids": s.numpy()} for s in sequences(4) + sequences(5)]
    )
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    losses = []
    for _ in range(steps):
        with te.autocast(enabled=fp8_recipe is not None, recipe=fp8_recipe):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "recipe", ["DelayedScaling", "Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling"]
)
def test_fp8_recipes_train_close_to_bf16(hf_model, recipe):
    from model.fp8 import build_fp8_recipe

    try:
        fp8_recipe = build_fp8_recipe(recipe, "HYBRID")
    except ValueError as e:
        assert "needs a GPU of compute capability" in str(e)
        pytest.skip(str(e))
    bf16 = _train_losses(hf_model, None)
    fp8 = _train_losses(hf_model, fp8_recipe)
    assert fp8[-1] < fp8[0] - 0.3, f"FP8 loss did not fall: {fp8}"
    assert fp8 != bf16, "FP8 losses are bitwise BF16's: the recipe was not applied"
    assert all(abs(a - b) < 0.15 for a, b in zip(fp8, bf16)), f"bf16 {bf16}\nfp8 {fp8}"


def test_unsupported_recipe_names_the_gpu_generation():
    from model.fp8 import build_fp8_recipe

    if torch.cuda.get_device_capability()[0] >= 10:
        pytest.skip("Blackwell runs every recipe")
    with pytest.raises(ValueError, match=r"MXFP8BlockScaling needs a GPU of compute capability 10.0 .*Blackwell"):
        build_fp8_recipe("MXFP8BlockScaling")


@torch.no_grad()
def test_cached_greedy_generation_equals_uncached(hf_model):
    from model.modeling_llama_te import HFInferenceParams

    te_model = te_from_hf(hf_model, attn_input_format="thd")
    config = te_model.config
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER, padding_side="left")
    inputs = tokenizer(["ACGTTGCA", "GGGCCCATATAT"], return_tensors="pt", padding=True).to("cuda")
    uncached = te_model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=False)
    cache = HFInferenceParams(
        max_batch_size=2, max_sequence_length=64, num_heads_kv=config.num_key_value_heads,
        head_dim_k=config.head_dim, dtype=torch.bfloat16, qkv_format="thd", max_ctx_len=64,
    )  # fmt: skip
    for layer_number in range(1, config.num_hidden_layers + 1):
        cache.allocate_memory(layer_number)
    cached = te_model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=True, past_key_values=cache)
    assert torch.equal(cached, uncached)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 15  # the last token is never fed back


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["bshd", "thd"])
def test_output_hidden_states_match_hf(hf_model, fmt):
    """Every layer's hidden states as HF returns them, in the input's shape.

    The embedding output first, the last one after the final norm; [B, S, H] for BSHD, [1, T, H] for a
    packed row.
    """
    te_model = te_from_hf(hf_model, attn_input_format=fmt)
    ids = torch.randint(4, 256, (1, 96), device="cuda")
    batch = {"input_ids": ids}
    if fmt == "thd":
        cu = torch.tensor([0, 40, 96], dtype=torch.int32, device="cuda")
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=56, max_length_k=56)
    te_states = te_model(**batch, output_hidden_states=True).hidden_states
    assert len(te_states) == hf_model.config.num_hidden_layers + 1
    assert te_model(**batch).hidden_states is None
    for i, state in enumerate(te_states):
        assert state.shape == (1, 96, 256), i
    hf_states = hf_model(input_ids=ids[:, :40], output_hidden_states=True).hidden_states
    for te_state, hf_state in zip(te_states, hf_states):
        assert_close_logits(te_state[:, :40], hf_state)  # the first sequence: the same in BSHD and THD


def test_hf_te_hf_model_round_trip_is_exact(hf_model):
    from model.convert import convert_llama_te_to_hf

    back = convert_llama_te_to_hf(te_from_hf(hf_model))
    original = hf_model.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name].cpu()), name


@torch.no_grad()
def test_exports_load_through_automodel_and_llama(hf_model, tmp_path):
    from checkpointing.export import export_hf_model, export_te_model

    te_model = te_from_hf(hf_model)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    te_dir = export_te_model(tmp_path / "final_model", te_model.state_dict(), te_model.config, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(te_dir, trust_remote_code=True, dtype=torch.bfloat16).cuda().eval()
    assert type(loaded).__name__ == "NVLlamaForCausalLM"
    ids = torch.randint(4, 256, (1, 64), device="cuda")
    assert torch.equal(loaded(input_ids=ids).logits, te_model(input_ids=ids).logits)

    hf_dir = export_hf_model(tmp_path / "hf", te_model.state_dict(), te_model.config, tokenizer)
    llama = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).cuda().eval()
    assert_close_logits(llama(input_ids=ids).logits, te_model(input_ids=ids).logits)
    assert math.isfinite(llama(input_ids=ids, labels=ids).loss.item())


@torch.no_grad()
@pytest.mark.parametrize("loss_chunk_size", [None, 64])
def test_te_loss_with_lowercase_weights_matches_the_weighted_reference(hf_model, loss_chunk_size):
    """`dataset.lowercase_loss_weight`: the TE model's loss (full or chunked) is the weighted mean of HF's logits."""
    from data.collate import LabelPolicy, ThdCollator
    from model.modeling_llama_te import causal_lm_loss

    te_model = te_from_hf(hf_model, attn_input_format="thd", loss_chunk_size=loss_chunk_size)
    policy = LabelPolicy(lowercase_loss_weight=0.1)
    seqs = [torch.tensor([ord(c) for c in "ACGTacgt"])[torch.randint(0, 8, (n,))] for n in SEQ_LENS]
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in ThdCollator(1, labels=policy)([{"input_ids": s.numpy()} for s in seqs]).items()}  # fmt: skip
    te_loss = te_model(**batch).loss.item()
    logits = torch.cat([hf_model(input_ids=s[None].cuda()).logits[0] for s in seqs])[None]
    reference = causal_lm_loss(logits, batch["labels"], 256, loss_weights=batch["loss_weights"]).item()
    assert te_loss == pytest.approx(reference, rel=0.01)


@pytest.mark.parametrize("layout", ["rows", "packs"])
def test_layer_graphs_give_the_eager_loss_and_gradients(hf_model, layout):
    """use_cuda_graphs at the model: replayed layers == eager layers, loss and every gradient, twice in a row.

    Packs: 5 ragged sequences filling a 384-token pack, whose boundary tensor the graphs pad with 3 empty
    sequences (max_sequences = 8); rows: [2, 96] without padding. A second replay with other tokens checks that
    the graphs read their inputs anew.
    """
    from data.collate import ThdCollator
    from model.cuda_graphs import LayerShape, capture_layer_graphs

    def batches(seed):
        if layout == "rows":
            rows = torch.stack([s[:96] for s in sequences(seed) if len(s) >= 96] * 2).cuda()
            return {"input_ids": rows, "labels": rows}
        seqs = sequences(seed)
        seqs.append(torch.randint(4, 256, (384 - sum(len(s) for s in seqs),)))  # fill the budget exactly
        batch = ThdCollator(pad_token_id=1)([{"input_ids": s.numpy()} for s in seqs])
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss_and_grads(model, batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]

    eager = te_from_hf(hf_model, attn_input_format="thd").train()
    graphed = te_from_hf(hf_model, attn_input_format="thd").train()
    shape = LayerShape.rows(2, 96) if layout == "rows" else LayerShape("packs", 384, 128, max_sequences=8)
    graphs = capture_layer_graphs(graphed, shape)
    for seed in (3, 4):
        batch = batches(seed)
        (loss_e, grads_e), (loss_g, grads_g) = loss_and_grads(eager, batch), loss_and_grads(graphed, batch)
        assert loss_g.item() == pytest.approx(loss_e.item(), rel=1e-3)
        for g, e in zip(grads_g, grads_e):
            assert F.cosine_similarity(g.flatten().float(), e.flatten().float(), dim=0) > 0.999
    assert (graphs.replayed, graphs.eager) == (2, 0)
    graphed.eval()  # validation: eager layers, the same numbers as the eager model
    with torch.no_grad():
        assert torch.allclose(graphed(**batch).loss, eager.eval()(**batch).loss, rtol=1e-3)
    assert graphs.replayed == 2
