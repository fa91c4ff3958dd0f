"""Peak memory of GPT.from_pretrained on a random HF checkpoint of a preset's shape.

    python benchmarks/load_memory.py --preset gpt2-medium [--format safetensors|bin]

Writes the checkpoint to a temp dir, then loads it in a fresh process and compares that
process's peak RSS (VmHWM, reset after imports) with the size of the weights in float32.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

LOADER = """
import json, sys, time
import jax, flax_gpt
from flax_gpt import GPT
def status_mb(field):
    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
    return int(line.split()[1]) / 1024
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak-RSS mark: count from here
base = status_mb('VmRSS')
t0 = time.perf_counter()
model = GPT.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({"rss_after_imports_mb": base, "peak_rss_mb": status_mb('VmHWM'), "load_s": seconds}))
"""


def write_checkpoint(preset_name: str, directory: Path, fmt: str) -> int:
    """Random float32 HF GPT-2 tensors of the preset's shape; returns their total bytes."""
    from flax_gpt import preset
    from flax_gpt.hf import config_to_hf

    cfg = preset(preset_name)
    C, L, rng = cfg.n_embd, cfg.n_layer, np.random.default_rng(0)
    shapes = {"transformer.wte.weight": (cfg.vocab_size, C), "transformer.wpe.weight": (cfg.block_size, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes |= {p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                   p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
                   p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                   p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
                   p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)}
    tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, directory / "model.safetensors")
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, directory / "pytorch_model.bin")
    return sum(t.nbytes for t in tensors.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="gpt2-medium")
    ap.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weight_bytes = write_checkpoint(args.preset, Path(tmp), args.format)
        out = subprocess.run([sys.executable, "-c", LOADER, tmp], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result |= {"preset": args.preset, "format": args.format, "weights_mb": weight_bytes / 2**20}
    result["peak_over_imports_mb"] = result["peak_rss_mb"] - result["rss_after_imports_mb"]
    result["peak_over_imports_x_weights"] = result["peak_over_imports_mb"] / result["weights_mb"]
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
