"""Tests for skipnet_jax.models (registry, layers, SkipNet)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from skipnet_jax.models import create_model, list_models, register_model, torch_compat
from skipnet_jax.models import layers as L
from skipnet_jax.models import skipnet as S
from skipnet_jax.models import skipnet_torch_keys as K

# Reference list of the SkipNet-M state_dict keys and shapes of the authors' released checkpoint.
_JSON_NAME = "skipnet_m_torch_state_dict.json"
_JSON_CANDIDATES = [
    *([Path(os.environ["SKIPNET_REFERENCE_DIR"]) / _JSON_NAME] if os.environ.get("SKIPNET_REFERENCE_DIR") else []),
    Path(__file__).parent / "fixtures" / _JSON_NAME,
    Path(__file__).resolve().parents[1] / "shared" / "reference" / _JSON_NAME,
    Path("/work/shared/reference") / _JSON_NAME,
]


def _load_state_dict_shapes() -> dict[str, list[int]]:
    for p in _JSON_CANDIDATES:
        if p.exists():
            return json.loads(p.read_text())
    pytest.skip(f"{_JSON_NAME} not found")


EXPECTED_PARAMS = {
    "skipnet_xs": 2_332_584,
    "skipnet_s": 3_587_416,
    "skipnet_m": 5_532_352,
    "skipnet_l": 7_127_384,
}
AUX_KEYS = {
    "stem",
    "base",
    "skip1",
    "skip2",
    "stage1",
    "stage2",
    "stage3",
    "stage4",
    "features",
    "embedding",
    "pre_logits",
}


# --------------------------------------------------------------------------- helpers


def _init_shapes(model, h=224, w=224):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3), jnp.float32), train=False))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _down(n: int) -> int:
    """Output size of a PyTorch conv k3/p1 or k5/p2 with stride 2."""
    return (n - 1) // 2 + 1


def _expected_spatial(h: int, w: int) -> dict[str, tuple[int, int]]:
    stem = (_down(h), _down(w))
    s1 = (_down(_down(stem[0])), _down(_down(stem[1])))
    s2 = (_down(s1[0]), _down(s1[1]))
    s4 = (_down(s2[0]), _down(s2[1]))
    return dict(stem=stem, base=stem, stage1=s1, skip1=s1, stage2=s2, skip2=s2, stage3=s2, stage4=s4, features=s4)


def _check_aux_shapes(aux, n, h, w, widths):
    assert set(AUX_KEYS) <= set(aux)
    sp = _expected_spatial(h, w)
    chans = dict(
        stem=widths["stem"],
        base=widths["stem"],
        stage1=widths["stages"][0][-1]["out"],
        skip1=widths["skip1"]["out"],
        stage2=widths["stages"][1][-1]["out"],
        skip2=widths["skip2"]["out"],
        stage3=widths["stages"][2][-1]["out"],
        stage4=widths["stages"][3][-1]["out"],
        features=widths["head"],
    )
    for k, hw in sp.items():
        assert aux[k].shape == (n, *hw, chans[k]), (k, aux[k].shape)
    assert aux["embedding"].shape == (n, widths["head"])
    assert aux["pre_logits"].shape == (n, widths["classifier_hidden"])


def _np_adaptive_avg_pool(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    n, h, w, c = x.shape
    out = np.zeros((n, oh, ow, c), np.float64)
    for i in range(oh):
        h0, h1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
        for j in range(ow):
            w0, w1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
            out[:, i, j] = x[:, h0:h1, w0:w1].astype(np.float64).mean(axis=(1, 2))
    return out


@pytest.fixture(scope="module")
def xs_model():
    return create_model("skipnet_xs", num_classes=10)


def _random_variables(shapes, seed=0):
    """Random variables with the given shapes, built with numpy (a jitted Flax init of the
    whole network takes ~20 s to compile on CPU).  Conv kernels follow the release init,
    Dense kernels are N(0, 1/in) so logits are O(1), BN scale/bias/stats are non-trivial."""
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        shape, last = leaf.shape, names[-1]
        if last == "kernel" and len(shape) == 4:
            a = rng.normal(size=shape) * math.sqrt(2.0 / (shape[0] * shape[1] * shape[3]))
        elif last == "kernel":
            a = rng.normal(size=shape) / math.sqrt(shape[0])
        elif last in ("scale", "var"):
            a = rng.uniform(0.5, 1.5, size=shape)
        else:  # bias, mean
            a = 0.1 * rng.normal(size=shape)
        return jnp.asarray(a, leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def xs_train_fwd(xs_model):
    return jax.jit(lambda v, x, key: xs_model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]))


TRAIN_BATCH = (8, 64, 64, 3)


@pytest.fixture(scope="module")
def xs_vars(xs_model, xs_train_fwd):
    """Random SkipNet-XS variables whose BN running statistics are calibrated on a batch,
    so eval-mode activations stay normalised and the logits depend on the input.

    Train-mode batch statistics do not depend on the running statistics, so one train
    step gives them exactly: batch = (new - 0.9 * old) / 0.1.
    """
    v = _random_variables(_init_shapes(xs_model, 32, 32))
    x = jax.random.normal(jax.random.key(99), TRAIN_BATCH)
    _, upd = xs_train_fwd(v, x, jax.random.key(0))
    stats = jax.tree_util.tree_map(lambda new, old: (new - 0.9 * old) / 0.1, upd["batch_stats"], v["batch_stats"])
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.maximum(a, 1e-3) if getattr(path[-1], "key", "") == "var" else a, stats
    )
    return {**v, "batch_stats": stats}


@pytest.fixture(scope="module")
def xs_apply(xs_model):
    return jax.jit(lambda v, x: xs_model.apply(v, x, train=False))


# --------------------------------------------------------------------------- helpers / layers


def test_make_divisible_examples():
    assert L.make_divisible(8) == 8
    assert L.make_divisible(16 * 0.5) == 8
    assert L.make_divisible(16 * 0.75) == 16
    assert L.make_divisible(16 * 1.15) == 24  # 16 < 0.9 * 18.4 -> bumped
    assert L.make_divisible(16 * 6) == 96
    assert L.make_divisible(16 * 2.3) == 40
    assert L.make_divisible(72 / 4) == 24  # SE squeeze of 72
    assert L.make_divisible(120 / 4) == 32
    assert L.make_divisible(80 * 2.3) == 184
    assert L.make_divisible(1280 * 1.15) == 1472
    assert L.make_divisible(3) == 8
    assert L.make_divisible(90) == 88
    assert L.make_divisible(100) == 104
    assert L.make_divisible(10, divisor=4) == 12
    assert L.make_divisible(2, min_value=16) == 16


def test_hard_activations():
    x = jnp.array([-4.0, -3.0, -1.5, 0.0, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(L.hard_sigmoid(x), np.clip(np.asarray(x) + 3, 0, 6) / 6)
    np.testing.assert_allclose(L.hard_swish(x), np.asarray(x) * np.clip(np.asarray(x) + 3, 0, 6) / 6)
    assert L.get_activation("hswish") is L.hard_swish
    with pytest.raises(ValueError, match="Unknown activation 'gelu2'"):
        L.get_activation("gelu2")


@pytest.mark.parametrize(
    "hw,out",
    [
        ((7, 7), (3, 3)),
        ((10, 10), (4, 4)),
        ((112, 112), (28, 28)),
        ((13, 10), (4, 3)),
        ((8, 12), (4, 5)),
        ((3, 5), (5, 2)),
        ((6, 6), (1, 1)),
    ],
)
def test_adaptive_avg_pool_matches_torch_bins(hw, out):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    got = jax.jit(torch_compat.adaptive_avg_pool, static_argnums=1)(jnp.asarray(x), out)
    assert got.shape == (2, *out, 3)
    np.testing.assert_allclose(np.asarray(got), _np_adaptive_avg_pool(x, *out), rtol=1e-5, atol=1e-6)


def test_adaptive_avg_pool_bf16_keeps_dtype():
    x = jnp.ones((1, 10, 10, 2), jnp.bfloat16)
    for out in (5, 3):
        y = torch_compat.adaptive_avg_pool(x, out)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), 1.0)


def test_adaptive_avg_pool_bf16_rounds_once():
    """Divisible sizes: the window means are float32 sums of the bf16 values, rounded to
    bf16 once (within half a bf16 ulp of the exact means)."""
    x = jax.random.normal(jax.random.key(0), (2, 112, 112, 4)).astype(jnp.bfloat16)
    exact = _np_adaptive_avg_pool(np.asarray(x, np.float32), 28, 14)
    got = np.asarray(torch_compat.adaptive_avg_pool(x, (28, 14)), np.float32)
    np.testing.assert_allclose(got, exact, rtol=2.0**-8 * 1.01, atol=1e-6)


def test_conv_padding_is_torch_style_not_same():
    """Stride-2 3x3 conv on an even size pads (1, 1), not TF 'SAME' (0, 1)."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
    m = L.ConvBN(4, 3, 2)
    v = jax.jit(m.init)(jax.random.key(1), x)
    y = jax.jit(m.apply)(v, x)
    k = v["params"]["conv"]["kernel"]
    dn = ("NHWC", "HWIO", "NHWC")
    ref = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    same = jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=dn)
    bn_scale = 1.0 / math.sqrt(1.0 + 1e-5)  # fresh BN stats: mean 0, var 1
    np.testing.assert_allclose(y, ref * bn_scale, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(y - same * bn_scale).max()) > 1e-2
    assert y.shape == (1, 4, 4, 4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (9, 6)])
