"""Checkpoint restore and the workdir lock: what may be moved, when a run must stop, who may write.

* Integrity errors (the data is there but cannot be decoded) move the checkpoint aside as
  ``<step>.corrupt``; storage errors (EIO, timeouts, an unreachable mount) are retried and
  then stop the run with the checkpoint left where it is.
* Read-only callers (evaluate, predict, export) never move anything; training refuses to
  start over from step 0 when only unreadable checkpoints are left.
* Processes of one run agree on every decision (a real two-process job below).
* One training run per workdir; the lock of a run killed with -9 does not outlive it.

The restore tests use a tiny pytree checkpoint; only the tests marked below run training.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CLI_RUN_FIELDS, REPO_ROOT, cli_run_command, cli_run_config, tiny_digits_config, xla_flags

from skipnet_jax import checkpointing
from skipnet_jax.config_validation import ConfigError

STEPS = (1, 2, 3)


def _state(step: int) -> dict:
    """Random weights: they do not compress, so the array data is the checkpoint's largest file."""
    return {
        "w": np.random.default_rng(step).standard_normal((64, 256)).astype(np.float32),
        "step": np.asarray(step, np.int32),
    }


def _save(workdir, steps=STEPS) -> None:
    manager = checkpointing.create_manager(str(workdir), keep=10)
    for step in steps:
        checkpointing.save(manager, step, _state(step))
    manager.wait_until_finished()
    manager.close()


def _listing(workdir) -> list[str]:
    return sorted(os.listdir(checkpointing.checkpoint_dir(str(workdir))))


def _restore(workdir, **kwargs):
    manager = checkpointing.create_manager(str(workdir), keep=10)
    try:
        return checkpointing.restore_latest(manager, _state(0), **kwargs)
    finally:
        manager.close()


def _step_dir(workdir, step) -> str:
    return os.path.join(checkpointing.checkpoint_dir(str(workdir)), str(step))


def _damage(workdir, step, how="truncate") -> None:
    """Damages the largest array file of a checkpoint: cut in half, or overwritten with junk.

    That file is an OCDBT data file holding the array's data and, around it, B-tree nodes that
    restoring never reads; where the data starts in it depends on thread timing during the save
    (node and data writes share one buffer), so "garble" junks the whole file (same size), not
    just its first bytes, which can be an unread node."""
    files = [os.path.join(d, f) for d, _, names in os.walk(_step_dir(workdir, step)) for f in names]
    victim = max(files, key=os.path.getsize)
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
        else:
            f.write(b"\xff" * size)


@pytest.fixture
def workdir(tmp_path):
    _save(tmp_path)
    return tmp_path


@pytest.fixture
def sleeps(monkeypatch):
    """The retry waits, recorded instead of slept."""
    waited: list[float] = []
    monkeypatch.setattr(checkpointing, "_sleep", waited.append, raising=False)  # False: also runs before the fix
    return waited


def _tensorstore_error(message: str) -> Exception:
    """An error shaped like orbax's: a bare Exception raised from TensorStore's ValueError."""
    try:
        try:
            raise ValueError(message)
        except ValueError as cause:
            raise Exception("Encountered error while reading array index: (slice(0, 4, 1),).") from cause
    except Exception as e:  # noqa: BLE001 - built only to be returned
        return e


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


UNAVAILABLE = {
    "EIO": lambda: OSError(errno.EIO, os.strerror(errno.EIO)),
    "ESTALE": lambda: OSError(errno.ESTALE, os.strerror(errno.ESTALE)),
    "timeout": lambda: TimeoutError("read timed out"),
    "connection reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "tensorstore UNAVAILABLE": lambda: _tensorstore_error('UNAVAILABLE: Error reading "w/0": gcs 503'),
    "tensorstore OS EIO": lambda: _tensorstore_error(
        f'FAILED_PRECONDITION: Error reading "w/0" in OCDBT database [OS error: {os.strerror(errno.EIO)}]'
    ),
}


