"""Schedules and optimisers built from the config."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from skipnet_jax import optim
from skipnet_jax.default_config import get_default_config


def _config(**overrides):
    config = get_default_config()
    config.update(overrides)
    return config


def test_steps_derived_from_epochs_or_given():
    assert optim.steps_for(_config(batch_size=64, num_epochs=2.0), 1437) == (23, 46)
    assert optim.steps_for(_config(batch_size=64, num_train_steps=7), 1437) == (23, 7)


def test_warmup_then_cosine():
    fn = optim.create_learning_rate_fn(_config(learning_rate=1.0, warmup_epochs=1.0, schedule="cosine"), 10, 110)
    assert float(fn(0)) == 0.0
    chex.assert_trees_all_close(fn(5), 0.5, atol=1e-6)
    chex.assert_trees_all_close(fn(10), 1.0, atol=1e-6)
    chex.assert_trees_all_close(fn(60), 0.5, atol=1e-6)  # half way through the 100 decay steps
    chex.assert_trees_all_close(fn(110), 0.0, atol=1e-6)


def test_exponential_staircase():
    fn = optim.create_learning_rate_fn(
        _config(learning_rate=0.1, schedule="exponential", lr_decay_rate=0.5, lr_decay_epochs=2.0), 10, 100
    )
    chex.assert_trees_all_close([fn(0), fn(19), fn(20), fn(45)], [0.1, 0.1, 0.05, 0.025], atol=1e-7)


def test_step_schedule_at_epochs():
    fn = optim.create_learning_rate_fn(
        _config(learning_rate=0.1, schedule="step", lr_step_epochs=(2, 4), lr_step_factor=0.1), 10, 60
    )
    chex.assert_trees_all_close([fn(19), fn(20), fn(39), fn(40)], [0.1, 0.01, 0.01, 0.001], rtol=1e-5)


def test_step_epochs_that_round_to_one_step_each_apply_their_factor():
    # 10 steps per epoch: epochs 2.0 and 2.04 are both step 20; 2 steps of warm-up.
    fn = optim.create_learning_rate_fn(
        _config(learning_rate=0.1, schedule="step", lr_step_epochs=(2.0, 2.04, 4), lr_step_factor=0.5,
                warmup_epochs=0.2),
        10, 60,
    )  # fmt: skip
    chex.assert_trees_all_close([fn(19), fn(20), fn(39), fn(40)], [0.1, 0.025, 0.025, 0.0125], rtol=1e-5)


def test_schedule_count_is_the_optimisers_own_step():
    params = {"w": jnp.ones(3)}
    for name in ("sgd", "rmsprop", "adamw"):
        tx = optim.create_optimizer(_config(optimizer=name, grad_clip_norm=1.0), optax.linear_schedule(0.0, 1.0, 10))
        opt_state = tx.init(params)
        for expected in range(3):
            assert int(optim.schedule_count(opt_state)) == expected, name
            _, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)


def test_weight_decay_mask_skips_batchnorm_and_biases():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 4, 8))},
        "bn": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
        "dense": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)},
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {
        "conv": {"kernel": True},
        "bn": {"scale": False, "bias": False},
        "dense": {"kernel": True, "bias": False},
    }


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adamw"])
def test_weight_decay_touches_only_kernels(name):
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.create_optimizer(_config(optimizer=name, weight_decay=0.1), lambda step: 1.0)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).sum()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).sum()) == 0


def test_rmsprop_is_tensorflow_style():
    # TF RMSProp: ms starts at 1, ms = 0.9 * 1 + 0.1 * g^2, step = lr * g / sqrt(ms + eps).
    g, lr, eps = 2.0, 0.01, 1e-3
    tx = optim.create_optimizer(
        _config(optimizer="rmsprop", momentum=0.0, rmsprop_decay=0.9, rmsprop_eps=eps, weight_decay=0.0),
        lambda step: lr,
    )
    params = jnp.zeros(1)
    updates, _ = tx.update(jnp.full(1, g), tx.init(params), params)
    expected = -lr * g / math.sqrt(0.9 + 0.1 * g * g + eps)
    np.testing.assert_allclose(np.asarray(updates), [expected], rtol=1e-6)


def test_drop_remainder_makes_an_epoch_the_whole_batches_only():
    config = _config(batch_size=64, num_epochs=2.0)
    config.data.drop_remainder = True
    assert optim.steps_for(config, 1437) == (22, 44)  # floor(1437 / 64) = 22
    config.batch_size = 2048
    with pytest.raises(ValueError, match=r"config\.data\.drop_remainder=True .*1437 .*batch_size=2048"):
        optim.steps_for(config, 1437)


def test_steps_per_epoch_follows_lazy_references():
    config = _config(batch_size=128)
    steps = optim.steps_per_epoch(50_000, config.get_ref("batch_size"), config.data.get_ref("drop_remainder"))
    assert steps.get() == 391
    config.data.drop_remainder = True
    assert steps.get() == 390
    config.batch_size = 100
    assert steps.get() == 500


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "step", "constant"])
def test_every_valid_schedule_builds(schedule):
    from skipnet_jax import config_validation

    assert schedule in config_validation.SCHEDULES
    fn = optim.create_learning_rate_fn(_config(schedule=schedule, warmup_epochs=1.0), 10, 200)
    assert float(fn(10)) == pytest.approx(0.1)


def test_valid_choices_are_the_implemented_ones():
    from skipnet_jax import config_validation, losses

    assert config_validation.SCHEDULES == tuple(optim.SCHEDULES)
    assert config_validation.OPTIMIZERS == tuple(optim.OPTIMIZERS) == ("sgd", "rmsprop", "adamw")
    assert config_validation.WEIGHT_DECAY_MASKS == tuple(optim.WEIGHT_DECAY_MASKS) == ("kernels", "all")
    assert config_validation.BIAS_LOSS_MODES == losses.BIAS_LOSS_MODES


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adamw"])
def test_weight_decay_mask_all_decays_every_parameter(name):
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "bn": {"scale": jnp.ones(2)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.create_optimizer(_config(optimizer=name, weight_decay=0.1, weight_decay_mask="all"), lambda step: 1.0)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert all(float(jnp.abs(u).min()) > 0 for u in jax.tree.leaves(updates))
