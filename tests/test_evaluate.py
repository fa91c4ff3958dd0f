"""python -m flax_gpt.evaluate: loss / perplexity over a text and HellaSwag scoring, each checked
against a plain per-window / per-ending computation with the same model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from flax_gpt import evaluate  # noqa: E402
from flax_gpt.config import preset  # noqa: E402
from flax_gpt.errors import UserError  # noqa: E402
from flax_gpt.model import GPT  # noqa: E402
from flax_gpt.tokenizer import EOT, get_encoding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
    "First Citizen: First, you know Caius Marcius is chief enemy to the people.\n"
) * 3


# evaluate_loss (batched, float32 sums) against the per-window float64 reference: measured 1.2e-8 (T=16), 4.3e-8
# (2 batches), 5.3e-9 (T=64) relative. One float32 ulp of a loss near 11 is 8.6e-8 of it, so the bound is a few ulps
# (the measurements alone would put it below one, where the sums' order decides).
LOSS_REL = 3e-7


@pytest.fixture(autouse=True, scope="module")
def fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def model():
    """Tiny GPT-2 (full vocabulary, block 64) with matrices x5, so its choices between endings are not ties."""
    m = GPT(preset("tiny"), seed=0)
    flat = [(p, v.replace(v[...] * 5.0 if p[-1] in ("kernel", "embedding") else v[...]))
            for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))]
    nnx.update(m, nnx.from_flat_state(flat))
    return m


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "hf"
    model.save_pretrained(out)
    return out


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@nnx.jit
def _forward(model, idx):
    return model(idx)[0]


def forward(model, idx: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) of model on idx (B, T), jitted (eager runs of the scanned blocks are slow)."""
    return np.asarray(_forward(model, jnp.asarray(idx)))


def reference_loss(model, tokens: np.ndarray, T: int, max_windows: int | None = None) -> float:
    """Mean next-token loss over windows tokens[s : s+T+1], s = 0, T, 2T, ..., one window at a time."""
    total, count = 0.0, 0
    starts = list(range(0, len(tokens) - 1, T))[:max_windows]
    for s in starts:
        x, y = tokens[s : s + T], tokens[s + 1 : s + T + 1]
        x = x[: len(y)]
        logits = forward(model, x[None])  # (1, t, V)
        logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)  # (t, V)
        total -= float(np.sum(np.asarray(logp)[np.arange(len(y)), y]))
        count += len(y)
    return total / count


def test_loss_and_perplexity_match_a_direct_computation(model, text_file):
    tokens = evaluate.read_tokens(text_file)
    assert list(tokens) == [EOT] + get_encoding().encode_ordinary(TEXT)  # the document starts with <|endoftext|>
    T, B = 16, 3
    n_windows = math.ceil((len(tokens) - 1) / T)
    assert (len(tokens) - 1) % T and n_windows % B  # a short last window and a partial last batch
    got = evaluate.evaluate_loss(model, tokens, batch_size=B, seq_len=T)
    want = reference_loss(model, tokens, T)
    assert got["loss"] == pytest.approx(want, rel=LOSS_REL)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert (got["tokens"], got["windows"], got["batches"]) == (len(tokens) - 1, n_windows, math.ceil(n_windows / B))

    limited = evaluate.evaluate_loss(model, tokens, batch_size=B, seq_len=T, max_batches=2)
    assert limited["windows"] == 2 * B and limited["tokens"] == 2 * B * T
    assert limited["loss"] == pytest.approx(reference_loss(model, tokens, T, max_windows=2 * B), rel=LOSS_REL)


def test_default_seq_len_is_block_size(model, text_file):
    tokens = evaluate.read_tokens(text_file)
    got = evaluate.evaluate_loss(model, tokens, batch_size=2)
    assert got["seq_len"] == model.config.block_size
    assert got["loss"] == pytest.approx(reference_loss(model, tokens, model.config.block_size), rel=LOSS_REL)
    with pytest.raises(UserError, match="block_size"):
        evaluate.evaluate_loss(model, tokens, seq_len=model.config.block_size + 1)


