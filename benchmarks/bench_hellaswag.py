"""The cost of one HellaSwag evaluation during training (train.py --hellaswag), against build-nanogpt's loop.

    python benchmarks/bench_hellaswag.py --preset gpt2 --examples 100 --dtype fp32 bf16

flax_gpt: the code train.py runs at each --hellaswag-interval (train_hellaswag.hellaswag_eval's fixed-shape batches of
--batch-size rows, the preset's, scored by evaluate.score_batches), on gpt2-shaped random weights. torch_ref:
build-nanogpt's hellaswag loop on the same weights, one example (4 rows, unpadded) per forward, fp32 or under
bf16 autocast as build-nanogpt's train_gpt2.py runs it. The first call of each (compilation) is timed apart; then
the two take turns for --repeats calls each (side by side in time: this machine's load changes by the minute), and
the median of each is reported. The examples are synthetic (no HellaSwag file offline): contexts of 20-70
words and endings of 8-30 words of English, so the rows are about as long as HellaSwag's; the cost scales with
rows x padded length.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the man is standing in a kitchen and then he takes a knife to cut some bread while a woman "
         "walks over to the table with two cups of coffee and they sit down to talk about the day").split()


def examples(n: int, seed: int = 0) -> list[dict]:
    """n HellaSwag-format examples: contexts of 20-70 words, endings of 8-30 words."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    return [{"ctx": words(rng.integers(20, 71)).capitalize(), "endings": [words(rng.integers(8, 31)) for _ in range(4)],
             "label": int(rng.integers(4))} for _ in range(n)]


def seconds(fn) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def side_by_side(fns: dict, repeats: int) -> dict:
    """{name: (first call s, median s of `repeats` more calls taken in turns, the last result)}."""
    first = {name: seconds(fn) for name, fn in fns.items()}
    times, last = {name: [] for name in fns}, {name: out for name, (_, out) in first.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            dt, last[name] = seconds(fn)
            times[name].append(dt)
    return {name: (first[name][0], statistics.median(times[name]), last[name]) for name in fns}


def flax_eval(preset: str, dtype: str, path: Path):
    """(score() as train.py calls it, the model, the batches' (rows, length), batch count)."""
    from flax import nnx

    from flax_gpt import devices
    from flax_gpt.config import preset as model_preset
    from flax_gpt.evaluate import score_batches
    from flax_gpt.model import GPT
    from flax_gpt.run_config import RUN_PRESETS
    from flax_gpt.train_hellaswag import hellaswag_eval, read_examples

    caps = devices.capabilities("cpu")
    config = model_preset(RUN_PRESETS[preset].model, dtype=dtype, matmul_output=caps.matmul_output)
    model = GPT(config, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    batch_size = RUN_PRESETS[preset].batch_size
    h = hellaswag_eval(str(path), batch_size, read_examples(str(path), None), config, graphdef, None, None, 0, 1)
    return (lambda: score_batches(h.step, params, h.batches, h.labels)), model, h.batches[0][0].shape, len(h.batches)


def torch_loop(model, items: list[dict], autocast: bool):
    """build-nanogpt's hellaswag.py evaluate(): per example, the 4 rows unpadded, lowest mean ending loss wins."""
    import torch
    from torch.nn import functional as F

    from flax_gpt.evaluate import render_example
    from flax_gpt.tokenizer import get_encoding

    enc = get_encoding()
    rendered = [render_example(e, model.config.block_size, enc) for e in items]

    def run() -> dict:
        correct = correct_norm = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for (tokens, mask), e in zip(rendered, items):
                tokens, mask = torch.from_numpy(tokens).long(), torch.from_numpy(mask)  # (4, L) each
                logits = model(tokens)[0].float()  # (4, L, V)
                losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                         reduction="none").view(tokens.size(0), -1)  # (4, L-1)
                shift_mask = mask[:, 1:].float()  # (4, L-1)
                sums = (losses * shift_mask).sum(dim=1)  # (4,)
                correct += int(sums.argmin()) == e["label"]
                correct_norm += int((sums / shift_mask.sum(dim=1)).argmin()) == e["label"]
        return {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}

    return run


def row_tokens(items: list[dict], block_size: int) -> int:
    """Tokens in all rows of all examples, unpadded (what build-nanogpt's loop runs)."""
    from flax_gpt.evaluate import render_example
    from flax_gpt.tokenizer import get_encoding

    enc = get_encoding()
    masks = [render_example(e, block_size, enc)[1] for e in items]  # (4, L) each, 1 on the ending's tokens
    return sum(int(np.flatnonzero(row).max()) + 1 for mask in masks for row in mask)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    import torch_ref

    items = examples(args.examples)
    results = {"preset": args.preset, "examples": args.examples, "machine": f"{platform.machine()} "
               f"{os.cpu_count()} cores", "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hs.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in items))
        for dtype in args.dtype:
            score, model, shape, n_batches = flax_eval(args.preset, {"fp32": "float32", "bf16": "bfloat16"}[dtype],
                                                       path)
            fns = {f"flax {dtype}": score}
            if not args.no_torch:
                reference = torch_ref.flax_to_torch(model).eval()
                name = f"torch_ref {'bf16 autocast' if dtype == 'bf16' else 'fp32'}"
                fns[name] = torch_loop(reference, items, autocast=dtype == "bf16")
            for name, (first, median, out) in side_by_side(fns, args.repeats).items():
                results["rows"][name] = {"first_s": first, "median_s": median, "acc": out["acc"],
                                         "acc_norm": out["acc_norm"]}
                print(f"{name}: first {first:.1f} s, median {median:.2f} s, acc {out['acc']:.3f} "
                      f"acc_norm {out['acc_norm']:.3f}", flush=True)
            results["rows"][f"flax {dtype}"]["batches"] = f"{n_batches} x {shape[0]}x{shape[1]}"
            print(f"flax {dtype}: {n_batches} batches of {shape[0]}x{shape[1]} tokens; the rows hold "
                  f"{row_tokens(items, model.config.block_size):,} tokens unpadded", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
