"""MFU's peak: the datasheet peak by exact device kind, summed over every device a step runs on; none when unknown."""

from types import SimpleNamespace

import pytest

from flax_gpt.metrics import GPU_PEAK_BF16, mfu, peak_flops


def gpus(kind: str, n: int = 1):
    return [SimpleNamespace(platform="gpu", device_kind=kind)] * n


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA L40", 181e12),  # a substring match gave it the L4's 121e12
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
])
def test_the_peak_is_the_exact_kinds(kind, peak):
    assert peak_flops("bfloat16", gpus(kind)) == (peak, f"1 x {kind} datasheet bf16")


def test_the_peak_is_that_of_every_device_of_every_process():
    total, source = peak_flops("bfloat16", gpus("NVIDIA H100 80GB HBM3", 8))
    assert total == 8 * 989e12 and source == "8 x NVIDIA H100 80GB HBM3 datasheet bf16"
    total, source = peak_flops("bfloat16", gpus("NVIDIA H100 80GB HBM3", 8), processes=2)
    assert total == 16 * 989e12 and source.startswith("16 x ")
    assert mfu(0.5 * total, total) == 0.5


@pytest.mark.parametrize("kind", ["NVIDIA L40X", "NVIDIA H100", "Tesla V100-SXM2-16GB", "nvidia l4", "NVIDIA L4 "])
def test_an_unknown_kind_has_no_peak_and_says_so(kind):
    peak, note = peak_flops("bfloat16", gpus(kind, 2))
    assert peak is None and mfu(1e12, peak) is None
    assert note == f"no datasheet peak for gpu device kind {kind!r} (flax_gpt/metrics.py GPU_PEAK_BF16)"


def test_one_unknown_device_among_known_ones_means_no_peak():
    peak, note = peak_flops("bfloat16", gpus("NVIDIA L4") + gpus("NVIDIA RTX 9999"))
    assert peak is None and "'NVIDIA RTX 9999'" in note


def test_a_plugin_platform_has_no_datasheet_peak():
    peak, note = peak_flops("bfloat16", [SimpleNamespace(platform="mps", device_kind="gpu")])
    assert peak is None and note.startswith("no datasheet peak for mps device kind 'gpu'")


def test_every_listed_peak_is_a_dense_bf16_figure():
    """Sanity of the table: between a T4-class 65 TFLOP/s and an H100's 989 (sparse figures would be 2x)."""
    assert all(60e12 <= peak <= 989e12 for peak in GPU_PEAK_BF16.values())
    assert all(kind == kind.strip() and kind.startswith("NVIDIA ") for kind in GPU_PEAK_BF16)


def test_peak_device_memory_is_the_largest_reported_and_none_on_the_cpu(monkeypatch):
    import jax

    from flax_gpt.metrics import peak_device_memory_gib

    assert peak_device_memory_gib() is None  # XLA:CPU reports no memory stats

    class Device:
        def __init__(self, peak):
            self.peak = peak

        def memory_stats(self):
            return {"peak_bytes_in_use": self.peak, "bytes_in_use": 1}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device(3 * 2**30), Device(5 * 2**30)])
    assert peak_device_memory_gib() == 5.0
