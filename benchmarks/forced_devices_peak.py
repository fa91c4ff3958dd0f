"""The MFU peak train.py measures on CPU, over N forced host devices against 1, side by side in one process.

    python benchmarks/forced_devices_peak.py --devices 4 --rounds 2

Forced devices share the machine's cores, so the split matmul should run as fast as on one device: the ratio
near 1 (measured 0.93-1.09 on a quiet 2-core machine, 0.46-0.65 under load). A speed, so it lives here;
tests/test_sharding.py checks the accounting on a fixed clock instead.
"""

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    import jax

    from flax_gpt.metrics import peak_flops

    all_, one = [], []
    for _ in range(args.rounds):
        all_.append(peak_flops(args.dtype, jax.local_devices())[0])
        one.append(peak_flops(args.dtype, jax.local_devices()[:1])[0])
    print(json.dumps({"devices": jax.device_count(), "peak_all": all_, "peak_one": one,
                      "ratio_best": max(all_) / max(one), "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