def _failing_restore(monkeypatch, error_factory, *, times: int, step: int = 3) -> list[int]:
    """Makes restoring `step` raise `error_factory()` the first `times` tries; returns the tries made."""
    import orbax.checkpoint as ocp

    real, tries = ocp.StandardCheckpointHandler.restore, []

    def restore(self, directory, *args, **kwargs):  # directory: checkpoints/<step>/default
        if directory.parent.name == str(step):
            tries.append(step)
            if len(tries) <= times:
                raise error_factory()
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", restore)
    return tries


# --- Which errors are storage problems and which are damaged data ------------------------------


@pytest.mark.parametrize("how", ["truncate", "garble"])
def test_what_orbax_raises_for_a_damaged_file_is_an_integrity_error(workdir, how):
    import orbax.checkpoint as ocp

    _damage(workdir, 3, how)
    manager = checkpointing.create_manager(str(workdir), keep=10)
    abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in _state(0).items()}
    with pytest.raises(Exception) as caught:  # the type orbax raises is what is examined
        manager.restore(3, args=ocp.args.StandardRestore(abstract))
    manager.close()
    # TensorStore's ValueError ("OUT_OF_RANGE: ...", "FAILED_PRECONDITION: ..."), which orbax may wrap.
    assert any(isinstance(e, ValueError) and e.args[0].split(":")[0].isupper() for e in _chain(caught.value))
    assert checkpointing.is_damage(caught.value) and not checkpointing.is_unavailable(caught.value)


@pytest.mark.parametrize("kind", sorted(UNAVAILABLE))
def test_storage_errors_are_told_apart_from_damage(kind):
    assert checkpointing.is_unavailable(UNAVAILABLE[kind]())
    assert not checkpointing.is_damage(UNAVAILABLE[kind]())


@pytest.mark.parametrize(
    "error",
    [
        _tensorstore_error('DATA_LOSS: Error reading "w/.zarray" in OCDBT database'),
        _tensorstore_error('OUT_OF_RANGE: Error reading "w/0.0": Requested byte range [0, 55155) is not valid'),
        _tensorstore_error('FAILED_PRECONDITION: Error reading "w/0.0": ZSTD_decompressStream() failed'),
        FileNotFoundError(errno.ENOENT, "Metadata file (named _METADATA) does not exist"),
        json.JSONDecodeError("Expecting value", "", 0),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    ],
    ids=["DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "no _METADATA", "bad JSON", "bad UTF-8"],
)
def test_damage_as_orbax_reports_it(error):
    assert checkpointing.is_damage(error) and not checkpointing.is_unavailable(error)


# --- Training restore: integrity errors are quarantined, storage errors stop the run ----------


def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restored(workdir, sleeps):
    _damage(workdir, 3)
    state = _restore(workdir)
    assert int(state["step"]) == 2
    assert _listing(workdir) == ["1", "2", "3.corrupt"]
    assert sleeps == []  # damage is not retried


@pytest.mark.parametrize("kind", sorted(UNAVAILABLE))
def test_storage_error_is_retried_with_backoff_then_restores(workdir, sleeps, monkeypatch, kind):
    tries = _failing_restore(monkeypatch, UNAVAILABLE[kind], times=checkpointing.RESTORE_ATTEMPTS - 1)
    state = _restore(workdir)
    assert int(state["step"]) == 3 and len(tries) == checkpointing.RESTORE_ATTEMPTS
    backoff = checkpointing.RETRY_BACKOFF_S
    assert sleeps == [backoff * 2**i for i in range(checkpointing.RESTORE_ATTEMPTS - 1)]
    assert _listing(workdir) == ["1", "2", "3"]


@pytest.mark.parametrize("kind", ["EIO", "tensorstore OS EIO"])
def test_lasting_storage_error_stops_and_moves_nothing(workdir, sleeps, monkeypatch, kind):
    tries = _failing_restore(monkeypatch, UNAVAILABLE[kind], times=10**6)
    with pytest.raises(checkpointing.CheckpointUnavailableError) as caught:
        _restore(workdir)
    message = str(caught.value)
    assert _step_dir(workdir, 3) in message and "NOT moved" in message and "\n" not in message
    assert isinstance(caught.value, ConfigError)  # the command lines print it as one `error:` line
    assert len(tries) == checkpointing.RESTORE_ATTEMPTS
    assert _listing(workdir) == ["1", "2", "3"]


def test_an_unrecognised_error_stops_at_once_and_moves_nothing(workdir, sleeps, monkeypatch):
    """Neither damage nor storage: e.g. a bug or an orbax change; no checkpoint is moved for it."""
    tries = _failing_restore(monkeypatch, lambda: ValueError("Unsupported type for key ('step',)"), times=10**6)
    with pytest.raises(checkpointing.CheckpointReadError) as caught:
        _restore(workdir)
    assert _step_dir(workdir, 3) in str(caught.value) and "NOT moved" in str(caught.value)
    assert len(tries) == 1 and sleeps == []
    assert _listing(workdir) == ["1", "2", "3"]


def test_shape_mismatch_is_refused_at_once(workdir, sleeps):
    manager = checkpointing.create_manager(str(workdir), keep=10)
    wrong = {"w": np.zeros((64, 3), np.float32), "step": np.asarray(0, np.int32)}
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"w \(64, 256\) != \(64, 3\)"):
        checkpointing.restore_latest(manager, wrong)
    manager.close()
    assert _listing(workdir) == ["1", "2", "3"] and sleeps == []


