"""Sizes that follow from a Llama config: head size and parameter count (for MFU and checkpoint sizes).

count_parameters(config, with_embedding=False)      # N of MFU's 6N per token
"""


def head_dim_of(config) -> int:
    """The attention head size (`head_dim`, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def count_parameters(config, with_embedding: bool = True) -> int:
    """Parameters of a Llama of this config: layers (norms included), final norm, LM head, embedding."""
    hidden, head_dim = config.hidden_size, head_dim_of(config)
    attention = hidden * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o, k, v
    layer = attention + 3 * hidden * config.intermediate_size + 2 * hidden
    lm_head = 0 if config.tie_word_embeddings and with_embedding else config.vocab_size * hidden
    return config.num_hidden_layers * layer + hidden + lm_head + (config.vocab_size * hidden if with_embedding else 0)
