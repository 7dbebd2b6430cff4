"""Our JAX bias loss (skipnet_jax.losses) equals the release-formula PyTorch reference
(skipnet_jax.reference.torch_bias_loss.TorchBiasLoss) batch after batch, in both
normalisation modes, including the running minimum of the release's "global" mode.

The one intended difference: when every variance in a batch is equal the release divides
0 by 0 (NaN; +inf in global mode once an earlier batch had a smaller minimum), while ours
defines the normalised variance as 0, so every weight is z(0) = 1 - beta and the loss is
0.7 * mean cross-entropy (finite).  ``test_equal_variances_*`` pin that difference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs it; a missing install must fail, not skip

from skipnet_jax.losses import bias_loss, init_bias_loss_state
from skipnet_jax.reference.torch_bias_loss import TorchBiasLoss

N, H, W, C, K = 8, 7, 7, 16, 10
# Per-sample feature scales of 4 successive batches: batch 1 and batch 3 bring a new,
# lower minimum variance; batch 2 does not (its normalised values exceed 1 in global mode).
SCALES = [(1.0, 3.0), (0.5, 2.0), (1.2, 4.0), (0.2, 1.0)]
ATOL = 1e-5


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for lo, hi in SCALES:
        scale = rng.uniform(lo, hi, size=(N, 1, 1, 1)).astype(np.float32)
        features = (rng.normal(size=(N, H, W, C)) * scale + rng.normal(size=(N, 1, 1, 1))).astype(np.float32)
        logits = rng.normal(size=(N, K)).astype(np.float32) * 2
        labels = rng.integers(0, K, size=(N,)).astype(np.int32)
        out.append((features, logits, labels))
    return out


def _torch_step(ref, features, logits, labels):
    loss = ref(
        torch.from_numpy(features.transpose(0, 3, 1, 2).copy()),  # NHWC -> NCHW
        torch.from_numpy(logits),
        torch.from_numpy(labels).long(),
    )
    return (float(loss), ref.last_scaled.numpy(), ref.last_weights.numpy(), ref.last_variance.numpy())


@pytest.mark.parametrize("mode", ["global", "local"])
def test_matches_release_over_successive_batches(mode):
    ref = TorchBiasLoss(normalisation_mode=mode)
    step = jax.jit(functools.partial(bias_loss, mode=mode))
    state = init_bias_loss_state()
    running_mins, above_one = [], False
    for features, logits, labels in _batches():
        t_loss, t_scaled, t_weights, t_var = _torch_step(ref, features, logits, labels)
        loss, state, aux = step(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(features), state=state)
        np.testing.assert_allclose(aux["variance"], t_var, rtol=1e-5)
        np.testing.assert_allclose(float(loss), t_loss, rtol=0, atol=ATOL)
        np.testing.assert_allclose(aux["normalized_variance"], t_scaled, rtol=0, atol=ATOL)
        np.testing.assert_allclose(aux["weights"], t_weights, rtol=0, atol=ATOL)
        if mode == "global":
            assert float(state["running_min"]) == pytest.approx(float(ref.running_min), rel=1e-6)
            running_mins.append(float(state["running_min"]))
            above_one |= bool(np.max(t_scaled) > 1.0)
        else:
            assert float(np.min(t_scaled)) == 0.0 and float(np.max(t_scaled)) == pytest.approx(1.0)
    if mode == "global":
        # The data exercise the running minimum: it dropped at batches 1 and 3, not at 2,
        # and batch 2's normalised variances went above 1.
        assert running_mins[1] < running_mins[0] and running_mins[2] == running_mins[1]
        assert running_mins[3] < running_mins[2]
        assert above_one


def _equal_variance_batch(seed=1):
    rng = np.random.default_rng(seed)
    one = rng.normal(size=(1, H, W, C)).astype(np.float32)
    features = np.repeat(one, N, axis=0)  # identical samples: every variance is equal
    logits = rng.normal(size=(N, K)).astype(np.float32)
    labels = rng.integers(0, K, size=(N,)).astype(np.int32)
    return features, logits, labels


def _ce(logits, labels):
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    return -np.asarray(logp)[np.arange(len(labels)), labels]


@pytest.mark.parametrize("mode", ["global", "local"])
def test_equal_variances_release_nan_ours_finite(mode):
    """Documented difference: the release gives NaN, ours weights every sample 1 - beta."""
    features, logits, labels = _equal_variance_batch()
    t_loss, *_ = _torch_step(TorchBiasLoss(normalisation_mode=mode), features, logits, labels)
    assert np.isnan(t_loss)
    loss, _, aux = bias_loss(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(features), mode=mode, state=init_bias_loss_state()
    )
    np.testing.assert_allclose(aux["weights"], 0.7, atol=1e-6)
    np.testing.assert_allclose(float(loss), 0.7 * _ce(logits, labels).mean(), rtol=1e-5)


def test_equal_variances_after_lower_minimum_release_inf_ours_finite():
    """Global mode with an earlier, lower minimum: the release's numerator is > 0 and its
    denominator 0, so the loss is +inf; ours still weights every sample 1 - beta."""
    ref = TorchBiasLoss(normalisation_mode="global")
    features0, logits0, labels0 = _batches()[3]  # small variances: sets a low running minimum
    _torch_step(ref, features0, logits0, labels0)
    _, state, _ = bias_loss(
        jnp.asarray(logits0), jnp.asarray(labels0), jnp.asarray(features0), mode="global", state=init_bias_loss_state()
    )
    features, logits, labels = _equal_variance_batch()
    features = features * 3.0  # well above the running minimum
    t_loss, *_ = _torch_step(ref, features, logits, labels)
    assert np.isinf(t_loss)
    loss, new_state, aux = bias_loss(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(features), mode="global", state=state
    )
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(aux["weights"], 0.7, atol=1e-6)
    assert float(new_state["running_min"]) == pytest.approx(float(ref.running_min), rel=1e-6)
