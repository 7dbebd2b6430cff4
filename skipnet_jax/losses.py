"""Bias loss (Abrahamyan et al., ICCV 2021) and plain cross-entropy.

Bias loss re-weights each sample's cross-entropy by how *diverse* the sample's
last feature maps are:

    L = (1/N) * sum_i z(v_i) * CE(logits_i, y_i),     z(v) = exp(alpha * v) - beta

where v_i is the unbiased variance of all H*W*C values of sample i's last
convolutional output (before global pooling), min-max normalised over the
batch. Samples whose features carry little information (low variance, the
paper's "random predictions") get weights down to 1 - beta = 0.7, the most
diverse ones up to exp(alpha) - beta = 1.0499 (at the defaults).

Everything here is a pure function of arrays, so it can be jitted and, under
`jax.jit` with a batch sharded over a mesh, every reduction over the batch
(min, max, mean) is over the *global* batch, as the paper requires.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

BIAS_LOSS_MODES = ("local", "global")
# The paper's and the release's z(v) = exp(alpha * v) - beta: the one statement of these defaults
# (the config schema, the CIFAR recipes and the PyTorch reference read them from here).
DEFAULT_ALPHA = 0.3
DEFAULT_BETA = 0.3

# State of the "global" normalisation: the smallest variance seen so far.
# +inf before the first batch so the first batch's minimum replaces it (the
# release starts from a large constant to the same effect).
BiasLossState = dict[str, jax.Array]


def init_bias_loss_state() -> BiasLossState:
    """The running state of `bias_loss(mode="global")` before any batch."""
    return {"running_min": jnp.array(jnp.inf, dtype=jnp.float32)}


def bias_weight(normalized_variance: jax.Array, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> jax.Array:
    """z(v) = exp(alpha * v) - beta: 0.7 at v = 0, exp(0.3) - 0.3 at v = 1 (defaults)."""
    return jnp.exp(alpha * normalized_variance) - beta


def per_sample_variance(features: jax.Array) -> jax.Array:
    """Unbiased variance of each sample's H*W*C values, computed in float32.

    The variance is a statistic of the features, not something to optimise, so
    it is taken on a stop-gradient copy: no gradient flows through the weights.
    """
    flat = jax.lax.stop_gradient(features).reshape(features.shape[0], -1).astype(jnp.float32)
    if flat.shape[1] < 2:
        raise ValueError(f"bias loss needs at least 2 feature values per sample, got shape {features.shape}")
    return jnp.var(flat, axis=1, ddof=1)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0.

    The double `where` keeps both the value and any gradient finite.
    """
    degenerate = denominator <= 0
    return jnp.where(degenerate, 0.0, numerator / jnp.where(degenerate, 1.0, denominator))


def normalize_variance(
    variance: jax.Array, *, mode: str = "local", state: BiasLossState | None = None
) -> tuple[jax.Array, BiasLossState | None]:
    """Min-max scales per-sample variances as the release does.

    - "local": (v - min_batch) / (max_batch - min_batch), in [0, 1].
    - "global" (the release's default): (v - running_min) / (max_batch - min_batch),
      where running_min is the minimum over every batch seen so far *including
      this one*; values can exceed 1 once the running minimum is below this
      batch's minimum.

    When every variance in the batch is equal the range is 0; the release then
    divides by zero and yields NaN. Here the normalised variance is defined as
    0 for every sample, so every weight is z(0) = 1 - beta and the loss is a
    uniformly scaled cross-entropy (finite, with finite gradients).
    """
    batch_min = jnp.min(variance)
    batch_range = jnp.max(variance) - batch_min
    if mode == "local":
        return _safe_divide(variance - batch_min, batch_range), state
    if mode == "global":
        if state is None:
            state = init_bias_loss_state()
        running_min = jnp.minimum(state["running_min"], batch_min)
        normalized = _safe_divide(variance - running_min, batch_range)
        return normalized, {"running_min": running_min}
    raise ValueError(f"bias_loss.mode={mode!r} is not valid; valid choices: {', '.join(BIAS_LOSS_MODES)}")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-sample cross-entropy for integer labels (N,) or (smoothed) one-hot (N, K)."""
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if labels.ndim == logits.ndim - 1:
        return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if labels.shape != logits.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match logits of shape {logits.shape}")
    return -jnp.sum(labels.astype(jnp.float32) * log_probs, axis=-1)


def bias_loss(
    logits: jax.Array,
    labels: jax.Array,
    features: jax.Array,
    *,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    mode: str = "local",
    state: BiasLossState | None = None,
) -> tuple[jax.Array, BiasLossState | None, Mapping[str, Any]]:
    """Bias loss of a batch.

    Args:
      logits: (N, K) class scores.
      labels: (N,) integer labels or (N, K) one-hot / label-smoothed targets.
      features: (N, H, W, C) last convolutional output before global pooling
        (any shape with the batch first works; all non-batch values count).
      alpha, beta: z(v) = exp(alpha * v) - beta.
      mode: "local" (batch min-max) or "global" (release: running minimum in
        the numerator, batch range in the denominator).
      state: for mode="global", the running minimum from
        `init_bias_loss_state()` or the previous call; ignored for "local".

    Returns:
      (loss, new_state, aux): the scalar loss; the updated state (the input
      state, unchanged, for "local"); aux with per-sample `variance`,
      `normalized_variance`, `weights` and `cross_entropy`.
    """
    if mode not in BIAS_LOSS_MODES:
        raise ValueError(f"bias_loss.mode={mode!r} is not valid; valid choices: {', '.join(BIAS_LOSS_MODES)}")
    if features.shape[0] != logits.shape[0]:
        raise ValueError(f"features batch {features.shape[0]} != logits batch {logits.shape[0]}")
    variance = per_sample_variance(features)
    normalized, new_state = normalize_variance(variance, mode=mode, state=state)
    weights = bias_weight(normalized, alpha, beta)
    cross_entropy = softmax_cross_entropy(logits, labels)
    loss = jnp.mean(weights * cross_entropy)
    aux = {
        "variance": variance,
        "normalized_variance": normalized,
        "weights": weights,
        "cross_entropy": cross_entropy,
    }
    return loss, new_state, aux
