"""Windows that share a prefix, scored with the prefix run once: a variant's REF and ALT windows.

    lls = shared_prefix_log_likelihoods(model, prefixes, suffixes)   # lls[k][b] = LL of prefixes[b] + suffixes[k][b]

A REF window and its ALT window hold the same bases up to the variant. The prefix (`<BOS>` and the bases
before the variant) runs once and stays in the model's KV cache; each suffix then runs on the cached
prefix, the cache cut back to the prefix in between. A causal model predicts a token from the tokens
before it only, so each window's log-likelihood is the full-window one (up to kernel rounding), for
P + S_ref + S_alt tokens of work instead of 2P + S_ref + S_alt.

The rows of one call may differ in length (a variant near a chromosome end, an indel): they are padded on
the right to a multiple of `LENGTH_MULTIPLE` under an attention mask, and the TE cache always holds
`rows` sequences, so that TE's attention sees a handful of shapes in a whole VCF (its fused kernels are
set up per shape). Rows grouped by exact length gave each variant near a record end its own shape; that
version ran at half the full-window speed on an H100 (55 vs 117 variants/s, in bursts).

HF models use their `DynamicCache`; the TE model uses TE's KV cache with a manager that lets a sequence go
on by a whole suffix (TE's own adds one token per step, for generation).
"""

import numpy as np
import torch

LENGTH_MULTIPLE = 128  # rows are padded to a multiple of this: few distinct attention shapes


def shared_prefix_log_likelihoods(
    model, prefixes: list[np.ndarray], suffixes: list[list[np.ndarray]], rows: int | None = None
) -> np.ndarray:
    """[len(suffixes), len(prefixes)] summed log p of every token after the first, of each prefix + suffix.

    `rows`: the batch size the cache is made for (>= len(prefixes)); the same value on every call keeps
    the attention shapes the same.
    """
    device = next(model.parameters()).device
    prefix_ids, prefix_mask, prefix_lengths = _padded(prefixes, device)
    suffix_rows = [_padded(s, device) for s in suffixes]
    cache_length = prefix_ids.shape[1] + max(ids.shape[1] for ids, _, _ in suffix_rows)
    cache = _new_cache(model, max(rows or 0, len(prefixes)), cache_length)
    batch = torch.arange(len(prefixes), device=device)
    with torch.no_grad():
        logits = model(input_ids=prefix_ids, attention_mask=prefix_mask, past_key_values=cache, use_cache=True).logits
        logp = torch.log_softmax(logits.float(), -1)
        prefix_ll = _summed(logp, prefix_ids, prefix_mask)
        next_token = logp[batch, prefix_lengths - 1]  # predicts each suffix's first token
        out = []
        for ids, mask, _ in suffix_rows:
            # Each row goes on after its own prefix: HF takes the positions, TE's cache knows them.
            positions = prefix_lengths[:, None] + torch.arange(ids.shape[1], device=device)
            logits = model(input_ids=ids, attention_mask=torch.cat([prefix_mask, mask], 1), position_ids=positions,
                           past_key_values=cache, use_cache=True).logits  # fmt: skip
            ll = prefix_ll + next_token.gather(1, ids[:, :1])[:, 0].double()
            out.append(ll + _summed(torch.log_softmax(logits.float(), -1), ids, mask))
            _crop(cache, prefix_ids.shape[1], prefix_lengths)
    return torch.stack(out).cpu().numpy()


def _padded(sequences: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids (L a multiple of LENGTH_MULTIPLE), their mask and each row's length."""
    lengths = [s.size for s in sequences]
    width = -(-max(lengths) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    ids = np.zeros((len(sequences), width), dtype=np.int64)
    for row, s in zip(ids, sequences):
        row[: s.size] = s
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    return (torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device).long(),
            torch.as_tensor(lengths, device=device))  # fmt: skip


def _summed(logp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log p of each real token after the first, given the tokens before it."""
    picked = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0].double()
    return (picked * mask[:, 1:]).sum(1)


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


def _crop(cache, padded_length: int, lengths: torch.Tensor) -> None:
    """Cut the cache back to the prefixes (the next suffix overwrites the rest).

    HF's cache holds the padded prefix rows (their pads stay masked); TE's holds each row's real tokens.
    """
    if hasattr(cache, "cache_manager"):
        for seq, length in zip(list(cache.cache_manager.sequences), lengths.tolist()):
            cache.cache_manager.sequences[seq] = length
    else:
        cache.crop(padded_length - cache.get_seq_length())  # negative: drop that many tokens


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
