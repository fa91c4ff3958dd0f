"""flax_gpt.GPT -> an HF GPT-2 directory (the default), or a build-nanogpt / nanoGPT checkpoint file.

    python -m flax_gpt.export out/ exported/                            # a training run (or its checkpoints dir)
    python -m flax_gpt.export out/ exported/ --overwrite
    python -m flax_gpt.export out/ model_00040.pt --format build-nanogpt  # build-nanogpt's log/model_XXXXX.pt
    python -m flax_gpt.export out/ ckpt.pt --format nanogpt               # nanoGPT's out/ckpt.pt

The HF directory holds config.json, model.safetensors ('transformer.'-prefixed HF names, Conv1D
(in, out) layout, float32, no lm_head.weight: it is tied to wte) and generation_config.json.
Files are written into a temporary directory next to OUT_DIR and moved in only when all are
complete, so a failed or killed export never leaves a half-written model.safetensors.
A .pt checkpoint (see flax_gpt.torch_ckpt) is written to a temporary file beside it and renamed over
it; an existing file is replaced only with --overwrite. From a training run, nanoGPT's file carries
the run's step and AdamW moments, so nanoGPT's `train.py --init_from=resume` continues the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flax_gpt import torch_ckpt
from flax_gpt.errors import UserError, run_cli
from flax_gpt.files import atomic_directory, atomic_write
from flax_gpt.hf import config_to_hf, to_hf_state_dict
from flax_gpt.load import TrainedModel, load_model, load_run, trained_with_muon
from flax_gpt.model import GPT
from flax_gpt.optim import OptimConfig

EXPORT_FILES = ("model.safetensors", "generation_config.json", "config.json")  # moved in this order
# Weight files an HF loader would read instead of (or besides) our model.safetensors: removed on --overwrite.
_STALE_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                  "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin", "tf_model.h5", "flax_model.msgpack")


def save_pretrained(model: GPT, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Write model as an HF GPT-2 directory; returns {"out_dir", "files", "n_params"}.

    out_dir may be missing, empty, or a previous export (only config.json, model.safetensors,
    generation_config.json); any other non-empty directory needs overwrite=True.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)
    tensors = to_hf_state_dict(model)
    hf_config = config_to_hf(model.config)
    if hf_config["eos_token_id"] >= model.config.vocab_size:  # not GPT-2's vocabulary: no <|endoftext|> id
        hf_config.update(bos_token_id=None, eos_token_id=None)
    created = _make_parents(out_dir.parent)
    done = False
    try:
        with atomic_directory(out_dir, EXPORT_FILES) as tmp:  # a reader sees the old or the new file of each name
            _write_safetensors(tensors, tmp / "model.safetensors")
            _write_json(tmp / "generation_config.json", _generation_config(hf_config))
            _write_json(tmp / "config.json", hf_config)
        if overwrite:
            _remove_stale_weights(out_dir)
        done = True
    except OSError as e:
        raise UserError(f"cannot write the export to {out_dir}: {e.strerror or e}") from e
    finally:
        if not done and not out_dir.exists():
            _remove_empty(created)
    return {"out_dir": str(out_dir), "files": list(EXPORT_FILES),
            "n_params": int(sum(t.size for t in tensors.values()))}


def save_torch_checkpoint(run: TrainedModel, out: str | Path, fmt: str, overwrite: bool = False) -> dict:
    """Write run as a build-nanogpt or nanoGPT checkpoint file; returns {"out", "optimizer", "n_params", "note"}.

    A model whose GELU is not the one fmt's model.py computes is written all the same, as a nanoGPT user moving a
    run there expects: "note" (else None) is the one line that says their logits differ (torch_ckpt.gelu_note).
    """
    torch_ckpt.require_torch()
    out = check_file_target(out, overwrite)
    if fmt == "build-nanogpt":
        ckpt, optimizer = torch_ckpt.build_nanogpt_checkpoint(run.model, run.step, run.val_losses.get(run.step)), None
    else:
        best = min((loss for step, loss in run.val_losses.items() if step <= run.step), default=1e9)
        ckpt = torch_ckpt.nanogpt_checkpoint(run.model, run.step, best, _optim_config(run.train_config), run.adam)
        if run.adam:
            optimizer = f"AdamW moments of step {run.step}"
        elif trained_with_muon(run.train_config):
            optimizer = ("empty AdamW state (this run trained with Muon: nanoGPT's train.py has no Muon state to resume "
                         "from, its AdamW starts afresh)")
        else:
            optimizer = "empty AdamW state (fresh moments)"
    created = _make_parents(out.parent)
    done = False
    try:
        atomic_write(out, lambda f: torch_ckpt.save(ckpt, f))  # a reader sees the old file or the new one
        done = True
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        if not done:
            _remove_empty(created)
    n_params = sum(t.numel() for k, t in ckpt["model"].items() if k != "lm_head.weight")
    return {"out": str(out), "optimizer": optimizer, "n_params": n_params,
            "note": torch_ckpt.gelu_note(run.model.config, fmt)}


def check_file_target(out: str | Path, overwrite: bool) -> Path:
    """The absolute path of a checkpoint file to write; refuses a directory, and an existing file unless overwrite."""
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise UserError(f"{out} is a directory; pass the checkpoint file to write, e.g. {out / 'ckpt.pt'}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another path or pass --overwrite to replace it")
    return out


def _optim_config(train_config: dict | None) -> OptimConfig:
    """The AdamW settings of a flax_gpt run (its TrainConfig record); OptimConfig's defaults without one."""
    fields = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "grad_clip")
    return OptimConfig(**{k: train_config[k] for k in fields if (train_config or {}).get(k) is not None})


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; pass a directory path to export into")
    if not out_dir.is_dir() or overwrite:
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    previous_export = "config.json" in entries and set(entries) <= set(EXPORT_FILES)
    if entries and not previous_export:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{out_dir} is not empty ({shown}) and is not a previous export; "
                        "choose another directory or pass --overwrite")


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers expects format=pt


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _generation_config(hf_config: dict) -> dict:
    return {"_from_model_config": True, "bos_token_id": hf_config["bos_token_id"],
            "eos_token_id": hf_config["eos_token_id"]}


