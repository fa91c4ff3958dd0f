"""Lowering for jax-mps (platform `mps`) on a machine without it, and the ops the plugin would be handed.

jax-mps is Mac-only (its PJRT plugin is a dylib), so `install` stands in for what jax-mps 0.10.11 changes in JAX
when it is imported (jax_plugins/mps/__init__.py and ops.py; the wheel's are those of its commit 9cc6ce6):

- `mps` becomes a platform JAX lowers for (its backend never starts: JAX_PLATFORMS=cpu), shardy off;
- its mps lowering rules of JAX primitives: the ten mhlo.* unary custom calls, stablehlo.logistic, the
  mps.threefry2x32 custom call; those of eigh, qr, svd and approx_top_k are not modelled and refuse;
- its patches of jax.nn.gelu, jax.nn.dot_product_attention and nnx.LayerNorm.__call__ keep JAX's own code
  here but record each call that jax-mps would send to its fused kernels (mps.gelu, mps.sdpa, mps.layer_norm),
  so a program that takes one is reported instead of checked against a module jax-mps would not get.

A jitted program reaches the plugin as the PJRT C API client sends it: serialised as a StableHLO portable
artifact (VHLO, CHLO legalised) at the default version for a plugin that reports none (jax-mps reports
no plugin attributes), which the plugin deserialises; `plugin_ops` does that round trip. What the plugin does
next is not run here: inlining, StableHLO simplification and folding, and its fusion pass, which only makes
mps.addmm, mps.softmax, mps.layer_norm and mps.rms_norm custom calls (all of them handled).
"""

from __future__ import annotations

import jax

FUSED_CALLS: list[str] = []  # jax-mps patched functions called with arguments it would fuse


# ----------------------------------------------------------------------------- the stand-in


def _ir_type(aval):
    """The MLIR tensor type of an aval (as jax-mps builds it: mlir.aval_to_ir_type's signature moves)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    return ir.RankedTensorType.get(aval.shape, mlir.dtype_to_ir_type(aval.dtype))


def _unary_custom_call(target: str):
    """jax-mps's lowering of a unary primitive to stablehlo.custom_call @target (HandleCustomCall runs it)."""
    from jax._src.interpreters import mlir

    def lowering(ctx, x):
        (aval,) = ctx.avals_out
        return mlir.custom_call(target, result_types=[_ir_type(aval)], operands=[x],
                                backend_config="").results

    return lowering


def _threefry2x32_lowering(ctx, k1, k2, x1, x2):
    """jax-mps's threefry2x32: one custom call @mps.threefry2x32 (zeros for a zero-size output)."""
    from jax._src.interpreters import mlir

    if 0 in ctx.avals_out[0].shape:
        zeros = mlir.full_like_aval(ctx, 0, ctx.avals_out[0])
        return [zeros, zeros]
    return mlir.custom_call("mps.threefry2x32", result_types=[_ir_type(a) for a in ctx.avals_out],
                            operands=[k1, k2, x1, x2], backend_config="").results


def _not_modelled(name: str):
    """A lowering that refuses: jax-mps lowers `name` its own way, which this stand-in does not copy."""
    def lowering(ctx, *args, **params):
        raise NotImplementedError(f"jax-mps lowers {name} with its own rule, not modelled by tests/jax_mps_lowering.py: "
                                  "copy it from jax_plugins/mps/ops.py before checking a program that uses it")

    return lowering


def register_lowerings() -> None:
    """The mps lowering rules jax-mps 0.10.11 registers for JAX's own primitives (register_fused_ops)."""
    from jax import lax
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir.dialects import hlo
    from jax.extend.random import threefry2x32_p
    from jax.lax import linalg

    for prim in ("sinh", "cosh", "asin", "acos", "atan", "asinh", "acosh", "atanh", "erf", "erf_inv"):
        mlir.register_lowering(getattr(lax, f"{prim}_p"), _unary_custom_call(f"mhlo.{prim}"), platform="mps")
    mlir.register_lowering(lax.logistic_p, lambda ctx, x, accuracy=None: [hlo.logistic(x)], platform="mps")
    mlir.register_lowering(threefry2x32_p, _threefry2x32_lowering, platform="mps")
    for prim in (linalg.eigh_p, linalg.qr_p, linalg.svd_p, lax.approx_top_k_p):
        mlir.register_lowering(prim, _not_modelled(prim.name), platform="mps")


