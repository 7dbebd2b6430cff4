"""The CIFAR-100 release-recipe configs: valid, the recipe's numbers, and a real run.

The release's schedule in steps: 50,000 / 128 with the incomplete batch dropped is 390 steps an
epoch, 160 epochs are 62,400 steps, the lr is 0.1 up to step 31,199, 0.01 from step 31,200
(epoch 80) and 0.001 from step 47,580 (epoch 122); weight decay applies to every parameter.

Each config trains 2 steps and evaluates the full (mock) test split through
`train.train_and_evaluate` on TFDS mock data (random 32x32x3 images, 100 classes).
"""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from skipnet_jax import config_validation, models, optim, train

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIGS = {
    "cifar100_resnet18": "resnet18_cifar",
    "cifar100_shufflenetv2": "shufflenet_v2_x0_5",
    "cifar100_densenet121": "densenet121_cifar",
}
CIFAR_TRAIN_EXAMPLES = 50_000
MOCK_EXAMPLES = 40  # per split; eval_batch_size 16 -> 3 batches, the last one padded


def load_config(stem: str):
    path = CONFIG_DIR / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_config_is_the_release_recipe(stem):
    config = load_config(stem)
    config_validation.validate_config(config, device_count=1, model_names=models.list_models())
    assert config.model == CONFIGS[stem]
    assert config.dataset == "cifar100" and config.image_size == 32
    assert config.optimizer == "sgd" and config.momentum == 0.9 and not config.nesterov
    assert config.weight_decay == 1e-4 and config.learning_rate == 0.1
    assert config.num_epochs == 160 and config.num_train_steps <= 0
    assert config.schedule == "step" and tuple(config.lr_step_epochs) == (80, 122)
    assert config.lr_step_factor == 0.1 and config.warmup_epochs == 0
    assert config.batch_size == 128
    assert config.loss == "bias" and config.bias_loss.mode == "global"
    assert (config.bias_loss.alpha, config.bias_loss.beta) == (0.3, 0.3)
    assert tuple(config.data.mean) == (0.507, 0.4865, 0.4409)
    assert tuple(config.data.std) == (0.2673, 0.2564, 0.2761)
    assert config.data.augment and config.dropout_rate == 0.0
    assert config.label_smoothing == 0.0 and config.ema_decay == 0.0


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_epoch_is_390_steps_as_in_the_release(stem):
    config = load_config(stem)
    assert optim.steps_for(config, CIFAR_TRAIN_EXAMPLES) == (390, 160 * 390)
    assert config.eval_every_steps == 10 * 390 and config.checkpoint_every_steps == 5 * 390


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_learning_rate_drops_where_the_release_drops_it(stem):
    config = load_config(stem)
    lr = optim.create_learning_rate_fn(config, *optim.steps_for(config, CIFAR_TRAIN_EXAMPLES))
    steps = [0, 80 * 390 - 1, 80 * 390, 122 * 390 - 1, 122 * 390, 160 * 390 - 1]
    np.testing.assert_allclose([float(lr(s)) for s in steps], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_weight_decay_applies_to_every_parameter(stem):
    config = load_config(stem)
    model = train.create_model(config, 100)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))["params"]
    mask = optim.weight_decay_mask(shapes, config.weight_decay_mask)
    assert all(jax.tree.leaves(mask)) and len(jax.tree.leaves(mask)) == len(jax.tree.leaves(shapes))
    # the decay term itself: with zero gradients and lr 1 every parameter moves by -1e-4 * itself
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    tx = optim.create_optimizer(config, lambda step: 1.0)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)]), -1e-4, rtol=1e-6)


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_config_trains_and_evaluates_on_mock_cifar100(stem, tmp_path):
    config = load_config(stem)
    config.num_train_steps = 2
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.data_dir = str(tmp_path / "tfds")
    workdir = str(tmp_path / "work")
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        results = train.train_and_evaluate(config, workdir)
    path = os.path.join(workdir, "results.json")
    assert os.path.exists(path)
    with open(path) as f:
        saved = json.load(f)
    assert saved["eval_examples"] == MOCK_EXAMPLES == results["eval_examples"]
    assert saved["steps"] == 2 and saved["model"] == CONFIGS[stem]
    assert saved["dataset"] == "cifar100" and saved["loss"] == "bias"
    assert 0.0 <= saved["eval_top1"] <= 1.0
