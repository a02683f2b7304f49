"""Windows that share a prefix, scored with the prefix run once: a variant's REF and ALT windows.

    lls = shared_prefix_log_likelihoods(model, prefixes, suffixes)   # lls[k][b] = LL of prefixes[b] + suffixes[k][b]

A REF window and its ALT window hold the same bases up to the variant. The prefix (`<BOS>` and the bases
before the variant) runs once and stays in the model's KV cache; each suffix then runs on the cached
prefix, the cache cut back to the prefix in between. A causal model predicts a token from the tokens
before it only, so each window's log-likelihood is the full-window one (up to kernel rounding), for
P + S_ref + S_alt tokens of work instead of 2P + S_ref + S_alt. The rows of one call share their lengths
(`use.variants` groups its windows so). HF models use their `DynamicCache`; the TE model uses TE's KV
cache with a manager that lets a sequence go on by a whole suffix (TE's own adds one token per step, for
generation).
"""

import numpy as np
import torch


def shared_prefix_log_likelihoods(model, prefixes: list[np.ndarray], suffixes: list[list[np.ndarray]]) -> np.ndarray:
    """[len(suffixes), len(prefixes)] summed log p of every token after the first, of each prefix + suffix."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.stack(prefixes), device=device)
    cache = _new_cache(model, len(prefixes), ids.shape[1] + max(s[0].size for s in suffixes))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, past_key_values=cache, use_cache=True).logits.float(), -1)
        prefix_ll = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0].double().sum(1)
        next_token = logp[:, -1]  # predicts each suffix's first token
        out = []
        for suffix in suffixes:
            s = torch.as_tensor(np.stack(suffix), device=device)
            logp = torch.log_softmax(model(input_ids=s, past_key_values=cache, use_cache=True).logits.float(), -1)
            ll = prefix_ll + next_token.gather(1, s[:, :1])[:, 0].double()
            out.append(ll + logp[:, :-1].gather(2, s[:, 1:, None])[..., 0].double().sum(1))
            _crop(cache, ids.shape[1])
    return torch.stack(out).cpu().numpy()


def _new_cache(model, batch: int, length: int):
    """An empty KV cache for `batch` sequences of up to `length` tokens, of the kind the model takes."""
    if getattr(model.config, "model_type", None) != "nvllama":
        from transformers import DynamicCache

        return DynamicCache()
    from model.modeling_llama_te import HFInferenceParams
    from model.shape import head_dim_of

    config = model.config
    cache = HFInferenceParams(
        max_batch_size=batch,
        max_sequence_length=length,
        max_ctx_len=length,
        qkv_format="thd",
        num_heads_kv=config.num_key_value_heads,
        head_dim_k=head_dim_of(config),
        dtype=next(model.parameters()).dtype,
        custom_cache_manager=_continuing_cache_manager(),
    )
    for layer_number in range(1, config.num_hidden_layers + 1):
        cache.allocate_memory(layer_number)
    return cache


def _crop(cache, length: int) -> None:
    """Cut every cached sequence back to its first `length` tokens (the next suffix overwrites the rest)."""
    if hasattr(cache, "cache_manager"):
        for seq in cache.cache_manager.sequences:
            cache.cache_manager.sequences[seq] = length
    else:
        cache.crop(length)


def _continuing_cache_manager():
    """TE's non-paged KV cache manager, except that a sequence that goes on adds the step's tokens, not one."""
    from transformer_engine.pytorch.attention.inference import NonPagedKVCacheManager

    class ContinuingKVCacheManager(NonPagedKVCacheManager):
        def pre_step(self, step_dict):
            if self.sequences and list(step_dict) != list(self.sequences):
                raise ValueError("Every step continues the same sequences, in the same order.")
            if not self.sequences:  # the cache rows are the batch rows, in order
                self.batch_indices.copy_(torch.arange(self.max_batch_size, dtype=self.batch_indices.dtype))
            for seq, tokens in step_dict.items():
                self.sequences[seq] = self.sequences.get(seq, 0) + tokens
            self.need_reindex = False
            return self.sequences

    return ContinuingKVCacheManager
