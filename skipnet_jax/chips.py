"""Published per-chip facts of the TPU generations the plan compiles for.

Figures are Google Cloud's own, per chip (https://cloud.google.com/tpu/docs/v4, .../v5e,
.../v5p, .../v6e, "key chip specifications"): dense bf16 peak, HBM capacity and HBM
bandwidth.  `skipnet_jax.plan` uses them for its roofline estimate and its fits-in-HBM
check; the accelerator check (`skipnet_jax.tools.check_environment`) takes its TPU peaks
from here too.

GPU figures are NVIDIA's datasheets, per GPU, SXM form factor: H100 (NVIDIA H100 Tensor
Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS *with sparsity*, so 989.5 dense; 80 GB
HBM3 at 3.35 TB/s; 132 SMs, compute capability 9.0) and A100 80 GB (NVIDIA A100 Tensor
Core GPU datasheet: BF16 Tensor Core 312 TFLOPS dense; 80 GB HBM2e at 2,039 GB/s; 108 SMs,
compute capability 8.0).  The per-SM limits (FP32 cores, shared memory, L2, boost clock)
are NVIDIA's architecture figures (Hopper / Ampere whitepapers, CUDA C++ Programming Guide
compute-capability table): XLA:GPU's compiler divides by several of them, and without them
it crashes (SIGFPE) compiling convolutions.  `gpu_target_config` turns them into the target description that
JAX's CUDA plugin compiles for without a GPU.
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


@dataclasses.dataclass(frozen=True)
class Gpu(Chip):
    """A GPU model: `Chip`'s figures plus what XLA:GPU's target description needs."""

    compute_capability: tuple[int, int] = (0, 0)
    sm_count: int = 0
    description: str = ""  # the CUDA device name, which jax reports as its device_kind
    fp32_cores_per_sm: int = 0
    shared_memory_per_sm: int = 0  # bytes
    shared_memory_per_block_optin: int = 0  # bytes
    l2_bytes: int = 0
    boost_clock_ghz: float = 0.0


GPUS: tuple[Gpu, ...] = (
    Gpu(
        "h100",
        "nvidia h100 80gb hbm3",
        989.5e12,
        80 * GB,
        3350 * GB,
        (9, 0),
        132,
        "NVIDIA H100 80GB HBM3",
        128,
        228 * 1024,
        227 * 1024,
        50 * 2**20,
        1.98,
    ),
    Gpu(
        "a100",
        "nvidia a100-sxm4-80gb",
        312e12,
        80 * GB,
        2039 * GB,
        (8, 0),
        108,
        "NVIDIA A100-SXM4-80GB",
        64,
        164 * 1024,
        163 * 1024,
        40 * 2**20,
        1.41,
    ),
)


def _prefix(topology_name: str) -> str:
    """The model part of a topology name: "v5e" of "v5e:2x2", "h100" of "h100:8"."""
    return topology_name.split(":", 1)[0].strip().lower()


def _named(topology_name: str, known: tuple[Chip, ...], what: str) -> Chip:
    """The chip of `known` that `topology_name` names; ValueError naming the known ones."""
    prefix = _prefix(topology_name)
    for chip in known:
        if chip.name == prefix:
            return chip
    choices = ", ".join(f"{c.name}:..." for c in known)
    raise ValueError(f"--topology={topology_name!r}: unknown {what} {prefix!r}; valid choices: {choices}")


def gpu(topology_name: str) -> Gpu:
    """The GPU of a topology name such as ``"h100:8"``; ValueError naming the known ones."""
    return _named(topology_name, GPUS, "GPU")


def gpu_target_config(chip: Gpu) -> str:
    """XLA:GPU's ``GpuTargetConfigProto`` (text format) for `chip`: the fields the
    compile-only CUDA client needs to build programs for it without the GPU."""
    major, minor = chip.compute_capability
    # Limits shared by compute capabilities 8.0 and 9.0 (CUDA C++ Programming Guide).
    common = (
        "threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048 "
        "shared_memory_per_block: 49152 registers_per_core_limit: 65536 registers_per_block_limit: 65536 "
        "thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64 "
        "block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535 "
    )
    return (
        f"gpu_device_info {{ {common}cuda_compute_capability {{ major: {major} minor: {minor} }} "
        f"core_count: {chip.sm_count} fpus_per_core: {chip.fp32_cores_per_sm} "
        f"shared_memory_per_core: {chip.shared_memory_per_sm} "
        f"shared_memory_per_block_optin: {chip.shared_memory_per_block_optin} l2_cache_size: {chip.l2_bytes} "
        f"clock_rate_ghz: {chip.boost_clock_ghz} device_memory_size: {int(chip.hbm_bytes)} "
        f"memory_bandwidth: {int(chip.hbm_bytes_per_sec)} }} "
        f'platform_name: "CUDA" device_description_str: "{chip.description}"'
    )


def is_gpu_name(topology_name: str) -> bool:
    """Whether a topology name names a GPU model (its prefix is one of `GPUS`)."""
    return _prefix(topology_name) in {c.name for c in GPUS}


def tpu_chip(topology_name: str) -> Chip:
    """The chip of a topology name such as ``"v5e:2x2"``; ValueError naming the known ones."""
    return _named(topology_name, TPU_CHIPS, "TPU generation")
