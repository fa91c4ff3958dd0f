"""FLOPs and bytes of a compiled XLA program from its optimized HLO, counting loops as they run.

A program compiled for a GPU without one (benchmarks/cuda_compile.py) has no cost analysis of its own, so its
HLO text is analysed by XLA's HloCostAnalysis on this machine, with two corrections:
- a while loop with a known trip count is counted that many times (HloCostAnalysis counts a loop body once);
- cuBLAS matmuls and cuDNN attention are custom calls, whose FLOPs HloCostAnalysis does not know: they are
  counted from their shapes (a matmul 2*M*N*K; cuDNN attention's forward two matmuls, its backward five, halved
  under a causal mask, which cuDNN skips block by block). Their bytes are HloCostAnalysis's (operands + outputs).
"""

from __future__ import annotations

import json
import math
import re

import jax
from jax._src.lib import _jax, hlo

SHAPE = re.compile(r"= \(?(\w+)\[([\d,]*)\]")  # an instruction's (first) result: dtype and dims
CALLED = re.compile(r"(?:body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)")


def dims(instruction_text: str) -> list[int]:
    """The dimensions of an instruction's first result, from its HLO text."""
    found = SHAPE.search(instruction_text)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def backend_config(instruction_text: str) -> dict:
    """The instruction's backend_config JSON ({} when it has none)."""
    start = instruction_text.find("backend_config=")
    if start < 0:
        return {}
    text = instruction_text[start + len("backend_config="):]
    return json.JSONDecoder().raw_decode(text)[0] if text.startswith("{") else {}


def custom_call_flops(instruction) -> float:
    """FLOPs of a cuBLAS matmul or cuDNN attention custom call from its shapes; 0 for any other target."""
    text = instruction.to_string()
    target = re.search(r'custom_call_target="([^"]+)"', text).group(1)
    config = backend_config(text)
    if target.startswith("__cublas"):
        numbers = config["gemm_backend_config"]["dot_dimension_numbers"]
        lhs = dims(instruction.operands()[0].to_string())
        contracted = math.prod(lhs[int(d)] for d in numbers["lhs_contracting_dimensions"])
        return 2.0 * math.prod(dims(text)) * contracted
    if target.startswith("__cudnn$fmha"):
        q, k = (dims(instruction.operands()[i].to_string()) for i in (0, 1))  # (B, T, H, D), (B, S, H, D)
        B, T, H, D, S = q[0], q[1], q[2], q[3], k[1]
        matmuls = 5 if "Backward" in target else 2  # forward: QK^T, PV; backward: QK^T again, dV, dP, dQ, dK
        causal = config.get("cudnn_fmha_backend_config", {}).get("mask_type") == "CAUSAL"
        return matmuls * 2.0 * B * H * T * S * D * (0.5 if causal else 1.0)
    return 0.0


def analysis(text: str, client) -> dict:
    """XLA's HloCostAnalysis of an HLO module's text."""
    return _jax.hlo_module_cost_analysis(client, hlo.hlo_module_from_text(text))


def as_entry(text: str, computation: str) -> str:
    """The module's text with `computation` as its entry (to cost a loop body alone)."""
    text = re.sub(r"^(HloModule [\w.\-]+).*$", r"\1", text, count=1, flags=re.M)  # its aliasing names the old entry
    text = re.sub(r"^ENTRY ", "", text, flags=re.M)
    return re.sub(rf"^%{re.escape(computation)} ", f"ENTRY %{computation} ", text, count=1, flags=re.M)


def program_cost(text: str) -> dict:
    """{"flops", "bytes_accessed"} of one run of the compiled program whose optimized HLO is `text`."""
    client = jax.devices("cpu")[0].client
    module = hlo.hlo_module_from_text(text)
    computations = {c.name: c for c in module.computations()}
    entry = re.search(r"^ENTRY %([\w.\-]+)", text, flags=re.M).group(1)
    runs, owner, loops = {entry: 1}, {entry: entry}, {}  # computation -> times it runs; -> the entry or loop body
    order = [entry]  # it belongs to; entry or loop body -> the loop bodies directly inside it
    for name in order:  # breadth first from the entry: callers before callees
        for instruction in computations[name].instructions():
            line = instruction.to_string()
            trip = backend_config(line).get("known_trip_count", {}).get("n") if "while(" in line else None
            for callee in CALLED.findall(line):
                if callee in computations and callee not in runs:
                    is_body = trip is not None and f"body=%{callee}" in line
                    runs[callee] = runs[name] * (int(trip) if is_body else 1)
                    owner[callee] = callee if is_body else owner[name]
                    loops.setdefault(owner[name], []).extend([callee] if is_body else [])
                    order.append(callee)
    whole = {c: analysis(text if c == entry else as_entry(text, c), client) for c in [entry, *sum(loops.values(), [])]}
    flops = bytes_accessed = 0.0
    for name, cost in whole.items():  # each loop body's own cost (without its inner loops) times its runs
        own = {k: cost.get(k, 0.0) - sum(whole[b].get(k, 0.0) for b in loops.get(name, [])) for k in
               ("flops", "bytes accessed")}
        flops += runs[name] * own["flops"]
        bytes_accessed += runs[name] * own["bytes accessed"]
    for name in order:
        for instruction in computations[name].instructions():
            if str(instruction.opcode) == "HloOpcode.kCustomCall":
                flops += runs[name] * custom_call_flops(instruction)
    return {"flops": flops, "bytes_accessed": bytes_accessed}


def custom_call_targets(text: str) -> dict[str, int]:
    """How many custom calls of each target the HLO text holds."""
    counts: dict[str, int] = {}
    for target in re.findall(r'custom_call_target="([^"]+)"', text):
        counts[target] = counts.get(target, 0) + 1
    return dict(sorted(counts.items()))
