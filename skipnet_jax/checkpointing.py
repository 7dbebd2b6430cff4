"""Orbax checkpoints of the train state in `WORKDIR/checkpoints/<step>`, and the workdir lock.

Why a run is never lost:
- orbax writes each checkpoint into a temporary directory and renames it only
  once it is complete, so a kill mid-save never leaves a half-written
  checkpoint that looks like the latest; old checkpoints are deleted only after
  a newer one is finalised (`max_to_keep`).
- On restore, what went wrong decides what happens to the latest checkpoint:
  * damage (its files are there but cannot be decoded: truncated, garbled,
    missing parts): training moves it aside to `<step>.corrupt` (kept for
    inspection, never deleted) and tries the previous one; read-only commands
    (evaluate, predict, export) skip it and move nothing.
  * a storage error (EIO, timeouts, a network mount that went away): retried
    with backoff, then the run stops with the checkpoint left in place, since
    it may be intact once the storage is back.
  * any other error (a sign of neither): the run stops, nothing is moved.
  * shapes that do not match the model of the config: refused with one error
    listing the mismatched entries, instead of being silently cast or
    partially restored.
- Training never silently starts over: when checkpoints exist (or were moved
  aside) but none is readable, it stops and says how to go on.
- In a multi-process run every process reads the checkpoint, then all act on
  the worst outcome any of them had, together (no process waits in a barrier
  the others skipped).
- One training run at a time per workdir (`workdir_lock`).
- A full disk during a save (`out_of_space_stops`) stops the run with one line naming the
  checkpoint that could not be written and the intact earlier ones; the partial
  ``<step>.orbax-checkpoint-tmp`` directory is removed and orbax's own error logs of the
  failure are dropped.

The state is saved as a plain nested dict of arrays (flax's state-dict form) so
checkpoints do not depend on Python class identities. The data position is not
stored separately: the input pipeline is a deterministic function of the step,
so restoring the step restores the data order.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging as logging_lib
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_manager import DEFAULT_ITEM_NAME

from skipnet_jax.config_validation import ConfigError

# Reading a checkpoint is tried up to RESTORE_ATTEMPTS times while the storage reports errors,
# waiting RETRY_BACKOFF_S, then twice and four times as long between tries (2 + 4 + 8 s).
RESTORE_ATTEMPTS = 4
RETRY_BACKOFF_S = 2.0
_sleep = time.sleep  # the wait between tries (tests record it instead)

# In the workdir; locked by the training run that uses the workdir (`workdir_lock`).
LOCK_FILE = "train.lock"
CHECKPOINTS_SUBDIR = "checkpoints"

# errno values with which storage says it did not deliver (unreachable, overloaded, refusing
# access), as opposed to data that was read but is damaged. Network filesystems (NFS, gcsfuse)
# report outages this way; the data may be intact once the storage is back.
UNAVAILABLE_ERRNOS = frozenset({
    errno.EIO, errno.EREMOTEIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ESTALE,
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ENOTCONN, errno.ECOMM, errno.ENETDOWN,
    errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENOBUFS, errno.ENOLCK,
    errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES, errno.EPERM,
})  # fmt: skip
# TensorStore (orbax's array storage) raises ValueError("<STATUS>: ..."). These statuses say the
# storage did not deliver ...
_UNAVAILABLE_STATUSES = frozenset({
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "ABORTED",
    "CANCELLED",
})  # fmt: skip
# ... and these that what it read is damaged or incomplete (measured: a truncated array file gives
# OUT_OF_RANGE, garbled compressed data FAILED_PRECONDITION, a garbled index DATA_LOSS, a missing
# one NOT_FOUND), except where an OS error caused them: TensorStore reports most OS errors as
# FAILED_PRECONDITION "... [OS error: <strerror>]".
_DAMAGE_STATUSES = frozenset({"DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND"})
_UNAVAILABLE_OS_MESSAGES = tuple(f"[OS error: {os.strerror(code)}]" for code in sorted(UNAVAILABLE_ERRNOS))
_QUARANTINED_NAME = re.compile(r"(\d+)\.corrupt\d*")


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir was written for a different model/config."""