def test_depthwise_shift_matches_lax(stride, k, hw):
    c = 5
    x = jax.random.normal(jax.random.key(0), (2, *hw, c))
    mods = {impl: L.DepthwiseConv(k, stride, impl=impl) for impl in ("lax", "shift")}
    v = jax.eval_shape(mods["lax"].init, jax.random.key(1), x)
    assert v["params"]["kernel"].shape == (k, k, 1, c)
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, c))
    out_hw = ((hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1)
    ct = jax.random.normal(jax.random.key(2), (2, *out_hw, c))

    @jax.jit
    def run(kernel, x, ct):
        res = {}
        for impl, m in mods.items():
            y, vjp = jax.vjp(lambda kk, xx, m=m: m.apply({"params": {"kernel": kk}}, xx), kernel, x)
            res[impl] = (y, vjp(ct))
        return res

    res = run(kernel, x, ct)
    (y_lax, g_lax), (y_shift, g_shift) = res["lax"], res["shift"]
    assert y_lax.shape == y_shift.shape == (2, *out_hw, c)
    np.testing.assert_allclose(y_shift, y_lax, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g_shift, g_lax, rtol=1e-5, atol=1e-5)


def test_depthwise_auto_and_bad_impl():
    x = jnp.ones((1, 5, 5, 2))
    v = L.DepthwiseConv(3, impl="auto").init(jax.random.key(0), x)
    y_auto = L.DepthwiseConv(3, impl="auto").apply(v, x)
    y_lax = L.DepthwiseConv(3, impl="lax").apply(v, x)
    np.testing.assert_allclose(y_auto, y_lax, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown depthwise impl 'nope'"):
        L.DepthwiseConv(3, impl="nope").apply(v, x)


def test_inverted_residual_structure():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    ir = L.InvertedResidual(16, 16, kernel_size=3, act="hard_swish")
    v = jax.jit(ir.init)(jax.random.key(0), x)
    p = v["params"]
    assert set(p) == {"expand", "depthwise", "project"}  # expand kept although t = 1
    assert p["expand"]["conv"]["kernel"].shape == (1, 1, 16, 16)
    assert p["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 16)
    # identity residual: zero the projection BN -> output equals input
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "project" in str(path) and "bn" in str(path) else a, p
    )
    y = jax.jit(ir.apply)({**v, "params": zeroed}, x)
    np.testing.assert_allclose(y, x)

    se = L.InvertedResidual(72, 40, kernel_size=5, strides=2, use_se=True)
    v = jax.eval_shape(se.init, jax.random.key(0), jnp.ones((1, 8, 8, 24)))
    assert v["params"]["se"]["fc1"]["kernel"].shape == (72, 24)
    assert v["params"]["se"]["fc2"]["kernel"].shape == (24, 72)
    assert set(v["params"]) == {"expand", "depthwise", "se", "project"}
    no_expand = L.InvertedResidual(16, 16, use_expand=False)
    assert "expand" not in jax.eval_shape(no_expand.init, jax.random.key(0), x)["params"]


# --------------------------------------------------------------------------- registry


def test_registry_lists_and_errors():
    assert list_models() == sorted(list_models())
    assert {"skipnet_xs", "skipnet_s", "skipnet_m", "skipnet_l"} <= set(list_models())
    with pytest.raises(ValueError) as e:
        create_model("foo", num_classes=10)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("Unknown model 'foo'; valid choices: ")
    assert "skipnet_l, skipnet_m, skipnet_s, skipnet_xs" in msg
    with pytest.raises(ValueError, match=r"Unknown override 'bogus'.*valid keys: .*dropout_rate"):
        create_model("skipnet_m", num_classes=10, bogus=1)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("skipnet_m", num_classes=0)
    with pytest.raises(ValueError, match="already registered"):
        register_model("skipnet_m")(lambda *, num_classes: None)


def test_registry_overrides():
    m = create_model("skipnet_m", num_classes=7, dropout_rate=0.5, dtype=jnp.bfloat16, depthwise_impl="lax")
    assert isinstance(m, S.SkipNet)
    assert (m.num_classes, m.dropout_rate, m.dtype, m.depthwise_impl) == (7, 0.5, jnp.bfloat16, "lax")
    assert (m.mode, m.width_multiplier) == ("large", 1.0)
    m2 = create_model("skipnet_m", num_classes=7, width_multiplier=0.5)
    assert (m2.mode, m2.width_multiplier) == ("large", 0.5)
    assert {create_model(n, num_classes=3).mode for n in ("skipnet_xs", "skipnet_s")} == {"small"}


# --------------------------------------------------------------------------- SkipNet


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_param_counts(name):
    v = _init_shapes(create_model(name, num_classes=1000))
    assert _count(v["params"]) == EXPECTED_PARAMS[name]
    assert set(v) == {"params", "batch_stats"}
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(v))


def test_widths_match_release():
    w = S.skipnet_widths("large", 1.0)
    assert w["stem"] == 16 and w["head"] == 960 and w["classifier_hidden"] == 1280
    assert [b["hidden"] for st in w["stages"] for b in st] == [
        64,
        72,
        72,
        120,
        240,
        240,
        200,
        184,
        184,
        480,
        672,
        672,
        960,
        960,
    ]
    assert (w["skip1"]["hidden"], w["skip1"]["out"], w["skip2"]["hidden"], w["skip2"]["out"]) == (96, 40, 40, 80)
    assert S.skipnet_widths("large", 1.15)["classifier_hidden"] == 1472
    assert S.skipnet_widths("small", 0.5)["classifier_hidden"] == 1024
    assert S.skipnet_widths("small", 0.5)["stem"] == 8
    with pytest.raises(ValueError, match="Unknown SkipNet mode"):
        S.skipnet_widths("medium", 1.0)


def test_torch_state_dict_maps_one_to_one():
    sd = _load_state_dict_shapes()
    assert len(sd) == 354
    v = _init_shapes(create_model("skipnet_m", num_classes=1000))
    flat = {
        (col, *path): leaf.shape
        for col in ("params", "batch_stats")
        for path, leaf in traverse_util.flatten_dict(v[col]).items()
    }
    seen = set()
    for key, shape in sd.items():
        target = K.torch_key_to_flax_path(key)
        if key.endswith("num_batches_tracked"):
            assert target is None
            continue
        assert target is not None, key
        full = (target.collection, *target.path)
        assert full in flat, (key, full)
        assert full not in seen, f"two torch keys map to {full}"
        seen.add(full)
        converted = K.torch_array_to_flax(np.zeros(shape, np.float32), target.layout)
        assert converted.shape == flat[full], (key, shape, converted.shape, flat[full])
    assert len(seen) == len(flat) == sum(not k.endswith("num_batches_tracked") for k in sd)


def test_torch_key_examples_and_errors():
    f = K.torch_key_to_flax_path
    assert f("first_layer.0.weight") == ("params", ("stem", "conv", "kernel"), "conv")
    assert f("first_layer.1.running_var") == ("batch_stats", ("stem", "bn", "var"), "vector")
    assert f("base_block.conv.3.weight").path == ("base_block", "depthwise", "conv", "kernel")
    assert f("blocks.0.2.conv.6.fc.2.bias").path == ("stage1_block2", "se", "fc2", "bias")
    assert f("blocks.3.1.conv.8.weight").path == ("stage4_block1", "project", "bn", "scale")
    assert f("skip2.core_block.6.weight").path == ("skip2", "project", "conv", "kernel")
    assert f("conv.1.bias") == ("params", ("head", "bn", "bias"), "vector")
    assert f("classifier.0.weight") == ("params", ("classifier_hidden", "kernel"), "linear")
    assert f("classifier.3.bias").path == ("classifier", "bias")
    for bad in ("classifier.1.weight", "blocks.0.0.conv.2.weight", "fc.weight", "skip3.core_block.0.weight"):
        with pytest.raises(KeyError):
            f(bad)
    a = np.arange(2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
    np.testing.assert_array_equal(K.torch_array_to_flax(a, "conv")[1, 4, 2, 0], a[0, 2, 1, 4])
    np.testing.assert_array_equal(K.torch_array_to_flax(a[:, :1], "conv")[:, :, 0, 1], a[1, 0])


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (224, 224), (256, 256), (96, 64), (100, 75)])
def test_skipnet_xs_forward_shapes(hw, xs_model, xs_vars, xs_apply):
    h, w = hw
    x = jax.random.normal(jax.random.key(3), (2, h, w, 3))
    logits, aux = xs_apply(xs_vars, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    _check_aux_shapes(aux, 2, h, w, S.skipnet_widths("small", 0.5))
    chex.assert_tree_all_finite((logits, aux))


@pytest.mark.parametrize("name", ["skipnet_s", "skipnet_m", "skipnet_l"])
@pytest.mark.parametrize("hw", [(32, 32), (224, 224), (96, 64), (100, 75)])
def test_other_variants_shapes(name, hw):
    m = create_model(name, num_classes=1000)
    h, w = hw
    v = _init_shapes(m, 32, 32)
    logits, aux = jax.eval_shape(lambda v, x: m.apply(v, x), v, jnp.zeros((3, h, w, 3)))
    assert logits.shape == (3, 1000) and logits.dtype == jnp.float32
    _check_aux_shapes(aux, 3, h, w, S.skipnet_widths(m.mode, m.width_multiplier))


def test_skipnet_m_aux_at_224():
    m = create_model("skipnet_m", num_classes=1000)
    v = _init_shapes(m)
    _, aux = jax.eval_shape(lambda v, x: m.apply(v, x), v, jnp.zeros((1, 224, 224, 3)))
    assert aux["stem"].shape == (1, 112, 112, 16)
    assert aux["base"].shape == (1, 112, 112, 16)
    assert aux["stage1"].shape == aux["skip1"].shape == (1, 28, 28, 40)
    assert aux["stage2"].shape == aux["skip2"].shape == (1, 14, 14, 80)
    assert aux["stage3"].shape == (1, 14, 14, 112)
    assert aux["stage4"].shape == (1, 7, 7, 160)
    assert aux["features"].shape == (1, 7, 7, 960)
    assert aux["embedding"].shape == (1, 960)
    assert aux["pre_logits"].shape == (1, 1280)


def test_skipnet_aux_consistency(xs_vars, xs_apply):
    x = jax.random.normal(jax.random.key(4), (2, 96, 64, 3))  # shape compiled above
    logits, aux = xs_apply(xs_vars, x)
    np.testing.assert_allclose(aux["embedding"], aux["features"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    p = xs_vars["params"]
    pre = L.hard_swish(aux["embedding"] @ p["classifier_hidden"]["kernel"] + p["classifier_hidden"]["bias"])
    np.testing.assert_allclose(aux["pre_logits"], pre, rtol=1e-4, atol=1e-5)
    ref = pre @ p["classifier"]["kernel"] + p["classifier"]["bias"]
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-6)


def test_release_initialisers(xs_model):
    # unsafe_rbg keys compile much faster than threefry for ~200 parameter inits.
    v = jax.jit(lambda: xs_model.init(jax.random.key(0, impl="unsafe_rbg"), jnp.zeros((1, 32, 32, 3))))()
    p = v["params"]
    k = np.asarray(p["head"]["conv"]["kernel"])  # (1, 1, 80, 480)
    np.testing.assert_allclose(k.std(), math.sqrt(2.0 / k.shape[-1]), rtol=0.05)
    dw = np.asarray(p["stage4_block1"]["depthwise"]["conv"]["kernel"])  # (5, 5, 1, C)
    np.testing.assert_allclose(dw.std(), math.sqrt(2.0 / (25 * dw.shape[-1])), rtol=0.1)
    fc = np.asarray(p["classifier_hidden"]["kernel"])
    np.testing.assert_allclose(fc.std(), 0.01, rtol=0.05)
    np.testing.assert_array_equal(p["classifier_hidden"]["bias"], 0)
    np.testing.assert_array_equal(p["stage1_block2"]["se"]["fc1"]["bias"], 0)
    np.testing.assert_array_equal(p["stem"]["bn"]["scale"], 1)
    np.testing.assert_array_equal(p["stem"]["bn"]["bias"], 0)
    bs = v["batch_stats"]["stem"]["bn"]
    np.testing.assert_array_equal(bs["mean"], 0)
    np.testing.assert_array_equal(bs["var"], 1)


def test_depthwise_impls_give_same_logits(xs_vars, xs_apply):
    # 100x75: stem 50x38 and stage 1 13x10, so the skip pooling bins do not divide.
    x = jax.random.normal(jax.random.key(5), (2, 100, 75, 3))
    lax_model = create_model("skipnet_xs", num_classes=10, depthwise_impl="lax")
    shift_model = create_model("skipnet_xs", num_classes=10, depthwise_impl="shift")
    l_lax, a_lax = jax.jit(lax_model.apply)(xs_vars, x)
    if jax.default_backend() == "cpu":  # xs_apply uses impl "auto" = "shift" on CPU
        l_shift, a_shift = xs_apply(xs_vars, x)
    else:
        l_shift, a_shift = jax.jit(shift_model.apply)(xs_vars, x)
    assert float(jnp.abs(l_lax[0] - l_lax[1]).max()) > 1e-2  # input-dependent logits
    np.testing.assert_allclose(l_shift, l_lax, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a_shift["features"], a_lax["features"], rtol=1e-4, atol=1e-4)


def test_train_mode_updates_batch_stats_and_dropout(xs_model, xs_vars, xs_train_fwd, xs_apply):
    x = jax.random.normal(jax.random.key(6), TRAIN_BATCH)
    train_fwd = xs_train_fwd

    (l1, _), upd = train_fwd(xs_vars, x, jax.random.key(10))
    (l1b, _), _ = train_fwd(xs_vars, x, jax.random.key(10))
    (l2, _), _ = train_fwd(xs_vars, x, jax.random.key(11))
    assert set(upd) == {"batch_stats"}
    chex.assert_trees_all_equal_structs(upd["batch_stats"], xs_vars["batch_stats"])
    old, new = xs_vars["batch_stats"]["stem"]["bn"], upd["batch_stats"]["stem"]["bn"]
    assert not np.allclose(old["mean"], new["mean"])
    assert not np.allclose(old["var"], new["var"])
    # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic (biased variance, as Flax does)
    k = xs_vars["params"]["stem"]["conv"]["kernel"]
    conv = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mu, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * var, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(l1, l1b)  # same dropout key -> same output
    assert not np.allclose(l1, l2)  # different dropout key -> different output

    # eval mode: no dropout RNG needed, and a given one changes nothing
    xe = x[:2]
    ev = jax.jit(lambda v, x, k: xs_model.apply(v, x, train=False, rngs={"dropout": k})[0])
    e1 = ev(xs_vars, xe, jax.random.key(10))
    np.testing.assert_array_equal(e1, ev(xs_vars, xe, jax.random.key(11)))
    np.testing.assert_allclose(e1, xs_apply(xs_vars, xe)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(flax.errors.InvalidRngError):  # train mode needs a 'dropout' RNG
        jax.eval_shape(lambda v, x: xs_model.apply(v, x, train=True, mutable=["batch_stats"]), xs_vars, x)


def test_bf16_compute_dtype(xs_vars, xs_apply):
    x = jax.random.normal(jax.random.key(7), (2, 64, 64, 3))
    v = xs_vars
    m16 = create_model("skipnet_xs", num_classes=10, dtype=jnp.bfloat16)
    l32, _a32 = xs_apply(v, x)
    l16, a16 = jax.jit(m16.apply)(v, x)
    assert l16.dtype == jnp.float32
    assert a16["features"].dtype == jnp.bfloat16
    chex.assert_tree_all_finite(l16)
    # A random (untrained) network amplifies small perturbations ~10x (an input
    # perturbation of 0.4% moves the features by ~5%), so bf16 rounding at every layer
    # ends up as a ~5-15% relative error here; the bound only catches gross bugs.
    rel = float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32))
    assert rel < 0.25, rel
    cos = float(jnp.vdot(l16, l32) / (jnp.linalg.norm(l16) * jnp.linalg.norm(l32)))
    assert cos > 0.97, cos
    # params stay float32 when initialised under bf16
    v16 = jax.eval_shape(lambda: m16.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v16))


