"""flax_gpt.GPT -> an HF GPT-2 directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    python -m flax_gpt.export out/ exported/            # a training run (or its checkpoints dir)
    python -m flax_gpt.export out/ exported/ --overwrite

The directory holds config.json, model.safetensors ('transformer.'-prefixed HF names, Conv1D
(in, out) layout, float32, no lm_head.weight: it is tied to wte) and generation_config.json.
Files are written into a temporary directory next to OUT_DIR and moved in only when all are
complete, so a failed or killed export never leaves a half-written model.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flax_gpt.errors import UserError, run_cli
from flax_gpt.hf import config_to_hf, to_hf_state_dict
from flax_gpt.model import GPT

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
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        _write_safetensors(tensors, tmp / "model.safetensors")
        _write_json(tmp / "generation_config.json", _generation_config(hf_config))
        _write_json(tmp / "config.json", hf_config)
        if out_dir.exists():
            for name in EXPORT_FILES:  # each replace is atomic: a reader sees the old or the new file
                os.replace(tmp / name, out_dir / name)
            if overwrite:
                _remove_stale_weights(out_dir)
            tmp.rmdir()
        else:
            os.rename(tmp, out_dir)  # the whole directory appears at once
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write the export to {out_dir}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if not out_dir.exists():
                _remove_empty(created)
    return {"out_dir": str(out_dir), "files": list(EXPORT_FILES),
            "n_params": int(sum(t.size for t in tensors.values()))}


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
    _fsync(path)


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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
        description="Export a flax_gpt model (training run, checkpoints dir, HF dir or hub id) as an HF GPT-2 "
                    "directory: config.json + model.safetensors + generation_config.json.")
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR",
                        help="a training out dir or its checkpoints dir (latest step), or an HF GPT-2 dir")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the HF directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty directory that is not a previous export")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    from flax_gpt.load import load_model

    def export():
        model = load_model(args.ckpt_dir)
        return model, save_pretrained(model, args.out_dir, overwrite=args.overwrite)

    exported, code = run_cli(export, args.debug)
    if code:
        return code
    model, result = exported
    c = model.config
    print(f"wrote {result['out_dir']}: {', '.join(sorted(result['files']))}")
    print(f"{result['n_params']:,} params ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
          f"vocab {c.vocab_size}, block_size {c.block_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
