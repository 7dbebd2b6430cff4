"""Tests of skipnet_jax.convert: PyTorch (release layout) -> Flax variables, .pth reading,
orbax save/load and the CLI.  Skipped when torch is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the test extra installs it; a missing install must fail, not skip

from skipnet_jax import convert
from skipnet_jax.models import create_model
from skipnet_jax.models.skipnet_torch_keys import flax_path_to_torch_key, torch_key_to_flax_path
from skipnet_jax.reference.torch_skipnet import TorchSkipNet, randomize_

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "skipnet_m_torch_state_dict.json"


class NotATensor:
    """Unpickling it needs code execution: refused by ``torch.load(weights_only=True)``."""


@pytest.fixture(scope="module")
def torch_m():
    """Release-layout SkipNet-M with random weights AND random BN running statistics."""
    return randomize_(TorchSkipNet("large", 1.0), seed=0, calibration_batch=4).eval()


@pytest.fixture(scope="module")
def state_dict(torch_m):
    return torch_m.state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
    return convert.torch_state_dict_to_variables(state_dict, "skipnet_m")


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _assert_same_arrays(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("impl", ["shift", "lax"])
def test_logits_match_torch_at_224(torch_m, variables, impl):
    """Converted variables in the Flax model give the PyTorch model's logits and features
    (eval mode, fp32, 224 px, NCHW for torch vs NHWC for Flax)."""
    x = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        t_logits, t_feats = torch_m.forward_with_features(torch.from_numpy(x))
    t_logits = t_logits.numpy()
    t_feats = t_feats.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    assert np.abs(t_logits[0] - t_logits[1]).max() > 0.05  # input-dependent, not vacuous
    assert t_logits.std() > 0.1

    model = create_model("skipnet_m", num_classes=1000, depthwise_impl=impl)
    logits, aux = jax.jit(lambda v, xx: model.apply(v, xx, train=False))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1))
    )
    logit_diff = float(np.abs(np.asarray(logits) - t_logits).max())
    feat_diff = float(np.abs(np.asarray(aux["features"]) - t_feats).max())
    print(
        f"[{impl}] max |logit diff| = {logit_diff:.3g} (logit std {t_logits.std():.3g}); "
        f"max |feature diff| = {feat_diff:.3g} (feature max {np.abs(t_feats).max():.3g})"
    )
    assert logit_diff <= 1e-4
    assert feat_diff <= 1e-4 * max(1.0, float(np.abs(t_feats).max()))


# --------------------------------------------------------------------------- key / shape checks


def test_fixture_keys_convert_to_exactly_the_flax_tree():
    shapes = json.loads(FIXTURE.read_text())
    assert len(shapes) == 354
    sd = {k: np.zeros(s, np.int64 if k.endswith("num_batches_tracked") else np.float32) for k, s in shapes.items()}
    got = convert.torch_state_dict_to_variables(sd, "skipnet_m")
    model = create_model("skipnet_m", num_classes=1000)
    want = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 224, 224, 3)), train=False), jax.random.key(0))
    assert set(got) == set(want) == {"params", "batch_stats"}
    assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(lambda x: x, dict(want)))
    for path, leaf in _flat(dict(want)).items():
        g = _flat(got)[path]
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, path
    # The inverse name map (used to name missing entries) inverts the release table.
    for key in shapes:
        t = torch_key_to_flax_path(key)
        if t is not None:
            assert flax_path_to_torch_key(t.collection, t.path) == key


def test_conversion_layouts(state_dict, variables):
    w = state_dict["blocks.0.2.conv.3.weight"].numpy()  # depthwise (72, 1, 5, 5)
    k = variables["params"]["stage1_block2"]["depthwise"]["conv"]["kernel"]
    assert k.shape == (5, 5, 1, 72) and k.dtype == np.float32
    np.testing.assert_array_equal(k[1, 4, 0, 7], w[7, 0, 1, 4])
    w = state_dict["classifier.0.weight"].numpy()  # (1280, 960)
    np.testing.assert_array_equal(variables["params"]["classifier_hidden"]["kernel"], w.T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["head"]["bn"]["var"], state_dict["conv.1.running_var"].numpy()
    )


def test_all_problems_in_one_error(state_dict):
    sd = {k: v.numpy() for k, v in state_dict.items()}
    sd["conv.1.wieght"] = sd.pop("conv.1.weight")  # renamed
    del sd["blocks.2.1.conv.6.fc.2.bias"]  # missing
    sd["skip1.core_block.3.weight"] = np.zeros((96, 1, 3, 3), np.float32)  # was (96, 1, 5, 5)
    with pytest.raises(convert.ConversionError) as info:
        convert.torch_state_dict_to_variables(sd, "skipnet_m")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert msg.startswith("4 problems converting to skipnet_m: ")
    assert "missing: conv.1.weight, blocks.2.1.conv.6.fc.2.bias" in msg
    assert "unexpected: conv.1.wieght" in msg
    assert "shape mismatch: skip1.core_block.3.weight (96, 1, 3, 3) != expected (96, 1, 5, 5)" in msg


def test_wrong_variant_and_unknown_model(state_dict):
    with pytest.raises(
        convert.ConversionError,
        match=r"problems converting to skipnet_xs "
        r"\(the shapes fit skipnet_m: wrong model\?\)",
    ):
        convert.torch_state_dict_to_variables(state_dict, "skipnet_xs")
    with pytest.raises(convert.ConversionError, match="not a registered model"):
        convert.torch_state_dict_to_variables(state_dict, "nope")
    with pytest.raises(convert.ConversionError, match="empty"):
        convert.torch_state_dict_to_variables({}, "skipnet_m")
    with pytest.raises(convert.ConversionError, match="expected a state dict"):
        convert.torch_state_dict_to_variables([1, 2], "skipnet_m")
    with pytest.raises(convert.ConversionError, match="not tensors: epoch, state"):
        convert.torch_state_dict_to_variables({"epoch": 3, "state": [1, 2]}, "skipnet_m")


def test_wrappers_and_data_parallel_prefix(state_dict, variables):
    dp = {"module." + k: v for k, v in state_dict.items()}
    for wrapped in (
        {"state_dict": state_dict},
        {"net": state_dict, "epoch": 3},
        {"model": dp, "optimizer": {"lr": 0.1}},
        dp,
    ):
        _assert_same_arrays(convert.torch_state_dict_to_variables(wrapped, "skipnet_m"), variables)
    as_numpy = {k: v.numpy() for k, v in state_dict.items()}
    _assert_same_arrays(convert.torch_state_dict_to_variables(as_numpy, "skipnet_m"), variables)


def test_num_classes_inferred():
    sd = TorchSkipNet("small", 0.5, num_classes=7).state_dict()
    v = convert.torch_state_dict_to_variables(sd, "skipnet_xs")
    assert v["params"]["classifier"]["kernel"].shape == (1024, 7)
    with pytest.raises(convert.ConversionError, match=r"classifier\.3\.weight \(7, 1024\) != expected \(10, 1024\)"):
        convert.torch_state_dict_to_variables(sd, "skipnet_xs", num_classes=10)


# --------------------------------------------------------------------------- files


def test_load_torch_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(convert.ConversionError, match=f"{tmp_path}/missing.pth: no such file"):
        convert.load_torch_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(convert.ConversionError, match=r"garbage\.pth") as info:
        convert.load_torch_checkpoint(garbage)
    assert "\n" not in str(info.value)

    evil = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, evil)
    with pytest.raises(convert.ConversionError, match=r"evil\.pth.*not a weights-only"):
        convert.load_torch_checkpoint(evil)

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    ok = tmp_path / "ok.pth"
    ok.write_bytes(b"x")
    with pytest.raises(convert.ConversionError, match=r"pip install torch==2\.13\.0"):
        convert.load_torch_checkpoint(ok)


def test_save_load_and_overwrite(tmp_path, variables):
    out = tmp_path / "out"
    path = convert.save_variables(variables, out, model_name="skipnet_m", num_classes=1000, source="x.pth")
    assert path == str(out)
    assert sorted(os.listdir(out)) == ["model.json", "variables"]
    restored, meta = convert.load_variables(out)
    _assert_same_arrays(restored, variables)
    assert meta["model"] == "skipnet_m" and meta["num_classes"] == 1000 and meta["source"] == "x.pth"
    assert meta["num_params"] == 5_532_352
    with pytest.raises(convert.ConversionError, match="not empty; pass --overwrite"):
        convert.save_variables(variables, out, model_name="skipnet_m", num_classes=1000)
    convert.save_variables(variables, out, model_name="skipnet_m", num_classes=1000, overwrite=True)
    with pytest.raises(convert.ConversionError, match=r"model\.json is missing"):
        convert.load_variables(tmp_path)
    (out / "model.json").write_text(json.dumps({"model": "skipnet_m", "num_classes": 10}))
    with pytest.raises(convert.ConversionError, match="cannot restore") as info:
        convert.load_variables(out)
    assert "\n" not in str(info.value)


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "skipnet_jax.convert", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_round_trip(tmp_path, state_dict, variables):
    pth = tmp_path / "skipnet_m.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state_dict.items()}, "epoch": 1}, pth)
    out = tmp_path / "converted"
    r = _run_cli("--torch_checkpoint", pth, "--output", out)
    assert r.returncode == 0, r.stderr
    assert "skipnet_m" in r.stdout and "5,532,352" in r.stdout and "25,696" in r.stdout
    assert "1000" in r.stdout and str(out) in r.stdout
    restored, meta = convert.load_variables(out)
    _assert_same_arrays(restored, variables)
    assert meta == {**meta, "model": "skipnet_m", "num_classes": 1000, "source": str(pth)}
    # The release's input: ImageNet's eval preprocessing at 224 px, as the eval pipeline defines it.
    from skipnet_jax.data import pipeline

    assert meta["dataset"] == "imagenet2012"
    assert meta["preprocessing"] == {
        "mode": "inception",
        "image_size": 224,
        "resize_shorter_side": 256,
        "crop": "center",
        "mean": list(pipeline.IMAGENET_MEAN),
        "std": list(pipeline.IMAGENET_STD),
    }
    assert "imagenet2012 at 224 px" in r.stdout


def test_convert_file_checks_the_dataset(tmp_path):
    pth = tmp_path / "seven.pth"
    torch.save(TorchSkipNet("small", 0.5, num_classes=7).state_dict(), pth)
    out = tmp_path / "out"
    with pytest.raises(
        convert.ConversionError,
        match=r"the checkpoint has 7 classes but dataset='imagenet2012' has 1000; pass --dataset=",
    ):
        convert.convert_file(str(pth), str(out), model_name="skipnet_xs")
    with pytest.raises(convert.ConversionError, match=r"--image_size=16 is not valid; .* >= 32"):
        convert.convert_file(str(pth), str(out), model_name="skipnet_xs", image_size=16)
    with pytest.raises(convert.ConversionError, match="not_a_dataset"):
        convert.convert_file(str(pth), str(out), model_name="skipnet_xs", dataset="not_a_dataset")
    assert not out.exists()


def test_cli_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    r = _run_cli("--torch_checkpoint", missing, "--output", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()
