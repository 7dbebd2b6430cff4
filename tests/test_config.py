"""Config validation: every bad value is one ConfigError naming the key and what is valid."""

import os

import pytest

from skipnet_jax import config_validation as cv
from skipnet_jax import models
from skipnet_jax.default_config import get_default_config


def _validate(device_count=1, **overrides):
    config = get_default_config()
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            target = target[part]
        target[leaf] = value
    cv.validate_config(config, device_count=device_count, model_names=models.list_models())


def test_defaults_and_shipped_configs_are_valid():
    _validate()
    import importlib.util
    import pathlib

    for path in sorted(pathlib.Path(__file__).parent.parent.joinpath("configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cv.validate_config(module.get_config(), device_count=1, model_names=models.list_models())


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"model": "resnet9000"}, r"config\.model='resnet9000' is not valid; valid choices: .*skipnet_m"),
        ({"optimizer": "lion"}, r"config\.optimizer='lion' .*valid choices: sgd, rmsprop, adamw"),
        ({"loss": "focal"}, r"config\.loss='focal' .*valid choices: bias, ce"),
        ({"schedule": "linear"}, r"config\.schedule='linear' .*valid choices: cosine"),
        ({"dtype": "float16"}, r"config\.dtype='float16' .*valid choices: float32, bfloat16"),
        ({"bias_loss__mode": "batch"}, r"config\.bias_loss\.mode='batch' .*valid choices: local, global"),
        ({"image_size": 0}, r"config\.image_size=0 .*>= 32"),
        ({"image_size": 16}, r"config\.image_size=16 "),
        ({"batch_size": 0}, r"config\.batch_size=0 .*positive integer"),
        ({"batch_size": -8}, r"config\.batch_size=-8 "),
        ({"eval_batch_size": 0}, r"config\.eval_batch_size=0 "),
        ({"learning_rate": 0.0}, r"config\.learning_rate=0\.0 .*positive"),
        ({"learning_rate": float("nan")}, r"config\.learning_rate=nan "),
        ({"num_epochs": 0.0}, r"config\.num_epochs=0\.0 .*> 0"),
        ({"label_smoothing": 1.0}, r"config\.label_smoothing=1\.0 .*\[0, 1\)"),
        ({"ema_decay": 1.5}, r"config\.ema_decay=1\.5 "),
        ({"bias_loss__beta": 1.0}, r"config\.bias_loss\.beta=1\.0 .*positive"),
        ({"checkpoint_every_steps": 0}, r"config\.checkpoint_every_steps=0 "),
        ({"num_classes": 1}, r"config\.num_classes=1 "),
        ({"lr_step_epochs": (122, 80)}, r"config\.lr_step_epochs=\(122, 80\) .*increasing"),
        ({"schedule": "step", "lr_step_epochs": ()}, r"config\.lr_step_epochs=\(\) .*non-empty"),
        (
            {"schedule": "step", "warmup_epochs": 5.0, "lr_step_epochs": (5, 80)},
            r"config\.lr_step_epochs=\(5, 80\) .*after warmup_epochs \(5\.0\)",
        ),
        ({"data__mean": (0.5, 0.5)}, r"config\.data\.mean=\(0\.5, 0\.5\) .*three numbers"),
        ({"data__std": (0.5, 0.0, 0.5)}, r"config\.data\.std=.*positive"),
        ({"dataset": ""}, r"config\.dataset='' "),
    ],
)
def test_invalid_values(overrides, expected):
    with pytest.raises(cv.ConfigError, match=expected) as info:
        _validate(**overrides)
    assert "\n" not in str(info.value)


def test_batch_not_divisible_by_devices():
    with pytest.raises(cv.ConfigError, match=r"config\.batch_size=12 .*divisible by the number of devices \(8\)"):
        _validate(device_count=8, batch_size=12)
    _validate(device_count=8, batch_size=16, eval_batch_size=64)


def test_unknown_key_is_named():
    config = get_default_config()
    config.unlock()
    config.learning_rat = 0.1
    with pytest.raises(cv.ConfigError, match="config key 'learning_rat' is unknown"):
        cv.validate_config(config, device_count=1, model_names=models.list_models())


def test_num_classes_must_match_dataset():
    config = get_default_config()
    assert cv.check_num_classes(config, 10) == 10
    config.num_classes = 100
    with pytest.raises(cv.ConfigError, match=r"config\.num_classes=100 does not match dataset 'digits', which has 10"):
        cv.check_num_classes(config, 10)


def test_workdir_checks(tmp_path):
    cv.check_workdir_writable(str(tmp_path / "new" / "dir"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(cv.ConfigError, match="is not a directory"):
        cv.check_workdir_writable(str(blocker / "sub"))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://b/r", "file:///tmp/x"])
def test_url_workdir_is_refused(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cv.ConfigError, match=r"--workdir='.*' is a URL; only local or mounted directories"):
        cv.check_workdir_writable(url)
    assert list(tmp_path.iterdir()) == []


def test_config_differences_lists_every_changed_field():
    saved = {"model": "skipnet_m", "data": {"augment": True, "cache": False}}
    wanted = {"model": "skipnet_s", "data": {"augment": True, "cache": True}, "new": 1}
    assert cv.config_differences(saved, wanted) == [
        "data.cache: False vs True",
        "model: 'skipnet_m' vs 'skipnet_s'",
        "new: None vs 1",
    ]
    assert cv.config_differences(saved, saved) == []


def test_data_num_threads_is_a_setting_and_sizes_the_tf_data_pool():
    from skipnet_jax.data import pipeline

    config = get_default_config()
    config.data.num_threads = 1  # what --config.data.num_threads=1 sets
    cv.validate_config(config, device_count=1, model_names=models.list_models())
    assert pipeline._options(config).threading.private_threadpool_size == 1
    config.data.num_threads = 0  # automatic: half of this process's CPUs, 1..16
    cpus = len(os.sched_getaffinity(0))
    assert pipeline._options(config).threading.private_threadpool_size == min(16, max(1, cpus // 2))
    config.data.num_threads = -1
    with pytest.raises(cv.ConfigError, match=r"config\.data\.num_threads=-1 .*integer >= 0"):
        cv.validate_config(config, device_count=1, model_names=models.list_models())
