"""`python -m skipnet_jax.compare`: statistics against hand-computed values, a tiny
end-to-end comparison that resumes after a simulated kill, and one-line CLI errors."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, tiny_digits_config

from skipnet_jax import compare
from skipnet_jax.config_validation import ConfigError


def test_mean_std_is_the_sample_std():
    # [1, 2, 4]: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9; / (n - 1) = 7/3.
    stat = compare.mean_std([1.0, 2.0, 4.0])
    assert stat == {"n": 3, "mean": pytest.approx(7 / 3), "std": pytest.approx(math.sqrt(7 / 3))}
    assert compare.mean_std([0.5]) == {"n": 1, "mean": 0.5, "std": None}


@pytest.mark.parametrize("df, value", [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (9, 2.2621572)])
def test_t_quantile_matches_the_table(df, value):
    # Two-sided 95% critical values of Student's t (any statistics table).
    assert compare.t_quantile(0.975, df) == pytest.approx(value, abs=1e-6)


def test_paired_difference_by_hand():
    ce = {0: 0.90, 1: 0.80, 2: 0.70, 7: 0.5}  # seed 7 has no bias run: not paired
    bias = {0: 0.91, 1: 0.82, 2: 0.73}
    d = compare.paired_difference(ce, bias)
    # Differences 0.01, 0.02, 0.03: mean 0.02, std 0.01, se 0.01 / sqrt(3).
    assert d["n"] == 3 and list(d["per_seed"]) == ["0", "1", "2"]
    assert d["mean"] == pytest.approx(0.02) and d["std"] == pytest.approx(0.01)
    half = 4.3026527 * 0.01 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-7)
    # df = 2 has a closed-form CDF, F(t) = 1/2 + t / (2 sqrt(2 + t^2)); t = 2 sqrt(3) gives
    # the two-sided p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(6/7).
    assert d["p_value"] == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-6)
    assert compare.paired_difference({0: 0.9}, {0: 0.95})["ci95"] is None  # one seed: no interval
    assert compare.paired_difference({0: 0.9, 1: 0.8}, {0: 0.9, 1: 0.8})["ci95"] is None  # zero spread


def _results(top1):
    return {"eval_top1": top1, "eval_top5": 1.0, "eval_loss": 1.0 - top1, "steps": 10, "wall_seconds": 60.0}


def test_summary_and_markdown_from_results():
    results = {
        "ce-seed0": _results(0.90),
        "bias-seed0": _results(0.92),
        "ce-seed1": _results(0.80),
        "bias-seed1": _results(0.80),
    }
    summary = compare.summarize(results, ("ce", "bias"), [0, 1])
    assert summary["by_loss"]["ce"]["eval_top1"]["mean"] == pytest.approx(0.85)
    assert summary["by_loss"]["ce"]["eval_top1"]["std"] == pytest.approx(math.sqrt(0.005))
    diff = summary["bias_minus_ce"]["eval_top1"]
    assert diff["per_seed"] == pytest.approx({"0": 0.02, "1": 0.0})
    half = 12.7062047 * math.sqrt(0.0002) / math.sqrt(2)  # std of (0.02, 0) = sqrt(0.0002)
    assert diff["ci95"] == pytest.approx([0.01 - half, 0.01 + half], abs=1e-6)
    assert summary["total_wall_seconds"] == 240.0
    text = compare.markdown(summary, "title")
    assert "| ce | 2 | 0.8500 ± 0.0707 |" in text
    assert "| eval top-1 | +0.0200 | +0.0000 | +0.0100 |" in text
    assert "contains 0: no significant difference" in text
    assert "bias_minus_ce" not in compare.summarize(results, ("ce",), [0, 1])


def test_bad_losses_and_reused_workdirs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'foo' is not a loss; valid choices: bias, ce"):
        compare.parse_losses("ce,foo")
    with pytest.raises(ConfigError, match="twice"):
        compare.parse_losses("ce,ce")
    config = tiny_digits_config(str(tmp_path))
    configs = compare.run_configs(config, ("ce", "bias"), [0])
    assert [(c.loss, c.seed) for c in configs.values()] == [("ce", 0), ("bias", 0)]
    os.makedirs(tmp_path / "ce-seed0")
    (tmp_path / "ce-seed0" / "config.json").write_text(
        json.dumps({**json.loads(config.to_json()), "loss": "ce", "num_train_steps": 99})
    )
    with pytest.raises(ConfigError, match=r"ce-seed0 was trained with another config \(num_train_steps: 99 vs 6\)"):
        compare.check_reusable(configs, str(tmp_path))


def _without_wall(summary):
    summary = json.loads(json.dumps(summary))
    for run in summary["runs"].values():
        run.pop("wall_seconds")
    for stats in summary["by_loss"].values():
        stats.pop("wall_seconds")
    summary.pop("total_wall_seconds")
    return summary


def test_end_to_end_writes_the_files_and_resumes(digits_data_dir, tmp_path, registered_step_test_net):
    # The comparison's runs, files and resume are under test, not the network.
    config = tiny_digits_config(digits_data_dir, model=registered_step_test_net, num_train_steps=8, eval_every_steps=4)
    workdir = str(tmp_path / "cmp")
    first = compare.run_comparison(config, workdir, ("ce", "bias"), 2, "tiny")
    for name in compare.FILES:
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert sorted(first["runs"]) == ["bias-seed0", "bias-seed1", "ce-seed0", "ce-seed1"]
    for name, run in first["runs"].items():
        with open(os.path.join(workdir, name, "results.json")) as f:
            assert json.load(f)["eval_top1"] == run["eval_top1"]
    with open(os.path.join(workdir, "comparison.json")) as f:
        assert json.load(f) == json.loads(json.dumps(first))
    assert "Paired difference bias − ce" in open(os.path.join(workdir, "comparison.md")).read()

    # A kill during bias-seed1's last steps: no results.json, no final checkpoint.
    killed = os.path.join(workdir, "bias-seed1")
    os.remove(os.path.join(killed, "results.json"))
    shutil.rmtree(os.path.join(killed, "checkpoints", "8"))
    finished = {
        n: os.path.getmtime(os.path.join(workdir, n, "results.json")) for n in first["runs"] if n != "bias-seed1"
    }
    second = compare.run_comparison(config, workdir, ("ce", "bias"), 2, "tiny")
    assert {n: os.path.getmtime(os.path.join(workdir, n, "results.json")) for n in finished} == finished
    with open(os.path.join(killed, "results.json")) as f:
        assert json.load(f)["resumed_from_step"] == 4
    assert _without_wall(second) == _without_wall(first)  # the resumed run ends where it would have


def test_cli_bad_flag_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "never"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "skipnet_jax.compare",
            "--config=configs/digits_hard.py",
            f"--workdir={workdir}",
            "--losses=ce,focal",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --losses='ce,focal': 'focal' is not a loss; valid choices: bias, ce"
    )
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not workdir.exists()
