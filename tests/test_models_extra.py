"""MobileNetV3 and the CIFAR baselines: parameter counts, shapes, dtypes, train mode.

Parameter counts and 224 px shapes use `jax.eval_shape` (no compilation).  The 32 px
forward passes run one jit per model (an eval pass in float32 and a train-mode pass in
bfloat16, compiled together) on deterministic synthetic variables built from the
eval_shape tree, which avoids compiling each model's random initialiser.
``shufflenet_v2_x0_5`` is also compared with a PyTorch model given the same weights.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skipnet_jax.models import cifar, create_model, list_models

NEW_MODELS = (
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "resnet18_cifar",
    "shufflenet_v2_x0_5",
    "densenet121_cifar",
)

# (model, classes) -> exact parameter count.
PARAM_COUNTS = {
    # torchvision's counts for mobilenet_v3_large / mobilenet_v3_small.
    ("mobilenet_v3_large", 1000): 5_483_032,
    ("mobilenet_v3_small", 1000): 2_542_856,
    # The release's CIFAR-100 models (100 classes).
    ("resnet18_cifar", 100): 11_220_132,
    ("shufflenet_v2_x0_5", 100): 444_292,
    ("densenet121_cifar", 100): 7_048_548,
    # Cross-checks against torchvision's ImageNet models at 1000 classes:
    # resnet18 11,689,512 - 7x7 stem conv (9,408) + 3x3 stem conv (1,728);
    ("resnet18_cifar", 1000): 11_681_832,
    # shufflenet_v2_x0_5 1,366,792 (its 3x3 stem conv has the same size at stride 1);
    ("shufflenet_v2_x0_5", 1000): 1_366_792,
    # densenet121 7,978,856 - 7x7 stem conv and its BN (9,536) + 3x3 stem conv (1,728).
    ("densenet121_cifar", 1000): 7_971_048,
}

# Shape of aux["features"] (without the batch dim) at 32 and 224 px.
FEATURES_32 = {
    "mobilenet_v3_large": (1, 1, 960),
    "mobilenet_v3_small": (1, 1, 576),
    "resnet18_cifar": (4, 4, 512),
    "shufflenet_v2_x0_5": (4, 4, 1024),
    "densenet121_cifar": (4, 4, 1024),
}
FEATURES_224 = {
    "mobilenet_v3_large": (7, 7, 960),
    "mobilenet_v3_small": (7, 7, 576),
    "resnet18_cifar": (28, 28, 512),
    "shufflenet_v2_x0_5": (28, 28, 1024),
    "densenet121_cifar": (28, 28, 1024),
}

NUM_CLASSES = 100
BATCH = 2


def _init_shapes(model, size=32):
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, size, size, 3)))


def _num_params(variables) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


def _synthetic_variables(shapes, seed=0):
    """Deterministic variables with the given shapes: He-scaled kernels, BN 1/0, stats 0/1."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        assert name == "kernel", path
        fan_in = math.prod(leaf.shape[:-1])
        return (rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


_RUNS: dict[str, dict] = {}


def _run(name: str) -> dict:
    """Eval pass (float32) and train pass (bfloat16) at 32 px, batch 2, one jit; cached."""
    if name not in _RUNS:
        overrides = {}
        if name != "resnet18_cifar" and name != "densenet121_cifar":
            # XLA:CPU compiles grouped convs faster than the default "shift" depthwise
            # (same maths; "shift" is covered by the SkipNet tests and the CIFAR config runs).
            overrides["depthwise_impl"] = "lax"
        model = create_model(name, num_classes=NUM_CLASSES, **overrides)
        model_bf16 = model.clone(dtype=jnp.bfloat16)
        variables = _synthetic_variables(_init_shapes(model))
        images = jnp.asarray(np.random.default_rng(1).standard_normal((BATCH, 32, 32, 3)), jnp.float32)

        @jax.jit
        def both(variables, images):
            eval_out = model.apply(variables, images, train=False)
            train_out, updates = model_bf16.apply(
                variables,
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            return eval_out, train_out, updates

        eval_out, train_out, updates = jax.device_get(both(variables, images))
        _RUNS[name] = dict(variables=variables, eval=eval_out, train=train_out, updates=updates)
    return _RUNS[name]


# --------------------------------------------------------------------------- registry


def test_models_are_registered():
    assert set(NEW_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", NEW_MODELS)
def test_accepts_training_loop_overrides(name):
    """The training loop always passes dropout_rate and dtype."""
    model = create_model(name, num_classes=10, dropout_rate=0.1, dtype=jnp.bfloat16)
    assert model.dropout_rate == 0.1 and model.dtype == jnp.bfloat16
    expected_default = 0.2 if name.startswith("mobilenet") else 0.0
    assert create_model(name, num_classes=10).dropout_rate == expected_default


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name, classes", sorted(PARAM_COUNTS))
def test_parameter_counts(name, classes):
    model = create_model(name, num_classes=classes)
    assert _num_params(_init_shapes(model)) == PARAM_COUNTS[(name, classes)]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_224px_shapes(name):
    model = create_model(name, num_classes=1000)
    shapes = _init_shapes(model, 224)
    logits, aux = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, jnp.zeros((BATCH, 224, 224, 3)))
    assert logits.shape == (BATCH, 1000) and logits.dtype == jnp.float32
    assert aux["features"].shape == (BATCH, *FEATURES_224[name])
    assert aux["embedding"].shape == (BATCH, FEATURES_224[name][-1])


def test_mobilenet_v3_torchvision_layout():
    large = _init_shapes(create_model("mobilenet_v3_large", num_classes=1000))["params"]
    small = _init_shapes(create_model("mobilenet_v3_small", num_classes=1000))["params"]
    # The first block has no expansion conv (expanded width == input width).
    assert "expand" not in large["block0"] and "expand" in large["block1"]
    assert "expand" not in small["block0"]
    # SE squeeze width make_divisible(hidden / 4, 8); FCs with bias.
    assert small["block0"]["se"]["fc1"]["kernel"].shape == (16, 8)
    assert large["block3"]["se"]["fc1"]["kernel"].shape == (72, 24)
    assert large["block3"]["se"]["fc2"]["bias"].shape == (72,)
    # Head: 1x1 conv to 6 x the last block's width, then 1280 / 1024 hidden units.
    assert large["head"]["conv"]["kernel"].shape == (1, 1, 160, 960)
    assert small["head"]["conv"]["kernel"].shape == (1, 1, 96, 576)
    assert large["classifier_hidden"]["kernel"].shape == (960, 1280)
    assert small["classifier_hidden"]["kernel"].shape == (576, 1024)
    assert create_model("mobilenet_v3_large", num_classes=10).bn_epsilon == 1e-3


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", NEW_MODELS)
def test_forward_32px_float32(name):
    logits, aux = _run(name)["eval"]
    assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert aux["features"].shape == (BATCH, *FEATURES_32[name])
    assert aux["features"].dtype == np.float32
    assert np.all(np.isfinite(aux["features"]))
    assert aux["embedding"].shape == (BATCH, FEATURES_32[name][-1])
    # The embedding is the classifier's input: the pooled features (for DenseNet the
    # pooled final BN-ReLU output; its bias-loss features are taken before that BN-ReLU).
    pooled = aux["normed_features" if name == "densenet121_cifar" else "features"]
    np.testing.assert_allclose(aux["embedding"], pooled.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[0], logits[1])  # the two images are told apart


@pytest.mark.parametrize("name", NEW_MODELS)
def test_bfloat16_train_mode_updates_batch_stats(name):
    run = _run(name)
    logits, aux = run["train"]
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    assert aux["features"].dtype == jnp.bfloat16
    assert aux["features"].shape == (BATCH, *FEATURES_32[name])
    new_stats = run["updates"]["batch_stats"]
    old_stats = run["variables"]["batch_stats"]
    assert jax.tree.structure(new_stats) == jax.tree.structure(old_stats)
    changed = jax.tree_util.tree_map_with_path(
        lambda path, new, old: path[-1].key != "var" or not np.array_equal(new, old),
        new_stats,
        old_stats,
    )
    assert all(jax.tree.leaves(changed))  # every BN's running variance moved
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new_stats))


