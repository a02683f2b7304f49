"""The chunked LM-head cross-entropy (`loss_chunk_size`) against HF's causal LM loss, on the CPU."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from model.modeling_llama_te import causal_lm_loss, chunked_cross_entropy


@pytest.mark.parametrize("num_items", [None, 50.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_loss_and_gradients_match_full_logits(chunk_size, num_items):
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 2, 37, 16, 300
    hidden = torch.randn(batch, seq, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :5] = -100  # ignored targets (THD sequence starts, masked bases)
    labels[1, 10] = -100
    num_items = None if num_items is None else torch.tensor(num_items)

    reference = ForCausalLMLoss(hidden @ weight.t(), labels, vocab, num_items_in_batch=num_items)
    chunked = chunked_cross_entropy(hidden, weight, labels, chunk_size, num_items)
    torch.testing.assert_close(chunked.double(), reference.double(), rtol=1e-6, atol=0)

    # a non-unit upstream gradient, as loss scaling or accumulation would give
    grads_ref = torch.autograd.grad(3.0 * reference, (hidden, weight))
    grads = torch.autograd.grad(3.0 * chunked, (hidden, weight))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_loss_never_holds_full_logits():
    """The largest tensor the loss creates (seen through a TorchFunctionMode) is one chunk's logits."""
    torch.manual_seed(0)
    tokens, hidden_size, vocab, chunk = 4096, 8, 5000, 256
    hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    largest = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.is_tensor(out):
                largest.append(out.numel())
            return out

    with Watch():
        chunked_cross_entropy(hidden, weight, labels, chunk)
    assert max(largest) == chunk * vocab  # not tokens * vocab


def weighted_case():
    """Random hidden states, LM head, labels with ignored targets, and per-target loss weights."""
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 2, 37, 16, 300
    hidden = torch.randn(batch, seq, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :5] = -100
    weights = torch.where(torch.rand(batch, seq) < 0.4, 0.1, 1.0).double()
    weights[labels == -100] = 0.0
    return hidden, weight, labels, weights


def test_weighted_loss_is_the_weighted_mean_and_the_chunked_one_agrees():
    """`loss_weights` (dataset.lowercase_loss_weight): sum of weight x nll over the summed weights, both paths."""
    hidden, weight, labels, weights = weighted_case()
    logits = hidden @ weight.t()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="none")  # fmt: skip
    expected = (nll * weights[:, 1:].reshape(-1)).sum() / weights[:, 1:].sum()
    full = causal_lm_loss(logits, labels, 300, loss_weights=weights)
    chunked = chunked_cross_entropy(hidden, weight, labels, 7, loss_weights=weights)
    torch.testing.assert_close(full.double(), expected, rtol=1e-6, atol=0)  # (both losses compute in fp32)
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-6, atol=0)
    for got, want in zip(torch.autograd.grad(chunked, (hidden, weight)), torch.autograd.grad(full, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_weight_zero_is_masking_and_no_weights_is_hfs_loss():
    hidden, weight, labels, weights = weighted_case()
    logits = hidden @ weight.t()
    low = (weights > 0) & (weights < 0.5)  # the weight-0.1 positions
    masked = labels.clone()
    masked[low] = -100  # the positions a weight of 0 drops
    zero = torch.where(low, 0.0, weights)
    torch.testing.assert_close(causal_lm_loss(logits, labels, 300, loss_weights=zero),
                               ForCausalLMLoss(logits, masked, 300), rtol=1e-6, atol=0)  # fmt: skip
    assert torch.equal(causal_lm_loss(logits, labels, 300), ForCausalLMLoss(logits, labels, 300))  # weight 1: HF's
