"""Bias loss against values worked out by hand."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipnet_jax import losses


def _features(values_per_sample):
    """(N, 1, 1, C) features from a list of per-sample value lists."""
    return jnp.asarray(values_per_sample, dtype=jnp.float32)[:, None, None, :]


# Three samples whose unbiased variances are easy by hand:
#   [0, 2] -> mean 1, ((-1)^2 + 1^2) / (2 - 1) = 2
#   [0, 4] -> 8,   [0, 6] -> 18.
# Batch min 2, max 18, range 16 -> normalised (0, 6/16 = 0.375, 1).
FEATURES = _features([[0.0, 2.0], [0.0, 4.0], [0.0, 6.0]])
# Logits chosen so the cross-entropies are logs of simple fractions:
#   [0, 0], label 0        -> p = 1/2 -> CE = ln 2
#   [ln 3, 0], label 0     -> p = 3/4 -> CE = ln(4/3)
#   [ln 3, 0], label 1     -> p = 1/4 -> CE = ln 4
LOGITS = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(3.0), 0.0]])
LABELS = jnp.array([0, 0, 1])
# z(0) = 0.7, z(0.375) = exp(0.1125) - 0.3 = 0.8190722569, z(1) = exp(0.3) - 0.3 = 1.0498588076
# loss = (0.7 ln 2 + 0.8190722569 ln(4/3) + 1.0498588076 ln 4) / 3 = 0.7254162586
EXPECTED_WEIGHTS = np.array([0.7, 0.8190722569127804, 1.0498588075760031])
EXPECTED_LOSS = 0.725416258554351


def test_bias_weight_endpoints():
    chex.assert_trees_all_close(losses.bias_weight(jnp.array(0.0)), 0.7, atol=1e-7)
    chex.assert_trees_all_close(losses.bias_weight(jnp.array(1.0)), math.exp(0.3) - 0.3, atol=1e-6)
    chex.assert_trees_all_close(losses.bias_weight(jnp.array(1.0), alpha=1.0, beta=0.5), math.e - 0.5, atol=1e-6)


def test_variance_is_unbiased_over_hwc():
    features = jax.random.normal(jax.random.key(0), (4, 3, 5, 7))
    expected = np.var(np.asarray(features).reshape(4, -1), axis=1, ddof=1)
    chex.assert_trees_all_close(losses.per_sample_variance(features), expected, rtol=1e-5)
    chex.assert_trees_all_close(losses.per_sample_variance(FEATURES), jnp.array([2.0, 8.0, 18.0]))


def test_three_sample_example_local():
    loss, state, aux = jax.jit(losses.bias_loss)(LOGITS, LABELS, FEATURES)
    assert state is None
    chex.assert_trees_all_close(aux["variance"], jnp.array([2.0, 8.0, 18.0]), atol=1e-6)
    chex.assert_trees_all_close(aux["normalized_variance"], jnp.array([0.0, 0.375, 1.0]), atol=1e-6)
    chex.assert_trees_all_close(aux["weights"], EXPECTED_WEIGHTS, atol=1e-6)
    chex.assert_trees_all_close(aux["cross_entropy"], jnp.log(jnp.array([2.0, 4 / 3, 4.0])), atol=1e-6)
    chex.assert_trees_all_close(loss, EXPECTED_LOSS, atol=1e-6)
    chex.assert_shape(loss, ())


def test_one_hot_and_integer_labels_agree():
    one_hot = jax.nn.one_hot(LABELS, 2)
    loss_int, _, _ = losses.bias_loss(LOGITS, LABELS, FEATURES)
    loss_hot, _, _ = losses.bias_loss(LOGITS, one_hot, FEATURES)
    chex.assert_trees_all_close(loss_int, loss_hot, atol=1e-7)


def test_smoothed_labels():
    # Label smoothing 0.2 on 2 classes: targets (0.9, 0.1) for class 0.
    targets = jnp.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    _, _, aux = losses.bias_loss(LOGITS, targets, FEATURES)
    log_p = np.log(np.array([[0.5, 0.5], [0.75, 0.25], [0.75, 0.25]]))
    expected_ce = -(np.asarray(targets) * log_p).sum(axis=1)
    chex.assert_trees_all_close(aux["cross_entropy"], expected_ce, atol=1e-6)


def test_global_mode_uses_running_minimum():
    step = jax.jit(lambda f, s: losses.bias_loss(LOGITS, LABELS, f, mode="global", state=s))
    state = losses.init_bias_loss_state()
    _, state, aux = step(FEATURES, state)
    # First batch: running min = batch min, identical to local mode.
    chex.assert_trees_all_close(aux["normalized_variance"], jnp.array([0.0, 0.375, 1.0]), atol=1e-6)
    chex.assert_trees_all_close(state["running_min"], 2.0)
    # Second batch variances (8, 18, 32): running min stays 2, range is 32 - 8 = 24
    # -> ((8-2)/24, (18-2)/24, (32-2)/24) = (0.25, 0.6667, 1.25).
    second = _features([[0.0, 4.0], [0.0, 6.0], [0.0, 8.0]])
    _, state, aux = step(second, state)
    chex.assert_trees_all_close(aux["normalized_variance"], jnp.array([0.25, 2 / 3, 1.25]), atol=1e-6)
    chex.assert_trees_all_close(state["running_min"], 2.0)
    # Third batch with a new minimum 0.5 ([0, 1]): the running min drops to it.
    third = _features([[0.0, 1.0], [0.0, 2.0], [0.0, 4.0]])
    _, state, aux = step(third, state)
    chex.assert_trees_all_close(state["running_min"], 0.5)
    chex.assert_trees_all_close(aux["normalized_variance"], jnp.array([0.0, 1.5 / 7.5, 1.0]), atol=1e-6)


def test_equal_variances_are_finite():
    features = _features([[1.0, 3.0], [5.0, 7.0], [-1.0, 1.0]])  # all variance 2
    for mode in losses.BIAS_LOSS_MODES:
        loss_fn = lambda logits, mode=mode: losses.bias_loss(logits, LABELS, features, mode=mode)[0]  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(LOGITS)
        chex.assert_tree_all_finite((loss, grads))
        _, _, aux = losses.bias_loss(LOGITS, LABELS, features, mode=mode)
        chex.assert_trees_all_close(aux["weights"], jnp.full((3,), 0.7), atol=1e-6)


def test_no_gradient_through_variance():
    def loss_of_features(features):
        return losses.bias_loss(LOGITS, LABELS, features)[0]

    grads = jax.grad(loss_of_features)(FEATURES)
    chex.assert_trees_all_equal(grads, jnp.zeros_like(FEATURES))


def test_bf16_features_give_float32_statistics():
    _, _, aux = losses.bias_loss(LOGITS, LABELS, FEATURES.astype(jnp.bfloat16))
    chex.assert_type(aux["variance"], jnp.float32)
    chex.assert_trees_all_close(aux["weights"], EXPECTED_WEIGHTS, atol=1e-6)


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="valid choices: local, global"):
        losses.bias_loss(LOGITS, LABELS, FEATURES, mode="batch")