def _recording(name: str, original, fused):
    """original, recording name in FUSED_CALLS whenever fused(*args, **kwargs) says jax-mps would fuse the call."""
    def patched(*args, **kwargs):
        if fused(*args, **kwargs):
            FUSED_CALLS.append(name)
        return original(*args, **kwargs)

    return patched


def _sdpa_fused(query, key, value, bias=None, mask=None, *, implementation=None, query_seq_lengths=None,
                key_value_seq_lengths=None, local_window_size=None, return_residual=False, **_):
    """Whether jax-mps's dot_product_attention takes its mps.sdpa path (else it calls JAX's own)."""
    if implementation is not None or bias is not None or return_residual or local_window_size is not None \
            or query_seq_lengths is not None or key_value_seq_lengths is not None:
        return False
    if query.ndim not in (3, 4):
        return False
    n_heads, n_kv = query.shape[-2], key.shape[-2]
    return not (n_kv < n_heads and n_heads % n_kv)


def _layer_norm_fused(self, x, *, mask=None):
    """Whether jax-mps's nnx.LayerNorm.__call__ takes its mps.layer_norm path."""
    return mask is None and self.use_bias and self.reduction_axes in (-1, (-1,)) and self.feature_axes in (-1, (-1,))


def patch_functions() -> None:
    """jax-mps's patches of jax.nn.gelu, jax.nn.dot_product_attention and nnx.LayerNorm.__call__, recording."""
    from flax import nnx
    from jax._src.nn import functions

    gelu = _recording("jax.nn.gelu -> mps.gelu", functions.gelu, lambda x, approximate=True: approximate)
    sdpa = _recording("jax.nn.dot_product_attention -> mps.sdpa", functions.dot_product_attention, _sdpa_fused)
    functions.gelu = jax.nn.gelu = gelu
    functions.dot_product_attention = jax.nn.dot_product_attention = sdpa
    nnx.LayerNorm.__call__ = _recording("nnx.LayerNorm -> mps.layer_norm", nnx.LayerNorm.__call__, _layer_norm_fused)


def install() -> None:
    """Make JAX lower for `mps` as it does with jax-mps 0.10.11 imported (see the module docstring)."""
    from jax._src import xla_bridge

    def no_backend():
        raise RuntimeError("the mps stand-in lowers only; it has no devices")

    jax.config.update("jax_use_shardy_partitioner", False)  # jax-mps's initialize() does this
    xla_bridge.register_backend_factory("mps", no_backend, priority=500, fail_quietly=True, experimental=True)
    register_lowerings()
    patch_functions()


# ----------------------------------------------------------------------------- what the plugin gets


def plugin_ops(lowered) -> dict[str, list[str]]:
    """Op names and custom-call targets of a lowered program as jax-mps deserialises it (modules and functions
    are skipped, as the plugin's unsupported-op scan does)."""
    from jax._src.interpreters import mlir
    from jax._src.lib import _jax
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import hlo

    version = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_12)
    artifact = _jax.mlir.serialize_portable_artifact(mlir.module_to_bytecode(lowered.compiler_ir("stablehlo")),
                                                     version)
    ops, targets = set(), set()

    def walk(op):
        ops.add(op.name)
        if op.name == "stablehlo.custom_call":
            targets.add(ir.StringAttr(op.attributes["call_target_name"]).value)
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    walk(inner.operation)

    with mlir.make_ir_context() as context:
        walk(_jax.mlir.deserialize_portable_artifact(artifact, context).operation)
    return {"ops": sorted(ops - {"builtin.module", "func.func"}), "custom_calls": sorted(targets)}


def lower(traceable, *args, **static):
    """A jitted function (or fn, jitted here with static keyword arguments static) lowered for mps, not compiled."""
    jitted = traceable if hasattr(traceable, "trace") else jax.jit(traceable, static_argnames=tuple(static))
    return jitted.trace(*args, **static).lower(lowering_platforms=("mps",))
