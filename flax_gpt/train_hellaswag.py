"""HellaSwag during training (--hellaswag FILE): the examples batched like the val loss and scored by one jitted step."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from flax_gpt import evaluate as ev
from flax_gpt.config import GPTConfig
from flax_gpt.tokenizer import get_encoding


@dataclasses.dataclass
class HellaSwagEval:
    """--hellaswag's examples in fixed-shape batches (this process's rows) and the jitted step that scores them."""

    step: Callable  # jitted (params, tokens (R, L), mask (R, L)) -> (sums (R,), counts (R,)), R over all processes
    batches: list[tuple[np.ndarray, np.ndarray]]  # [(tokens, mask)] (E*4, L) int32 each
    labels: np.ndarray  # (n,) the right ending of every example


def read_examples(path: str | None, limit: int | None) -> list[dict] | None:
    """The first `limit` examples of --hellaswag (all without a limit), each checked; None without the file."""
    return None if path is None else ev.read_hellaswag(path)[:limit]


def hellaswag_eval(path: str, batch_size: int, examples: list[dict], config: GPTConfig, graphdef, params_sharding,
                   eval_sharding, process_index: int, process_count: int) -> HellaSwagEval:
    """The examples rendered as evaluate.py renders them, batched over processes and devices like the val loss."""
    enc = get_encoding()
    rendered = [ev.render_example(e, config.block_size, enc, f"--hellaswag {path}: example {i + 1}")
                for i, e in enumerate(examples)]
    n_devices = jax.local_device_count() if eval_sharding is not None else 1
    per_process = examples_per_batch(batch_size, n_devices)
    batches = ev.hellaswag_batches(rendered, per_process, config.block_size, process_index, process_count)
    step = ev.make_hellaswag_step(graphdef, ev.ending_length(rendered), params_sharding, eval_sharding)
    return HellaSwagEval(step, batches, np.array([e["label"] for e in examples]))


def examples_per_batch(batch_size: int, n_devices: int) -> int:
    """Examples per process in a HellaSwag batch: about batch_size rows (4 per example), and rows that split
    evenly over the process's devices."""
    unit = n_devices // math.gcd(n_devices, ev.N_ENDINGS)
    return -(-max(1, batch_size // ev.N_ENDINGS) // unit) * unit


def score(h: HellaSwagEval, params, to_device: Callable[[np.ndarray], jax.Array]) -> dict:
    """acc, acc_norm, n and correct counts of params on every example (all processes)."""
    return ev.score_batches(h.step, params, h.batches, h.labels, to_device)
