"""Where JAX computes (`--device`) and what runs there: CUDA, Apple GPUs through the jax-mps plugin, or the CPU.

A plugin platform cannot run everything the CPU and CUDA can; `capabilities` names the fallbacks, and
train, generate and evaluate set the model and the jitted steps from them (the model knows no platforms).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform

import jax

from flax_gpt.config import ATTENTIONS
from flax_gpt.data import cache_dir
from flax_gpt.errors import UserError
from flax_gpt.sharding import initialize_distributed

JAX_PLATFORM = {"cuda": "cuda", "metal": "mps", "cpu": "cpu"}  # --device -> the platform's name in JAX
METAL_INSTALL = ("--device metal needs the jax-mps plugin (Apple silicon, macOS 14+, Python 3.11+): "
                 "pip install 'flax-gpt[metal]'")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a platform runs as CPU and CUDA do, and the fallback where it does not."""

    donation: bool = True  # jit reuses donated input buffers (else: donate nothing)
    matmul_output: str = "float32"  # GPTConfig.matmul_output: 16-bit dots return float32, or "compute" and a cast
    cudnn_attention: bool = False  # cuDNN flash attention can run (else: XLA's)

    def fallbacks(self) -> list[str]:
        """The fallbacks in words, for the run's log."""
        return ([] if self.donation else ["no buffer donation"]) + (
            [] if self.matmul_output == "float32" else ["bf16 matmuls return bf16, cast to float32"])


def capabilities(platform: str) -> Capabilities:
    """Of a JAX platform name (cpu, gpu, mps, ...). jax-mps (mps) warns and copies donated buffers, and its
    dot_general hands back the inputs' bf16 where preferred_element_type asks for float32."""
    if platform == "mps":
        return Capabilities(donation=False, matmul_output="compute")
    return Capabilities(cudnn_attention=platform == "gpu")


def current_platform() -> str:
    """The platform of JAX's default devices (cpu, gpu for CUDA, mps for Apple GPUs)."""
    return jax.devices()[0].platform


def has_metal_plugin() -> bool:
    """Whether jax-mps, the PJRT plugin for Apple GPUs, is installed."""
    try:
        importlib.metadata.distribution("jax-mps")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def select_device(device: str) -> str:
    """Point JAX at --device before it starts; returns the platform in use.

    auto is JAX's own choice: a CUDA GPU, else Apple's GPU when jax-mps is installed (plugins rank above the
    CPU), else the CPU. The CPU backend stays available beside an accelerator (loaded weights wait there).
    jax_platforms still takes effect after `import jax`: JAX starts its backends when devices are first asked for.
    """
    if device not in ("auto", *JAX_PLATFORM):
        raise UserError(f"--device must be auto, cuda, metal or cpu, got {device!r}")
    if device == "metal" and not has_metal_plugin():
        raise UserError(METAL_INSTALL)
    if device != "auto":
        jax.config.update("jax_platforms", "cpu" if device == "cpu" else f"{JAX_PLATFORM[device]},cpu")
    initialize_distributed()  # before anything asks for devices; a no-op for a single process
    try:
        return current_platform()
    except RuntimeError:
        raise UserError(f"--device {device}: JAX finds no such device (for cuda: pip install 'flax-gpt[cuda]' "
                        "on a machine with an NVIDIA driver; for metal: jax-mps on macOS 14+ on Apple silicon)") from None


def compute_dtype(dtype: str, platform: str, training: bool = False) -> str:
    """--dtype: auto is bf16 on accelerators, except CUDA GPUs without bf16 (float16 there for training, with loss
    scaling; float32 for evaluation and sampling); on the CPU, fp32, except for training on a CPU with bf16 dot
    instructions (bf16 steps are faster there; evaluation and sampling keep fp32's accuracy)."""
    if dtype == "auto":
        if platform == "gpu":
            return "bfloat16" if gpu_has_bf16() else "float16" if training else "float32"
        return "bfloat16" if platform != "cpu" or (training and cpu_has_bf16_dots()) else "float32"
    return DTYPES[dtype]


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
          "float32": "float32"}  # --dtype (either spelling) -> GPTConfig.dtype
FLAG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # GPTConfig.dtype -> --dtype


BF16_COMPUTE_CAPABILITY = 8.0  # Ampere: the first NVIDIA GPUs with bf16 tensor cores (T4 is 7.5, V100 7.0)
CUDNN_FLASH_COMPUTE_CAPABILITY = 8.0  # JAX's cuDNN attention refuses older GPUs (fp16 included)
# Tiled attention's steps measured as fast as XLA's at 128 positions, 1-14% faster at 256 (BENCHMARKS.md), and it
# compiles longer (~0.4 s more per layer at 256): auto takes it for training from 256 positions on.
TILED_MIN_SEQ_LEN = 256
TILED_DTYPES = ("float32", "bfloat16")  # tiled attention's dots (float16 ones with float32 results: XLA:CPU refuses)


def gpu_compute_capability(devices=None) -> float:
    """The lowest CUDA compute capability of the GPUs (default: this process's), e.g. 7.5 for a T4."""
    return min(float(d.compute_capability) for d in devices or jax.local_devices())


