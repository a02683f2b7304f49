"""DNA continuation from a trained model, with the KV cache: greedy or sampled, FASTA out.

    python generate.py --model ckpt/final_model --prompt ACGTTGCA --max-new-tokens 500 --out generated.fa
    python generate.py --model ckpt/final_model --prompts prompts.fa --temperature 0.8 --top-k 4 --seed 1 \
        --num-samples 3 --out samples.fa

Each prompt is `<BOS>` + its bases (never an `<EOS>`: the model is asked to go on). Generation stops at
`<EOS>` or after `--max-new-tokens`; nothing after `<EOS>` is written; only `--alphabet` (default ACGT)
and `<EOS>` may be emitted. `--greedy` (or temperature 0) takes
the most likely base; otherwise sampling with `--temperature`, `--top-k`, `--top-p`, seeded by `--seed`
(sample i of prompt p uses seed + 1000 p + i, so a run is reproducible). On a GPU with TE, the TE model
runs with TE's InferenceParams as the KV cache; elsewhere HF with its own cache.
"""

import argparse
import time

import torch
from tqdm import tqdm

from config.command_line import ToolHelp, run_tool
from data.dna import BASES, IUPAC_CODES
from data.sources import read_records
from model.shape import head_dim_of
from use.inference import encode, load_model


def parse_args(argv=None):
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ToolHelp)
    p.add_argument("--model", required=True, help="final_model, best_model, an HF directory or a step_N")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt, as bases")
    source.add_argument("--prompts", help="a FASTA/FASTQ (.gz) or parquet file of prompts")
    p.add_argument("--max-new-tokens", type=int, default=256, help="bases to add to each prompt")
    p.add_argument("--greedy", action="store_true", help="always the most likely base")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (reproducible)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations per prompt")
    p.add_argument("--alphabet", default=BASES, help="the characters it may emit (and <EOS>); 'any': no limit")
    p.add_argument("--use-te", choices=["auto", "true", "false"], default="auto", help="auto: TE on a GPU with TE")
    p.add_argument("--out", default=None, help="FASTA of the continuations (default: print them)")
    return p.parse_args(argv)


def kv_cache(model, max_length: int):
    """TE's InferenceParams for the TE model (None for HF, which makes its own)."""
    if model.config.model_type != "nvllama":
        return None
    from model.modeling_llama_te import HFInferenceParams

    config = model.config
    cache = HFInferenceParams(
        max_batch_size=1,
        max_sequence_length=max_length,
        max_ctx_len=max_length,
        qkv_format="thd",
        num_heads_kv=config.num_key_value_heads,
        head_dim_k=head_dim_of(config),
        dtype=model.dtype,
    )
    for layer_number in range(1, config.num_hidden_layers + 1):
        cache.allocate_memory(layer_number)
    return cache


def continuation(ids: list[int], eos_id: int) -> list[int]:
    """The generated ids up to (not including) the first `<EOS>`."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, sampling: dict) -> str:
    """One continuation of `prompt` (bases only)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(encode(tokenizer, prompt), device=device)[None]
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        use_cache=True,
        past_key_values=kv_cache(model, ids.shape[1] + max_new_tokens),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    new = continuation(out[0, ids.shape[1] :].tolist(), tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True).replace(" ", "")


def main(argv=None) -> list[tuple[str, str]]:
    """Generate for every prompt, write FASTA (or print it); returns [(name, continuation)]."""
    args = parse_args(argv)
    odd = sorted(set(args.prompt or "") - set(IUPAC_CODES + IUPAC_CODES.lower()))
    if odd:  # e.g. a file name given to --prompt
        raise ValueError(
            f"--prompt {args.prompt[:40]!r} holds characters that are not bases ({''.join(odd)[:20]}); pass "
            "bases (IUPAC codes, either case), or a FASTA/parquet file of prompts with --prompts."
        )
    if args.prompt is not None:
        prompts = [("prompt", args.prompt)]
    else:  # read before the model is loaded: a bad file is said at once
        prompts = list(read_records(args.prompts, option="--prompts"))
    model, tokenizer = load_model(args.model, use_te=None if args.use_te == "auto" else args.use_te == "true")
    greedy = args.greedy or args.temperature == 0
    sampling = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    )
    if args.alphabet != "any":  # a barely trained model may emit other bytes: keep to the alphabet
        allowed = {ord(c) for c in args.alphabet} | {tokenizer.eos_token_id}
        sampling["suppress_tokens"] = [i for i in range(model.config.vocab_size) if i not in allowed]
    start, results = time.perf_counter(), []
    for p, (name, prompt) in enumerate(tqdm(prompts, unit=" prompt")):
        for i in range(args.num_samples):
            text = generate(model, tokenizer, prompt, args.max_new_tokens, args.seed + 1000 * p + i, sampling)
            results.append((f"{name}_generated_{i}" if args.num_samples > 1 else f"{name}_generated", text))
    fasta = "".join(f">{name}\n{text}\n" for name, text in results)
    if args.out:
        with open(args.out, "w") as f:
            f.write(fasta)
    else:
        print(fasta, end="")
    bases = sum(len(t) for _, t in results)
    print(
        f"{len(results)} continuations, {bases:,} bases in {time.perf_counter() - start:.1f} s"
        + (f" -> {args.out}" if args.out else "")
    )
    return results


if __name__ == "__main__":
    run_tool(main)
