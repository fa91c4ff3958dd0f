"""Print every parity check with its measured error and bound: `python -m parity_tests.report`.

The numbers come from the same functions the tests assert on (parity_tests/checks.py).
"""

import datetime
import os
import platform
import sys
import time


def main() -> int:
    t0 = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import flax
    import jax
    import torch
    import transformers

    from parity_tests import checks

    measurements = (checks.all_forward_checks() + checks.all_optimizer_checks() + checks.all_generation_checks()
                    + checks.all_conversion_checks())
    print(f"flax-gpt parity report, {datetime.date.today().isoformat()}, {platform.machine()} "
          f"{platform.system()} ({os.cpu_count()} cores), {jax.devices()[0].platform}; jax {jax.__version__}, "
          f"flax {flax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; fp32 unless said\n")
    print("| check | measured | bound | ok |")
    print("| --- | ---: | ---: | --- |")
    for m in measurements:
        bound = f"{m.floor:.0e} to {m.bound:.0e}" if m.floor else f"{m.bound:.0e}"
        print(f"| {m.check} | {m.value:.2e} | {bound} | {'yes' if m.ok else 'NO'} |")
    failed = [m for m in measurements if not m.ok]
    print(f"\n{len(measurements) - len(failed)}/{len(measurements)} within bounds ({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
