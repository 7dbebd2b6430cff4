"""Orbax checkpoints of the train state in `WORKDIR/checkpoints/<step>`.

The state is saved as a plain nested dict of arrays (flax's state-dict form)
so checkpoints do not depend on Python class identities. The data position is
not stored separately: the input pipeline is a deterministic function of the
step, so restoring the step restores the data order.
"""

from __future__ import annotations

import os
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts an (asynchronous) save; orbax writes to a temporary dir and renames it when complete."""
    manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, state_like: Any) -> Any | None:
    """The latest checkpoint restored into the structure (and shardings) of `state_like`, or None."""
    step = manager.latest_step()
    if step is None:
        return None
    target = flax.serialization.to_state_dict(state_like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return flax.serialization.from_state_dict(state_like, restored)
