"""`layers.BatchNorm` in train mode against ``torch.nn.BatchNorm2d``.

PyTorch normalises with the biased batch variance but updates the running variance with
the unbiased one: ``running_var = (1 - m) * running_var + m * var * n / (n - 1)``, ``n``
the number of values per channel (batch * H * W), PyTorch momentum ``m = 0.1`` being
Flax momentum 0.9.  Both paths of the module are checked: its own NHWC train-mode path
and ``nn.BatchNorm``'s (one-pass variance, a mask, a named batch axis).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs it; a missing install must fail, not skip

from skipnet_jax.models import cpu_kernels
from skipnet_jax.models.layers import BatchNorm

N, H, W, C = 4, 5, 5, 3
TORCH_MOMENTUM = 0.1
EPS = 1e-5


def _inputs(step: int) -> np.ndarray:
    rng = np.random.default_rng(step)
    return (1.5 + 2.0 * rng.standard_normal((N, H, W, C))).astype(np.float32)


def _torch_bn() -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(C, eps=EPS, momentum=TORCH_MOMENTUM)
    rng = np.random.default_rng(10)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C).astype(np.float32)))
        bn.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.5, C).astype(np.float32)))
        bn.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 0.5, C).astype(np.float32)))
        bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C).astype(np.float32)))
    return bn.train()


def _flax_variables(bn: torch.nn.BatchNorm2d) -> dict:
    def f(t):
        return jnp.asarray(t.detach().numpy())

    return {
        "params": {"scale": f(bn.weight), "bias": f(bn.bias)},
        "batch_stats": {"mean": f(bn.running_mean), "var": f(bn.running_var)},
    }


def _torch_step(bn: torch.nn.BatchNorm2d, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = bn(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).numpy()


def _assert_matches(y, stats, bn, y_ref, step):
    # y: float32 round-off of |y| ~ 1 values (the one-pass variance adds ~1e-6).
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-6, atol=2e-6, err_msg=f"y, step {step}")
    np.testing.assert_allclose(
        stats["mean"], bn.running_mean.numpy(), rtol=1e-6, atol=1e-7, err_msg=f"running mean, step {step}"
    )
    np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-6, err_msg=f"running var, step {step}")


def _module(use_fast_variance: bool = False, **kwargs) -> BatchNorm:
    return BatchNorm(
        use_running_average=False,
        momentum=1.0 - TORCH_MOMENTUM,
        epsilon=EPS,
        use_fast_variance=use_fast_variance,
        force_float32_reductions=True,
        **kwargs,
    )


@pytest.mark.parametrize("path", ["fast", "flax_fast_variance", "flax_mask"])
def test_train_mode_matches_torch(path, monkeypatch):
    """Output and running statistics after one and two train-mode updates."""
    fast_calls = []
    fast = cpu_kernels.batch_norm_train
    monkeypatch.setattr(cpu_kernels, "batch_norm_train", lambda *args: fast_calls.append(1) or fast(*args))
    module = _module(use_fast_variance=path == "flax_fast_variance")
    kwargs = {"mask": jnp.ones((N, H, W, C), bool)} if path == "flax_mask" else {}
    bn = _torch_bn()
    variables = _flax_variables(bn)
    for step in (1, 2):
        x = _inputs(step)
        y, updates = module.apply(variables, jnp.asarray(x), mutable=["batch_stats"], **kwargs)
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        _assert_matches(y, jax.device_get(updates["batch_stats"]), bn, _torch_step(bn, x), step)
    assert bool(fast_calls) == (path == "fast")  # the path under test is the one taken


def test_masked_count_is_unmasked_elements():
    """With a mask, ``n`` is the number of unmasked values: PyTorch on those images alone."""
    keep = 3  # the last image is masked out
    mask = jnp.asarray(np.arange(N) < keep).reshape(N, 1, 1, 1)
    module = _module()
    bn = _torch_bn()
    variables = _flax_variables(bn)
    for step in (1, 2):
        x = _inputs(step)
        y, updates = module.apply(variables, jnp.asarray(x), mask=mask, mutable=["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        _assert_matches(y[:keep], jax.device_get(updates["batch_stats"]), bn, _torch_step(bn, x[:keep]), step)


def test_axis_name_counts_the_whole_batch():
    """Statistics over a named axis (2 shards of 2 images): ``n`` is the global count,
    as in PyTorch's SyncBatchNorm, which here equals BatchNorm2d on the whole batch."""
    module = _module(axis_name="shards")
    bn = _torch_bn()
    variables = _flax_variables(bn)

    def apply(variables, x):
        return module.apply(variables, x, mutable=["batch_stats"])

    sharded = jax.vmap(apply, in_axes=(None, 0), axis_name="shards")
    for step in (1, 2):
        x = _inputs(step)
        y, updates = sharded(variables, jnp.asarray(x).reshape(2, N // 2, H, W, C))
        stats = jax.tree.map(lambda s: np.asarray(s[0]), updates["batch_stats"])
        for s in jax.tree.leaves(updates["batch_stats"]):
            np.testing.assert_array_equal(s[0], s[1])  # every shard stores the same statistics
        variables = {"params": variables["params"], "batch_stats": stats}
        _assert_matches(np.asarray(y).reshape(N, H, W, C), stats, bn, _torch_step(bn, x), step)


def test_single_value_per_channel_keeps_a_finite_variance():
    """One value per channel has no unbiased variance (PyTorch refuses such a batch in
    train mode); the running variance then takes the biased batch variance, 0."""
    x = jnp.ones((1, 1, 1, C))
    variables = {
        "params": {"scale": jnp.ones(C), "bias": jnp.zeros(C)},
        "batch_stats": {"mean": jnp.zeros(C), "var": jnp.ones(C)},
    }
    for kwargs in ({}, {"mask": jnp.ones((1, 1, 1, C), bool)}):
        _, updates = _module().apply(variables, x, mutable=["batch_stats"], **kwargs)
        np.testing.assert_allclose(updates["batch_stats"]["var"], np.full(C, 0.9), rtol=1e-6)
