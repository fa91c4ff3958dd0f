"""The flags of `python train.py` and the run presets that fill the ones not given.

Each flag is one TrainConfig field declared with `flag(...)`: its default, whether the preset fills it, whether
it defines the run (--resume takes it from the checkpoint and refuses a contradicting one) or belongs to this
invocation of train.py only, and its check. The presets, the resume rules and the CLI (tyro reads the comments as help) are
derived from those fields. No JAX here: bad flags fail before JAX starts.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from flax_gpt.config import AttentionFlag
from flax_gpt.errors import UserError
from flax_gpt.sinks import require


CHECKS = {"positive": (lambda v: v > 0, "positive"), "non_negative": (lambda v: v >= 0, "non-negative"),
          "fraction": (lambda v: 0 <= v < 1, "in [0, 1)")}  # flag(check=...): (passes, what the error says)


def flag(default=None, *, preset: Literal["fill", "read"] | None = None, defines_run: bool = False,
         invocation: bool = False, check: Literal["positive", "non_negative", "fraction"] | None = None):
    """A TrainConfig field. preset: "fill" takes the preset's value when the flag is not given, "read" leaves the
    field unset (so a checkpoint records that the preset's was used) and reads the preset where it is needed.
    invocation: never restored on --resume (where to write, which device, --debug)."""
    return dataclasses.field(default=default, metadata={"preset": preset, "defines_run": defines_run,
                                                        "invocation": invocation, "check": check})


@dataclasses.dataclass
class TrainConfig:
    """Train a GPT-2 on a text corpus (defaults come from --preset; every field is a flag)."""

    preset: str = flag("small", defines_run=True)  # run recipe: tiny | small | gpt2 | gpt2-medium | gpt2-large | gpt2-xl (see README)
    data: str | None = flag(None, defines_run=True)  # token shards dir or .txt/.jsonl/.parquet file(s); default ./input.txt, else Shakespeare
    out_dir: str = flag("out", invocation=True)  # checkpoints/, metrics.jsonl and loss.png go here
    init_from: str | None = flag(None, preset="fill", defines_run=True)  # scratch | an HF hub id (gpt2, ...) | an HF directory | a run; default: the preset's
    resume: bool = flag(False, invocation=True)  # continue the run in out_dir from its latest checkpoint, with that run's own flags
    extend_steps: int = flag(0, invocation=True, check="non_negative")  # with --resume: train this many steps past the run's --max-steps, at its final lr
    max_steps: int | None = flag(None, preset="fill", defines_run=True, check="positive")  # optimizer steps
    decay_steps: int | None = flag(None, defines_run=True, check="positive")  # the cosine reaches min_lr here and stays there (nanoGPT's lr_decay_iters); default max_steps
    batch_size: int | None = flag(None, preset="fill", defines_run=True, check="positive")  # sequences per micro batch (B)
    seq_len: int | None = flag(None, preset="fill", defines_run=True, check="positive")  # tokens per sequence (T), at most the model's block_size
    total_batch_size: int | None = flag(None, preset="read", defines_run=True, check="positive")  # tokens per optimizer step; a multiple of B*T (gradient accumulation)
    lr: float | None = flag(None, preset="fill", defines_run=True, check="positive")  # max learning rate
    min_lr_ratio: float = flag(0.1, defines_run=True)  # min_lr = lr * min_lr_ratio, reached at decay_steps
    warmup_steps: int | None = flag(None, preset="fill", defines_run=True, check="non_negative")
    weight_decay: float = flag(0.1, defines_run=True)
    grad_clip: float = flag(1.0, defines_run=True)
    optimizer: Literal["adamw", "muon"] = flag("adamw", defines_run=True)  # muon: Muon (torch.optim.Muon's) for the blocks' weight matrices, AdamW for embeddings, LayerNorms and biases
    muon_lr: float = flag(0.01, defines_run=True, check="positive")  # Muon's max learning rate (same warmup and cosine as --lr)
    muon_momentum: float = flag(0.95, defines_run=True, check="fraction")  # Muon's Nesterov momentum
    muon_weight_decay: float = flag(0.0, defines_run=True, check="non_negative")  # Muon's decoupled weight decay: W *= 1 - lr * wd
    dropout: float = flag(0.0, defines_run=True, check="fraction")  # nanoGPT's dropout in training (e.g. 0.2; 0: off); evaluation and sampling never drop
    eval_interval: int | None = flag(None, preset="fill", check="positive")  # steps between val-loss evaluations (and samples)
    eval_batches: int | None = flag(None, preset="fill", check="positive")  # val batches per evaluation
    ckpt_interval: int | None = flag(None, preset="fill", check="positive")  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = flag(3, check="positive")
    sample_tokens: int = flag(64, check="non_negative")  # tokens sampled at each evaluation (seed: --seed + step); 0 turns sampling off
    sample_prompt: str = flag("<|endoftext|>")  # the text each evaluation's sample continues
    hellaswag: str | None = flag(None)  # HellaSwag val JSON Lines (as published): acc and acc_norm during training
    hellaswag_interval: int | None = flag(None, check="positive")  # steps between HellaSwag evaluations; default --eval-interval
    hellaswag_limit: int | None = flag(None, check="positive")  # score only the file's first N examples (quick runs)
    tensorboard: bool = flag(False)  # also write TensorBoard event files to OUT_DIR/tensorboard (extra: tensorboard)
    wandb_project: str | None = flag(None)  # also log to this Weights & Biases project (extra: wandb; WANDB_MODE=offline works)
    seed: int = flag(1337, defines_run=True)
    device: Literal["auto", "cpu", "cuda", "metal"] = flag("auto", invocation=True)
    sharding: Literal["auto", "none", "dp", "fsdp"] = flag("auto", invocation=True)  # auto: dp when more than one device is visible
    remat: bool = flag(False)  # recompute block activations in the backward pass: less memory, ~1/3 more compute
    scan_layers: bool = flag(False)  # rolled layer loop: compile time flat in depth, slower steps
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = flag("auto", defines_run=True)  # compute dtype; auto: bf16 on GPUs and on CPUs with bf16 dot instructions, fp16 with loss scaling on GPUs without bf16
    attention: AttentionFlag = flag("auto")  # auto: cuDNN flash attention on CUDA in bf16; tiled on CPU (fp32, bf16, no dropout, T >= 256); else XLA's
    n_layer: int | None = flag(None)  # model overrides of the preset's shape (scratch runs only)
    n_head: int | None = flag(None)
    n_embd: int | None = flag(None)
    block_size: int | None = flag(None)
    progress: bool = flag(True)  # show a progress bar (only when stderr is a terminal)
    log_interval: int | None = flag(None, check="positive")  # steps between 'step | loss | lr | norm | dt | tok/s' lines; default: every step without a bar
    debug: bool = flag(False, invocation=True)  # show tracebacks instead of one-line errors


def fields_with(key: str, value=True) -> tuple[str, ...]:
    """The names of the TrainConfig fields whose flag() metadata has key == value."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata[key] == value)


# --resume takes these from the checkpoint and refuses a command line that contradicts them; the others
# (intervals, sampling, progress, memory and speed settings) may change when a run is resumed. The model's
# shape flags are checked against the checkpoint's model, which names the fields that differ.
RUN_FIELDS = fields_with("defines_run")
NOT_RESTORED = fields_with("invocation")  # this invocation's own: never taken from the checkpoint
PRESET_FIELDS = fields_with("preset", "fill") + fields_with("preset", "read")

# A preset names its model (flax_gpt.config's presets) and a value of every preset flag
RunPreset = dataclasses.make_dataclass("RunPreset", ["model", *PRESET_FIELDS], frozen=True)


def _fine_tune(model: str, batch_size: int) -> RunPreset:
    """nanoGPT's fine-tuning recipe (finetune_shakespeare.py) for the larger GPT-2s: their HF weights, 32 x 1024
    tokens per step, lr 3e-5; the micro batch is what fits one 80 GB GPU with its AdamW state."""
    return RunPreset(model, init_from=model, batch_size=batch_size, seq_len=1024, total_batch_size=32 * 1024,
                     max_steps=200, lr=3e-5, warmup_steps=10, eval_interval=25, eval_batches=20, ckpt_interval=100)


RUN_PRESETS = {
    "tiny": RunPreset("tiny", init_from="scratch", batch_size=8, seq_len=64, total_batch_size=512, max_steps=40,
                      lr=3e-3, warmup_steps=4, eval_interval=20, eval_batches=2, ckpt_interval=20),
    "small": RunPreset("small", init_from="scratch", batch_size=8, seq_len=128, total_batch_size=1024, max_steps=350,
                       lr=2e-3, warmup_steps=20, eval_interval=50, eval_batches=8, ckpt_interval=100),
    "gpt2": RunPreset("gpt2", init_from="scratch", batch_size=64, seq_len=1024, total_batch_size=524288,
                      max_steps=19073, lr=6e-4, warmup_steps=715, eval_interval=250, eval_batches=20,
                      ckpt_interval=5000),
    "gpt2-medium": _fine_tune("gpt2-medium", batch_size=16),
    "gpt2-large": _fine_tune("gpt2-large", batch_size=8),
    "gpt2-xl": _fine_tune("gpt2-xl", batch_size=4),
}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill unset fields from the run preset and check every value."""
    if cfg.preset not in RUN_PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of: {', '.join(RUN_PRESETS)}")
    base = RUN_PRESETS[cfg.preset]
    filled = {name: getattr(base, name) for name in fields_with("preset", "fill") if getattr(cfg, name) is None}
    cfg = dataclasses.replace(cfg, **filled)
    cfg = dataclasses.replace(cfg, decay_steps=cfg.decay_steps or cfg.max_steps)
    for field in dataclasses.fields(cfg):
        value, check = getattr(cfg, field.name), field.metadata["check"]
        if value is not None and check and not CHECKS[check][0](value):
            raise UserError(f"--{field.name.replace('_', '-')} must be {CHECKS[check][1]}, got {value}")
    if cfg.extend_steps and not cfg.resume:
        raise UserError("--extend-steps continues a run: use it with --resume")
    if cfg.hellaswag is None and (cfg.hellaswag_interval or cfg.hellaswag_limit):
        raise UserError("--hellaswag-interval and --hellaswag-limit set how --hellaswag FILE is scored: pass the file")
    if not cfg.sample_prompt:
        raise UserError("--sample-prompt is empty; give some text, or the default <|endoftext|>")
    for module, wanted in (("tensorboardX", cfg.tensorboard), ("wandb", cfg.wandb_project)):
        if wanted:
            require(module)  # a missing package fails before JAX starts
    grad_accum_steps(cfg)  # raises early if the tokens per step are not a whole number of micro batches
    return cfg


def grad_accum_steps(cfg: TrainConfig, process_count: int = 1) -> int:
    """Micro steps per optimizer step: tokens per step / (B * T * processes).

    Tokens per step are --total-batch-size, else the preset's (gpt2: 524,288): the same whatever
    --batch-size, --seq-len and the process count are, as in build-nanogpt.
    """
    total = cfg.total_batch_size or RUN_PRESETS[cfg.preset].total_batch_size
    per_micro = cfg.batch_size * cfg.seq_len * process_count
    if total % per_micro:
        source = f"--total-batch-size {total}" if cfg.total_batch_size else f"the {cfg.preset} preset's {total:,} tokens per step"
        raise UserError(f"{source} is not a multiple of batch_size*seq_len*processes = "
                        f"{cfg.batch_size}*{cfg.seq_len}*{process_count} = {per_micro:,}; choose sizes that divide it"
                        + ("" if cfg.total_batch_size else " or pass --total-batch-size"))
    return total // per_micro


def given_fields(argv: list[str]) -> set[str]:
    """The TrainConfig fields set on a command line (`--lr 1e-3`, `--lr=1e-3`, `--no-progress`)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            given.add(name if name in names else name.removeprefix("no_"))
    return given & names


def changed_fields(cfg: TrainConfig) -> set[str]:
    """The fields of cfg that differ from TrainConfig's defaults: the given ones when no command line is known."""
    default = TrainConfig()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}
