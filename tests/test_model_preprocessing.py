"""The preprocessing a model needs travels with it: predict / evaluate / export on converted directories.

A ``skipnet_jax.convert`` directory records the dataset its weights were trained on and that
dataset's eval preprocessing in model.json; predict applies it without flags, a class count
that does not fit the dataset is one error line, directories without the record still load,
and an unreadable image among good ones is reported and skipped.  The weights are random
(no training): every check here is about the input path, not accuracy.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from test_imagenet_pipeline import _encode, _image

from skipnet_jax import convert, export, inference, predict
from skipnet_jax.config_validation import ConfigError
from skipnet_jax.data import pipeline
from skipnet_jax.default_config import get_default_config
from skipnet_jax.models import create_model, list_models


def _run(module, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", f"skipnet_jax.{module}", *map(str, args)],
        cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _random_variables(model_name, num_classes, image_size, seed=0):
    """Random weights of the model's shapes (He-scaled kernels, BN statistics near 0 / 1); nothing compiled."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name, shape = path[-1].key, spec.shape
        if name == "kernel":
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "scale":
            value = np.ones(shape)
        else:  # biases, BN means
            value = rng.normal(0.0, 0.1, shape)
        return value.astype(np.float32)

    abstract = convert.abstract_variables(model_name, num_classes, image_size)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _data_config(dataset, image_size, data_dir=None):
    config = get_default_config()
    config.dataset, config.image_size, config.data_dir = dataset, image_size, data_dir
    return config


def _load(directory, **changes):
    """`inference.load_model` of `directory` with its own config (as the CLIs load it), `changes` applied."""
    config = inference.load_config(directory)
    config.update(changes)
    return inference.load_model(directory, config)


@pytest.fixture(scope="module")
def imagenet_weights():
    return _random_variables("skipnet_m", 1000, 224)


@pytest.fixture(scope="module")
def imagenet_dir(imagenet_weights, tmp_path_factory):
    """SkipNet-M with 1000 classes, saved as the converter saves the release weights."""
    out = tmp_path_factory.mktemp("converted") / "skipnet_m"
    return convert.save_variables(
        imagenet_weights, out, model_name="skipnet_m", num_classes=1000, data_config=convert.data_config()
    )


