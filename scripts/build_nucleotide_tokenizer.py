"""Build `tokenizers/nucleotide_fast_tokenizer/`, the byte-level nucleotide tokenizer.

    python scripts/build_nucleotide_tokenizer.py

Ids: <EOS>=0, <PAD>=1, <BOS>=2, <UNK>=3, and every other character its `ord()` (so the vocabulary
has 256 entries; characters 0-3 and anything above 255 become <UNK>). Each encoded sequence is
`<BOS> ... <EOS>`. Case is kept: lowercase (soft-masked) bases are their own tokens.
"""

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

EOS, PAD, BOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = {"<EOS>": EOS, "<PAD>": PAD, "<BOS>": BOS, "<UNK>": UNK}
OUT_DIR = Path(__file__).parents[1] / "tokenizers" / "nucleotide_fast_tokenizer"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: the four specials at 0-3, every other character 4..255 its `ord()`."""
    vocab = SPECIAL_TOKENS | {chr(i): i for i in range(len(SPECIAL_TOKENS), 256)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<UNK>"))
    # One token per character; [\s\S] (not ".") so that newlines are split too.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<BOS> $A <EOS>", special_tokens=[("<BOS>", BOS), ("<EOS>", EOS)]
    )
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<BOS>",
        eos_token="<EOS>",
        pad_token="<PAD>",
        unk_token="<UNK>",
        model_max_length=1_000_000_000,
        padding_side="right",
    )


if __name__ == "__main__":
    build_tokenizer().save_pretrained(OUT_DIR)
    print(f"wrote {OUT_DIR}")
