"""Data parallelism with `jax.jit` over a one-axis device mesh.

Parameters and optimiser state are replicated; every batch is split along its
first axis over all devices of all processes. Because the arrays handed to the
jitted step are *global* arrays, every reduction over the batch inside the
step (BatchNorm statistics, the bias-loss min/max/mean, accuracy) is over the
global batch, exactly as on one device.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh() -> Mesh:
    """A 1-D mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Turns this process's slice of the batch into global arrays sharded over the mesh."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in local_batch.items()
    }


def prefetch_to_device(
    local_batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int
) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches whose host-to-device copies were started `size` batches early.

    `jax.make_array_from_process_local_data` returns before the copy finishes, so
    keeping `size` converted batches queued overlaps the transfer of the next batches
    with the step running on the current one.
    """
    queue: collections.deque = collections.deque()
    for local_batch in local_batches:
        queue.append(to_global_batch(local_batch, sharding))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
