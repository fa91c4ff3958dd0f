"""Muon on the attention's fused c_attn: one (C, 3C) matrix, as torch.optim.Muon sees nanoGPT's c_attn, or q, k and v
orthogonalized apart, as the modded-nanogpt speedrun does. Runs train.py with the latter patched in:

    python benchmarks/muon_qkv.py --optimizer muon --out-dir out_qkv_split    # compare with the same flags, unpatched
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path

from flax_gpt import muon, optim

if __name__ == "__main__":
    optim.muon = functools.partial(muon.muon, split_qkv=True)  # make_optimizer's Muon, q, k and v apart
    sys.argv = [str(Path(__file__).resolve().parents[1] / "train.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
