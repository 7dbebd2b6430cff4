"""The CLI on bad input: exit code 2, one line naming the key and the choices, no traceback,
and an existing workdir left exactly as it was."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, xla_flags


def _snapshot(directory):
    return {
        os.path.relpath(os.path.join(root, name), directory): os.path.getmtime(os.path.join(root, name))
        for root, _, files in os.walk(directory)
        for name in files
    }


def _run_cli(workdir, *overrides, env=None, config="configs/digits.py"):
    command = [sys.executable, "-m", "skipnet_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def existing_workdir(tmp_path):
    workdir = tmp_path / "workdir"
    (workdir / "checkpoints" / "100").mkdir(parents=True)
    (workdir / "checkpoints" / "100" / "state").write_text("precious")
    (workdir / "results.json").write_text("{}")
    return workdir


def _error_lines(stderr):
    """stderr lines that are ours (not C++ start-up notices from TF/XLA)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


CASES = [
    (["--config.model=skipnet_xxl"], None, r"config.model='skipnet_xxl' is not valid; valid choices: "),
    (["--config.dataset=no_such_dataset"], None, "no_such_dataset"),
    (
        ["--config.optimizer=adagrad"],
        None,
        "config.optimizer='adagrad' is not valid; valid choices: sgd, rmsprop, adamw",
    ),
    (["--config.loss=focal"], None, "config.loss='focal' is not valid; valid choices: bias, ce"),
    (["--config.image_size=-1"], None, "config.image_size=-1 is not valid"),
    (["--config.batch_size=0"], None, "config.batch_size=0 is not valid"),
    (
        ["--config.batch_size=12"],
        {"XLA_FLAGS": xla_flags(8)},
        "divisible by the number of devices (8)",
    ),
    (["--config.learning_rat=0.1"], None, "config key 'learning_rat'"),
    (["--config.batch_size=abc"], None, "--config.batch_size=abc"),
]


@pytest.mark.parametrize("overrides, env, expected", CASES, ids=[c[0][0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(existing_workdir, overrides, env, expected):
    before = _snapshot(existing_workdir)
    result = _run_cli(existing_workdir, "--config.num_train_steps=1", *overrides, env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert _snapshot(existing_workdir) == before


def test_unusable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _run_cli(blocker / "run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert "--workdir=" in line and "not a directory" in line
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc filesystem")
def test_workdir_that_cannot_be_created_is_one_line():
    result = _run_cli("/proc/skipnet_cannot_be_here/run", "--config.num_train_steps=1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert "--workdir='/proc/skipnet_cannot_be_here/run' cannot be created" in line


def test_missing_config_file(tmp_path):
    result = _run_cli(tmp_path / "run", config="configs/does_not_exist.py")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert "configs/does_not_exist.py" in line
    assert not (tmp_path / "run").exists()