def test_densenet_features_are_the_release_tensor():
    """Bias-loss features: last dense block output before the final BN-ReLU (release)."""
    _, aux = _run("densenet121_cifar")["eval"]
    np.testing.assert_array_equal(aux["features"], aux["block4"])
    assert aux["normed_features"].min() >= 0 and aux["features"].min() < 0
    model = create_model("densenet121_cifar", num_classes=10, features_after_norm=True)
    assert model.features_after_norm


# --------------------------------------------------------------------------- pieces


def test_channel_shuffle_matches_pytorch_semantics():
    n, h, w, c, g = 1, 2, 3, 12, 2
    x = np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c)
    # PyTorch: NCHW view (n, g, c/g, h, w) -> transpose(1, 2) -> flatten channels.
    nchw = x.transpose(0, 3, 1, 2)
    ref = nchw.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)
    shuffled = cifar.channel_shuffle(jnp.asarray(x), g)
    np.testing.assert_array_equal(shuffled, ref.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- vs PyTorch


def _torch_shufflenet_v2(widths, repeats, num_classes):
    """PyTorch ShuffleNetV2 with the CIFAR stem, its modules keyed by the Flax names.

    Facts: stem 3x3 conv stride 1 + BN, no ReLU, no max-pool (the release's ``pre``);
    torchvision's units: stride 2 -> [dw3x3/2 BN, 1x1 BN ReLU](x) and [1x1 BN ReLU,
    dw3x3/2 BN, 1x1 BN ReLU](x), each ``out / 2`` wide; stride 1 -> split the channels
    in halves, the second through the 3-conv branch; concatenate, shuffle 2 groups;
    conv5 1x1 BN ReLU, average pool, Linear.  Convs without bias (each feeds a BN).
    """
    import torch
    from torch import nn as tnn

    m = tnn.ModuleDict()

    def conv_bn(name, cin, cout, k, stride=1, depthwise=False, bn_name=None):
        m[name] = tnn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=cin if depthwise else 1, bias=False)
        m[bn_name] = tnn.BatchNorm2d(cout)

    conv_bn("stem_conv", 3, widths[0], 3, bn_name="stem_bn")
    cin = widths[0]
    for s, (reps, out) in enumerate(zip(repeats, widths[1:-1])):
        b = out // 2
        for u in range(reps):
            name = f"stage{s + 2}_unit{u}"
            stride = 2 if u == 0 else 1
            if stride == 2:
                conv_bn(f"{name}_left_dw", cin, cin, 3, 2, True, f"{name}_left_bn1")
                conv_bn(f"{name}_left_conv", cin, b, 1, bn_name=f"{name}_left_bn2")
            r = f"{name}_right"
            conv_bn(f"{r}_conv1", cin if stride == 2 else b, b, 1, bn_name=f"{r}_bn1")
            conv_bn(f"{r}_dw", b, b, 3, stride, True, f"{r}_bn2")
            conv_bn(f"{r}_conv2", b, b, 1, bn_name=f"{r}_bn3")
            cin = out
    conv_bn("conv5_conv", cin, widths[-1], 1, bn_name="conv5_bn")
    m["classifier"] = tnn.Linear(widths[-1], num_classes)

    def forward(x):
        """``(logits, {"stem", "stage2".."stage4", "features"})``, NCHW tensors."""

        def cbn(name, bn_name, x, relu):
            y = m[bn_name](m[name](x))
            return torch.relu(y) if relu else y

        out = {}
        x = out["stem"] = cbn("stem_conv", "stem_bn", x, relu=False)
        for s, reps in enumerate(repeats):
            for u in range(reps):
                name = f"stage{s + 2}_unit{u}"
                r = f"{name}_right"
                if u == 0:
                    left = cbn(f"{name}_left_dw", f"{name}_left_bn1", x, False)
                    left = cbn(f"{name}_left_conv", f"{name}_left_bn2", left, True)
                    right = x
                else:
                    left, right = x.chunk(2, dim=1)
                right = cbn(f"{r}_conv1", f"{r}_bn1", right, True)
                right = cbn(f"{r}_dw", f"{r}_bn2", right, False)
                right = cbn(f"{r}_conv2", f"{r}_bn3", right, True)
                x = torch.cat([left, right], dim=1)
                n, c, h, w = x.shape
                x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            out[f"stage{s + 2}"] = x
        x = out["features"] = cbn("conv5_conv", "conv5_bn", x, True)
        return m["classifier"](x.mean(dim=(2, 3))), out

    return m, forward


