"""Timing a compiled JAX train / eval step, and the clock every benchmarked side shares.

A *side* (:class:`Side`) is one thing being timed: ``run(k)`` does k steps and returns
when they are finished.  :func:`time_alternating` warms every side up, then times them in
alternating rounds (A B A B ...) so that slow phases of a shared machine spread over all of
them.  :func:`jax_side` builds the JAX side from the real train / eval step of training;
:mod:`skipnet_jax.tools.torch_timing` builds the PyTorch ones.  Used by
:mod:`skipnet_jax.benchmark` and :mod:`skipnet_jax.accelerator_check`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

NUM_CLASSES = 1000
_STEPS_PER_EPOCH = 1000  # only shapes the (cosine) learning-rate schedule
_NUM_TRAIN_STEPS = 100_000


class BenchmarkError(Exception):
    """A bad request (reported as one line, exit code 2)."""


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def benchmark_config(model: str, batch_size: int, image_size: int, dtype: str, loss: str):
    """The default training config with the benchmark's model, sizes, dtype and loss."""
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.model = model
    config.batch_size = batch_size
    config.eval_batch_size = batch_size
    config.image_size = image_size
    config.dtype = dtype
    config.loss = loss
    config.num_classes = NUM_CLASSES
    return config


def tune_malloc() -> bool:
    """Make glibc malloc keep and reuse large freed blocks (returns False where it cannot).

    XLA:CPU (and PyTorch's CPU allocator) allocate every activation-sized buffer with
    malloc; glibc serves large requests -- and, in threads other than the main one, any
    request beyond a 64 MiB arena heap -- with a fresh ``mmap`` and unmaps it on free, so
    each step touches every page of its activations anew (one page fault per 4 KiB).
    One arena (``M_ARENA_MAX=1``), no mmap'd chunks (``M_MMAP_MAX=0``) and no trimming
    below 2 GiB (``M_TRIM_THRESHOLD``) keep those pages mapped for reuse, at the price of
    never handing memory back to the OS.  Same effect as starting the process with
    ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.  Must run
    before other threads start allocating (i.e. before JAX/PyTorch initialise).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(
        mallopt(option, value) == 1 for option, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1))
    )


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Side:
    """One thing being timed: ``run(k)`` does k steps and returns when they are finished."""

    def __init__(self, name: str, run: Callable[[int], None], batch_size: int):
        self.name = name
        self.run = run
        self.batch_size = batch_size
        self.round_seconds: list[float] = []
        self.round_cpu_seconds: list[float] = []
        self.round_faults: list[float] = []
        self.info: dict[str, Any] = {}
        self.compiled = None  # the JAX executable, for inspection

    def step_seconds(self) -> float:
        return statistics.median(self.round_seconds)

    def examples_per_sec(self) -> float:
        return self.batch_size / self.step_seconds()


def jax_side(config, mode: str, seed: int = 0, name: str = "jax") -> Side:
    """The real train/eval step of training (`skipnet_jax.engine`), compiled, on a fixed random batch."""
    import jax
    import numpy as np

    from skipnet_jax import sharding
    from skipnet_jax.engine import build_engine

    engine = build_engine(
        config, NUM_CLASSES, steps_per_epoch=_STEPS_PER_EPOCH, num_train_steps=_NUM_TRAIN_STEPS, reuse=False
    )
    data_sharding = engine.data_sharding

    t0 = time.perf_counter()
    state = engine.initial_state(seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    b, s = config.batch_size, config.image_size
    host_batch = {
        "image": rng.standard_normal((b, s, s, 3), dtype=np.float32),
        "label": rng.integers(0, NUM_CLASSES, size=(b,), dtype=np.int32),
    }
    if mode == "eval":
        host_batch["mask"] = np.ones((b,), np.float32)
    batch = sharding.to_global_batch(host_batch, data_sharding)

    if mode == "train":
        jitted = engine.jitted_train_step(seed)
    else:
        jitted = engine.jitted_eval_step(use_ema=config.ema_decay > 0)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    holder = {"state": state}

    if mode == "train":

        def run(k: int) -> None:
            st, metrics = holder["state"], None
            for _ in range(k):
                st, metrics = compiled(st, batch)
            jax.block_until_ready((st, metrics))
            holder["state"] = st

    else:

        def run(k: int) -> None:
            out = None
            for _ in range(k):
                out = compiled(holder["state"], batch)
            jax.block_until_ready(out)

    side = Side(name, run, b)
    side.compiled = compiled
    side.info = {
        "init_s": init_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
    }
    return side


def time_alternating(sides: list[Side], *, steps: int, warmup: int, rounds: int) -> None:
    """Warm every side up, then `rounds` rounds of `steps` steps, the sides taking turns."""
    for side in sides:
        if warmup > 0:
            t0 = time.perf_counter()
            side.run(warmup)
            side.info["warmup_s"] = time.perf_counter() - t0
    for _ in range(rounds):
        for side in sides:
            t0, c0, f0 = time.perf_counter(), time.process_time(), page_faults()
            side.run(steps)
            side.round_seconds.append((time.perf_counter() - t0) / steps)
            side.round_cpu_seconds.append((time.process_time() - c0) / steps)
            side.round_faults.append((page_faults() - f0) / steps)
