"""Never lose a run: kill -9 and SIGTERM resume exactly, corrupt checkpoints fall back, NaN stops.

What a process boundary is needed for (a signal, kill -9, the CLI's exit code and one-line
error) runs the real CLI in a subprocess; the resumes and the reference run train in-process
(`train.train_and_evaluate` with the config the CLI builds, bit-for-bit the same numbers: same
XLA flags), which reuses the worker's compiled steps and pays no start-up.  JAX's persistent
compilation cache (tests/conftest.py) compiles the subprocesses' steps once for all of them.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess

import pytest
from conftest import CLI_RUN_FIELDS, REPO_ROOT, cli_run_command, cli_run_config

STEPS = CLI_RUN_FIELDS["num_train_steps"]
COMPARED = ("eval_top1", "eval_top5", "eval_loss", "train_loss", "params_global_norm", "steps")
CADENCE = {"checkpoint_every_steps": 3, "log_every_steps": 1}


def _command(workdir, data_dir, *extra):
    return cli_run_command(workdir, data_dir, *extra, **CADENCE)


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(workdir, data_dir, *extra):
    return subprocess.run(
        _command(workdir, data_dir, *extra), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )


def _cli_config(data_dir, **overrides):
    """The config `_command(..., "--config.KEY=VALUE" for overrides)` gives the CLI."""
    return cli_run_config(data_dir, **{**CADENCE, **overrides})


def _train_in_process(workdir, data_dir, caplog, *, allow_changed_config=False, **overrides):
    """The CLI's run (`_run(workdir, data_dir, "--config.KEY=VALUE"...)`) in this process: returns
    what it logged (the CLI's stderr lines) once it finished; a failure raises."""
    from skipnet_jax import train

    caplog.clear()
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        config = _cli_config(str(data_dir), **overrides)
        train.train_and_evaluate(config, str(workdir), allow_changed_config=allow_changed_config)
    return "\n".join(record.getMessage() for record in caplog.records)


def _run_until_step_then_signal(workdir, data_dir, step, sig):
    """Starts a run, sends `sig` once it logs `step`, returns (exit code, log)."""
    process = subprocess.Popen(
        _command(workdir, data_dir), cwd=REPO_ROOT, env=_env(), stderr=subprocess.PIPE, text=True
    )
    log = []
    try:
        for line in process.stderr:
            log.append(line)
            if f"step {step}/{STEPS}" in line:
                process.send_signal(sig)
                break
        log.extend(process.stderr)
        return process.wait(timeout=300), "".join(log)
    finally:
        if process.poll() is None:
            process.kill()


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return {k: results[k] for k in COMPARED}


def _steps_saved(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def uninterrupted_workdir(digits_data_dir, tmp_path_factory):
    """The run from scratch to STEPS without a stop (in-process; the same numbers as the CLI's)."""
    from skipnet_jax import train

    workdir = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(_cli_config(digits_data_dir), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_workdir):
    return _results(uninterrupted_workdir)


def test_kill_9_at_a_random_step_then_restart_is_identical(uninterrupted, digits_data_dir, tmp_path, caplog):
    kill_at = random.Random().randint(4, STEPS - 1)
    code, log = _run_until_step_then_signal(tmp_path, digits_data_dir, kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"run ended before the kill at step {kill_at}:\n{log[-2000:]}"
    assert not (tmp_path / "results.json").exists()
    # Checkpoints are written asynchronously: the kill may land before the first one is
    # finalised (then the restart begins from scratch) or in the middle of a save.
    finalised = _steps_saved(tmp_path) if (tmp_path / "checkpoints").is_dir() else []
    log = _train_in_process(tmp_path, digits_data_dir, caplog)  # the restart; raises unless it finishes
    if finalised:
        assert f"at step {finalised[-1]}" in log and "Resumed from" in log
    assert _results(tmp_path) == uninterrupted, f"killed at step {kill_at}, checkpoints {finalised}"


def test_sigterm_saves_exits_zero_and_resumes(uninterrupted, digits_data_dir, tmp_path, caplog):
    code, log = _run_until_step_then_signal(tmp_path, digits_data_dir, 5, signal.SIGTERM)
    assert code == 0, log[-3000:]
    assert "Preempted: checkpoint at step" in log
    saved = _steps_saved(tmp_path)
    assert saved and 5 <= saved[-1] < STEPS
    assert not (tmp_path / "results.json").exists()
    _train_in_process(tmp_path, digits_data_dir, caplog)  # the resume; raises unless it finishes
    assert _results(tmp_path) == uninterrupted


def test_truncated_latest_checkpoint_falls_back_to_previous(
    uninterrupted_workdir, uninterrupted, digits_data_dir, tmp_path, caplog
):
    shutil.copytree(uninterrupted_workdir, tmp_path, dirs_exist_ok=True)  # a finished run (the fixture asserted it)
    os.remove(tmp_path / "results.json")
    latest = tmp_path / "checkpoints" / str(STEPS)
    victims = sorted(
        (p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 1000), key=lambda p: -p.stat().st_size
    )
    with open(victims[0], "r+b") as f:
        f.truncate(victims[0].stat().st_size // 2)
    log = _train_in_process(tmp_path, digits_data_dir, caplog)  # raises unless it finishes
    assert f"{latest} is unreadable" in log
    assert (tmp_path / "checkpoints" / f"{STEPS}.corrupt").is_dir()  # kept for inspection, not deleted
    assert _results(tmp_path) == uninterrupted


def test_nan_stops_with_the_step_and_keeps_the_last_checkpoint(digits_data_dir, tmp_path):
    # No bound on the weights: the exploding weights overflow to a NaN loss.
    nan = ("--config.optimizer=sgd", "--config.learning_rate=1e30", "--config.loss=ce", "--config.max_abs_weight=0")
    result = _run(tmp_path, digits_data_dir, *nan)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert "non-finite loss or gradient at step" in line
    assert "last good checkpoint: " in line or "no checkpoint was saved yet" in line
    failed_step = int(line.split("at step ")[1].split()[0])
    assert all(step <= failed_step for step in _steps_saved(tmp_path))
    assert not any("tmp" in name for name in os.listdir(tmp_path / "checkpoints"))  # no half-written save
    assert not (tmp_path / "results.json").exists()


def test_checkpoint_of_another_model_is_refused(uninterrupted_workdir, digits_data_dir, tmp_path):
    shutil.copytree(uninterrupted_workdir, tmp_path, dirs_exist_ok=True)  # a finished skipnet_xs run
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    saved_config = (tmp_path / "config.json").read_bytes()
    # Two differences (the seed as well), so the error's lead lists several fields.
    result = _run(tmp_path, digits_data_dir, "--config.model=skipnet_s", "--config.seed=1")
    assert result.returncode == 2
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert "does not match the configured model" in line
    assert line.startswith("error: config differs from the workdir's run (model: 'skipnet_xs' vs 'skipnet_s'; ")
    assert len(line) < 1000, line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert (tmp_path / "config.json").read_bytes() == saved_config  # the run's own config, for evaluate


def test_ctrl_c_saves_exits_130_quietly_and_resumes(uninterrupted, digits_data_dir, tmp_path, caplog):
    code, log = _run_until_step_then_signal(tmp_path, digits_data_dir, 5, signal.SIGINT)
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    assert "Interrupted: checkpoint at step" in log
    saved = _steps_saved(tmp_path)
    assert saved and 5 <= saved[-1] < STEPS
    assert not any("tmp" in name for name in os.listdir(tmp_path / "checkpoints"))  # the save was finished
    log = _train_in_process(tmp_path, digits_data_dir, caplog)  # the resume; raises unless it finishes
    assert f"at step {saved[-1]}" in log
    assert _results(tmp_path) == uninterrupted


def test_exploding_weights_stop_before_any_checkpoint_holds_them(digits_data_dir, tmp_path, caplog):
    # Warm-up from 0: step 0 trains at lr 0 and is checkpointed; the next one would blow the
    # weights up to ~1e29 while staying finite, so only a bound on the weights can catch it.
    diverging = ("--config.optimizer=sgd", "--config.learning_rate=1e30", "--config.loss=ce",
                 "--config.warmup_epochs=0.2", "--config.checkpoint_every_steps=1")  # fmt: skip
    result = _run(tmp_path, digits_data_dir, *diverging)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    last_good = _steps_saved(tmp_path)[-1]
    assert f"last good checkpoint: {tmp_path / 'checkpoints' / str(last_good)}" in line, line
    assert "--config.learning_rate" in line
    # Resuming it with a sane learning rate (allowed explicitly) finishes: the checkpoint holds usable weights.
    assert "--allow_changed_config" in line
    log = _train_in_process(
        tmp_path, digits_data_dir, caplog, optimizer="sgd", learning_rate=0.01, loss="ce", allow_changed_config=True
    )  # raises unless it finishes
    assert f"at step {last_good}" in log
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["train_loss"] < 10