class CheckpointReadError(ConfigError):
    """The latest checkpoint cannot be restored for a reason that is not known damage; it was left in place.

    A ConfigError so that every command line reports it as one ``error:`` line."""


class CheckpointUnavailableError(CheckpointReadError):
    """The storage kept failing to deliver the latest checkpoint; it was left in place for a rerun."""


class NoReadableCheckpointError(ConfigError):
    """Checkpoints exist (or were moved aside as damaged) but none can be restored.

    Training refuses to start over from step 0 on its own: that would bury the run
    whose checkpoints these were."""


class WorkdirLockedError(ConfigError):
    """Another training run holds the workdir's lock."""


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written because the disk is full; the earlier ones are intact.

    A ConfigError so that every command line reports it as one ``error:`` line."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS_SUBDIR)


# Writes each replicated array from its first replica alone (`_write_replicated_arrays_from_one_replica`).
_ONE_REPLICA_ARRAY_HANDLER = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)


def _write_replicated_arrays_from_one_replica() -> None:
    """Makes orbax write each replicated array from its first replica alone (once per process).

    Orbax's default on CPU and TPU ("replica-parallel" saving) splits every replicated array
    among its replicas, slicing it on each device: the first save compiles one slice program
    per device and distinct array shape (for SkipNet-XS on 8 CPU devices, ~600 compiles that
    stalled the first checkpoint for 22 s; on an 8-chip TPU slice every one is a TPU compile).
    The state of these models is a few tens of MB, which one replica writes in well under a
    second, so the split saves nothing.  Orbax keeps its handlers per process, so this applies
    to every orbax save of a jax.Array in the process; the warning orbax logs for replacing its
    own default is dropped."""
    if ocp.type_handlers.get_type_handler(jax.Array) is _ONE_REPLICA_ARRAY_HANDLER:
        return
    absl_logger = logging_lib.getLogger("absl")
    quiet = lambda record: not record.getMessage().startswith("Type handler registry")  # noqa: E731
    absl_logger.addFilter(quiet)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, _ONE_REPLICA_ARRAY_HANDLER, override=True)
    finally:
        absl_logger.removeFilter(quiet)


