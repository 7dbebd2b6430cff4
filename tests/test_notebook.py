"""notebooks/skipnet_colab.ipynb runs end to end on CPU (nbclient), with a short schedule.

Every cell must run without error; the notebook itself asserts that the bias weights
follow z(v), that `evaluate` reproduces the training run's top-1 and that the TFLite
export matches JAX.  Here we also check that it trained, plotted and exported, that the
install cell did nothing (the package is installed here), that a batch size the devices do
not divide was adjusted (two forced CPU devices, as a TPU v2-8 has eight) and that the
training cell showed its progress lines.
"""

import json
import os
import re
import subprocess
import sys

import nbclient
import nbformat
from conftest import REPO_ROOT, xla_flags

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "skipnet_colab.ipynb")


def _text(cell, stream="stdout"):
    return "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == stream)


def test_colab_notebook_runs_on_cpu(digits_data_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    for key, value in {
        "SKIPNET_NOTEBOOK_MODEL": "skipnet_xs", "SKIPNET_NOTEBOOK_STEPS": "12", "SKIPNET_NOTEBOOK_BATCH": "31",
        "SKIPNET_NOTEBOOK_DATA_DIR": digits_data_dir, "SKIPNET_NOTEBOOK_WORKDIR": str(workdir),
        "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": xla_flags(2),
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)  # inherited by the kernel process
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO_ROOT}}
    ).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    install, train = code[0], next(cell for cell in code if "train_and_evaluate(" in cell.source)
    assert _text(install) == "skipnet_jax is already installed (not on Colab): nothing to install.\n"
    settings = _text(next(cell for cell in code if "fit_to_devices(" in cell.source))
    assert "BATCH_SIZE = 31 is not divisible by the 2 CPU devices: using 32." in settings
    assert "2 device(s): batch 32 (16 per device), eval batch 120 (60 per device)" in settings
    progress = re.findall(r"\] step (\d+)/12  loss \S+  acc \S+  lr \S+  \S+ img/s  ETA \S+\n", _text(train, "stderr"))
    assert progress == [str(step) for step in range(1, 13)]  # log_every_steps = 1
    ours = {f for _, _, files in os.walk(os.path.join(REPO_ROOT, "skipnet_jax")) for f in files if f.endswith(".py")}
    info_from = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ ([^:]+):\d+\]", _text(train, "stderr"), re.MULTILINE))
    assert "reporting.py" in info_from and info_from <= ours  # other libraries' INFO (orbax's) dropped
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # curves, variance histograms, bias vs CE, confusion matrix, shown inline
    with open(workdir / "results.json") as f:
        assert json.load(f)["steps"] == 12
    assert sorted(os.listdir(workdir / "plots")) == [
        "bias_vs_cross_entropy.png", "confusion_matrix.png", "training_curves.png", "variance_histograms.png"
    ]  # fmt: skip
    assert (workdir / "model.tflite").stat().st_size > 100_000


def test_configure_logging_shows_our_progress_outside_app_run():
    """What the notebook's training cell relies on, in a plain interpreter (no absl.app.run)."""
    script = """
import logging, sys
from absl import logging as absl_logging
absl_logging.info("before: dropped, as absl drops INFO outside app.run")
from skipnet_jax import console, reporting
console.configure_logging()
console.configure_logging()  # idempotent: one handler, one filter
reporter = reporting.ProgressReporter(None, num_train_steps=4, batch_size=8, log_every_steps=2)
for step in range(1, 5):
    reporter.record(step, {"loss": 1.0, "accuracy": 0.5, "learning_rate": 0.1})
absl_logging.info("another library's INFO through absl: dropped")
logging.getLogger("jax").info("jax INFO: dropped")
logging.getLogger("jax").warning("jax WARNING: shown")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    messages = [re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ (\S+:\d+)\] ", r"\1 ", line) for line in result.stderr.splitlines()]
    assert len(messages) == 3, result.stderr
    assert re.fullmatch(
        r"reporting\.py:\d+ step 2/4  loss 1\.0000  acc 0\.500  lr 0\.1  [\d.]+ img/s  ETA 0m00s", messages[0]
    )
    assert re.fullmatch(
        r"reporting\.py:\d+ step 4/4  loss 1\.0000  acc 0\.500  lr 0\.1  [\d.]+ img/s  ETA 0m00s", messages[1]
    )
    assert re.fullmatch(r"<string>:\d+ jax WARNING: shown", messages[2])