@pytest.fixture(scope="module")
def digits_dir(digits_data_dir, tmp_path_factory):
    """SkipNet-XS with 10 classes trained (here: initialised) on digits at 32 px."""
    out = tmp_path_factory.mktemp("converted") / "skipnet_xs"
    return convert.save_variables(
        _random_variables("skipnet_xs", 10, 32),
        out,
        model_name="skipnet_xs",
        num_classes=10,
        data_config=_data_config("digits", 32, digits_data_dir),
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two photo-like JPEGs, landscape and portrait (the centre crop differs from a plain resize)."""
    out = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (width, height) in enumerate([(500, 375), (320, 480)]):
        path = out / f"photo {i}.jpg"
        path.write_bytes(_encode(_image(width, height, seed=i), "JPEG", quality=90))
        paths.append(str(path))
    return paths


def _imagenet_eval_pipeline(paths):
    """The files as the tf.data eval pipeline prepares imagenet2012 examples (`inception.eval_image`)."""
    import tensorflow as tf

    from skipnet_jax.data import inception, preprocess

    def load(path):
        image = inception.eval_image(tf.io.read_file(path), 224)
        return preprocess.normalize(image, pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)

    return np.stack(list(tf.data.Dataset.from_tensor_slices(paths).map(load).as_numpy_iterator()))


def _printed_top(stdout):
    """``{path: [(class index, probability), ...]}`` from predict's output."""
    top, path = {}, None
    for line in stdout.splitlines()[1:]:
        if not line.startswith("  "):
            path = line
            top[path] = []
            continue
        index = re.search(r"\(class (\d+)\)", line)
        top[path].append((int(index.group(1)) if index else int(line.split()[1]), float(line.split()[-1])))
    return top


def test_convert_records_the_eval_preprocessing(imagenet_dir):
    with open(os.path.join(imagenet_dir, convert.META_FILE)) as f:
        meta = json.load(f)
    assert meta["dataset"] == "imagenet2012"
    assert meta["preprocessing"] == {
        "mode": "inception",
        "image_size": 224,
        "resize_shorter_side": 256,
        "crop": "center",
        "mean": list(pipeline.IMAGENET_MEAN),
        "std": list(pipeline.IMAGENET_STD),
    }
    config = inference.load_config(imagenet_dir)
    assert (config.model, config.num_classes, config.dataset, config.image_size) == (
        "skipnet_m",
        1000,
        "imagenet2012",
        224,
    )
    assert predict.eval_preprocessing(config) == ("inception", pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)


def test_predict_converted_imagenet_weights_needs_no_flag(imagenet_dir, imagenet_weights, photos, tmp_path):
    images = _imagenet_eval_pipeline(photos)
    direct = inference.LoadedModel(
        model=create_model("skipnet_m", num_classes=1000), variables=imagenet_weights, config=get_default_config(),
        num_classes=1000, kind="converted", source="memory", step=None, use_ema=False,
    )  # fmt: skip
    logits = direct.logits(images)  # compiled here first: the CLI finds it in JAX's cache
    assert np.abs(logits).max() > 1.0
    want = [list(np.argsort(-row, kind="stable")[:5]) for row in logits]

    result = _run("predict", f"--workdir={imagenet_dir}", *photos, env={"TFDS_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "imagenet2012" in result.stdout.splitlines()[0] and "shorter side 256" in result.stdout.splitlines()[0]
    got = _printed_top(result.stdout)
    assert list(got) == photos
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for path, top, row in zip(photos, want, probs):
        assert [index for index, _ in got[path]] == top
        np.testing.assert_allclose([p for _, p in got[path]], row[top], atol=1e-4)


def test_directory_without_the_record(imagenet_dir, photos, tmp_path):
    """Written before model.json recorded the dataset: loads with --config.dataset, else one error."""
    old = tmp_path / "old"
    shutil.copytree(imagenet_dir, old)
    meta = json.loads((old / convert.META_FILE).read_text())
    (old / convert.META_FILE).write_text(
        json.dumps({k: v for k, v in meta.items() if k not in ("dataset", "preprocessing")})
    )

    result = _run("predict", f"--workdir={old}", photos[0], env={"TFDS_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert "1000 classes" in line and "config.dataset='digits' has 10" in line and "--config.dataset=" in line
    assert result.stdout == ""

    from_old = predict.predict(_load(str(old), dataset="imagenet2012", data_dir=str(tmp_path)), photos)
    from_new = predict.predict(inference.load_model(imagenet_dir), photos)
    assert [p["top"] for p in from_old] == [p["top"] for p in from_new]


def test_class_count_mismatch_is_one_error(digits_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"10 classes but config\.dataset='imagenet2012' has 1000; .*--config\.dataset"
    ):
        _load(digits_dir, dataset="imagenet2012", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"mean": [0.5, 0.5]}, "preprocessing.mean"),
        ({"mode": "fancy"}, "preprocessing.mode"),
        ({"image_size": "224"}, "preprocessing.image_size"),
        ({"resize_shorter_side": 288}, "preprocessing.resize_shorter_side"),
    ],
)
def test_bad_record_is_one_error(imagenet_dir, tmp_path, change, key):
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads(open(os.path.join(imagenet_dir, convert.META_FILE)).read())
    meta["preprocessing"].update(change)
    (bad / convert.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        inference.load_config(str(bad))
    assert convert.META_FILE in str(info.value) and "\n" not in str(info.value)


def test_predict_reports_unreadable_files_and_predicts_the_rest(digits_dir, digits_data_dir, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(_image(20, 16, seed=3), "PNG"))
    jpeg = _encode(_image(60, 40, seed=4), "JPEG", quality=90)
    garbage, truncated, empty, missing = (
        tmp_path / "garbage.jpg",
        tmp_path / "truncated.jpg",
        tmp_path / "empty.png",
        tmp_path / "missing.png",
    )
    garbage.write_bytes(b"this is not an image")
    truncated.write_bytes(jpeg[: len(jpeg) // 3])
    empty.write_bytes(b"")
    bad = [garbage, truncated, empty, missing]

    result = _run("predict", f"--workdir={digits_dir}", f"--config.data_dir={digits_data_dir}", garbage, good, *bad[1:])
    assert result.returncode == 1, result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == len(bad), result.stderr  # one line per bad file
    for path in bad:
        assert sum(f" {path}:" in line or line.endswith(f" {path}") for line in lines) == 1, path
    for internal in ("function_node", "[Op:", "JPEG library", "Traceback"):
        assert internal not in result.stderr
    assert list(_printed_top(result.stdout)) == [str(good)]

    result = _run("predict", f"--workdir={digits_dir}", f"--config.data_dir={digits_data_dir}", *bad)
    assert result.returncode == 2 and result.stdout == ""
    assert len(_error_lines(result.stderr)) == len(bad)

    # The Python API: an entry per path, in order, either a prediction or the error.
    out = predict.predict(_load(digits_dir, data_dir=digits_data_dir), [str(good), str(garbage)])
    assert [p["path"] for p in out] == [str(good), str(garbage)]
    assert len(out[0]["top"]) == 5 and "error" not in out[0]
    assert out[1]["error"].startswith(f"cannot decode image {garbage}: ") and "top" not in out[1]


def test_export_docstring_names_only_real_model_fields():
    named = set(re.findall(r"``(\w+_impl)=", export.__doc__))
    fields = {f.name for name in list_models() for f in dataclasses.fields(create_model(name, num_classes=10))}
    assert named <= fields, named - fields


def test_export_traces_plain_convolutions(digits_dir, digits_data_dir):
    """Every convolution of the exported function is one lax conv (the formats' conv operators)."""
    loaded = _load(digits_dir, data_dir=digits_data_dir)
    images = np.zeros((1, 32, 32, 3), np.float32)
    num_convs = len(export.conv_bn_paths(loaded.model, loaded.variables, 32))

    def count(jaxpr, name):
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name == name
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    total += count(inner, name)
        return total

    for fold in (True, False):
        jaxpr = jax.make_jaxpr(export.inference_function(loaded, fold=fold))(images).jaxpr
        assert count(jaxpr, "conv_general_dilated") == num_convs > 40