def _make_parents(parent: Path) -> Path | None:
    """Create parent (and its missing ancestors); returns the topmost directory created, if any."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {parent}: {e.strerror or e}") from e
    return missing[-1] if missing else None


def _remove_empty(top: Path | None) -> None:
    """Remove the directories this export created above out_dir, if they are still empty."""
    if top is None:
        return
    for d in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


def _remove_stale_weights(out_dir: Path) -> None:
    for pattern in _STALE_WEIGHTS:
        for p in out_dir.glob(pattern):
            if p.is_file() and p.name not in EXPORT_FILES:
                p.unlink()


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flax_gpt.export",
        description="Export a flax_gpt model (training run, checkpoints dir, HF dir, .pt file or hub id) as an HF "
                    "GPT-2 directory (config.json + model.safetensors + generation_config.json), or as a "
                    "build-nanogpt or nanoGPT checkpoint file.")
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR",
                        help="a training out dir or its checkpoints dir (latest step), an HF GPT-2 dir, or a .pt")
    parser.add_argument("out_dir", metavar="OUT", help="where to write: the HF directory, or the .pt file")
    parser.add_argument("--format", choices=("hf", "build-nanogpt", "nanogpt"), default="hf",
                        help="hf: an HF GPT-2 directory; build-nanogpt: log/model_XXXXX.pt's dict; nanogpt: "
                             "out/ckpt.pt's dict, with the run's AdamW state")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty directory that is not a previous export, or replace a .pt")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)

    def export():
        if args.format == "hf":
            model = load_model(args.ckpt_dir)
            return model, save_pretrained(model, args.out_dir, overwrite=args.overwrite)
        torch_ckpt.require_torch()  # both before the (long) load
        check_file_target(args.out_dir, args.overwrite)
        run = load_run(args.ckpt_dir)
        return run.model, save_torch_checkpoint(run, args.out_dir, args.format, overwrite=args.overwrite)

    exported, code = run_cli(export, args.debug)
    if code:
        return code
    model, result = exported
    c = model.config
    if args.format == "hf":
        print(f"wrote {result['out_dir']}: {', '.join(sorted(result['files']))}")
    else:
        optimizer = f" + {result['optimizer']}" if result["optimizer"] else ""
        print(f"wrote {result['out']}: {args.format} checkpoint, weights{optimizer}")
    print(f"{result['n_params']:,} params ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
          f"vocab {c.vocab_size}, block_size {c.block_size})")
    if result.get("note"):
        print(result["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