def gpu_has_bf16(devices=None) -> bool:
    """Whether every one of the CUDA GPUs computes bf16 natively (compute capability 8.0 or newer)."""
    return gpu_compute_capability(devices) >= BF16_COMPUTE_CAPABILITY


def auto_dtype_note(dtype: str, platform: str, devices=None) -> str | None:
    """Why --dtype auto trains in float16 on this GPU, for the run's log; None where it does not."""
    if dtype != "auto" or platform != "gpu" or gpu_has_bf16(devices):
        return None
    return (f"--dtype auto trains in float16 with dynamic loss scaling: this GPU (compute capability "
            f"{gpu_compute_capability(devices)}) has no bf16")


ISA_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")  # what a CPU's matmul kernels can use


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """{"model": this CPU's model name, "isa": which of ISA_FLAGS it has} from Linux's cpuinfo (the first CPU);
    elsewhere Python's platform.processor() (or the machine) and no flags."""
    try:
        with open(cpuinfo) as f:
            first = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return {"model": platform.processor() or platform.machine(), "isa": []}
    fields = {key.strip(): value.strip() for key, value in first.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def cpu_line(info: dict | None = None) -> str:
    """cpu_info() in one phrase: "AMD EPYC (avx512_bf16, avx512f)"."""
    info = info or cpu_info()
    return f"{info['model']} ({', '.join(info['isa']) or 'no AVX-512'})"


def cpu_has_bf16_dots(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this x86 CPU has native bf16 dot products (AVX512_BF16 or AMX-BF16), read from Linux's cpuinfo."""
    isa = cpu_info(cpuinfo)["isa"]
    return "avx512_bf16" in isa or "amx_bf16" in isa


def enable_compile_cache() -> None:
    """Keep compiled programs under $FLAX_GPT_CACHE/xla, so a rerun with the same shapes skips compiling.

    JAX_COMPILATION_CACHE_DIR, when set, wins; an unwritable cache directory only means compiling every time.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    xla_cache = cache_dir() / "xla"
    try:
        xla_cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(xla_cache))


def host_device():
    """A CPU device of this process, where loaded weights wait (None if JAX runs without its CPU backend)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def model_numerics(dtype_flag: str, attention_flag: str) -> tuple[str, dict]:
    """(compute dtype, GPTConfig numerics) for --dtype and --attention on the current platform: what generate and
    evaluate load a model with."""
    platform = current_platform()
    dtype = compute_dtype(dtype_flag, platform)
    return dtype, {"matmul_output": capabilities(platform).matmul_output,
                   "attention": attention_implementation(attention_flag, platform, dtype)}


def attention_implementation(attention: str, platform: str, dtype: str, dropout: float = 0.0,
                             train_seq_len: int | None = None) -> str:
    """--attention as GPTConfig.attention: auto is cuDNN flash attention on CUDA in bf16 without dropout; tiled
    attention when training on CPU in fp32 or bf16 without dropout on sequences of TILED_MIN_SEQ_LEN or more
    (train_seq_len; None: not training); XLA's elsewhere (JAX's cuDNN attention fixes its dropout seed when it
    compiles: every step would drop the same)."""
    cudnn_runs = capabilities(platform).cudnn_attention
    if attention == "auto":
        if cudnn_runs and dtype == "bfloat16" and dropout == 0:
            return "cudnn"
        tiled_pays = train_seq_len is not None and train_seq_len >= TILED_MIN_SEQ_LEN
        return "tiled" if platform == "cpu" and dtype in TILED_DTYPES and dropout == 0 and tiled_pays else "xla"
    if attention == "tiled" and dropout > 0:
        raise UserError(f"--attention tiled has no dropout, and this run has --dropout {dropout}: use --attention xla "
                        "(or auto)")
    if attention == "tiled" and dtype not in TILED_DTYPES:
        raise UserError(f"--attention tiled computes in fp32 or bf16, this run in {dtype}: use --attention xla (or auto)")
    if attention == "cudnn" and dropout > 0:
        raise UserError(f"--attention cudnn cannot drop out with --dropout {dropout}: JAX's cuDNN attention fixes its "
                        "dropout seed when it compiles (the same entries every step); use --attention xla (or auto)")
    if attention == "cudnn" and not cudnn_runs:
        raise UserError(f"--attention cudnn needs a CUDA GPU (cuDNN flash attention); this run is on {platform}: "
                        "use --attention xla (or auto)")
    if attention == "cudnn" and dtype not in ("bfloat16", "float16"):
        raise UserError(f"--attention cudnn runs in bf16 or fp16 only (cuDNN flash attention), this run computes in "
                        f"{dtype}: add --dtype bf16, or use --attention xla")
    if attention == "cudnn" and gpu_compute_capability() < CUDNN_FLASH_COMPUTE_CAPABILITY:
        raise UserError(f"--attention cudnn: cuDNN flash attention needs compute capability "
                        f"{CUDNN_FLASH_COMPUTE_CAPABILITY} or newer, this GPU has {gpu_compute_capability()}: use "
                        "--attention xla (or auto)")
    if attention not in ATTENTIONS:
        raise UserError(f"--attention must be auto, {', '.join(ATTENTIONS)}; got {attention!r}")
    return attention
