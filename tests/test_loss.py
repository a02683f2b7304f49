"""The chunked LM-head cross-entropy (`loss_chunk_size`) against HF's causal LM loss, on the CPU."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from model.modeling_llama_te import chunked_cross_entropy


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
