"""The accelerator check's ``tests`` part: pytest in a subprocess on the tests that need no TensorFlow."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests that exercise the models, the loss, the kernels, the optimiser, the weight
# conversion and the train step, and run without TensorFlow (checked with TensorFlow made
# absent).  Left out: tests/test_train.py's end-to-end tests and every other test that reads
# data through tf.data/TFDS (test_data, test_inference, test_cli, ...) or exports through
# TensorFlow; test_torch_reference.py, which runs PyTorch on the CPU only (the bench part
# runs that model on the GPU); and test_no_tensorflow.py, which this whole check repeats
# (it runs without TensorFlow) at a larger scale.
GPU_TESTS = (
    "tests/test_models.py",
    "tests/test_models_extra.py",
    "tests/test_losses.py",
    "tests/test_fast_kernels.py",
    "tests/test_optim.py",
    "tests/test_bias_loss_release.py",
    "tests/test_summary.py",
    "tests/test_convert.py",
    "tests/test_train.py::test_train_step_reports_bias_statistics",
    "tests/test_train.py::test_non_finite_step_keeps_the_state",
)
TINY_TESTS = ("tests/test_losses.py",)

_SUMMARY_WORDS = ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed", "deselected")


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's closing line (``3 failed, 180 passed, 2 skipped in 95.20s``)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0}
    for line in reversed(output.splitlines()):
        if re.search(r"\bin [0-9.]+s\b", line) and re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            for number, word in re.findall(r"(\d+) ([a-z]+)", line):
                if word in _SUMMARY_WORDS:
                    key = "errors" if word.startswith("error") else word
                    counts[key] = counts.get(key, 0) + int(number)
            break
    return counts


def _default_workers() -> int:
    """Half the cores (compiling is CPU work), at most 8, when pytest-xdist is there."""
    if importlib.util.find_spec("xdist") is None:
        return 0
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def run_tests(tests: list[str], workers: int | None, precision: str, timeout: float) -> dict[str, Any]:
    """Runs pytest on `tests` in a subprocess and returns its counts, failures and output tail.

    A subprocess, so that the tests' own JAX settings (compilation cache, x64, precision)
    never leak into the timed parts, and a hung test is stopped by `timeout`.
    """
    if workers is None:
        workers = _default_workers()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if workers > 0:
        command += ["-n", str(workers)]
    command += tests
    env = dict(os.environ)
    if workers > 0:  # PyTorch's CPU references in the tests: no N workers x all-cores threads
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // workers)))
    if precision == "highest":
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        output, returncode, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        returncode, timed_out = None, True
    seconds = time.perf_counter() - t0
    counts = parse_pytest_summary(output)
    failures = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    ok = returncode == 0 and counts["passed"] > 0 and not timed_out
    return {
        "ok": ok,
        "command": " ".join(command[1:]),
        "selection": tests,
        "workers": workers,
        "matmul_precision": precision,
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": seconds,
        **counts,
        "failures": failures,
        "output_tail": output.splitlines()[-60:],
    }


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