def create_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    _write_replicated_arrays_from_one_replica()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts an (asynchronous) save; orbax writes to a temporary dir and renames it when complete."""
    manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)), force=True)


# --- A full disk during a save ------------------------------------------------------------------

# The suffix of the directory orbax writes a checkpoint into before renaming it to <step>.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_OUT_OF_SPACE_MESSAGES = tuple(os.strerror(code) for code in sorted(_OUT_OF_SPACE_ERRNOS))


def _mentions_out_of_space(text: str) -> bool:
    return text.startswith("RESOURCE_EXHAUSTED: ") or any(message in text for message in _OUT_OF_SPACE_MESSAGES)


def is_out_of_space(error: BaseException) -> bool:
    """Whether a write failed because the disk (or the user's quota) is full: an OSError with
    ENOSPC/EDQUOT, TensorStore's RESOURCE_EXHAUSTED, or a "No space left on device" message."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if _tensorstore_status(e) == "RESOURCE_EXHAUSTED" or any(m in str(e) for m in _OUT_OF_SPACE_MESSAGES):
            return True
    return False


class _DropOutOfSpaceLogs(logging_lib.Filter):
    """Drops the error records (each with a traceback) that orbax's save threads log for an
    out-of-space failure; `out_of_space_stops` reports it once instead."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        if record.levelno < logging_lib.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not ((error is not None and is_out_of_space(error)) or _mentions_out_of_space(record.getMessage()))


def _out_of_space_error(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointWriteError:
    """Removes the partial checkpoint directories orbax left behind and says what was lost and kept."""
    directory = str(manager.directory)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    partial = sorted(name for name in names if TMP_SUFFIX in name)
    if jax.process_index() == 0:
        for name in partial:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    failed = [name.split(".")[0] for name in partial]
    intact = sorted((int(name) for name in names if name.isdigit()), reverse=True)
    what = f"checkpoint {os.path.join(directory, failed[-1])}" if failed else f"a file of the run in {directory}"
    free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
    kept = (
        f"the earlier checkpoints ({', '.join(str(s) for s in intact)}) are intact; free space ({free / 2**20:.0f} MiB "
        f"free now) and rerun the same command to resume from step {intact[0]}"
        if intact
        else f"no earlier checkpoint was saved; free space ({free / 2**20:.0f} MiB free now) and rerun"
    )
    return CheckpointWriteError(f"{what} could not be written: no space left on device ({_describe(error)}); {kept}")


@contextlib.contextmanager
def out_of_space_stops(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Within it, a save (or any write) that fails for lack of disk space raises one
    `CheckpointWriteError` naming the checkpoint (`_out_of_space_error`), whichever call
    of the manager meets orbax's asynchronous failure; orbax's own logs of it are dropped."""
    quiet = _DropOutOfSpaceLogs()
    absl_logger = logging_lib.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        yield
    except Exception as e:
        if not is_out_of_space(e):
            raise
        raise _out_of_space_error(manager, e) from None
    finally:
        absl_logger.removeFilter(quiet)


# --- What a failed read means -------------------------------------------------------------------


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, the errors that caused it, and the members of exception groups among them
    (orbax wraps TensorStore's error in a bare Exception, asyncio code may group errors)."""
    seen, pending = set(), [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _tensorstore_status(e: BaseException) -> str | None:
    match = re.match(r"([A-Z][A-Z_]+): ", str(e)) if isinstance(e, ValueError) else None
    return match.group(1) if match else None


def _says_unavailable(e: BaseException) -> bool:
    if isinstance(e, (TimeoutError, ConnectionError)) or (isinstance(e, OSError) and e.errno in UNAVAILABLE_ERRNOS):
        return True
    status = _tensorstore_status(e)
    if status is None:
        return False
    return status in _UNAVAILABLE_STATUSES or any(message in str(e) for message in _UNAVAILABLE_OS_MESSAGES)


def _says_damaged(e: BaseException) -> bool:
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):  # a metadata file garbled or cut short
        return True
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):  # part of it missing
        return True
    return _tensorstore_status(e) in _DAMAGE_STATUSES


def is_unavailable(error: BaseException) -> bool:
    """Whether a read failed because the storage did not deliver: worth retrying, and the data may be intact."""
    return any(_says_unavailable(e) for e in _chain(error))


def is_damage(error: BaseException) -> bool:
    """Whether a read failed on files that are there but damaged or incomplete (and no storage error
    is involved): the only failure for which a checkpoint is moved aside."""
    return not is_unavailable(error) and any(_says_damaged(e) for e in _chain(error))


def _describe(error: BaseException) -> str:
    """The root cause in one short line (orbax's own wrapper message embeds a whole TensorStore spec)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")


# --- Restore ------------------------------------------------------------------------------------


class _Outcome(enum.IntEnum):
    """What reading one checkpoint gave one process; all processes act on the highest (worst) one."""

    RESTORED = 0
    DAMAGED = 1
    UNAVAILABLE = 2
    UNRECOGNISED = 3
    MISMATCH = 4


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


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
            f"checkpoint {_step_path(manager, step)} does not match the configured model "
            f"({len(problems)} entries): {shown}. Use another --workdir or the config it was trained with."
        )


def _read(manager: ocp.CheckpointManager, step: int, target: dict, abstract: dict) -> tuple[_Outcome, Any]:
    """This process's read of checkpoint `step`: (RESTORED, the restored tree) or (what failed, the error).

    Storage errors are retried here, before the processes compare outcomes, so a short
    outage costs seconds rather than the run. No error escapes: every process must get
    to the comparison.

    The arrays are read with orbax's handler rather than `manager.restore`, whose closing
    barrier a process that failed halfway would never reach while the others wait in it;
    the comparison in `restore_latest` is the barrier instead, reached by every process."""
    item_dir = epath.Path(_step_path(manager, step)) / DEFAULT_ITEM_NAME
    for attempt in range(1, RESTORE_ATTEMPTS + 1):
        try:
            _check_shapes(manager, step, target)
            with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
                return _Outcome.RESTORED, handler.restore(item_dir, args=ocp.args.StandardRestore(abstract))
        except CheckpointMismatchError as e:
            return _Outcome.MISMATCH, e
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_unavailable(e):
                return (_Outcome.DAMAGED if is_damage(e) else _Outcome.UNRECOGNISED), e
            if attempt == RESTORE_ATTEMPTS:
                return _Outcome.UNAVAILABLE, e
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            logging.warning(
                "Checkpoint %s could not be read (%s); trying again in %.0f s (%d of %d tries made).",
                _step_path(manager, step), _describe(e), delay, attempt, RESTORE_ATTEMPTS,
            )  # fmt: skip
            _sleep(delay)
    raise AssertionError("unreachable: the last try returns")


def _agree(outcome: _Outcome) -> tuple[_Outcome, list[int]]:
    """The worst outcome over all processes and the processes that had it (a collective when there are several)."""
    if jax.process_count() == 1:
        return outcome, [jax.process_index()]
    outcomes = np.asarray(multihost_utils.process_allgather(np.asarray(int(outcome), np.int32))).reshape(-1)
    worst = int(outcomes.max())
    return _Outcome(worst), [int(i) for i in np.flatnonzero(outcomes == worst)]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged checkpoint out of orbax's view without deleting anything; returns its new path.

    Every process (all must call this) picks the name before process 0 renames, so all log the same path."""
    source = _step_path(manager, step)
    target, suffix = source + ".corrupt", 1
    while os.path.exists(target):
        target, suffix = f"{source}.corrupt{suffix}", suffix + 1
    _barrier(f"quarantine checkpoint {step}: name chosen")
    if jax.process_index() == 0:
        os.rename(source, target)
    _barrier(f"quarantine checkpoint {step}: moved")
    manager.reload()
    return target


def quarantined(directory) -> list[str]:
    """The checkpoints moved aside as damaged (`<step>.corrupt`, `<step>.corrupt<N>`) in a checkpoint directory."""
    directory = str(directory)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    by_step = sorted((int(match.group(1)), name) for name in names if (match := _QUARANTINED_NAME.fullmatch(name)))
    return [os.path.join(directory, name) for _, name in by_step]


def _stop_error(agreed: _Outcome, path: str, own_error: BaseException | None, where: list[int]) -> Exception:
    """The error with which every process stops when the checkpoint at `path` must not be used or moved."""
    if agreed == _Outcome.MISMATCH:
        return own_error or CheckpointMismatchError(
            f"checkpoint {path} does not match the configured model (found by process(es) {where}). "
            "Use another --workdir or the config it was trained with."
        )
    cause = ", ".join(
        ([_describe(own_error)] if own_error is not None else [])
        + ([f"on process(es) {where}"] if jax.process_count() > 1 else [])
    )
    if agreed == _Outcome.UNAVAILABLE:
        return CheckpointUnavailableError(
            f"checkpoint {path} could not be read in {RESTORE_ATTEMPTS} tries ({cause}); it was NOT moved: "
            "rerun when the storage is reachable again"
        )
    return CheckpointReadError(
        f"checkpoint {path} could not be restored ({cause}), an error that is neither known damage nor a storage "
        f"outage; it was NOT moved: if it is damaged, move it out of {os.path.dirname(path)} and rerun"
    )


def _nothing_readable(directory: str, paths: list[str], moved: bool) -> NoReadableCheckpointError:
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    if moved:
        return NoReadableCheckpointError(
            f"no readable checkpoint in {directory}, only damaged ones, kept as {shown}; not starting over from "
            f"step 0 over them: move them out of {directory} to train from scratch, or put a readable copy back "
            f"as {directory}/<step> to resume"
        )
    return NoReadableCheckpointError(
        f"no readable checkpoint in {directory} (damaged, left as they are: {shown}); put a readable copy back "
        f"as {directory}/<step>, or pass another --workdir"
    )


def restore_latest(manager: ocp.CheckpointManager, state_like: Any, *, quarantine: bool = True) -> Any | None:
    """The newest readable checkpoint restored into the structure of `state_like`; None if there is none at all.

    `quarantine`: training passes True, so a damaged checkpoint is moved aside to
    `<step>.corrupt` and neither the next save nor the next start meets it again.
    Read-only commands pass False: damaged checkpoints are skipped where they are, so
    looking at a workdir never changes it.

    Raises CheckpointMismatchError when a checkpoint's shapes do not fit the model,
    CheckpointUnavailableError when the storage keeps failing, CheckpointReadError for
    any other error that is not known damage, and NoReadableCheckpointError when
    checkpoints exist (or were moved aside earlier) but none is readable. In a
    multi-process run every process must call it; all get the same result or error.
    """
    target = flax.serialization.to_state_dict(state_like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    skipped: list[str] = []
    for step in sorted(manager.all_steps(), reverse=True):
        path = _step_path(manager, step)
        outcome, result = _read(manager, step, target, abstract)
        agreed, where = _agree(outcome)
        if agreed == _Outcome.RESTORED:
            return flax.serialization.from_state_dict(state_like, result)
        own_error = result if outcome == agreed else None
        if agreed != _Outcome.DAMAGED:
            error = _stop_error(agreed, path, own_error, where)
            if error is own_error:  # this process's own CheckpointMismatchError
                raise error
            raise error from own_error
        reason = _describe(own_error) if own_error is not None else f"damaged as read by process(es) {where}"
        if quarantine:
            moved = _quarantine(manager, step)
            logging.warning("Checkpoint %s is unreadable (%s); moved it to %s and trying the previous one.",
                            path, reason, moved)  # fmt: skip
        else:
            skipped.append(path)
            logging.warning("Checkpoint %s is unreadable (%s); left it in place and trying the previous one.",
                            path, reason)  # fmt: skip
    leftovers = skipped + quarantined(manager.directory)
    if leftovers:
        raise _nothing_readable(str(manager.directory), leftovers, moved=quarantine)
    return None


# --- One training run per workdir ---------------------------------------------------------------


def _lock(path: str) -> int | None:
    """A descriptor holding an exclusive lock on `path`, or None on a filesystem without locks (warned).

    Raises WorkdirLockedError, naming the holder recorded in the file, when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    except OSError as e:
        raise ConfigError(f"cannot create the lock file {path}: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise WorkdirLockedError(
            f"{os.path.dirname(path)} is in use by another training run ({holder}; lock file {path}): "
            "wait for it to finish or stop it, or pass another --workdir"
        ) from None
    except OSError as e:
        os.close(fd)
        logging.warning("Cannot lock %s (%s): nothing stops a second run in this workdir.", path, e.strerror or e)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/train.lock exclusively while a training run uses the (existing) workdir.

    Two runs in one workdir would overwrite each other's checkpoints, logs and results.
    The lock is an flock: the kernel drops it when the holder ends in any way, kill -9
    included, so the file left behind never blocks a rerun (it is never deleted: a new
    file would let a second run lock it while the first still holds the old one). In a
    multi-process run process 0 holds it for the job and tells the others whether to go on.
    """
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    fd, refusal = None, None
    if jax.process_index() == 0:
        try:
            fd = _lock(path)
        except WorkdirLockedError as e:
            refusal = e
    refused = refusal is not None
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(np.asarray(refused, np.int32)))
    if refused:
        raise refusal or WorkdirLockedError(
            f"{os.path.abspath(workdir)} is in use by another training run (process 0 names it; lock file {path})"
        )
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
