"""Bad files in an image folder (issue: never lose a run): undecodable, truncated and
empty image files are skipped and counted (or stop the run with an error naming the
file), an empty class directory is reported; odd-but-valid formats (grayscale, CMYK,
RGBA) are decoded, see tests/test_imagenet_pipeline.py."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_imagenet_pipeline import _cli, _config, _encode, _image

from skipnet_jax.data import pipeline
from skipnet_jax.tools.check_digits import load_config

GOOD = {("train", "a"): 2, ("train", "b"): 2, ("val", "a"): 2, ("val", "b"): 2}


@pytest.fixture(scope="module")
def damaged_folder(tmp_path_factory):
    """train: a/ 2 good + garbage + truncated, b/ 2 good + empty file, c/ empty; val: a/ 2 good +
    truncated, b/ 2 good."""
    root = tmp_path_factory.mktemp("damaged")
    for (split, name), count in GOOD.items():
        directory = root / split / name
        directory.mkdir(parents=True)
        for i in range(count):
            (directory / f"good{i}.jpg").write_bytes(_encode(_image(120 + 10 * i, 90, seed=i), "JPEG", quality=90))
    jpeg = _encode(_image(200, 150, seed=7), "JPEG", quality=90)
    (root / "train" / "a" / "garbage.jpg").write_bytes(b"this is not an image")
    (root / "train" / "a" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    (root / "train" / "c").mkdir()
    (root / "val" / "a" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return str(root)


def _bad_train_files(root):
    return {os.path.join(root, "train", *p) for p in (("a", "garbage.jpg"), ("a", "truncated.jpg"), ("b", "empty.png"))}


def test_train_stream_skips_and_reports_unreadable_files(damaged_folder):
    config = _config(damaged_folder, bad_images="skip")
    info = pipeline.get_dataset_info(config)
    assert info.num_classes == 3 and info.num_train_examples == 7
    assert info.empty_class_dirs == (os.path.join(damaged_folder, "train", "c"),)
    reported = []
    batches = list(itertools.islice(pipeline.create_train_iterator(config), 7))  # 4 epochs
    for batch in batches:
        runs = pipeline.pop_bad_files(batch, config, "train")
        reported.extend(path for run in runs for path in run)
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (4, 64, 64, 3) and np.isfinite(batch["image"]).all()
        assert set(batch["label"]) <= {0, 1}  # every example is a real, readable one
    assert set(reported) == _bad_train_files(damaged_folder)
    # Deterministic: the same stream again, and a resumed one, see the same files.
    again = list(itertools.islice(pipeline.create_train_iterator(config, start_step=3), 4))
    for got, want in zip(again, batches[3:]):
        np.testing.assert_array_equal(got["image"], want["image"])


def test_eval_masks_out_unreadable_files(damaged_folder):
    config = _config(damaged_folder)
    batches = list(pipeline.create_eval_iterator(config))
    found = [p for b in batches for run in pipeline.pop_bad_files(b, config, "validation") for p in run]
    assert found == [os.path.join(damaged_folder, "val", "a", "truncated.jpg")]
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 4 and len(mask) == 5


def test_error_policy_names_the_empty_class_dir(damaged_folder):
    with pytest.raises(ValueError, match=r"train/c'.*bad_images='error'"):
        pipeline.get_dataset_info(_config(damaged_folder, bad_images="error"))
    with pytest.raises(ValueError, match="bad_images='sometimes' is not valid; valid choices: skip, error"):
        pipeline.get_dataset_info(_config(damaged_folder, bad_images="sometimes"))


# configs/imagenet_m.py's input pipeline with a small float32 model: what is tested here is
# the data path and the loop's reaction to bad files, not the network (compiles 3x faster).
_CLI_FLAGS = (
    "--config.image_size=32", "--config.batch_size=4", "--config.eval_batch_size=4", "--config.model=skipnet_xs",
    "--config.dtype=float32",
)  # fmt: skip


def _cli_config(**overrides):
    """The config `_cli(workdir, *_CLI_FLAGS, "--config.KEY=VALUE" for overrides)` gives the CLI."""
    config = load_config(os.path.join(REPO_ROOT, "configs", "imagenet_m.py"))
    config.update(dict(image_size=32, batch_size=4, eval_batch_size=4, model="skipnet_xs", dtype="float32"))
    config.update(overrides)
    return config


def test_cli_skips_counts_then_error_mode_stops_and_keeps_checkpoint(damaged_folder, tmp_path, caplog):
    from skipnet_jax import train

    # The skipping run trains in this process (no start-up to pay); the CLI's exit codes and
    # one-line errors are what the two strict runs below check.
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        train.train_and_evaluate(_cli_config(dataset=damaged_folder, num_train_steps=2), str(workdir))  # or raises
    log = "\n".join(record.getMessage() for record in caplog.records)
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["eval_examples"] == 4 and results["skipped_eval_examples"] == 1
    assert results["empty_class_dirs"] == [os.path.join(damaged_folder, "train", "c")]
    assert results["skipped_train_files"] and set(results["skipped_train_files"]) <= _bad_train_files(damaged_folder)
    assert "Skipping unreadable image file" in log

    # Strict mode: first the empty class directory is refused, naming it.
    strict = ("--config.data.bad_images=error", "--config.num_train_steps=4")
    result = _cli(workdir, f"--config.dataset={damaged_folder}", *_CLI_FLAGS, *strict)
    assert result.returncode == 2 and _one_error_line(result).count("train/c'") == 1

    # With that class filled, the resumed run (step 2 -> 4) meets an unreadable file and stops
    # with one error line naming it, exit 2; the step-2 checkpoint and results.json are intact.
    fixed = tmp_path / "fixed"
    shutil.copytree(damaged_folder, fixed)
    (fixed / "train" / "c" / "good.jpg").write_bytes(_encode(_image(100, 80, seed=3), "JPEG"))
    result = _cli(workdir, f"--config.dataset={fixed}", *_CLI_FLAGS, *strict, "--allow_changed_config")
    assert result.returncode == 2, result.stderr[-4000:]
    error = _one_error_line(result)
    bad = _bad_train_files(str(fixed)) | {os.path.join(fixed, "val", "a", "truncated.jpg")}
    assert any(repr(path) in error for path in bad) and "bad_images=skip" in error, error
    assert os.listdir(workdir / "checkpoints") == ["2"]
    with open(workdir / "results.json") as f:
        assert json.load(f) == results


def _one_error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-4000:]
    return errors[0]


def test_only_a_run_of_unreadable_files_stops_a_skip_run(damaged_folder):
    """Many bad files scattered over a batch are skipped; one example whose every try failed
    (it holds a blank fallback image) stops the run."""
    from skipnet_jax import train

    config = _config(damaged_folder, bad_images="skip")
    limit = pipeline.MAX_CONSECUTIVE_BAD_FILES
    scattered = [(f"/data/bad{i}.jpg",) for i in range(2 * limit)]
    train._report_bad_files(scattered, set(), config, "train step 0")
    run = tuple(f"/data/run{i}.jpg" for i in range(limit))
    with pytest.raises(train.BadImageError, match=f"{limit} unreadable image files in a row from '/data/run0.jpg'"):
        train._report_bad_files([run], set(), config, "train step 1")