def test_inverted_residual_train_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 24))
    ir = L.InvertedResidual(72, 40, kernel_size=5, strides=2, use_se=True, act="hard_swish")
    v = jax.jit(ir.init)(jax.random.key(1), x)

    def loss(params):
        y, _ = ir.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y**2)

    g = jax.jit(jax.grad(loss))(v["params"])
    chex.assert_trees_all_equal_shapes(g, v["params"])
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g["se"]["fc1"]["kernel"]).max()) > 0


# --------------------------------------------------------------------------- torch cross-check


def _torch_state_dict_to_flax(state_dict) -> dict:
    flat = {}
    for key, tensor in state_dict.items():
        t = K.torch_key_to_flax_path(key)
        if t is not None:
            arr = tensor.detach().cpu().numpy()
            flat[(t.collection, *t.path)] = jnp.asarray(K.torch_array_to_flax(arr, t.layout))
    return traverse_util.unflatten_dict(flat)


def _compare_with_torch(torch, net, apply, x_nchw):
    with torch.no_grad():
        t_logits, t_feats = net.forward_with_features(torch.from_numpy(x_nchw))
    t_logits, t_feats = t_logits.numpy(), t_feats.numpy().transpose(0, 2, 3, 1)
    assert np.abs(t_logits[0] - t_logits[1]).max() > 0.05  # not vacuous: input-dependent
    logits, aux = apply(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    scale = max(float(np.abs(t_logits).max()), 1.0)
    np.testing.assert_allclose(logits, t_logits, rtol=0, atol=1e-4 * scale)
    f_scale = max(float(np.abs(t_feats).max()), 1.0)
    np.testing.assert_allclose(aux["features"], t_feats, rtol=0, atol=5e-5 * f_scale)


def test_matches_torch_reference_m_224():
    """Flax SkipNet-M loaded from the project's independent PyTorch reference
    (skipnet_jax/reference/torch_skipnet.py, whose state_dict has the release layout)
    gives the same logits and bias-loss features at 224 px, eval mode."""
    import torch

    from skipnet_jax.reference import torch_skipnet as ref

    net = ref.randomize_(ref.TorchSkipNet("large", 1.0), seed=0).eval()
    shapes = _load_state_dict_shapes()
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == shapes
    variables = _torch_state_dict_to_flax(net.state_dict())
    model = create_model("skipnet_m", num_classes=1000)
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    _compare_with_torch(torch, net, lambda xx: jax.jit(model.apply)(variables, xx), x)


def test_matches_torch_reference_xs_non_divisible(xs_apply):
    """SkipNet-XS (stem width 8) at 100x75, where the skip pooling bins do not divide."""
    import torch

    from skipnet_jax.reference import torch_skipnet as ref

    net = ref.randomize_(ref.TorchSkipNet("small", 0.5, num_classes=10), seed=1, calibration_size=96).eval()
    variables = _torch_state_dict_to_flax(net.state_dict())
    x = np.random.default_rng(1).normal(size=(2, 3, 100, 75)).astype(np.float32)
    _compare_with_torch(torch, net, lambda xx: xs_apply(variables, xx), x)
