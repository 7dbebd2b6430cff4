"""Orbax checkpoints of the train state in `WORKDIR/checkpoints/<step>`.

Why a run is never lost:
- orbax writes each checkpoint into a temporary directory and renames it only
  once it is complete, so a kill mid-save never leaves a half-written
  checkpoint that looks like the latest; old checkpoints are deleted only after
  a newer one is finalised (`max_to_keep`).
- On restore, a latest checkpoint that cannot be read (truncated, corrupted) is
  reported by path, moved aside to `<step>.corrupt` (kept for inspection, never
  deleted) and the previous one is tried.
- A checkpoint whose shapes do not match the model of the config is refused
  with one error listing the mismatched entries, instead of being silently
  cast or partially restored.

The state is saved as a plain nested dict of arrays (flax's state-dict form) so
checkpoints do not depend on Python class identities. The data position is not
stored separately: the input pipeline is a deterministic function of the step,
so restoring the step restores the data order.
"""

from __future__ import annotations

import os
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir was written for a different model/config."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts an (asynchronous) save; orbax writes to a temporary dir and renames it when complete."""
    manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)), force=True)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_shapes(manager: ocp.CheckpointManager, step: int, target: dict) -> None:
    stored = {
        _path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(manager.item_metadata(step))
    }
    wanted = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    problems = [
        f"{k} {stored[k]} != {wanted[k]}" for k in sorted(wanted.keys() & stored.keys()) if stored[k] != wanted[k]
    ]
    problems += [f"{k} missing from the checkpoint" for k in sorted(wanted.keys() - stored.keys())]
    problems += [f"{k} not in the model" for k in sorted(stored.keys() - wanted.keys())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointMismatchError(
            f"checkpoint {os.path.join(str(manager.directory), str(step))} does not match the configured model "
            f"({len(problems)} entries): {shown}. Use another --workdir or the config it was trained with."
        )


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves an unreadable checkpoint out of orbax's view without deleting anything."""
    source = os.path.join(str(manager.directory), str(step))
    target = source + ".corrupt"
    suffix = 1
    while os.path.exists(target):
        target, suffix = f"{source}.corrupt{suffix}", suffix + 1
    if jax.process_index() == 0:
        os.rename(source, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    manager.reload()
    return target


def restore_latest(manager: ocp.CheckpointManager, state_like: Any) -> Any | None:
    """The newest readable checkpoint restored into the structure of `state_like`, or None.

    Raises CheckpointMismatchError when a checkpoint's shapes do not fit the model.
    """
    target = flax.serialization.to_state_dict(state_like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            _check_shapes(manager, step, target)
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
            moved = _quarantine(manager, step)
            logging.warning(
                "Checkpoint %s is unreadable (%s: %s); moved it to %s and trying the previous one.",
                os.path.join(str(manager.directory), str(step)), type(e).__name__, str(e).splitlines()[0][:200], moved,
            )  # fmt: skip
            continue
        return flax.serialization.from_state_dict(state_like, restored)
    return None
