"""Decode speed: flax_gpt generate (KV cache) vs transformers' generate (its cache), one process.

    python benchmarks/bench_generate.py --preset gpt2 --prompt-len 32 --new-tokens 64 --json out.json

Both decode greedily from the same random GPT-2 weights and prompt; the first call of each
(compilation, warm-up) is timed apart; the median of --repeats timed calls is reported.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median seconds of `repeats` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    from flax_gpt import GPT, preset
    from flax_gpt.generate import generate, stream
    from flax_gpt.hf import config_to_hf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = preset(args.preset)
    hf = GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(config))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = GPT.from_pretrained(tmp)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.prompt_len))
    n = args.new_tokens
    results = {}

    def ours():
        return generate(model, prompt, n, temperature=0)

    def ours_stream():
        return np.stack(list(stream(model, prompt, n, temperature=0)), axis=1)

    def theirs():
        with torch.no_grad():
            return hf.generate(torch.from_numpy(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               use_cache=True, pad_token_id=0, attention_mask=torch.ones(prompt.shape, dtype=torch.long))

    same = bool((ours() == theirs().numpy()).all())
    for name, fn in (("flax_gpt generate", ours), ("flax_gpt stream (iterator)", ours_stream),
                     ("transformers generate", theirs)):
        first, median = median_seconds(fn, args.repeats)
        results[name] = {"first_call_s": first, "median_s": median, "decode_tok_s": args.batch * n / median}
    header = (f"preset {args.preset}, batch {args.batch}, prompt {args.prompt_len}, {n} new tokens, greedy, "
              f"{args.threads} threads, {platform.machine()} {os.cpu_count()} cores; jax {jax.__version__}, "
              f"torch {torch.__version__}, transformers {transformers.__version__}; same tokens: {same}")
    print(header + "\n")
    print("| decoder | first call s | median s | new tokens/s |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['first_call_s']:.2f} | {r['median_s']:.3f} | {r['decode_tok_s']:.1f} |")
    ratio = results["flax_gpt generate"]["decode_tok_s"] / results["transformers generate"]["decode_tok_s"]
    print(f"\nflax_gpt / transformers decode tokens/s: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results, "ratio": ratio, "same_tokens": same}, f, indent=2)


if __name__ == "__main__":
    main()
