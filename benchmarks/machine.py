"""What a benchmark ran on: the CPU's vector features and TensorFlow's kernels.

Ratios between timings depend on them (oneDNN's float32 kernels use AVX-512
where the CPU has it, Eigen's float64 ones AVX2), so every benchmark prints
`describe()` above its table.
"""

from __future__ import annotations

import os
import platform

_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu_features() -> list[str]:
    """The vector features of this CPU that matter to TensorFlow's kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [feature for feature in _FEATURES if feature in flags]


def describe() -> str:
    """One line: CPU model, cores, vector features, TensorFlow and oneDNN."""
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"
    return (
        f"machine: {model}, {os.cpu_count()} cores, features "
        f"{' '.join(cpu_features()) or 'unknown'}; TensorFlow {tf.__version__} "
        f"(oneDNN {'on' if onednn else 'off'})"
    )
