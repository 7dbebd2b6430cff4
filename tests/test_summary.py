"""Tests of skipnet_jax.summary: parameter and MAC counts vs the paper's figures, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from skipnet_jax import summary
from skipnet_jax.models import create_model, list_models

REPO_ROOT = Path(__file__).resolve().parents[1]

# Exact counts this implementation measures (1000 classes, 224 px); the table's figures are
# rounded to 0.1M MACs.
MEASURED_MACS = {
    "skipnet_xs": 78_537_232,
    "skipnet_s": 170_235_920,
    "skipnet_m": 236_622_048,
    "skipnet_l": 347_748_608,
}


@pytest.fixture(scope="module")
def m_summary():
    return summary.summarize("skipnet_m", 224, 1000)


def test_skipnet_m_params_and_macs(m_summary):
    assert m_summary.params == 5_532_352
    assert abs(m_summary.macs - 236.6e6) <= 0.005 * 236.6e6
    assert m_summary.macs == MEASURED_MACS["skipnet_m"]
    assert summary.count_macs("skipnet_m", 224, 1000) == m_summary.macs
    assert summary.count_params("skipnet_m") == 5_532_352


@pytest.mark.parametrize("name", ["skipnet_xs", "skipnet_s", "skipnet_l"])
def test_other_skipnets_match_table(name):
    s = summary.summarize(name, 224, 1000)
    ref = summary.PAPER_FIGURES[name]
    assert s.params == ref["params"]
    assert abs(s.macs - ref["macs"]) <= 0.01 * ref["macs"]
    assert s.macs == MEASURED_MACS[name]


def test_rows_use_the_mac_formula(m_summary):
    rows = {r.path: r for r in m_summary.rows}
    # conv: out_H * out_W * k * k * (in / groups) * out
    assert rows["stem/conv"].macs == 112 * 112 * 3 * 3 * 3 * 16
    assert rows["stem/conv"].output_shape == (112, 112, 16)
    # depthwise 5x5 stride 2 on 72 channels: groups = 72
    assert rows["stage1_block2/depthwise/conv"].macs == 28 * 28 * 5 * 5 * 1 * 72
    # SE dense layers and the classifier: in * out
    assert rows["stage1_block2/se/fc1"].macs == 72 * 24
    assert rows["stage1_block2/se/fc1"].params == 72 * 24 + 24
    assert rows["classifier"].macs == 1280 * 1000
    # BN counts parameters but no MACs; rows cover every parameter exactly once
    assert rows["head/bn"].macs == 0 and rows["head/bn"].params == 2 * 960
    assert sum(r.params for r in m_summary.rows) == m_summary.params
    assert sum(r.macs for r in m_summary.rows) == m_summary.macs
    text = summary.format_table(m_summary)
    assert "236,622,048" in text and "5,532,352" in text and "76.2%" in text


def test_macs_scale_with_resolution_and_no_paper_figures_elsewhere():
    s = summary.summarize("skipnet_xs", 32, 10)
    assert s.paper is None
    assert 0 < s.macs < MEASURED_MACS["skipnet_xs"] / 20


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name):
    """Generic over the registry: the total equals the model's own parameter count."""
    s = summary.summarize(name, 224, 1000)
    model = create_model(name, num_classes=1000)
    v = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 224, 224, 3)), train=False), jax.random.key(0))
    assert s.params == sum(x.size for x in jax.tree.leaves(v["params"]))
    assert s.macs > 0 and s.rows


def test_markdown_table():
    text = summary.markdown_table(["skipnet_m", "skipnet_xs"])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model |")
    assert "| skipnet_m | 5,532,352 | 236.6M | 5,532,352 (+0.00%) |" in text


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "skipnet_jax.summary", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli():
    r = _run_cli("--model", "skipnet_m")
    assert r.returncode == 0, r.stderr
    assert "head/conv" in r.stdout and "5,532,352" in r.stdout and "236,622,048" in r.stdout

    r = _run_cli("--model", "no_such_model")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_model" in lines[0] and "skipnet_m" in lines[0]
    assert "Traceback" not in r.stderr
