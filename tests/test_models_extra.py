"""MobileNetV3 and the CIFAR baselines: parameter counts, shapes, dtypes, train mode.

Parameter counts and 224 px shapes use `jax.eval_shape` (no compilation).  The 32 px
forward passes run one jit per model (an eval pass in float32 and a train-mode pass in
bfloat16, compiled together) on deterministic synthetic variables built from the
eval_shape tree, which avoids compiling each model's random initialiser.
``shufflenet_v2_x0_5`` is also compared with the release's model (the PyTorch reference
`skipnet_jax.reference.torch_shufflenet`) through the converter.
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
    ("shufflenet_v2_x0_5", 100): 448_268,
    ("densenet121_cifar", 100): 7_048_548,
    # Cross-checks against torchvision's ImageNet models at 1000 classes:
    # resnet18 11,689,512 - 7x7 stem conv (9,408) + 3x3 stem conv (1,728);
    ("resnet18_cifar", 1000): 11_681_832,
    # shufflenet_v2_x0_5 1,366,792 (its 3x3 stem conv has the same size at stride 1)
    # + the release's 3,976 conv biases;
    ("shufflenet_v2_x0_5", 1000): 1_370_768,
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


def _release_shufflenet(seed=0):
    """The independent PyTorch reference of the release's ShuffleNetV2 0.5x with random
    conv biases, BN affines and uncalibrated running statistics, and its converted variables."""
    from skipnet_jax import convert
    from skipnet_jax.reference.torch_shufflenet import TorchShuffleNetV2, randomize_

    m = randomize_(TorchShuffleNetV2(0.5, NUM_CLASSES), seed)
    return m, convert.torch_state_dict_to_variables(m.state_dict(), "shufflenet_v2_x0_5")


def test_shufflenet_v2_x0_5_is_the_release_model():
    """Same parameters as the release (448,268 at 100 classes, conv biases included); the
    converter carries every release entry, so the converted variables give the release's
    logits and conv5 features in eval mode and train mode, and its running statistics."""
    import torch

    from skipnet_jax.reference.torch_shufflenet import count_parameters

    m, variables = _release_shufflenet()
    assert count_parameters(m) == PARAM_COUNTS[("shufflenet_v2_x0_5", NUM_CLASSES)] == 448_268
    model = create_model("shufflenet_v2_x0_5", num_classes=NUM_CLASSES, depthwise_impl="lax")
    shapes = _init_shapes(model)
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)
    conv_biases = [v["bias"] for v in variables["params"].values() if v.get("kernel", np.zeros(())).ndim == 4]
    assert len(conv_biases) == 56 and all(np.abs(b).max() > 0.1 for b in conv_biases)

    images = np.random.default_rng(1).standard_normal((BATCH, 32, 32, 3)).astype(np.float32)

    @jax.jit
    def both(variables, images):
        eval_out = model.apply(variables, images, train=False)
        train_out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return eval_out, train_out, updates["batch_stats"]

    eval_out, train_out, new_stats = jax.device_get(both(variables, jnp.asarray(images)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        m.eval()
        ref_eval = m(x)
        m.train()
        ref_train = m(x)
    for mode, (logits, aux), (ref_logits, ref_features) in (
        ("eval", eval_out, ref_eval),
        ("train", train_out, ref_train),
    ):
        ref_features = ref_features.numpy().transpose(0, 2, 3, 1)
        scale = np.abs(ref_logits.numpy()).max()
        assert scale > 1.0 and np.abs(ref_features).max() > 1.0, mode  # a live signal
        np.testing.assert_allclose(aux["features"], ref_features, rtol=1e-5, atol=3e-5 * np.abs(ref_features).max())
        np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-5, atol=1e-5 * scale, err_msg=f"{mode} logits")
    from skipnet_jax import convert

    ref_stats = convert.torch_state_dict_to_variables(m.state_dict(), "shufflenet_v2_x0_5")["batch_stats"]
    for name, stats in ref_stats.items():
        np.testing.assert_allclose(new_stats[name]["mean"], stats["mean"], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(new_stats[name]["var"], stats["var"], rtol=1e-5, atol=1e-5, err_msg=name)


def test_shufflenet_v2_bias_free_state_dict_is_refused():
    """A state dict without the conv biases (torchvision-style units) is not the release's:
    the converter names the missing biases instead of dropping or inventing them."""
    from skipnet_jax import convert

    m, _ = _release_shufflenet()
    sd = m.state_dict()
    conv_biases = [k for k in sd if k.endswith(".bias") and sd[k.removesuffix(".bias") + ".weight"].dim() == 4]
    assert len(conv_biases) == 56
    sd = {k: v for k, v in sd.items() if k not in conv_biases}
    with pytest.raises(
        convert.ConversionError, match=r"^56 problems converting to shufflenet_v2_x0_5: missing: [^;]*\bpre\.0\.bias$"
    ):
        convert.torch_state_dict_to_variables(sd, "shufflenet_v2_x0_5")


def test_shufflenet_v2_release_1x_widths():
    """The release's factory default (ratio 1: widths 24, 116, 232, 464, 1024) built with
    ``stages_out_channels`` has the release's 1.0x parameter count."""
    from skipnet_jax.reference.torch_shufflenet import TorchShuffleNetV2, count_parameters

    model = create_model("shufflenet_v2_x0_5", num_classes=NUM_CLASSES, stages_out_channels=(24, 116, 232, 464, 1024))
    assert _num_params(_init_shapes(model)) == count_parameters(TorchShuffleNetV2(1.0, NUM_CLASSES)) == 1_360_896
