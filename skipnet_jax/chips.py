"""Published per-chip facts of the TPU generations the plan compiles for.

Figures are Google Cloud's own, per chip (https://cloud.google.com/tpu/docs/v4, .../v5e,
.../v5p, .../v6e, "key chip specifications"): dense bf16 peak, HBM capacity and HBM
bandwidth.  `skipnet_jax.plan` uses them for its roofline estimate and its fits-in-HBM
check; the accelerator check (`skipnet_jax.tools.check_environment`) takes its TPU peaks
from here too.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # the topology-name prefix, e.g. "v5e" in "v5e:2x2"
    device_kind: str  # what jax's device_kind says of it, lower-cased (e.g. "tpu v5 lite")
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bytes: float
    hbm_bytes_per_sec: float


TPU_CHIPS: tuple[Chip, ...] = (
    Chip("v4", "tpu v4", 275e12, 32 * GIB, 1200 * GB),
    Chip("v5e", "tpu v5 lite", 197e12, 16 * GB, 819 * GB),
    Chip("v5p", "tpu v5", 459e12, 95 * GB, 2765 * GB),
    Chip("v6e", "tpu v6 lite", 918e12, 32 * GB, 1640 * GB),
)


def tpu_chip(topology_name: str) -> Chip:
    """The chip of a topology name such as ``"v5e:2x2"``; ValueError naming the known ones."""
    prefix = topology_name.split(":", 1)[0].strip().lower()
    for chip in TPU_CHIPS:
        if chip.name == prefix:
            return chip
    known = ", ".join(f"{c.name}:..." for c in TPU_CHIPS)
    raise ValueError(f"--topology={topology_name!r}: unknown TPU generation {prefix!r}; valid choices: {known}")