# ----------------------------------------------------------------------------- HellaSwag

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He", "label": 0,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"activity_label": "Baking cookies", "ctx_a": "A woman pours flour into a bowl.", "ctx_b": "she", "label": 1,
     "endings": ["stirs.", "adds two eggs and a cup of sugar, then mixes it all with a wooden spoon.",
                 "puts the bowl in the oven", "walks away from the kitchen and sits on the couch to read."]},
    {"ctx": "The dog runs across the field chasing a ball. " * 6 + "Then the dog", "label": 2,  # > block_size 64
     "endings": ["barks.", "catches the ball and brings it back to its owner.", "falls asleep in the grass.",
                 "jumps."]},
    {"ctx": "Two people are playing tennis on a court. They", "label": 3,
     "endings": ["hit the ball.", "shake hands at the net after the match.", "sit.",
                 "run to the side of the court to pick up more balls."]},
]


def reference_scores(model, examples):
    """build-nanogpt's hellaswag.py, one ending at a time, no padding: (pred, pred_norm) per example."""
    enc, block = get_encoding(), model.config.block_size
    preds, preds_norm = [], []
    for ex in examples:
        ctx = ex.get("ctx") or f"{ex['ctx_a']} {ex['ctx_b']}"
        ctx_tokens = enc.encode(ctx)
        ends = [enc.encode(" " + e) for e in ex["endings"]]
        ctx_tokens = ctx_tokens[-(block - max(map(len, ends))):]  # left-truncated to fit the longest row
        sums, means = [], []
        for end in ends:
            row = np.array(ctx_tokens + end, np.int32)
            # one compiled shape: the row zero-padded to block_size at the end, which cannot change
            # the logits before it (causal attention; parity_tests check it), then cut back to L-1
            padded = np.zeros((1, block), np.int32)
            padded[0, : len(row) - 1] = row[:-1]
            logp = np.asarray(jax.nn.log_softmax(forward(model, padded)[0, : len(row) - 1], axis=-1))  # (L-1, V)
            losses = -logp[np.arange(len(row) - 1), row[1:]][len(ctx_tokens) - 1 :]  # the ending's tokens
            assert len(losses) == len(end)
            sums.append(losses.sum())
            means.append(losses.mean())
        preds.append(int(np.argmin(sums)))
        preds_norm.append(int(np.argmin(means)))
    return preds, preds_norm


@pytest.fixture(scope="module")
def controlled(model):
    """EXAMPLES relabelled from the reference predictions: examples 0, 1 labelled with the reference's pick
    (sum loss), 0 and 2 with its pick by mean loss where that differs; so acc and acc_norm are known."""
    pred, pred_norm = reference_scores(model, EXAMPLES)
    examples = [dict(e) for e in EXAMPLES]
    for i, e in enumerate(examples):
        e["label"] = pred[i] if i in (0, 1) else (pred[i] + 1) % 4
    want_acc = 0.5
    want_norm = np.mean([pred_norm[i] == e["label"] for i, e in enumerate(examples)])
    return examples, pred, pred_norm, want_acc, want_norm


def test_score_hellaswag_matches_the_reference(model, controlled):
    examples, pred, pred_norm, want_acc, want_norm = controlled
    assert len(set(pred)) > 1 and pred != pred_norm  # the model has preferences, and length matters
    got = evaluate.score_hellaswag(model, examples)
    assert got["pred"] == pred and got["pred_norm"] == pred_norm
    assert (got["acc"], got["acc_norm"], got["n"]) == (want_acc, want_norm, 4)
    batched = evaluate.score_hellaswag(model, examples, examples_per_batch=3)  # a padded last group
    assert batched["pred"] == pred and batched["pred_norm"] == pred_norm


