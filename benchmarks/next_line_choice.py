"""A HellaSwag-format file from the val split of train.py's data: which of four lines comes next?

    python benchmarks/next_line_choice.py --out next_line.jsonl              # default data: Shakespeare
    python train.py --hellaswag next_line.jsonl --hellaswag-limit 100       # watched during training

Each example: a line of the val text as the context, the line after it and three other lines of the val text
as the endings (in a random order), the next line's index as the label. A model that never saw the val text
scores 1/4 by chance and more as it learns the corpus's language; HellaSwag itself is not reachable offline,
this is the same scoring on text at hand (the overlay picture of docs/training.md uses it).
"""

import argparse
import json
from pathlib import Path

import numpy as np


def lines_of_val(data: str | None) -> list[str]:
    """The val split of train.py's --data (default: Shakespeare), decoded, as its lines of 4 words or more."""
    from flax_gpt import data as data_lib
    from flax_gpt.tokenizer import get_encoding

    tokens = data_lib.load(data, Path.cwd())
    text = get_encoding().decode([int(t) for t in np.asarray(tokens.val[: len(tokens.val)])])
    return [line.strip() for line in text.splitlines() if len(line.split()) >= 4 and "<|endoftext|>" not in line]


def examples(lines: list[str], n: int, seed: int = 0) -> list[dict]:
    """n examples from consecutive line pairs spread over the text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in np.linspace(0, len(lines) - 2, n).astype(int):
        others = [lines[j] for j in rng.choice(len(lines), size=3, replace=False) if j not in (i, i + 1)]
        while len(others) < 3:
            others.append(lines[int(rng.integers(len(lines)))])
        endings = [lines[i + 1], *others[:3]]
        order = rng.permutation(4)
        out.append({"ctx": lines[i], "endings": [endings[k] for k in order], "label": int(np.argmin(order))})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="train.py's --data (default: ./input.txt, else Shakespeare)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="next_line.jsonl")
    args = ap.parse_args()
    items = examples(lines_of_val(args.data), args.n)
    Path(args.out).write_text("".join(json.dumps(e) + "\n" for e in items))
    print(f"wrote {len(items)} examples to {args.out}")


if __name__ == "__main__":
    main()
