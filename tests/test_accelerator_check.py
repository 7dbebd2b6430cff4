"""The accelerator check runs end to end on a CPU (--tiny) and reports what a GPU run would.

What is checked is that every part runs and reports real, consistent figures (pytest's
counts, the digits accuracy over the 360 test images, examples_per_sec, ratios, FLOPs,
the fraction of peak), that a missed accuracy threshold fails the run, and that the NumPy
digits input is the tf.data pipeline's.  The speed itself is measured on a GPU machine (docs/performance.md).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from skipnet_jax.tools.check_environment import peak_tflops
from skipnet_jax.tools.check_tests import TINY_TESTS, parse_pytest_summary
from skipnet_jax.tools.digits_input import DigitsInput


def _run(*args, timeout=1800):  # a hang guard: compile-bound, 2-10 min on a loaded 2-core machine
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "skipnet_jax.accelerator_check", *args], check=False, cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_run_reports_every_part(tmp_path):
    out = tmp_path / "check.json"
    r = _run("--tiny", "--peak_tflops=0.5", f"--out={out}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["tiny"] and report["parts"] == ["tests", "digits", "bench"]
    assert {"backend", "device_kind", "jax_version", "torch_version"} <= set(report["environment"])

    tests = report["tests"]
    assert tests["ok"] and tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    assert tests["selection"] == list(TINY_TESTS) and tests["matmul_precision"] == "highest"

    digits = report["digits"]
    assert digits["ok"] and digits["model"] == "skipnet_xs" and digits["dtype"] == "bfloat16"
    assert digits["eval_examples"] == 360 and digits["train_examples"] == 1437  # the real split, nothing dropped
    assert 0 <= digits["eval_correct"] <= 360 and digits["eval_top1"] == digits["eval_correct"] / 360
    assert digits["eval_top1"] <= digits["eval_top5"] <= 1 and digits["steps"] == 8 and not digits["nonfinite_steps"]
    assert all(_positive(digits[k]) for k in ("eval_loss", "first_loss", "compile_s", "train_examples_per_sec"))

    bench = report["bench"]
    assert bench["ok"] and bench["model"] == "skipnet_xs" and bench["dtype"] == "bfloat16"
    assert bench["peak_tflops"] == 0.5 and bench["peak_source"] == "--peak_tflops"
    assert bench["torch_compile"] is False and any("torch.compile skipped" in n for n in bench["notes"])
    assert set(bench["modes"]) == {"train", "eval"}
    for mode in bench["modes"].values():
        assert set(mode["sides"]) == {"jax", "torch_eager"}
        assert _positive(mode["flops_per_step"]) and _positive(mode["flops_per_step_2macs"])
        jax_side, torch_side = mode["sides"]["jax"], mode["sides"]["torch_eager"]
        for side in (jax_side, torch_side):
            for key in ("examples_per_sec", "step_ms", "tflops_per_s", "peak_fraction", "jax_over_this"):
                assert _positive(side[key]), key
            assert side["peak_fraction"] == pytest.approx(side["tflops_per_s"] / 0.5)
        assert _positive(jax_side["compile_s"]) and torch_side["compile_s"] is None
        assert torch_side["autocast"] == "bfloat16" and torch_side["channels_last"] and torch_side["device"] == "cpu"
        assert mode["ratio_jax_torch_eager"] == pytest.approx(
            jax_side["examples_per_sec"] / torch_side["examples_per_sec"]
        )
    train = bench["modes"]["train"]
    assert train["flops_per_step_2macs"] == pytest.approx(3 * bench["modes"]["eval"]["flops_per_step_2macs"])

    lines = r.stdout.splitlines()
    assert lines[0].startswith("accelerator check:") and lines[-1].startswith("result: OK")
    for start in ("[tests]  OK", "[digits] OK", "[bench]  OK", "  train  jax", "  train  torch-eager",
                  "  eval   jax", "  eval   torch-eager", "  note: torch.compile skipped"):  # fmt: skip
        assert any(line.startswith(start) for line in lines), start
    assert f"eval top-1 {digits['eval_top1']:.4f} ({digits['eval_correct']}/360)" in r.stdout


def test_missed_accuracy_threshold_fails_the_run(tmp_path):
    out = tmp_path / "check.json"
    # Same digits settings as the run above (compiled step reused from the cache), but an
    # accuracy no 8-step run reaches.
    r = _run("--tiny", "--parts=digits", "--digits_threshold=1.0", f"--out={out}")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["ok"] and not report["digits"]["ok"] and report["digits"]["eval_top1"] < 1.0
    assert set(report) >= {"digits", "environment"} and "tests" not in report and "bench" not in report
    assert "[digits] FAILED" in r.stdout and r.stdout.splitlines()[-1].startswith("result: FAILED (digits)")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--parts=tests,nope"], "--parts: unknown 'nope'"),
        (["--digits_threshold=1.5"], "--digits_threshold must be in [0, 1]"),
        (["--tests=tests/no_such_test.py"], "no such test file"),
        (["--bench_steps=0"], "--bench_steps must be positive"),
        (["--peak_tflops=-1"], "--peak_tflops must be positive"),
    ],
)
def test_bad_arguments_are_one_line(args, expected):
    r = _run(*args, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error:") and expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_numpy_digits_input_is_the_tf_pipeline(digits_data_dir):
    """Eval images equal the tf.data pipeline's (as a set: the orders differ); train images are
    the same images shifted by at most the padding, with zeros (black) shifted in."""
    pytest.importorskip("tensorflow")
    from skipnet_jax.data import pipeline
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.dataset, config.data_dir, config.image_size, config.eval_batch_size = "digits", digits_data_dir, 32, 128
    data = DigitsInput(image_size=32, batch_size=64, eval_batch_size=128, seed=0)

    def real_rows(batches):
        images, labels = [], []
        for b in batches:
            keep = b["mask"] > 0
            images.append(b["image"][keep])
            labels.append(b["label"][keep])
        images, labels = np.concatenate(images), np.concatenate(labels)
        order = np.lexsort(np.round(images.reshape(len(images), -1), 4).T[::-1])
        return images[order], labels[order]

    ours, ours_labels = real_rows(data.eval_batches())
    theirs, theirs_labels = real_rows(pipeline.create_eval_iterator(config))
    assert ours.shape == theirs.shape == (360, 32, 32, 3)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    np.testing.assert_array_equal(ours_labels, theirs_labels)

    step = 22  # stream positions 1408..1471: crosses the end of the first epoch (1437 examples)
    batch = data.train_batch(step)
    indices = data._indices(step * 64 + np.arange(64))
    np.testing.assert_array_equal(batch["label"], data.train_labels[indices])
    assert batch["image"].shape == (64, 32, 32, 3) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray repeated to RGB
    pad, shifts = data.pad, set()
    for image, index in zip(batch["image"], indices):
        source = np.pad(data.train_images[index], pad)  # zero (black) padding, before normalisation
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.allclose((source[dy : dy + 32, dx : dx + 32] - data.mean) / data.std, image[..., 0], atol=1e-5)
        ]
        assert found, "a train image is not its source image shifted by at most the padding"
        shifts.add(found[0])
    assert len(shifts) > 5  # the offsets are random


def test_train_stream_visits_each_example_once_per_epoch():
    data = DigitsInput(image_size=32, batch_size=64, eval_batch_size=128, seed=3)
    n = data.num_train
    steps = math.ceil(2 * n / 64)
    positions = np.arange(steps * 64)
    indices = np.concatenate([data._indices(positions[i * 64 : (i + 1) * 64]) for i in range(steps)])
    assert sorted(indices[:n]) == list(range(n)) and sorted(indices[n : 2 * n]) == list(range(n))
    assert not np.array_equal(indices[:n], indices[n : 2 * n])  # a new permutation every epoch
    again = DigitsInput(image_size=32, batch_size=64, eval_batch_size=128, seed=3)
    np.testing.assert_array_equal(again.train_batch(5)["image"], data.train_batch(5)["image"])  # a function of the step


def test_peak_table_and_flops():
    assert peak_tflops("NVIDIA H200", None)[0] == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert peak_tflops("NVIDIA L4", None)[0] == 121.0 and peak_tflops("NVIDIA L40S", None)[0] == 362.0
    assert peak_tflops("cpu", None)[0] is None and peak_tflops("cpu", 2.0) == (2.0, "--peak_tflops")
    assert parse_pytest_summary("x\n= 3 failed, 180 passed, 2 skipped, 1 error in 95.20s (0:01:35) =\n") == {
        "passed": 180, "failed": 3, "skipped": 2, "errors": 1, "xfailed": 0, "xpassed": 0,
    }  # fmt: skip
