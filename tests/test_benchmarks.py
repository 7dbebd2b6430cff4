"""The benchmark CLIs run and report what the Performance table (docs/performance.md) quotes.

Tiny sizes only: these check that the tools work and report every figure (throughput as
``examples_per_sec``, ratio to PyTorch, bias-loss overhead, compile time, peak memory; the
input-pipeline ratio), not the speed itself (speed is measured by running the tools, see
docs/performance.md).
"""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def _run(module, *args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", f"skipnet_jax.{module}", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_model_benchmark_json_with_torch_and_loss_comparison():
    result = _run(
        "benchmark", "--model=skipnet_xs", "--batch_size=2", "--image_size=32", "--mode=train", "--steps=1",
        "--rounds=1", "--warmup=1", "--json", "--compare=torch", "--compare_loss",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["model"] == "skipnet_xs" and report["mode"] == "train" and report["loss"] == "bias"
    figures = ("examples_per_sec", "torch_examples_per_sec", "ratio", "compile_s", "peak_rss_mb")
    for key in (*figures, "bias_step_ms", "ce_step_ms"):
        assert report[key] > 0, key
    assert abs(report["ratio"] - report["examples_per_sec"] / report["torch_examples_per_sec"]) < 1e-6 * report["ratio"]
    assert abs(report["bias_overhead_pct"] - 100 * (report["bias_step_ms"] / report["ce_step_ms"] - 1)) < 1e-6


def test_model_benchmark_bad_argument_is_one_line():
    result = _run("benchmark", "--model=skipnet_xxl", "--json")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "skipnet_xxl" in result.stderr and "Traceback" not in result.stderr


def test_input_benchmark_json():
    result = _run(
        "input_benchmark", "--num_images=16", "--batch_size=4", "--image_size=32", "--batches=2", "--rounds=1",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["images"] == 16 and set(report["examples_per_sec"]) == {"tf.data", "PIL"}
    assert report["ratio"] == report["examples_per_sec"]["tf.data"] / report["examples_per_sec"]["PIL"] > 0
