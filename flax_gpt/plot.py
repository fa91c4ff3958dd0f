"""Pictures of runs from their metrics.jsonl: the loss curve, the panels of everything that matters, overlays.

    python -m flax_gpt.plot out                       # out/metrics.png again
    python -m flax_gpt.plot runs/a runs/b --out ab.png  # several runs overlaid, one colour each

Panels (each drawn when some run has its metric): train loss (faint: every step; solid: a running mean) and val
loss (dots), learning rate, gradient norm, tokens/s (solid: a running median), HellaSwag acc_norm.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import tyro
from matplotlib.figure import Figure

from flax_gpt.errors import UserError, run_cli
from flax_gpt.files import atomic_write

# (metrics.jsonl key, panel title, y label)
PANELS = (
    ("loss", "loss", "cross-entropy (nats)"),
    ("lr", "learning rate", "lr"),
    ("grad_norm", "gradient norm (before clipping)", "global norm"),
    ("tokens_per_s", "throughput", "tokens/s"),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", "accuracy"),
)


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of every record with a number under key."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.float64)) if pairs else (
        np.zeros(0), np.zeros(0))


def running(values: np.ndarray, k: int, how=np.mean) -> np.ndarray:
    """how (mean or median) of each window of k values: len(values) - k + 1 of them."""
    return np.array([how(values[i : i + k]) for i in range(len(values) - k + 1)])


def plot_losses(records: list[dict], path: Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and val loss against step, saved as a PNG."""
    fig = Figure(figsize=(7, 4.2), dpi=110)  # no pyplot: no GUI backend, no global figure state
    ax = fig.subplots()
    _loss_panel(ax, records, "tab:blue", "tab:orange", "")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """fig as the image file path (its format from the suffix, PNG without one), written whole."""
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix[1:] or None))


def _loss_panel(ax, records: list[dict], color: str, val_color: str, name: str) -> None:
    """Train loss (faint every step, solid its running mean when there are many) and val loss (dots)."""
    steps, losses = series(records, "loss")
    prefix = f"{name} " if name else ""
    k = max(1, len(losses) // 25)
    if len(losses):
        ax.plot(steps, losses, color=color, alpha=0.3 if k > 1 else 1.0, linewidth=0.8, label=f"{prefix}train")
    if k > 1:
        ax.plot(steps[k - 1 :], running(losses, k), color=color, linewidth=1.6, label=f"{prefix}train (mean of {k})")
    steps, val = series(records, "val_loss")
    if len(val):
        ax.plot(steps, val, "o-", color=val_color, linewidth=1.4, markersize=4, label=f"{prefix}val")


def panels_of(runs: dict[str, list[dict]]) -> list[tuple[str, str, str]]:
    """The PANELS some run has a number for (the loss panel: train or val loss)."""
    def has(key: str) -> bool:
        keys = ("loss", "val_loss") if key == "loss" else (key,)
        return any(len(series(records, k)[0]) for records in runs.values() for k in keys)

    return [p for p in PANELS if has(p[0])]


def plot_runs(runs: dict[str, list[dict]], path: Path, title: str = "") -> list[str]:
    """One panel per metric some run has (PANELS), each run in its own colour; saved as a PNG.

    Returns the titles of the panels drawn.
    """
    panels = panels_of(runs)
    if not panels:
        raise UserError(f"nothing to plot: no train loss, val loss or other metric in {', '.join(runs)}")
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6.2 * cols, 3.4 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel_title, ylabel) in zip(axes.flat, panels):
        for i, (name, records) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            label = name if len(runs) > 1 else ""
            if key == "loss":
                _loss_panel(ax, records, color, color if len(runs) > 1 else "tab:orange", label)
            else:
                _metric_panel(ax, records, key, color, label)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return [p[1] for p in panels]


def _metric_panel(ax, records: list[dict], key: str, color: str, label: str) -> None:
    """One metric against step (label: the run's name, "" for no legend); tokens/s also as a running median."""
    steps, values = series(records, key)
    if not len(values):
        return
    label = label or None
    if key.startswith("hellaswag"):
        ax.plot(steps, values, "o-", color=color, linewidth=1.4, markersize=4, label=label)
        return
    k = max(1, len(values) // 25) if key == "tokens_per_s" else 1
    ax.plot(steps, values, color=color, alpha=0.3 if k > 1 else 1.0, linewidth=0.9, label=None if k > 1 else label)
    if k > 1:
        ax.plot(steps[k - 1 :], running(values, k, np.median), color=color, linewidth=1.6,
                label=f"{label or ''} (median of {k})".lstrip())


def read_run(path: str | Path) -> list[dict]:
    """The records of a run directory's metrics.jsonl (or of that file); a half-written last line is skipped."""
    path = Path(path).expanduser()
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no metrics.jsonl; pass a run's --out-dir (or its metrics.jsonl)")
    records = []
    for line in file.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def run_names(paths: list[str]) -> list[str]:
    """Labels for the runs: their directory names, or the paths as given where two names are the same."""
    names = [Path(p).expanduser().resolve().name if Path(p).is_dir() else Path(p).resolve().parent.name
             for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


@dataclasses.dataclass
class PlotConfig:
    """Plot the metrics of one or more training runs into one PNG (several runs: overlaid)."""

    runs: tyro.conf.Positional[tuple[str, ...]]  # run directories (train.py --out-dir) or their metrics.jsonl files
    out: str = "runs.png"  # the PNG to write
    title: str = ""
    debug: bool = False  # show tracebacks instead of one-line errors


def plot(cfg: PlotConfig) -> list[str]:
    """Read every run, draw the panels, write cfg.out; returns the panel titles."""
    if not cfg.runs:
        raise UserError("no run to plot: pass one or more run directories")
    runs = dict(zip(run_names(list(cfg.runs)), (read_run(p) for p in cfg.runs)))
    try:
        return plot_runs(runs, Path(cfg.out).expanduser(), cfg.title)
    except OSError as e:
        raise UserError(f"--out {cfg.out}: cannot write ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = tyro.cli(PlotConfig, args=argv, description=__doc__, prog="python -m flax_gpt.plot")
    panels, code = run_cli(lambda: plot(cfg), cfg.debug)
    if code:
        return code
    print(f"wrote {cfg.out}: {', '.join(panels)} of {len(cfg.runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
