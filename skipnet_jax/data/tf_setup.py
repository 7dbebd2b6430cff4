"""How TensorFlow runs the input pipeline: on the CPU only, deterministically, in a
bounded thread pool of its own, so that it neither takes the accelerators from JAX nor
competes with the JAX runtime for every core."""

from __future__ import annotations

import functools
import os

import tensorflow as tf
from absl import logging

# Parallel maps keep the element order: the stream's order is part of its contract.
PARALLEL = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@functools.cache
def configure_tensorflow() -> None:
    """Keeps TensorFlow off accelerators: JAX owns them; tf.data runs on CPU.

    Must run before TensorFlow initialises its devices; later it can only
    warn (tensorflow-cpu has no GPU support, so that case is harmless).
    """
    for device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], device_type)
        except (RuntimeError, ValueError) as err:
            logging.warning("Cannot hide %s devices from TF: %s", device_type, err)


def automatic_num_threads() -> int:
    """Half the CPUs this process may run on, at least 1 and at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(16, max(1, cpus // 2))


def options(config) -> tf.data.Options:
    """Deterministic ordering and a bounded private thread pool.

    The thread pool is private so the input pipeline does not compete with the
    JAX runtime for every core: ``config.data.num_threads`` threads, or with 0
    half the CPUs this process may run on, at most 16.  The CPU affinity, not
    the machine's core count, is what several processes on one host (SLURM
    tasks with ``--cpus-per-task``, ``taskset``) each get.
    """
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.private_threadpool_size = config.data.num_threads or automatic_num_threads()
    opts.threading.max_intra_op_parallelism = 1
    return opts
