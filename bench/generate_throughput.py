"""Generation throughput: dataeff's KV-cached sampling vs Hugging Face ``generate``, same weights and prompts.

Both decode one batch of random prompts with a ~10M-parameter Llama (preset 10m, seq_len 512, vocab 4096,
random weights): dataeff through :func:`dataeff.sample.generate`, HF through ``to_hf(model).generate`` with its
KV cache. Greedy, or sampling at temperature 1 with top-k and top-p off for both; every row runs to
max_new_tokens. bf16 is dataeff's autocast-style bf16 against HF with bf16 weights (HF's fastest CPU setting).
Tokens/s count new tokens; the time includes the prompt's prefill. Runs alternate between the two and the
best of each counts, because the machine may be shared: the load average is printed with the figures.
The last line is one JSON object: dataeff_tok_s, hf_tok_s, ratio.

    python bench/generate_throughput.py            # 8 prompts x 256 new tokens, a few minutes
    python bench/generate_throughput.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from dataeff.hf import to_hf
from dataeff.model import ModelConfig, Transformer, count_parameters
from dataeff.sample import generate


def best_tok_s(runs: dict[str, Callable[[], list[list[int]]]], reps: int, tokens: int) -> dict[str, float]:
    """Tokens/s of each run, best of ``reps``; the runs take turns, so a burst of load hits them alike."""
    best = dict.fromkeys(runs, 0.0)
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = max(best[name], tokens / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs: under a minute")
    parser.add_argument("--preset", default="10m")
    parser.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=0, help="new tokens per prompt (0: 256, or 128 with --quick)")
    parser.add_argument("--mode", choices=["greedy", "sample"], default="greedy")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    # Decode-sized ops gain little from more threads, and on a shared machine threads stall at every barrier.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (128 if args.quick else 256)
    reps = 3 if args.quick else 5

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = ModelConfig(preset=args.preset, seq_len=512, vocab_size=4096)
    model = Transformer(cfg).eval()
    hf = to_hf(model)
    if args.dtype == "bf16":
        hf = hf.to(torch.bfloat16)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    sampling = args.mode == "sample"
    temperature = 1.0 if sampling else 0.0

    def ours() -> list[list[int]]:
        return generate(model, prompts.tolist(), max_new_tokens=new_tokens, temperature=temperature,
                        stop_at_eos=False, generator=torch.Generator().manual_seed(0), batch_size=args.batch,
                        dtype=args.dtype)

    def theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=sampling, temperature=1.0, top_k=0, top_p=1.0)
        return out[:, args.prompt_len :].tolist()

    load_before = os.getloadavg()
    agree = sum(a == b for a, b in zip(ours(), theirs(), strict=True))  # also the warm-up
    tok_s = best_tok_s({"dataeff": ours, "hf": theirs}, reps, args.batch * new_tokens)
    load_after = os.getloadavg()
    ratio = tok_s["dataeff"] / tok_s["hf"]

    params = count_parameters(cfg)
    print(f"model: preset {args.preset}, {params['total'] / 1e6:.2f}M parameters, seq_len 512, vocab {cfg.vocab_size}; "
          f"{args.batch} prompts of {args.prompt_len} tokens, {new_tokens} new tokens each, {args.mode}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, best of {reps}")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after {', '.join(f'{x:.2f}' for x in load_after)} on {os.cpu_count()} CPUs")
    if not sampling:
        print(f"greedy rows identical to HF: {agree}/{args.batch}"
              + (" (bf16 rounds differently, so paths may part at near-ties)" if args.dtype == "bf16" else ""))
    print(f"dataeff generate   {tok_s['dataeff']:>9,.0f} tok/s")
    print(f"HF generate        {tok_s['hf']:>9,.0f} tok/s")
    print(f"ratio              {ratio:>9.2f}x")
    print(json.dumps({"dataeff_tok_s": round(tok_s["dataeff"], 1), "hf_tok_s": round(tok_s["hf"], 1),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