def test_empty_or_half_written_checkpoint_dir_is_a_fresh_start(tmp_path):
    assert _restore(tmp_path) is None
    # What a kill -9 during the first save leaves: orbax's temporary directory only.
    os.makedirs(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "4.orbax-checkpoint-tmp-1700000000"))
    assert _restore(tmp_path) is None


def test_training_never_starts_over_when_every_checkpoint_is_unreadable(workdir, sleeps):
    for step in STEPS:
        _damage(workdir, step)
    with pytest.raises(checkpointing.NoReadableCheckpointError) as caught:
        _restore(workdir)
    assert _listing(workdir) == ["1.corrupt", "2.corrupt", "3.corrupt"]
    message = str(caught.value)
    assert all(_step_dir(workdir, step) + ".corrupt" in message for step in STEPS), message
    assert "step 0" in message and "\n" not in message and isinstance(caught.value, ConfigError)
    # ... nor on the next attempt, when only the quarantined copies are left.
    with pytest.raises(checkpointing.NoReadableCheckpointError, match=r"3\.corrupt"):
        _restore(workdir)


def test_a_readable_checkpoint_next_to_quarantined_ones_is_restored(workdir):
    _damage(workdir, 3)
    assert int(_restore(workdir)["step"]) == 2
    assert int(_restore(workdir)["step"]) == 2  # 3.corrupt is kept and does not stop later runs


# --- Read-only restore (evaluate, predict, export) ---------------------------------------------


def test_read_only_restore_skips_damaged_checkpoints_in_place(workdir, sleeps):
    _damage(workdir, 3)
    assert int(_restore(workdir, quarantine=False)["step"]) == 2
    assert _listing(workdir) == ["1", "2", "3"]


def test_read_only_restore_of_nothing_readable_fails_and_moves_nothing(workdir, sleeps):
    for step in STEPS:
        _damage(workdir, step)
    with pytest.raises(checkpointing.NoReadableCheckpointError) as caught:
        _restore(workdir, quarantine=False)
    assert all(_step_dir(workdir, step) in str(caught.value) for step in STEPS)
    assert _listing(workdir) == ["1", "2", "3"]


@pytest.fixture
def untrained_run(digits_data_dir, tmp_path_factory, registered_step_test_net):
    """A workdir holding the initial state of the small test network (what the checkpoint
    handling checks does not depend on the network) as checkpoints 2 and 4 (no training)."""
    import jax

    from skipnet_jax import optim, train
    from skipnet_jax.data import pipeline

    config = tiny_digits_config(digits_data_dir, model=registered_step_test_net)
    info = pipeline.get_dataset_info(config)
    steps_per_epoch, num_train_steps = optim.steps_for(config, info.num_train_examples)
    tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config, steps_per_epoch, num_train_steps))
    model = train.create_model(config, info.num_classes)
    init = functools.partial(
        train.create_train_state, model, tx, seed=config.seed, image_size=config.image_size, ema_decay=config.ema_decay
    )
    state = jax.jit(init)()
    workdir = tmp_path_factory.mktemp("untrained")
    manager = checkpointing.create_manager(str(workdir), keep=10)
    for step in (2, 4):
        checkpointing.save(manager, step, state.replace(step=np.int32(step)))
    manager.wait_until_finished()
    manager.close()
    return str(workdir), config


