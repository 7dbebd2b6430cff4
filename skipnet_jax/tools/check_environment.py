"""What machine the accelerator check ran on, and the chip's peak bf16 rate the bench part measures against."""

from __future__ import annotations

import os
import platform
from typing import Any

from skipnet_jax import chips

# Dense (no sparsity) bf16 TFLOP/s per chip, vendor figures.  Matched in order against the
# lower-cased jax device_kind (e.g. "NVIDIA H200", "NVIDIA H100 80GB HBM3", "TPU v5 lite"),
# so a name that contains another ("a100" / "a10", "l40s" / "l4") comes first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    # TPUs: the published figures of `skipnet_jax.chips`, "tpu v5 lite" before "tpu v5"
    *((c.device_kind, c.bf16_flops / 1e12) for c in sorted(chips.TPU_CHIPS, key=lambda c: -len(c.device_kind))),
)


def environment() -> dict[str, Any]:
    """What ran: backend, device, versions (the numbers mean little without them)."""
    import jax

    env: dict[str, Any] = {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    }
    try:
        import torch

        env["torch_version"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
    except ImportError:
        env["torch_version"] = None
    return env


def peak_tflops(device_kind: str, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s per chip, where the number came from)."""
    if override is not None:
        return override, "--peak_tflops"
    kind = device_kind.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in kind:
            return tflops, f"table entry {key!r} for device kind {device_kind!r}"
    return None, f"no table entry for device kind {device_kind!r} (pass --peak_tflops)"