def _torch_to_flax(m) -> dict:
    from torch import nn as tnn

    def f(t):
        return np.asarray(t.detach().numpy(), np.float32)

    params, stats = {}, {}
    for name, mod in m.items():
        if isinstance(mod, tnn.Conv2d):
            params[name] = {"kernel": f(mod.weight).transpose(2, 3, 1, 0)}  # OIHW -> HWIO; dw: (k, k, 1, C)
        elif isinstance(mod, tnn.BatchNorm2d):
            params[name] = {"scale": f(mod.weight), "bias": f(mod.bias)}
            stats[name] = {"mean": f(mod.running_mean), "var": f(mod.running_var)}
        else:
            params[name] = {"kernel": f(mod.weight).T, "bias": f(mod.bias)}
    return {"params": params, "batch_stats": stats}


def test_shufflenet_v2_x0_5_matches_pytorch():
    """Logits, intermediate tensors (eval and train mode) and running statistics of the
    registered 0.5x model against a PyTorch ShuffleNetV2 with the same weights."""
    import torch

    torch.manual_seed(0)
    model = create_model("shufflenet_v2_x0_5", num_classes=NUM_CLASSES, depthwise_impl="lax")
    m, forward = _torch_shufflenet_v2(tuple(model.stages_out_channels), tuple(model.stages_repeats), NUM_CLASSES)
    rng = np.random.default_rng(0)
    bns = [mod for mod in m.values() if isinstance(mod, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
            bn.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.2, c).astype(np.float32)))
        # Running statistics of a calibration batch (momentum 1), so that eval-mode
        # activations keep their scale through the 50 layers of PyTorch-default init.
        for bn in bns:
            bn.momentum = 1.0
        forward(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        for bn in bns:
            bn.momentum = 0.1
    variables = _torch_to_flax(m)
    shapes = _init_shapes(model)
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)

    images = rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32)

    @jax.jit
    def both(variables, images):
        eval_out = model.apply(variables, images, train=False)
        train_out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return eval_out, train_out, updates["batch_stats"]

    eval_out, train_out, new_stats = jax.device_get(both(variables, jnp.asarray(images)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        m.eval()
        ref_eval = forward(x)
        m.train()
        ref_train = forward(x)
    runs = (("eval", eval_out, ref_eval), ("train", train_out, ref_train))
    for mode, (logits, aux), (ref_logits, ref_aux) in runs:
        for key, ref in ref_aux.items():
            ref = ref.numpy().transpose(0, 2, 3, 1)
            scale = np.abs(ref).max()
            assert scale > 1.0, (mode, key)  # the comparison sees a live signal
            # float32 round-off grows with depth: about 1.5e-5 of the scale at conv5.
            np.testing.assert_allclose(aux[key], ref, rtol=1e-5, atol=3e-5 * scale, err_msg=f"{mode} {key}")
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{mode} logits")
    ref_stats = _torch_to_flax(m)["batch_stats"]
    for name, stats in ref_stats.items():
        np.testing.assert_allclose(new_stats[name]["mean"], stats["mean"], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(new_stats[name]["var"], stats["var"], rtol=1e-5, err_msg=name)