def test_evaluate_moves_nothing_and_training_then_refuses_to_start_over(untrained_run, tmp_path, sleeps):
    from skipnet_jax import inference, train

    source, config = untrained_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    assert inference.load_model(workdir, config.copy_and_resolve_references()).step == 4
    for step in (2, 4):
        _damage(workdir, step)
    with pytest.raises(ConfigError, match="no readable checkpoint") as caught:
        inference.load_model(workdir, config.copy_and_resolve_references())
    assert "\n" not in str(caught.value)
    assert _listing(workdir) == ["2", "4"]  # a read-only command changed nothing

    for _ in range(2):  # first run: moves them aside; second run: finds only the quarantined copies
        with pytest.raises(ConfigError, match=r"4\.corrupt") as caught:
            train.train_and_evaluate(config, workdir)
        assert "step 0" in str(caught.value)
        assert _listing(workdir) == ["2.corrupt", "4.corrupt"]
    assert sorted(os.listdir(workdir)) == ["checkpoints", checkpointing.LOCK_FILE]  # no new run was started


# --- Processes of one run agree ----------------------------------------------------------------

_TWO_PROCESS_JOB = r"""
import errno, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
import orbax.checkpoint as ocp
from skipnet_jax import checkpointing

checkpointing._sleep = lambda seconds: None
failure = {"now": None}
if jax.process_index() == 1:  # only this process fails to read step 3
    real = ocp.StandardCheckpointHandler.restore
    def restore(self, directory, *args, **kwargs):
        if directory.parent.name == "3" and failure["now"] is not None:
            raise failure["now"]
        return real(self, directory, *args, **kwargs)
    ocp.StandardCheckpointHandler.restore = restore

replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)), jax.sharding.PartitionSpec())
like = {"w": jax.ShapeDtypeStruct((64, 256), np.float32, sharding=replicated),
        "step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated)}
manager = checkpointing.create_manager(sys.argv[3], keep=10)
for name, error in [("unavailable", OSError(errno.EIO, "Input/output error")), ("damaged", ValueError("DATA_LOSS: bad"))]:
    failure["now"] = error
    try:
        state = checkpointing.restore_latest(manager, like)
        print(f"{name}: restored step", int(np.asarray(state["step"].addressable_data(0))), flush=True)
    except checkpointing.CheckpointUnavailableError as e:
        print(f"{name}: unavailable:", e, flush=True)
manager.close()

with checkpointing.workdir_lock(sys.argv[3]):  # process 0 takes it for both
    try:
        with checkpointing.workdir_lock(sys.argv[3]):
            print("lock: taken twice", flush=True)
    except checkpointing.WorkdirLockedError as e:
        print("lock: refused:", e, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_when_only_one_cannot_read_the_latest(workdir):
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = xla_flags(1)
    command = [sys.executable, "-c", _TWO_PROCESS_JOB, address]
    jobs = [
        subprocess.Popen(
            [*command, str(i), str(workdir)],
            cwd=REPO_ROOT,
            env=env,
            text=True,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        outputs = [job.communicate(timeout=240)[0] for job in jobs]
    except subprocess.TimeoutExpired:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
        tails = "\n".join(job.communicate()[0][-2000:] for job in jobs)
        pytest.fail(f"the processes did not finish in 240 s (one waits in a barrier the other skipped):\n{tails}")
    for i, (job, output) in enumerate(zip(jobs, outputs)):
        lines = [line for line in output.splitlines() if line.startswith(("unavailable:", "damaged:", "lock:"))]
        assert job.returncode == 0 and len(lines) == 3, f"process {i}:\n{output[-3000:]}"
        # Process 1 cannot reach the storage: both stop, and nothing is moved ...
        assert lines[0].startswith("unavailable: ") and "NOT moved" in lines[0], lines[0]
        # ... then it finds step 3 damaged: process 0 moves it aside and both restore step 2.
        assert lines[1] == "damaged: restored step 2", f"process {i}: {lines[1]}"
        # While the job holds the workdir, a second holder is refused on every process.
        assert lines[2].startswith("lock: refused: ") and str(workdir) in lines[2], lines[2]
    assert "process(es) [1]" in next(line for line in outputs[0].splitlines() if line.startswith("unavailable:"))
    assert f"pid {jobs[0].pid} " in next(line for line in outputs[0].splitlines() if line.startswith("lock:"))
    assert _listing(workdir) == ["1", "2", "3.corrupt"]


# --- One training run per workdir --------------------------------------------------------------


def test_workdir_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with checkpointing.workdir_lock(str(tmp_path)):
        with pytest.raises(checkpointing.WorkdirLockedError) as caught:
            with checkpointing.workdir_lock(str(tmp_path)):
                pass
        message = str(caught.value)
        assert str(tmp_path) in message and f"pid {os.getpid()}" in message and "\n" not in message
        assert isinstance(caught.value, ConfigError)
    with pytest.raises(RuntimeError, match="boom"):
        with checkpointing.workdir_lock(str(tmp_path)):
            raise RuntimeError("boom")
    with checkpointing.workdir_lock(str(tmp_path)):  # released on both ways out
        pass


def test_training_refuses_a_workdir_in_use_before_writing_anything(digits_data_dir, tmp_path):
    from skipnet_jax import train

    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with checkpointing.workdir_lock(workdir):
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            train.train_and_evaluate(tiny_digits_config(digits_data_dir), workdir)
        assert time.monotonic() - started < 60
    assert os.listdir(workdir) == [checkpointing.LOCK_FILE]


KILL_STEPS = CLI_RUN_FIELDS["num_train_steps"]
KILL_CADENCE = {"checkpoint_every_steps": 1, "keep_checkpoints": 2, "log_every_steps": 5}


def _train_command(workdir, data_dir):
    return cli_run_command(workdir, data_dir, **KILL_CADENCE)


def _train_config(data_dir):
    """The config `_train_command` gives the CLI."""
    return cli_run_config(data_dir, **KILL_CADENCE)


def _saving_after_a_finalised_one(checkpoints: str) -> bool:
    """Whether a checkpoint is finalised and orbax is writing the next one (its temporary directory exists)."""
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    return any(name.isdigit() for name in names) and any("tmp" in name for name in names)


def test_kill_9_during_a_save_then_the_rerun_resumes_and_finishes(digits_data_dir, tmp_path, caplog):
    """Saves every step; killed while a save is in flight, once an earlier one is finalised.
    The rerun is the same run in this process (the kill needs the subprocess, the rerun does not)."""
    from skipnet_jax import train

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    checkpoints = checkpointing.checkpoint_dir(str(tmp_path))
    process = subprocess.Popen(
        _train_command(tmp_path, digits_data_dir), cwd=REPO_ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            if _saving_after_a_finalised_one(checkpoints):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    finally:
        if process.poll() is None:
            process.kill()
    finalised = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    assert any("tmp" in name for name in os.listdir(checkpoints))  # the save that was cut short
    assert finalised and finalised[-1] < KILL_STEPS
    assert os.path.exists(tmp_path / checkpointing.LOCK_FILE)  # left by the killed run; its lock died with it

    caplog.clear()
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        train.train_and_evaluate(_train_config(digits_data_dir), str(tmp_path))  # raises unless it finishes
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert "Resumed from" in log and f"at step {finalised[-1]}" in log, log[-3000:]
    assert "unreadable" not in log
    assert sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit()) == [KILL_STEPS - 1, KILL_STEPS]
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["steps"] == KILL_STEPS
