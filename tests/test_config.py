"""Config validation: every bad value is one ConfigError naming the key and what is valid."""

import json
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
        # z(v) = exp(alpha*v) - beta must be positive and finite in float32 for v in [0, 1]
        ({"bias_loss__beta": -1e308}, r"config\.bias_loss\.beta=-1e\+308 .*\(-3\.4\d*e\+38, 1\)"),
        ({"bias_loss__beta": -3.5e38}, r"config\.bias_loss\.beta=-3\.5e\+38 "),
        ({"bias_loss__beta": float("-inf")}, r"config\.bias_loss\.beta=-inf "),
        ({"bias_loss__alpha": 1e308}, r"config\.bias_loss\.alpha=1e\+308 .*\(0, 88\.72\d*\)"),
        ({"bias_loss__alpha": 89.0}, r"config\.bias_loss\.alpha=89\.0 "),
        ({"bias_loss__alpha": 0.0}, r"config\.bias_loss\.alpha=0\.0 "),
        ({"weight_decay_mask": "biases"}, r"config\.weight_decay_mask='biases' .*valid choices: kernels, all"),
        (
            {"data__preprocessing": "fancy"},
            r"config\.data\.preprocessing='fancy' .*valid choices: auto, simple, inception",
        ),
        ({"data__randaugment_num_layers": -1}, r"config\.data\.randaugment_num_layers=-1 .*integer >= 0"),
        ({"data__randaugment_magnitude": 11.0}, r"config\.data\.randaugment_magnitude=11\.0 .*\[0, 10\]"),
        ({"data__bad_images": "sometimes"}, r"config\.data\.bad_images='sometimes' .*valid choices: skip, error"),
        ({"data__manual_dir": ""}, r"config\.data\.manual_dir='' .*None or a directory path"),
    ],
)
def test_invalid_values(overrides, expected):
    with pytest.raises(cv.ConfigError, match=expected) as info:
        _validate(**overrides)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"bias_loss__alpha": 88.0, "bias_loss__beta": 0.99},
        {"bias_loss__alpha": 1e-6, "bias_loss__beta": -1e6},
        {"weight_decay_mask": "all", "data__drop_remainder": True},
    ],
)
def test_valid_edge_values(overrides):
    _validate(**overrides)


def _parse_like_the_cli(*args):
    """The config exactly as `--config FILE --config.KEY=VALUE ...` gives it to main (absl +
    ml_collections' config_flags, config locked; the overrides are read from the command line,
    which `app.run` leaves in sys.argv)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["main", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def test_imagenet_cadence_follows_a_batch_size_override():
    from skipnet_jax import optim, recipes

    for batch_size in (2048, 1024, 4096):
        config = _parse_like_the_cli("--config=configs/imagenet_m.py", f"--config.batch_size={batch_size}")
        steps_per_epoch, _ = optim.steps_for(config, recipes.NUM_TRAIN_EXAMPLES)
        assert steps_per_epoch == -(-recipes.NUM_TRAIN_EXAMPLES // batch_size)
        assert config.checkpoint_every_steps == 2 * steps_per_epoch
        assert config.eval_every_steps == 10 * steps_per_epoch
        assert config.learning_rate == pytest.approx(0.016 * batch_size / 256)
    config = _parse_like_the_cli(
        "--config=configs/imagenet_m.py", "--config.batch_size=1024", "--config.checkpoint_every_steps=100"
    )
    assert config.checkpoint_every_steps == 100 and config.eval_every_steps == 12_520


def test_cifar_cadence_follows_batch_size_and_drop_remainder():
    config = _parse_like_the_cli("--config=configs/cifar100_resnet18.py", "--config.batch_size=256")
    assert (config.eval_every_steps, config.checkpoint_every_steps) == (10 * 195, 5 * 195)
    config = _parse_like_the_cli("--config=configs/cifar100_resnet18.py", "--config.data.drop_remainder=False")
    assert (config.eval_every_steps, config.checkpoint_every_steps) == (10 * 391, 5 * 391)


def test_retired_keys_are_not_in_the_schema_and_are_named_as_retired():
    from skipnet_jax import default_config

    known = dict(cv._flat_items(get_default_config()))
    assert "data.shuffle_buffer" in default_config.RETIRED_KEYS
    assert not set(default_config.RETIRED_KEYS) & set(known)
    message = cv.describe_unknown_override(["--config.data.shuffle_buffer=10"])
    assert message.startswith("config key 'data.shuffle_buffer' (from --config.data.shuffle_buffer=10) is not a")
    config = get_default_config()
    config.data.shuffle_buffer = 10
    with pytest.raises(cv.ConfigError, match=r"config key 'data\.shuffle_buffer' is not a setting: .*permutation"):
        cv.validate_config(config, device_count=1, model_names=models.list_models())
    # a config.json of a run that still lists it does not differ from the same config without it
    saved = {"model": "skipnet_m", "data": {"augment": True, "shuffle_buffer": 10_000}}
    assert cv.config_differences(saved, {"model": "skipnet_m", "data": {"augment": True}}) == []


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


def test_config_differences_counts_a_missing_field_as_its_schema_default():
    wanted = json.loads(get_default_config().to_json_best_effort())
    saved = json.loads(get_default_config().to_json_best_effort())
    del saved["weight_decay_mask"], saved["data"]["drop_remainder"]  # config.json of an older run
    assert cv.config_differences(saved, wanted) == []
    wanted["data"]["drop_remainder"] = True
    assert cv.config_differences(saved, wanted) == ["data.drop_remainder: False vs True"]


def test_data_num_threads_is_a_setting_and_sizes_the_tf_data_pool():
    from skipnet_jax.data import tf_setup

    config = get_default_config()
    config.data.num_threads = 1  # what --config.data.num_threads=1 sets
    cv.validate_config(config, device_count=1, model_names=models.list_models())
    assert tf_setup.options(config).threading.private_threadpool_size == 1
    config.data.num_threads = 0  # automatic: half of this process's CPUs, 1..16
    cpus = len(os.sched_getaffinity(0))
    assert tf_setup.options(config).threading.private_threadpool_size == min(16, max(1, cpus // 2))
    config.data.num_threads = -1
    with pytest.raises(cv.ConfigError, match=r"config\.data\.num_threads=-1 .*integer >= 0"):
        cv.validate_config(config, device_count=1, model_names=models.list_models())


def test_config_json_of_an_earlier_version_is_read(tmp_path):
    """A run's config.json with a retired key and without a newer field still loads for evaluate."""
    from skipnet_jax import inference

    values = json.loads(get_default_config().to_json_best_effort())
    values["data"]["shuffle_buffer"] = 10_000
    del values["weight_decay_mask"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = inference.config_from_json(str(tmp_path / "config.json"))
    assert "shuffle_buffer" not in config.data and config.weight_decay_mask == "kernels"
