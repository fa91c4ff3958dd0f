"""Evaluate a GPT: loss and perplexity over a text file or a token shard directory's val split, and HellaSwag.

    python -m flax_gpt.evaluate --init-from out --data input.txt
    python -m flax_gpt.evaluate --init-from gpt2 --hellaswag hellaswag_val.jsonl --json scores.json

Loss: the file's GPT-2 tokens are cut into consecutive windows of seq_len+1 tokens that share
their edge token (starts 0, T, 2T, ..., like the training run's validation batches), so every
token after the first is predicted exactly once; the last, shorter window and the last,
partial batch are padded and masked out. Loss is the mean over predicted tokens.

HellaSwag: scored as build-nanogpt's hellaswag.py does. Per example, 4 rows of context tokens
+ " " + ending tokens, the per-token cross entropy of the ending tokens; acc picks the ending
with the lowest summed loss, acc_norm the lowest mean loss. Rows are batched with one padded
length (one compile), logits only where they predict an ending token; `train.py --hellaswag` scores
with the same functions (hellaswag_batches, make_hellaswag_step, score_batches), its batches split over
processes and devices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

from flax_gpt import devices
from flax_gpt.config import AttentionFlag
from flax_gpt.errors import UserError, run_cli
from flax_gpt.files import atomic_write
from flax_gpt.load import load_model
from flax_gpt.ops import token_cross_entropy
from flax_gpt.shards import open_token_dir
from flax_gpt.tokenize_chunks import tokenize_paths
from flax_gpt.tokenizer import get_encoding

N_ENDINGS = 4


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a GPT on a text file (loss, perplexity) and/or HellaSwag-format jsonl."""

    init_from: str  # a training out dir or checkpoints dir, an HF GPT-2 dir, a build-nanogpt/nanoGPT .pt, an HF hub id
    data: str | None = None  # text / .jsonl / .parquet file or directory, or token shards (their val split): loss
    batch_size: int = 8  # windows per batch
    seq_len: int | None = None  # tokens per window; default the model's block_size
    max_batches: int | None = None  # evaluate at most this many batches; default the whole file
    hellaswag: str | None = None  # HellaSwag jsonl: ctx (or ctx_a/ctx_b), endings (4), label
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # compute dtype; auto: bf16 on GPU/TPU, fp32 on CPU
    attention: AttentionFlag = "auto"  # auto: cuDNN flash attention on CUDA in bf16, else XLA's; tiled: for CPUs
    json: str | None = None  # also write the results to this JSON file
    debug: bool = False  # show tracebacks instead of one-line errors


# ----------------------------------------------------------------------------- loss over a text


