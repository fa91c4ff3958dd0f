"""Train a GPT-2 with JAX/Flax: `python train.py` (small model, Shakespeare, ~5 min on 2 CPU cores).

    python train.py --preset tiny                      # a test run, seconds
    python train.py --data my.txt --max-steps 1000     # your text
    python train.py --init-from gpt2 --data my.txt     # fine-tune GPT-2 (online or HF cache)
    python train.py --resume                           # continue out/ from its last checkpoint, with its flags
    python train.py --resume --extend-steps 200        # train a finished run on, at its final learning rate
    python train.py --help                             # every flag
"""

import sys

import tyro

from flax_gpt.errors import run_cli
from flax_gpt.host_memory import jax_runs_on_cpu, keep_freed_memory
from flax_gpt.run_config import TrainConfig, given_fields, resolve  # no JAX: --help and bad flags answer at once


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = tyro.cli(TrainConfig, args=argv, description=__doc__)
    if jax_runs_on_cpu(cfg.device):
        keep_freed_memory()  # before JAX starts its threads: CPU steps reuse freed memory instead of faulting it in

    def train():
        if not cfg.resume:  # a resumed run's flags are known once its checkpoint is read
            resolve(cfg)  # bad flags answer before JAX is imported (seconds)
        from flax_gpt.train import run

        return run(cfg, given_fields(argv))

    summary, code = run_cli(train, cfg.debug)
    if code:
        return code
    if not summary["is_main"]:  # one process of several: process 0 reports
        return 130 if summary["interrupted"] else 0
    vals = summary["val_losses"]
    if vals:
        print(f"val loss {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} (step {vals[-1][0]})")
    print(f"done: {summary['steps']} steps in {summary['wall_s']:.0f} s; checkpoint {summary['checkpoint']}; "
          f"plot {summary['plot']}; metrics {summary['metrics']}")
    if summary["interrupted"]:
        print("interrupted: checkpoint written; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
