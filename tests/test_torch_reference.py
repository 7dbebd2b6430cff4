"""Tests of the independent PyTorch reference (SkipNet model and release-style bias loss).

PyTorch comes with the test extra.  The checkpoint-layout test needs
``skipnet_m_torch_state_dict.json`` (from the shared reference folder); it is looked up in
$SKIPNET_REFERENCE_DIR, tests/fixtures (a copy of the spec) and ../shared/reference and skipped if
absent.  Speed against this model is measured by ``python -m skipnet_jax.benchmark --compare
torch``, not here.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch  # the test extra installs it; a missing install must fail, not skip
from torch import nn
from torch.nn import functional as F

from skipnet_jax.reference.torch_bias_loss import TorchBiasLoss, feature_variance, z_weight
from skipnet_jax.reference.torch_skipnet import (
    VARIANTS,
    TorchSkipNet,
    count_parameters,
    make_divisible,
    randomize_,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
JSON_NAME = "skipnet_m_torch_state_dict.json"

EXPECTED_PARAMS = {"xs": 2_332_584, "s": 3_587_416, "m": 5_532_352, "l": 7_127_384}
EXPECTED_FEATURES = {"xs": 480, "s": 720, "m": 960, "l": 1104}


def _find_layout_json():
    candidates = []
    if os.environ.get("SKIPNET_REFERENCE_DIR"):
        candidates.append(Path(os.environ["SKIPNET_REFERENCE_DIR"]) / JSON_NAME)
    candidates += [
        Path(__file__).parent / "fixtures" / JSON_NAME,
        REPO_ROOT.parent / "shared" / "reference" / JSON_NAME,
    ]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _smooth_input(n, px, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 7, 7, generator=g)
    x = F.interpolate(low, size=(px, px), mode="bilinear", align_corners=False)
    return x + 0.3 * torch.randn(n, 3, px, px, generator=g)


@pytest.fixture(scope="module")
def model_m():
    torch.manual_seed(0)
    return randomize_(TorchSkipNet("large", 1.0), seed=0).eval()


# --------------------------------------------------------------------------- model


def test_make_divisible():
    assert make_divisible(16 * 2.3) == 40
    assert make_divisible(16 * 6) == 96
    assert make_divisible(72 / 4) == 24  # 16 would be < 0.9 * 18
    assert make_divisible(40 * 0.5) == 24
    assert make_divisible(1280 * 1.15) == 1472
    assert make_divisible(3) == 8


def test_state_dict_matches_release_layout():
    path = _find_layout_json()
    if path is None:
        pytest.skip(f"{JSON_NAME} not found")
    expected = json.loads(path.read_text())
    assert len(expected) == 354
    sd = TorchSkipNet("large", 1.0).state_dict()
    got = {k: list(v.shape) for k, v in sd.items()}
    assert set(got) == set(expected), (sorted(set(got) ^ set(expected)))[:20]
    assert got == expected
    assert list(got) == list(expected)  # same order too


def test_state_dict_spot_checks_without_json():
    sd = TorchSkipNet("large", 1.0).state_dict()
    assert len(sd) == 354
    assert tuple(sd["first_layer.0.weight"].shape) == (16, 3, 3, 3)
    assert tuple(sd["base_block.conv.0.weight"].shape) == (16, 16, 1, 1)
    assert tuple(sd["blocks.0.2.conv.6.fc.0.weight"].shape) == (24, 72)
    assert tuple(sd["blocks.3.2.conv.3.weight"].shape) == (960, 1, 5, 5)
    assert tuple(sd["skip1.core_block.3.weight"].shape) == (96, 1, 5, 5)
    assert tuple(sd["skip2.core_block.6.weight"].shape) == (80, 40, 1, 1)
    assert tuple(sd["classifier.3.weight"].shape) == (1000, 1280)
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 53  # 1 + 3 + 14*3 + 2*3 + 1
    # load_state_dict round trip (strict) works.
    other = TorchSkipNet("large", 1.0)
    other.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("name", ["xs", "s", "m", "l"])
def test_parameter_counts(name):
    mode, w = VARIANTS[name]
    model = TorchSkipNet(mode, w)
    assert count_parameters(model) == EXPECTED_PARAMS[name]
    assert model.feature_channels == EXPECTED_FEATURES[name]


def test_release_init_statistics():
    torch.manual_seed(0)
    m = TorchSkipNet("large", 1.0)
    w = m.conv[0].weight  # 1x1, 960 outputs: std sqrt(2/960)
    assert abs(w.std().item() - math.sqrt(2 / 960)) < 0.1 * math.sqrt(2 / 960)
    dw = m.blocks[3][2].conv[3].weight  # 5x5 depthwise, 960 outputs: std sqrt(2/(25*960))
    assert abs(dw.std().item() - math.sqrt(2 / (25 * 960))) < 0.1 * math.sqrt(2 / (25 * 960))
    assert abs(m.classifier[0].weight.std().item() - 0.01) < 0.001
    assert torch.all(m.classifier[0].bias == 0)
    assert torch.all(m.conv[1].weight == 1) and torch.all(m.conv[1].bias == 0)
    bn = m.first_layer[1]
    assert bn.eps == 1e-5 and bn.momentum == 0.1
    assert isinstance(m.classifier[2], nn.Dropout) and m.classifier[2].p == 0.2


def test_forward_224_m_logits_and_features(model_m):
    x = _smooth_input(2, 224, seed=1)
    with torch.no_grad():
        logits, features = model_m.forward_with_features(x)
        plain = model_m(x)
    assert logits.shape == (2, 1000)
    assert features.shape == (2, 960, 7, 7)
    assert torch.isfinite(logits).all() and torch.isfinite(features).all()
    torch.testing.assert_close(plain, logits)
    # randomize_ keeps activations O(1) and makes the output depend on the input.
    std = logits.std().item()
    assert 0.1 < std < 100, std
    assert features.std().item() < 100
    assert (logits[0] - logits[1]).abs().max().item() > 1e-2
    # features are post-h_swish: >= min of h_swish = -0.375
    assert features.min().item() >= -0.375 - 1e-6


def test_forward_white_noise_224_m_stays_bounded(model_m):
    with torch.no_grad():
        logits = model_m(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3)))
    assert torch.isfinite(logits).all()
    assert 0.1 < logits.std().item() < 100


@pytest.mark.parametrize("name", ["xs", "s", "m", "l"])
def test_forward_32px_all_variants(name):
    mode, w = VARIANTS[name]
    model = randomize_(TorchSkipNet(mode, w, num_classes=100), seed=1, calibration_size=32).eval()
    x = _smooth_input(3, 32, seed=2)
    with torch.no_grad():
        logits, features = model.forward_with_features(x)
    assert logits.shape == (3, 100)
    assert features.shape == (3, EXPECTED_FEATURES[name], 1, 1)
    assert torch.isfinite(logits).all()


def test_forward_non_divisible_resolution():
    model = randomize_(TorchSkipNet("small", 0.5), seed=2, calibration_size=100).eval()
    with torch.no_grad():
        logits, features = model.forward_with_features(_smooth_input(2, 100, seed=4))
    # 100 -> 50 (stem) -> 25 -> 13 (stage 1) -> 7 (stage 2) -> 4 (stage 4)
    assert features.shape == (2, 480, 4, 4)
    assert torch.isfinite(logits).all()


def test_skip_pooling_at_224_is_plain_average_pooling(model_m):
    base = torch.randn(2, 16, 112, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got1 = model_m.skip1(base, (28, 28))
        ref1 = model_m.skip1.core_block(F.avg_pool2d(base, 4, 4))
        got2 = model_m.skip2(base, (14, 14))
        ref2 = model_m.skip2.core_block(F.avg_pool2d(base, 8, 8))
    torch.testing.assert_close(got1, ref1)
    torch.testing.assert_close(got2, ref2)


def test_randomize_is_deterministic_and_covers_bn_stats():
    a = randomize_(TorchSkipNet("small", 0.5), seed=7, calibration_size=64)
    b = randomize_(TorchSkipNet("small", 0.5), seed=7, calibration_size=64)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb)
    bn = a.blocks[1][0].conv[4]
    assert torch.all(bn.running_var > 0)
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_train_mode_backward_runs():
    model = TorchSkipNet("small", 0.5, num_classes=10).train()
    x = _smooth_input(4, 64, seed=6)
    logits, features = model.forward_with_features(x)
    loss = TorchBiasLoss(normalisation_mode="local")(features, logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.first_layer[0].weight.grad is not None


# --------------------------------------------------------------------------- bias loss


def _features_with_variances(variances, shape=(2, 3, 3), seed=0):
    """float64 features whose per-sample unbiased variance is exactly ``variances``."""
    rng = np.random.default_rng(seed)
    out = []
    for v in variances:
        x = rng.normal(size=int(np.prod(shape)))
        x = (x - x.mean()) / x.std(ddof=1)
        out.append((x * math.sqrt(v) + rng.normal()).reshape(shape))
    return np.stack(out)


def _np_ce(logits, targets):
    m = logits.max(axis=1, keepdims=True)
    logsumexp = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return logsumexp - logits[np.arange(len(targets)), targets]


def _np_loss(scaled, logits, targets, alpha=0.3, beta=0.3):
    return float(np.mean((np.exp(alpha * scaled) - beta) * _np_ce(logits, targets)))


def test_z_endpoints():
    assert z_weight(torch.tensor(0.0)).item() == pytest.approx(0.7)
    assert z_weight(torch.tensor(1.0)).item() == pytest.approx(math.exp(0.3) - 0.3)
    assert math.exp(0.3) - 0.3 == pytest.approx(1.0499, abs=1e-4)


@pytest.mark.parametrize("mode", ["local", "global"])
def test_tiny_hand_made_batch(mode):
    # sample 0: values (0, 0, 0) -> v = 0; sample 1: (0, 1, 2) -> v = 1 (unbiased).
    features = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]], dtype=torch.float64).reshape(2, 1, 1, 3)
    logits = torch.zeros(2, 4, dtype=torch.float64)  # CE = log 4 for each sample
    targets = torch.tensor([1, 3])
    loss_fn = TorchBiasLoss(normalisation_mode=mode)
    loss = loss_fn(features, logits, targets)
    torch.testing.assert_close(loss_fn.last_variance, torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(loss_fn.last_scaled, torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(loss_fn.last_weights, torch.tensor([0.7, math.exp(0.3) - 0.3], dtype=torch.float64))
    assert loss.item() == pytest.approx((0.7 + math.exp(0.3) - 0.3) / 2 * math.log(4), rel=1e-12)


def test_feature_variance_is_unbiased_and_detached():
    f = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    v = feature_variance(f)
    assert not v.requires_grad
    np.testing.assert_allclose(v.numpy(), f.detach().numpy().reshape(3, -1).var(axis=1, ddof=1), rtol=1e-12)


def test_no_gradient_through_features():
    f = torch.randn(4, 2, 3, 3, requires_grad=True)
    logits = torch.randn(4, 5, requires_grad=True)
    loss = TorchBiasLoss(normalisation_mode="local")(f, logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert f.grad is None
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_equal_variances_give_nan_like_release():
    features = torch.tensor(_features_with_variances([2.0, 2.0, 2.0], seed=1))
    logits = torch.randn(3, 5, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2])
    assert torch.isnan(TorchBiasLoss(normalisation_mode="local")(features, logits, targets))
    # global, first batch: running min == common value -> 0/0 -> NaN.
    assert torch.isnan(TorchBiasLoss(normalisation_mode="global")(features, logits, targets))
    # global after a batch with a smaller minimum: positive / 0 -> +inf.
    g = TorchBiasLoss(normalisation_mode="global")
    g(torch.tensor(_features_with_variances([1.0, 3.0], seed=2)), logits[:2], targets[:2])
    out = g(features, logits, targets)
    assert torch.isinf(out) and out > 0


BATCH_VARIANCES = ([1.0, 2.0, 4.0], [3.0, 5.0, 6.0], [0.5, 2.0, 3.0])


def _three_batches(dtype):
    rng = np.random.default_rng(123)
    batches = []
    for b, variances in enumerate(BATCH_VARIANCES):
        feats = _features_with_variances(variances, shape=(4, 3, 3), seed=10 + b)
        logits = rng.normal(size=(3, 7)) * 2.0
        targets = rng.integers(0, 7, size=3)
        batches.append((feats, logits, targets))
    return batches


def _expected_three_batches():
    """Hand computation in numpy: local, global (running min includes current batch) and the
    alternative global reading (running min of previous batches only)."""
    batches = _three_batches(np.float64)
    local, glob, glob_prev = [], [], []
    running = np.inf
    for feats, logits, targets in batches:
        v = feats.reshape(len(feats), -1).var(axis=1, ddof=1)
        rng_ = v.max() - v.min()
        local.append(_np_loss((v - v.min()) / rng_, logits, targets))
        prev = v.min() if np.isinf(running) else running
        glob_prev.append(_np_loss((v - prev) / rng_, logits, targets))
        running = min(running, v.min())
        glob.append(_np_loss((v - running) / rng_, logits, targets))
    return batches, local, glob, glob_prev


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_global_vs_local_over_three_batches(dtype, rtol):
    batches, exp_local, exp_global, exp_global_prev = _expected_three_batches()
    local = TorchBiasLoss(normalisation_mode="local")
    glob = TorchBiasLoss()  # default: global
    glob_prev = TorchBiasLoss(normalisation_mode="global", update_before_scaling=False)
    assert glob.normalisation_mode == "global" and glob.alpha == 0.3 and glob.beta == 0.3
    got_local, got_global, got_prev, scaled_global = [], [], [], []
    for feats, logits, targets in batches:
        f = torch.tensor(feats, dtype=dtype)
        lg = torch.tensor(logits, dtype=dtype)
        t = torch.tensor(targets)
        got_local.append(local(f, lg, t).item())
        got_global.append(glob(f, lg, t).item())
        scaled_global.append(glob.last_scaled.double().numpy())
        got_prev.append(glob_prev(f, lg, t).item())
    np.testing.assert_allclose(got_local, exp_local, rtol=rtol)
    np.testing.assert_allclose(got_global, exp_global, rtol=rtol)
    np.testing.assert_allclose(got_prev, exp_global_prev, rtol=rtol)

    # The scaled variances, written out by hand (variances are exact by construction):
    atol = 1e-9 if dtype == torch.float64 else 1e-5
    # batch 1: running min 1, range 3 -> same as local.
    np.testing.assert_allclose(scaled_global[0], [0.0, 1 / 3, 1.0], atol=atol)
    # batch 2: running min stays 1 (< 3), range 3 -> (v - 1) / 3, exceeds 1.
    np.testing.assert_allclose(scaled_global[1], [2 / 3, 4 / 3, 5 / 3], atol=atol)
    # batch 3: running min drops to 0.5 (its own min), range 2.5 -> same as local again.
    np.testing.assert_allclose(scaled_global[2], [0.0, 0.6, 1.0], atol=atol)
    assert got_global[0] == pytest.approx(got_local[0], rel=rtol)
    assert got_global[1] > got_local[1] * 1.05  # genuinely different
    assert got_global[2] == pytest.approx(got_local[2], rel=rtol)
    # alternative reading differs only on batch 3: (v - 1) / 2.5 = (-0.2, 0.4, 0.8).
    np.testing.assert_allclose(glob_prev.last_scaled.double().numpy(), [-0.2, 0.4, 0.8], atol=atol)
    assert glob.running_min.item() == pytest.approx(0.5, rel=1e-6)

    glob.reset()
    assert glob.running_min is None