def read_tokens(path: str | Path):
    """The tokens to measure: a token shard directory's val split (memory-mapped), else (N,) int32 GPT-2 tokens of
    a text / JSON Lines / Parquet file or directory, each document starting with <|endoftext|>."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--data {path}: no such file")
    shards = open_token_dir(path) if path.is_dir() else None
    return shards.val if shards is not None else tokenize_paths([path]).astype(np.int32)


def windows(tokens: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """(start, n_targets) of each window: starts 0, T, 2T, ... while a token is left to predict."""
    n = len(tokens)
    return [(s, min(seq_len, n - 1 - s)) for s in range(0, max(n - 1, 0), seq_len)]


def make_loss_step(model):
    """A jitted step(params, x, y, mask) -> (sum of token losses, number of tokens) of a (B, T) batch, in eval mode
    (no dropout)."""
    graphdef, _ = nnx.split(model)

    @jax.jit
    def step(state, x, y, mask):
        model = nnx.merge(graphdef, state)
        model.eval()
        logits, _ = model(x)  # (B, T, V) float32
        losses = token_cross_entropy(logits, y)  # (B, T)
        return jnp.sum(losses * mask), jnp.sum(mask)

    return step


def evaluate_loss(model, tokens: np.ndarray, batch_size: int = 8, seq_len: int | None = None,
                  max_batches: int | None = None) -> dict:
    """Mean next-token loss and perplexity of model over tokens; see the module docstring."""
    T = model.config.block_size if seq_len is None else seq_len
    if batch_size < 1 or T < 1:
        raise UserError(f"--batch-size and --seq-len must be >= 1, got {batch_size} and {T}")
    if T > model.config.block_size:
        raise UserError(f"--seq-len {T} exceeds the model's block_size {model.config.block_size}")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches must be >= 1, got {max_batches}")
    spans = windows(tokens, T)
    if not spans:
        raise UserError(f"the text has {len(tokens)} token(s); at least 2 are needed to measure a loss")
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    if max_batches is not None:
        batches = batches[:max_batches]
    step = make_loss_step(model)
    state = nnx.state(model)
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        x = np.zeros((batch_size, T), np.int32)  # (B, T) rows past the batch and tokens past the text stay 0
        y = np.zeros((batch_size, T), np.int32)  # (B, T)
        mask = np.zeros((batch_size, T), np.float32)  # (B, T) 1 on real targets
        for row, (start, n) in enumerate(batch):
            x[row, :n] = tokens[start : start + n]
            y[row, :n] = tokens[start + 1 : start + 1 + n]
            mask[row, :n] = 1.0
        s, c = step(state, x, y, mask)
        loss_sum += float(s)  # summed in float64 across batches
        count += float(c)
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count),
            "windows": sum(len(b) for b in batches), "batches": len(batches), "seq_len": T}


# ----------------------------------------------------------------------------- HellaSwag


def normalize_example(example: Mapping, where: str) -> dict:
    """{"ctx", "endings", "label"} of one HellaSwag example (also the original ctx_a/ctx_b fields)."""
    if not isinstance(example, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
    ctx = example.get("ctx")
    if ctx is None and "ctx_a" in example:  # original HellaSwag: ctx = ctx_a + " " + ctx_b
        ctx_a, ctx_b = example.get("ctx_a"), example.get("ctx_b") or ""
        if not isinstance(ctx_a, str) or not isinstance(ctx_b, str):
            raise UserError(f"{where}: ctx_a and ctx_b must be strings")
        ctx = f"{ctx_a} {ctx_b}" if ctx_b else ctx_a
    if not isinstance(ctx, str):
        raise UserError(f"{where}: needs a string field 'ctx' (or 'ctx_a' and 'ctx_b')")
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == N_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings")
    label = example.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # the HF datasets copy stores "3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: 'label' must be an integer 0..{N_ENDINGS - 1}, got {label!r}")
    return {"ctx": ctx, "endings": list(endings), "label": label}


def read_hellaswag(path: str | Path) -> list[dict]:
    """The examples of a HellaSwag jsonl file, each checked; errors name the file and line."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--hellaswag {path}: no such file; pass HellaSwag's validation JSON Lines "
                        "(hellaswag_val.jsonl as published, or a file in its format)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--hellaswag {path}: cannot read as UTF-8 text ({e})") from None
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        examples.append(normalize_example(record, f"{path}:{lineno}"))
    if not examples:
        raise UserError(f"--hellaswag {path}: no examples in the file")
    return examples


