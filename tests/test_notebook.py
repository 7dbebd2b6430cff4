"""notebooks/skipnet_colab.ipynb runs end to end on CPU (nbclient), with a short schedule.

Every cell must run without error; the notebook itself asserts that the bias weights
follow z(v), that `evaluate` reproduces the training run's top-1 and that the TFLite
export matches JAX.  Here we also check that it trained, plotted and exported.
"""

import json
import os

import nbclient
import nbformat
from conftest import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "skipnet_colab.ipynb")


def test_colab_notebook_runs_on_cpu(digits_data_dir, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    for key, value in {
        "SKIPNET_NOTEBOOK_MODEL": "skipnet_xs", "SKIPNET_NOTEBOOK_STEPS": "12", "SKIPNET_NOTEBOOK_BATCH": "32",
        "SKIPNET_NOTEBOOK_DATA_DIR": digits_data_dir, "SKIPNET_NOTEBOOK_WORKDIR": str(workdir),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)  # inherited by the kernel process
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO_ROOT}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # curves, variance histograms, bias vs CE, confusion matrix, shown inline
    with open(workdir / "results.json") as f:
        assert json.load(f)["steps"] == 12
    assert sorted(os.listdir(workdir / "plots")) == [
        "bias_vs_cross_entropy.png", "confusion_matrix.png", "training_curves.png", "variance_histograms.png"
    ]  # fmt: skip
    assert (workdir / "model.tflite").stat().st_size > 100_000