def test_rows_are_padded_and_masked_like_build_nanogpt():
    enc = get_encoding()
    tokens, mask = evaluate.render_example(EXAMPLES[0], 64, enc)
    ctx = enc.encode(EXAMPLES[0]["ctx"])
    ends = [enc.encode(" " + e) for e in EXAMPLES[0]["endings"]]
    assert tokens.shape == mask.shape == (4, len(ctx) + max(map(len, ends)))
    for i, end in enumerate(ends):
        assert list(tokens[i, : len(ctx) + len(end)]) == ctx + end and not tokens[i, len(ctx) + len(end) :].any()
        assert list(mask[i]) == [0] * len(ctx) + [1] * len(end) + [0] * (tokens.shape[1] - len(ctx) - len(end))
    long_tokens, long_mask = evaluate.render_example(EXAMPLES[2], 64, enc)
    assert long_tokens.shape[1] == 64 and long_mask[:, -1].sum() == 1  # longest row fills block_size exactly


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_cli_reports_loss_perplexity_acc_and_writes_json(model_dir, controlled, text_file, tmp_path, capsys):
    examples, _, _, want_acc, want_norm = controlled
    jsonl = write_jsonl(tmp_path / "hs.jsonl", examples)
    out = tmp_path / "scores.json"
    rc = evaluate.main(["--init-from", str(model_dir), "--data", str(text_file), "--seq-len", "16",
                        "--batch-size", "4", "--hellaswag", str(jsonl), "--json", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out.read_text())
    h, d = results["hellaswag"], results["data"]
    assert (h["acc"], h["acc_norm"], h["n"]) == (want_acc, want_norm, 4)
    assert d["perplexity"] == pytest.approx(math.exp(d["loss"]))
    lines = {ln.split()[0]: ln.split()[1] for ln in stdout.splitlines()}  # "name  value ..." rows
    assert {"loss", "perplexity", "acc", "acc_norm"} <= lines.keys(), stdout
    assert float(lines["acc"]) == pytest.approx(want_acc) and float(lines["acc_norm"]) == pytest.approx(want_norm)
    assert float(lines["loss"]) == pytest.approx(d["loss"], abs=5e-5)  # printed with 4 decimals: rounding only


# ----------------------------------------------------------------------------- bad inputs


def run_cli(args, capsys) -> str:
    """The CLI's one-line stderr message, asserting exit status 2."""
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_data_file(tmp_path, capsys):
    err = run_cli(["--init-from", "unused", "--data", str(tmp_path / "missing.txt")], capsys)
    assert "missing.txt" in err


@pytest.mark.parametrize("content, why", [
    (b"", "is empty"),
    (bytes(range(256)) * 4, "NUL byte at offset 0"),
    ("caf\u00e9 au lait\n".encode("latin-1") * 20, "not UTF-8"),
])
def test_empty_binary_and_non_utf8_data(model_dir, content, why, tmp_path, capsys):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    err = run_cli(["--init-from", str(model_dir), "--data", str(path)], capsys)
    assert why in err, err
    assert path.read_bytes() == content


@pytest.mark.parametrize("bad_line, why", [
    ('{"ctx": "A cat", "endings": ["a", "b", "c", "d"], "label": 1', "not valid JSON"),
    ('{"ctx": "A cat", "endings": ["a", "b", "c"], "label": 1}', "endings"),
    ('{"ctx": "A cat", "endings": ["a", "b", "c", "d"], "label": 7}', "label"),
    ('{"endings": ["a", "b", "c", "d"], "label": 1}', "ctx"),
    ('["not", "an", "object"]', "JSON object"),
])
def test_malformed_hellaswag_line_names_file_and_line(bad_line, why, tmp_path, capsys):
    good = json.dumps(EXAMPLES[0])
    jsonl = write_jsonl(tmp_path / "hs.jsonl", [good, "", bad_line, good])
    err = run_cli(["--init-from", "unused", "--hellaswag", str(jsonl)], capsys)
    assert f"{jsonl}:3:" in err and why in err


def test_nothing_to_evaluate_and_bad_model(text_file, tmp_path, capsys):
    assert "nothing to evaluate" in run_cli(["--init-from", "unused"], capsys)
    assert str(tmp_path) in run_cli(["--init-from", str(tmp_path), "--data", str(text_file)], capsys)


def test_cudnn_attention_on_the_cpu_is_one_line(model_dir, text_file, capsys):
    assert "--attention cudnn needs a CUDA GPU" in run_cli(["--init-from", str(model_dir), "--data", str(text_file),
                                                           "--attention", "cudnn"], capsys)


def test_module_entry_point_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flax_gpt.evaluate", "--init-from", "x", "--data",
                           str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "nope.txt" in proc.stderr