def render_example(example: Mapping, block_size: int, enc=None, where: str = "example") -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask (4, L) int32 of one example: context + " " + ending, mask 1 on ending tokens.

    Rows are right-padded with 0 to the longest; a context too long for block_size loses
    tokens from its left, the same number in every row.
    """
    enc = enc or get_encoding()
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    if not ctx_tokens:
        raise UserError(f"{where}: empty context; the first ending token would have nothing to be predicted from")
    end_tokens = [enc.encode_ordinary(" " + e) for e in example["endings"]]  # GPT-2 BPE: the space goes in front
    longest_end = max(len(e) for e in end_tokens)
    if longest_end >= block_size:
        raise UserError(f"{where}: an ending has {longest_end} tokens; with a context it does not fit "
                        f"the model's block_size {block_size}")
    keep = block_size - longest_end
    ctx_tokens = ctx_tokens[-keep:] if len(ctx_tokens) > keep else ctx_tokens  # truncate from the left
    rows = [ctx_tokens + e for e in end_tokens]
    L = max(len(r) for r in rows)
    tokens = np.zeros((N_ENDINGS, L), np.int32)  # (4, L)
    mask = np.zeros((N_ENDINGS, L), np.int32)  # (4, L)
    for i, (row, e) in enumerate(zip(rows, end_tokens)):
        tokens[i, : len(row)] = row
        mask[i, len(ctx_tokens) : len(row)] = 1
    return tokens, mask


def make_hellaswag_step(graphdef, ending_len: int, params_sharding=None, rows_sharding=None):
    """A jitted step(params, tokens, mask) -> (sum, count) (R,) each of the masked ending losses per row.

    ending_len: the most ending tokens of any row (ending_length). With shardings (train.py on several devices)
    the rows are split over the devices like the val batches and both outputs come back whole on every device.
    """
    shardings = {}
    if params_sharding is not None:
        replicated = jax.sharding.NamedSharding(rows_sharding.mesh, jax.sharding.PartitionSpec())
        shardings = dict(in_shardings=(params_sharding, rows_sharding, rows_sharding), out_shardings=replicated)

    @functools.partial(jax.jit, **shardings)
    def step(params, tokens, mask):
        model = nnx.merge(graphdef, params)
        x, _ = model.trunk(tokens)  # (R, L, C)
        return ending_losses(model.lm_head, x, tokens, mask, ending_len)  # (R,), (R,)

    return step


def ending_losses(lm_head, x, tokens, mask, ending_len: int):
    """Summed loss and token count of each row's ending: x (R, L, C) the final hidden states, tokens and mask
    (R, L) -> (R,), (R,).

    Logits only where they predict an ending token: the ending_len positions from the one before each row's
    ending (the lm_head is a third of a GPT-2 forward pass; over the contexts it would be wasted).
    """
    L = tokens.shape[1]
    first = jnp.maximum(jnp.argmax(mask, axis=1) - 1, 0)  # (R,) the position that predicts the ending's first token
    pos = jnp.minimum(first[:, None] + jnp.arange(ending_len), L - 2)  # (R, K)
    logits = lm_head(jnp.take_along_axis(x, pos[..., None], axis=1))  # (R, K, V)
    losses = token_cross_entropy(logits, jnp.take_along_axis(tokens, pos + 1, axis=1))  # (R, K): predicting pos + 1
    valid = (jnp.arange(ending_len) < jnp.sum(mask, axis=1)[:, None]).astype(jnp.float32)  # (R, K)
    return jnp.sum(losses * valid, axis=1), jnp.sum(valid, axis=1)  # (R,), (R,)


def ending_length(rendered: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """The most ending tokens of any row of the rendered examples: make_hellaswag_step's ending_len."""
    return max(int(mask.sum(axis=1).max()) for _, mask in rendered)


