"""CPU-specific formulations (skipnet_jax/models/cpu_kernels.py) equal the plain ones.

* `Conv(impl="dot")` (1x1 convolutions as one matrix product; k x k via im2col) vs
  `Conv(impl="lax")` (`lax.conv_general_dilated`);
* `BatchNorm` (train mode: closed-form statistics and VJP, `cpu_kernels.batch_norm_train`,
  and its one-pass form for accelerators, `cpu_kernels.batch_norm_train_one_pass`) vs
  `flax.linen.BatchNorm`;
values and gradients (input and parameters), stride 1 and 2, odd sizes; the running
statistics too.  (The depthwise "shift" kernel with its hand-written VJP is compared
with lax's grouped convolution in tests/test_models.py::test_depthwise_shift_matches_lax.)
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipnet_jax.models import cpu_kernels
from skipnet_jax.models import layers as L


def _value_and_grads(module, variables, x, **kwargs):
    def loss(params, x):
        y = module.apply({**variables, "params": params}, x, **kwargs)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(jnp.sin(y) * jnp.linspace(0.5, 1.5, y.size).reshape(y.shape)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
    return y, grads


@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(7, 7), (8, 6), (9, 5)])
def test_conv_dot_matches_lax(kernel_size, stride, hw):
    x = jax.random.normal(jax.random.key(0), (2, *hw, 6))
    convs = {impl: L.Conv(10, kernel_size, stride, impl=impl) for impl in ("lax", "dot")}
    variables = convs["lax"].init(jax.random.key(1), x)
    (y_lax, g_lax), (y_dot, g_dot) = (_value_and_grads(convs[i], variables, x) for i in ("lax", "dot"))
    expected_hw = tuple(-(-n // stride) for n in hw)  # PyTorch padding (k-1)//2
    assert y_lax.shape == y_dot.shape == (2, *expected_hw, 10)
    np.testing.assert_allclose(y_dot, y_lax, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_dot, g_lax, rtol=1e-5, atol=1e-5)


def test_conv_params_equal_flax_conv_and_auto_impl():
    """Same parameter tree as nn.Conv(use_bias=False) (the converter relies on it)."""
    x = jnp.ones((1, 5, 5, 4))
    ours = L.Conv(8, 3).init(jax.random.key(0), x)
    flax_conv = nn.Conv(8, (3, 3), use_bias=False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, flax_conv)
    expected = "dot" if jax.default_backend() == "cpu" else "lax"
    resolve = cpu_kernels.resolve_impl
    assert resolve("conv", "auto", (1, 1)) == expected and resolve("conv", "auto", (3, 3)) == "lax"
    with pytest.raises(ValueError, match="valid choices: auto, lax, dot"):
        resolve("conv", "fft", (1, 1))
    # The same resolver decides the depthwise and BatchNorm kernels.
    assert resolve("depthwise") == ("shift" if jax.default_backend() == "cpu" else "lax")
    assert resolve("batch_norm") == "fused" and resolve("batch_norm", "flax") == "flax"
    with pytest.raises(ValueError, match="Unknown depthwise impl 'nope'; valid choices: auto, lax, shift"):
        resolve("depthwise", "nope")


@pytest.mark.parametrize("impl", ["fused", "one_pass"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(4, 7, 5, 6), (2, 3, 3, 16)])
def test_batch_norm_train_matches_flax(shape, dtype, impl):
    x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)).astype(dtype)
    # Two-pass variance: the configuration of the fast path (nn.BatchNorm defaults to one-pass).
    kwargs = dict(use_running_average=False, momentum=0.9, epsilon=1e-3, dtype=dtype, use_fast_variance=False)
    ours, reference = L.BatchNorm(impl=impl, **kwargs), nn.BatchNorm(**kwargs)
    variables = reference.init(jax.random.key(1), x)
    params = {
        "scale": 1.0 + 0.3 * jax.random.normal(jax.random.key(2), (shape[-1],)),
        "bias": 0.2 * jax.random.normal(jax.random.key(3), (shape[-1],)),
    }
    variables = {**variables, "params": params}
    results = {}
    for name, module in (("ours", ours), ("flax", reference)):
        (y, grads) = _value_and_grads(module, variables, x, mutable=["batch_stats"])
        _, updated = jax.jit(lambda v, x, m=module: m.apply(v, x, mutable=["batch_stats"]))(variables, x)
        results[name] = (y, grads, updated["batch_stats"])
    (y, grads, stats), (y_ref, grads_ref, stats_ref) = results["ours"], results["flax"]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert y.dtype == y_ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol)
    # Gradients within tol of each leaf's largest entry: the closed-form scale gradient
    # rstd * (sum g*x - mean * sum g) cancels digits when |mean| > std (here ~3e-6 of the
    # largest entry in float32, about 6x the round-off of flax's autodiff).
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
        np.testing.assert_allclose(g, g_ref, rtol=tol, atol=tol * max(1.0, np.abs(g_ref).max()))
    # nn.BatchNorm stores 0.9 * old + 0.1 * biased batch variance; `L.BatchNorm` stores
    # PyTorch's unbiased one: the batch term scaled by n / (n - 1), n = N * H * W.
    n = shape[0] * shape[1] * shape[2]
    kept = 0.9 * variables["batch_stats"]["var"]
    stats_ref = {**stats_ref, "var": kept + (stats_ref["var"] - kept) * n / (n - 1)}
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)


def test_resolve_batch_norm_follows_the_target_platform():
    """Two-pass statistics on CPU, one pass (`batch_norm_train_one_pass`) on accelerators."""
    for platform, expected in (("cpu", "fused"), ("tpu", "one_pass"), ("gpu", "one_pass")):
        with cpu_kernels.target_platform(platform):
            assert cpu_kernels.resolve_impl("batch_norm") == expected
            assert cpu_kernels.resolve_impl("batch_norm", "fused") == "fused"
    with pytest.raises(ValueError, match="valid choices: auto, flax, fused, one_pass"):
        cpu_kernels.resolve_impl("batch_norm", "two_pass")


def test_batch_norm_layer_runs_one_pass_for_a_tpu_and_uses_its_running_mean(monkeypatch):
    """Traced for a TPU, the layer's train mode calls the one-pass kernel with its running
    mean as the shift; outputs and updated statistics equal the CPU (two-pass) path's."""
    shifts = []
    one_pass = cpu_kernels.batch_norm_train_one_pass
    monkeypatch.setattr(cpu_kernels, "batch_norm_train_one_pass", lambda *a: shifts.append(a[3]) or one_pass(*a))
    x = 2.0 + jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    module = L.batch_norm(True)
    variables = module.init(jax.random.key(1), x)
    variables = {**variables, "batch_stats": {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.ones(3)}}
    y, stats = module.apply(variables, x, mutable=["batch_stats"])
    with cpu_kernels.target_platform("tpu"):
        y_tpu, stats_tpu = module.apply(variables, x, mutable=["batch_stats"])
    assert len(shifts) == 1
    np.testing.assert_array_equal(shifts[0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(y_tpu, y, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats_tpu, stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1.0, -10.0, np.inf, np.nan])
def test_batch_norm_one_pass_equals_two_pass_for_any_shift(offset):
    """The statistics, output and gradients of the one-pass kernel do not depend on its
    shift (the batch mean plus `offset` batch standard deviations; non-finite: none) beyond
    float32 round-off, and equal the two-pass kernel's; the shift's gradient is zero."""
    shape = (4, 6, 5, 8)
    x = 50.0 + 3.0 * jax.random.normal(jax.random.key(0), shape)  # |mean| >> std: cancellation-prone
    scale = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (8,))
    bias = 0.2 * jax.random.normal(jax.random.key(2), (8,))
    shift = jnp.mean(x, axis=(0, 1, 2)) + offset * jnp.std(x, axis=(0, 1, 2))
    weights = jnp.linspace(0.5, 1.5, x.size).reshape(shape)

    def loss(kernel, x, scale, bias, *shift):
        y, mean, var = kernel(x, scale, bias, *shift, 1e-5)
        return jnp.sum(jnp.sin(y) * weights) + jnp.sum(mean) + jnp.sum(var), (y, mean, var)

    argnums = (0, 1, 2, 3)
    one = jax.jit(jax.value_and_grad(lambda *a: loss(cpu_kernels.batch_norm_train_one_pass, *a), argnums, True))
    two = jax.jit(jax.value_and_grad(lambda *a: loss(cpu_kernels.batch_norm_train, *a), argnums[:3], True))
    (_, outputs), grads = one(x, scale, bias, shift)
    (_, outputs_ref), grads_ref = two(x, scale, bias)
    # Relative to the variance (9): float32 round-off of sums of squares of values near 50
    # (the plain one-pass sums, shift 0) is about 1e-7 * (50 / 3)^2 of it.
    tol = 1e-4 if offset in (0.0, 1.0) else 1e-3
    for got, want in zip(outputs, outputs_ref):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    for got, want in zip(grads[:3], grads_ref):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))
    np.testing.assert_array_equal(grads[3], np.zeros(8))


def test_batch_norm_eval_and_init_are_flax():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    ours, reference = L.BatchNorm(use_running_average=True), nn.BatchNorm(use_running_average=True)
    variables = reference.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    stats = {"mean": jnp.arange(3.0), "var": jnp.array([0.5, 1.0, 2.0])}
    variables = {**variables, "batch_stats": stats}
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), rtol=1e-6, atol=1e-6)
