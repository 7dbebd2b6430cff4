"""Only training and `python -m skipnet_jax.data.prepare` write data: every reader of an
unprepared data_dir gets one line naming the dataset, the data_dir and how to prepare it,
and leaves the data_dir as it was."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, tiny_digits_config

from skipnet_jax.config_validation import ConfigError
from skipnet_jax.data import pipeline


def _readers(config):
    yield "get_dataset_info", lambda: pipeline.get_dataset_info(config)
    yield "num_eval_batches", lambda: pipeline.num_eval_batches(config)
    yield "create_train_iterator", lambda: pipeline.create_train_iterator(config)
    yield "create_eval_iterator", lambda: pipeline.create_eval_iterator(config)


def test_readers_of_an_unprepared_data_dir_prepare_nothing(tmp_path):
    data_dir = tmp_path / "tfds"
    config = tiny_digits_config(str(data_dir))
    for name, read in _readers(config):
        with pytest.raises(pipeline.DataNotFoundError) as excinfo:
            read()
        message = str(excinfo.value)
        assert "\n" not in message, name
        assert "config.dataset='digits' is not prepared" in message and repr(str(data_dir)) in message, name
        assert "python -m skipnet_jax.data.prepare" in message and "run training once" in message, name
    # The eval preprocessing is metadata: known without the data.
    assert pipeline.eval_preprocessing(config)[0] == "simple"
    assert not data_dir.exists()


def test_evaluate_on_an_unprepared_data_dir_is_one_error_and_prepares_nothing(tmp_path):
    from skipnet_jax import inference

    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "6").mkdir(parents=True)  # the data is looked at before the checkpoint is read
    data_dir = tmp_path / "tfds"
    with pytest.raises(ConfigError, match=r"config\.dataset='digits' is not prepared in data_dir") as excinfo:
        inference.load_model(str(workdir), tiny_digits_config(str(data_dir)))
    assert "\n" not in str(excinfo.value)
    assert not data_dir.exists()


def _prepare(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "skipnet_jax.data.prepare", *map(str, args)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_prepare_cli_prepares_digits_for_the_readers(tmp_path):
    data_dir = tmp_path / "tfds"
    result = _prepare("--config=configs/digits.py", f"--config.data_dir={data_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == (
        f"digits: 10 classes, 1437 train / 360 test examples; ready in data_dir {str(data_dir)!r}"
    )
    info = pipeline.get_dataset_info(tiny_digits_config(str(data_dir)))
    assert (info.num_train_examples, info.num_eval_examples) == (1437, 360)


def test_prepare_cli_errors_are_one_line(tmp_path):
    data_dir = tmp_path / "tfds"
    result = _prepare("--config=configs/imagenet_m.py", f"--config.data_dir={data_dir}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "ILSVRC2012_img_train.tar" in errors[0] and "downloads/manual" in errors[0]
    assert not (data_dir / "imagenet2012").exists()