def hellaswag_batches(rendered: list[tuple[np.ndarray, np.ndarray]], examples_per_batch: int, block_size: int,
                      process_index: int = 0, process_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """This process's (tokens, mask) (E*4, L) int32 rows of each global batch of E*processes examples.

    One L for all batches (the longest row rounded up to a multiple of 32, at most block_size), so the step
    compiles once. Global batch b holds examples b*G .. b*G+G-1 (G = E * processes) in order, process p the
    p-th E of them; rows past the last example are all 0 (mask 0). Padding at the end of a row changes
    nothing before it (causal attention).
    """
    G = examples_per_batch * process_count
    L = min(block_size, -(-max(t.shape[1] for t, _ in rendered) // 32) * 32)
    batches = []
    for first in range(0, len(rendered), G):
        mine = rendered[first + process_index * examples_per_batch : first + (process_index + 1) * examples_per_batch]
        tokens = np.zeros((examples_per_batch * N_ENDINGS, L), np.int32)  # (E*4, L)
        mask = np.zeros((examples_per_batch * N_ENDINGS, L), np.int32)  # (E*4, L) padding rows: all 0
        for j, (t, m) in enumerate(mine):
            tokens[j * N_ENDINGS : (j + 1) * N_ENDINGS, : t.shape[1]] = t
            mask[j * N_ENDINGS : (j + 1) * N_ENDINGS, : m.shape[1]] = m
        batches.append((tokens, mask))
    return batches


def score_batches(step, params, batches, labels: np.ndarray, to_device=None) -> dict:
    """acc, acc_norm, n, correct counts and predictions from the batches of hellaswag_batches (all processes).

    to_device(rows) puts this process's (E*4, L) rows where the step wants them (default: jnp.asarray).
    """
    to_device = to_device or jnp.asarray
    outputs = [step(params, to_device(tokens), to_device(mask)) for tokens, mask in batches]  # all queued first
    sums, counts = (np.concatenate([np.asarray(o[i], np.float64) for o in jax.device_get(outputs)]) for i in (0, 1))
    n = len(labels)
    sums, counts = sums.reshape(-1, N_ENDINGS)[:n], counts.reshape(-1, N_ENDINGS)[:n]  # (n, 4): padding dropped
    pred = np.argmin(sums, axis=1)  # the ending with the lowest summed loss
    pred_norm = np.argmin(sums / counts, axis=1)  # ... with the lowest mean loss per token
    return {"acc": float(np.mean(pred == labels)), "acc_norm": float(np.mean(pred_norm == labels)), "n": n,
            "correct": int(np.sum(pred == labels)), "correct_norm": int(np.sum(pred_norm == labels)),
            "pred": pred.tolist(), "pred_norm": pred_norm.tolist()}


def score_hellaswag(model, examples: Iterable[Mapping], examples_per_batch: int = 4) -> dict:
    """acc, acc_norm, n and the per-example predictions (pred, pred_norm) of model on HellaSwag examples.

    examples: dicts with ctx (or ctx_a, ctx_b), endings (4 strings) and label.
    """
    examples = [normalize_example(e, f"example {i}") for i, e in enumerate(examples)]
    if not examples:
        raise UserError("no HellaSwag examples to score")
    block_size, enc = model.config.block_size, get_encoding()
    rendered = [render_example(e, block_size, enc, f"example {i}") for i, e in enumerate(examples)]
    graphdef, state = nnx.split(model)
    labels = np.array([e["label"] for e in examples])
    return score_batches(make_hellaswag_step(graphdef, ending_length(rendered)), state,
                         hellaswag_batches(rendered, examples_per_batch, block_size), labels)


# ----------------------------------------------------------------------------- CLI


def run(cfg: EvalConfig) -> dict:
    """Load the model, evaluate what cfg asks for; returns the results record."""
    if cfg.data is None and cfg.hellaswag is None:
        raise UserError("nothing to evaluate: pass --data FILE and/or --hellaswag FILE.jsonl")
    if cfg.data is not None:  # cheap checks before the model loads
        tokens = read_tokens(cfg.data)
    if cfg.hellaswag is not None:
        examples = read_hellaswag(cfg.hellaswag)

    devices.enable_compile_cache()
    dtype, numerics = devices.model_numerics(cfg.dtype, cfg.attention)
    model = load_model(cfg.init_from, dtype, **numerics)
    c = model.config
    results = {"init_from": cfg.init_from, "dtype": dtype,
               "model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                         "block_size": c.block_size, "n_params": model.num_params(non_embedding=False)}}
    if cfg.data is not None:
        results["data"] = {"path": cfg.data, **evaluate_loss(model, tokens, cfg.batch_size, cfg.seq_len,
                                                              cfg.max_batches)}
    if cfg.hellaswag is not None:
        scores = score_hellaswag(model, examples)
        results["hellaswag"] = {"path": cfg.hellaswag, **scores}
    if cfg.json is not None:
        try:
            atomic_write(Path(cfg.json).expanduser(), json.dumps(results, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"--json {cfg.json}: cannot write ({e.strerror or e})") from None
    return results


def format_table(results: dict) -> str:
    m = results["model"]
    rows = [("model", f"{results['init_from']} ({m['n_params'] / 1e6:.2f}M params, {m['n_layer']} layers, "
                      f"{results['dtype']})")]
    if "data" in results:
        d = results["data"]
        rows += [("data", f"{d['path']}: {d['tokens']:,} tokens predicted in {d['windows']} windows of "
                          f"{d['seq_len']}"),
                 ("loss", f"{d['loss']:.4f}"), ("perplexity", f"{d['perplexity']:.2f}")]
    if "hellaswag" in results:
        h = results["hellaswag"]
        rows += [("hellaswag", f"{h['path']}: n={h['n']}"),
                 ("acc", f"{h['acc']:.4f} ({h['correct']}/{h['n']})"),
                 ("acc_norm", f"{h['acc_norm']:.4f} ({h['correct_norm']}/{h['n']})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = tyro.cli(EvalConfig, args=argv, description=__doc__, prog="python -m flax_gpt.evaluate")
    results, code = run_cli(lambda: run(cfg), cfg.debug)
    if code:
        return code
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
