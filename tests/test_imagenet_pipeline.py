"""ImageNet-style input: image folders, TFDS imagenet2012 from a (tiny) manual dir,
Inception crops, eval centre crop, decoding of odd formats, RandAugment, and one
end-to-end CLI run with configs/imagenet_m.py on a folder of real JPEGs."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO_ROOT
from PIL import Image

from skipnet_jax.data import folder, inception, pipeline, preparation, randaugment
from skipnet_jax.default_config import get_default_config

CLASSES = ("cat", "dog", "fish")
# (width, height) of the 4 train images per class; val images use the same sizes flipped.
SIZES = ((500, 375), (300, 400), (256, 256), (641, 479))
SYNSETS = ("n01440764", "n01443537", "n01484850")  # labels 0, 1, 2 of imagenet2012


def _image(width, height, seed):
    """A smooth RGB image (compresses like a photo, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        127 + 120 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform()))
        for _ in range(3)
    ]
    return np.stack(channels, -1).astype(np.uint8)


def _encode(array, fmt, mode=None, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _cmyk_jpeg(array):
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _odd_file(kind, array):
    """(file name suffix, bytes) of a non-plain-RGB-JPEG variant."""
    if kind == "png":
        return ".png", _encode(array, "PNG")
    if kind == "gray":
        return ".jpeg", _encode(array[..., 0], "JPEG", "L")
    if kind == "rgba":
        alpha = np.full((*array.shape[:2], 1), 128, np.uint8)
        return ".PNG", _encode(np.concatenate([array, alpha], -1), "PNG", "RGBA")
    if kind == "cmyk":
        return ".jpg", _cmyk_jpeg(array)
    return ".JPG", _encode(array, "JPEG", quality=90)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{train,val}/<class>/: 3 classes x 4 real images of varied sizes and formats."""
    root = tmp_path_factory.mktemp("image_folder")
    kinds = itertools.cycle(["jpeg", "png", "gray", "rgba", "cmyk"])
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            directory = root / split / name
            directory.mkdir(parents=True)
            for i, (width, height) in enumerate(SIZES):
                if split == "val":
                    width, height = height, width
                suffix, data = _odd_file(next(kinds), _image(width, height, seed=100 * c + i))
                (directory / f"img{i}{suffix}").write_bytes(data)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return str(root)


def _config(dataset, **data):
    config = get_default_config()
    config.dataset = dataset
    config.image_size = 64
    config.batch_size = 4
    config.eval_batch_size = 5
    config.data.eval_split = "validation"
    config.data.update(data)
    return config


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ------------------------------------------------------------------ decoding


def _decode(data):
    return inception.decode_rgb(tf.constant(data)).numpy()


@pytest.mark.parametrize("kind", ["png", "gray", "rgba", "cmyk", "jpeg"])
def test_formats_decode_to_rgb(kind):
    rgb = _image(40, 30, seed=1)
    _, data = _odd_file(kind, rgb)
    decoded = _decode(data)
    assert decoded.shape == (30, 40, 3) and decoded.dtype == np.uint8
    if kind in ("png", "rgba"):  # lossless; alpha dropped
        np.testing.assert_array_equal(decoded, rgb)
    elif kind == "gray":
        assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()
        assert np.abs(decoded[..., 0].astype(int) - rgb[..., 0]).mean() < 4
    elif kind == "jpeg":  # the RGB pixels PIL decodes, up to IDCT rounding
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int32)
        assert np.abs(decoded.astype(int) - reference).mean() < 1.5
    else:  # CMYK JPEG (PIL's RGB -> CMYK is naive, so compare with the source image)
        assert np.abs(decoded.astype(int) - rgb).mean() < 8


def test_grayscale_png_and_decoded_arrays():
    gray = _image(20, 10, seed=2)[..., :1]
    decoded = _decode(_encode(gray[..., 0], "PNG", "L"))
    np.testing.assert_array_equal(decoded, np.repeat(gray, 3, -1))
    np.testing.assert_array_equal(inception.decode_rgb(tf.constant(gray)).numpy(), np.repeat(gray, 3, -1))


# ------------------------------------------------------------------ train crop


def _seed(i):
    return tf.constant([7, i], tf.int64)


def test_crop_window_area_aspect_and_bounds():
    height, width = 375, 500
    for i in range(200):
        y, x, h, w = inception.crop_window(tf.constant([height, width, 3]), _seed(i)).numpy()
        assert 0 <= y and 0 <= x and y + h <= height and x + w <= width and h > 0 and w > 0
        area = h * w / (height * width)
        central = (h, w) == (round(0.875 * height),) * 2  # the fallback
        if not central:
            assert 0.08 - 0.01 <= area <= 1.0
            assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_random_resized_crop_shape_and_determinism():
    data = _encode(_image(500, 375, seed=3), "JPEG", quality=90)
    outputs = [inception.train_image(tf.constant(data), _seed(i), 64).numpy() for i in (0, 0, 1)]
    assert outputs[0].shape == (64, 64, 3) and outputs[0].dtype == np.float32
    assert 0.0 <= outputs[0].min() and outputs[0].max() <= 1.0
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_crop_from_bytes_equals_crop_of_decoded_image(fmt):
    """The JPEG fast path (decode only the window) picks and decodes the same window."""
    data = _encode(_image(300, 400, seed=4), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    decoded = tf.constant(_decode(data))
    for i in range(5):
        from_bytes = inception.train_image(tf.constant(data), _seed(i), 48).numpy()
        from_array = inception.train_image(decoded, _seed(i), 48).numpy()
        np.testing.assert_allclose(from_bytes, from_array, atol=2 / 255)


# ------------------------------------------------------------------ eval crop


def test_eval_resize_size():
    assert inception.eval_resize_size(224) == 256
    assert inception.eval_resize_size(64) == math.ceil(64 / 0.875) == 74


@pytest.mark.parametrize("width, height", [(400, 300), (300, 400)])
def test_eval_centre_crop_geometry(width, height):
    """Ramps along x (red) and y (green) read back where the geometry says they should."""
    size = 64
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = np.stack([x / (width - 1), y / (height - 1), np.zeros_like(x)], -1)
    image = np.round(ramp * 255).astype(np.uint8)
    out = inception.eval_image(tf.constant(_encode(image, "PNG")), size).numpy()
    assert out.shape == (size, size, 3)

    short = 74  # ceil(64 / 0.875)
    scale = short / min(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # Output pixel j samples resized pixel (left + j), whose centre maps back to source x.
    cols = (left + np.arange(size) + 0.5) / scale - 0.5
    rows = (top + np.arange(size) + 0.5) / scale - 0.5
    np.testing.assert_allclose(out[size // 2, :, 0], cols / (width - 1), atol=1.5 / 255 + 0.004)
    np.testing.assert_allclose(out[:, size // 2, 1], rows / (height - 1), atol=1.5 / 255 + 0.004)


# ------------------------------------------------------------------ RandAugment


@pytest.mark.parametrize("name", sorted(randaugment.OPS))
def test_randaugment_ops_keep_shape_and_range(name):
    image = tf.constant(_image(32, 24, seed=5).astype(np.float32) / 255)
    for sign in (-1.0, 1.0):
        out = randaugment.OPS[name](image, tf.constant(9.0), tf.constant(sign)).numpy()
        assert out.shape == (24, 32, 3) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "color"])
def test_randaugment_magnitude_zero_is_identity(name):
    image = tf.constant(_image(32, 24, seed=6).astype(np.float32) / 255)
    out = randaugment.OPS[name](image, tf.constant(0.0), tf.constant(1.0)).numpy()
    np.testing.assert_allclose(out, image.numpy(), atol=1e-5)


def test_randaugment_ops_do_something():
    image = tf.constant(_image(32, 24, seed=7).astype(np.float32) / 255)
    for name, op in randaugment.OPS.items():
        if name != "identity":
            out = op(image, tf.constant(10.0), tf.constant(1.0)).numpy()
            assert np.abs(out - image.numpy()).max() > 0.01, name


def test_randaugment_is_deterministic_per_seed():
    image = tf.constant(_image(32, 32, seed=8).astype(np.float32) / 255)
    assert randaugment.randaugment(image, _seed(0), 0, 9.0) is image
    outs = [randaugment.randaugment(image, _seed(i), 2, 9.0).numpy() for i in range(12)]
    np.testing.assert_array_equal(outs[0], randaugment.randaugment(image, _seed(0), 2, 9.0).numpy())
    assert len({o.tobytes() for o in outs}) > 6


# ------------------------------------------------------------------ image folder


def test_folder_dataset_info(image_folder):
    info = pipeline.get_dataset_info(_config(image_folder))
    assert info.class_names == CLASSES and info.num_classes == 3
    assert info.num_train_examples == 12 and info.num_eval_examples == 12
    listing = folder.load_split(image_folder, "train")
    assert listing.labels == (0,) * 4 + (1,) * 4 + (2,) * 4
    assert not any(p.endswith(".txt") for p in listing.paths)


def test_folder_train_stream_is_deterministic_resumable_and_splits_over_processes(image_folder):
    config = _config(image_folder, randaugment_num_layers=2)
    reference = _take(pipeline.create_train_iterator(config), 5)  # crosses epochs (12 examples)
    assert reference[0]["image"].shape == (4, 64, 64, 3) and reference[0]["image"].dtype == np.float32
    assert set(np.concatenate([b["label"] for b in reference[:3]])) == {0, 1, 2}
    _assert_batches_equal(_take(pipeline.create_train_iterator(config), 5), reference)
    _assert_batches_equal(_take(pipeline.create_train_iterator(config, start_step=3), 2), reference[3:])
    halves = [
        _take(pipeline.create_train_iterator(config, start_step=1, process_index=k, process_count=2), 2)
        for k in range(2)
    ]
    merged = [{key: np.concatenate([a[key], b[key]]) for key in a} for a, b in zip(*halves)]
    _assert_batches_equal(merged, reference[1:3])


def test_folder_eval_centre_crops_every_example_once(image_folder):
    config = _config(image_folder)
    batches = list(pipeline.create_eval_iterator(config))
    assert len(batches) == pipeline.num_eval_batches(config) == 3  # 12 = 5 + 5 + 2 (+3 padding)
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(15) < 12)
    np.testing.assert_array_equal(labels[:12], np.repeat([0, 1, 2], 4))
    # Example 0 is val/cat/img0: a 375x500 (w x h) JPEG, centre-cropped.
    path = folder.load_split(image_folder, "val").paths[0]
    with open(path, "rb") as f:
        expected = inception.eval_image(tf.constant(f.read()), 64).numpy()
    mean, std = np.array(pipeline.IMAGENET_MEAN), np.array(pipeline.IMAGENET_STD)
    np.testing.assert_allclose(batches[0]["image"][0], (expected - mean) / std, atol=1e-5)


def test_folder_errors(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"no 'test' split directory.*train, val"):
        pipeline.get_dataset_info(_config(image_folder, eval_split="test"))
    with pytest.raises(ValueError, match="not a directory"):
        pipeline.get_dataset_info(_config(str(tmp_path / "missing")))
    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    (bad / "train" / "a" / "x.png").write_bytes(_encode(_image(8, 8, 0), "PNG"))
    (bad / "val" / "zebra").mkdir(parents=True)
    with pytest.raises(ValueError, match="classes not in train/: zebra"):
        pipeline.get_dataset_info(_config(str(bad)))


def test_data_config_errors(image_folder):
    for field, value, match in [
        ("preprocessing", "fancy", "valid choices: auto, simple, inception"),
        ("randaugment_num_layers", -1, "randaugment_num_layers"),
        ("randaugment_magnitude", 11.0, r"randaugment_magnitude=11.0 .* \[0, 10\]"),
    ]:
        config = _config(image_folder)
        config.data[field] = value
        with pytest.raises(ValueError, match=match):
            pipeline.get_dataset_info(config)


# ------------------------------------------------------------------ TFDS imagenet2012


def _add_to_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def imagenet_manual_dir(tmp_path_factory):
    """The two official tars in miniature: what TFDS's imagenet2012 builder reads.

    Train: ILSVRC2012_img_train.tar holding <synset>.tar archives of <synset>_<n>.JPEG.
    Val: ILSVRC2012_img_val.tar of ILSVRC2012_val_<8 digits>.JPEG; TFDS labels the k-th
    name in sorted order with line k of its bundled validation_labels.txt.
    """
    manual = tmp_path_factory.mktemp("imagenet_manual")
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for s, synset in enumerate(SYNSETS):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i, (width, height) in enumerate(SIZES):
                    jpeg = _encode(_image(width, height, seed=10 * s + i), "JPEG", quality=90)
                    _add_to_tar(inner, f"{synset}_{i + 1}.JPEG", jpeg)
            _add_to_tar(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(6):
            jpeg = _encode(_image(300 + 20 * i, 250, seed=50 + i), "JPEG", quality=90)
            _add_to_tar(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg)
    return str(manual)


def test_imagenet2012_prepared_from_manual_dir(imagenet_manual_dir, tmp_path):
    import tensorflow_datasets as tfds

    config = _config("imagenet2012", manual_dir=imagenet_manual_dir, cache=True)  # cache ignored
    config.data_dir = str(tmp_path)
    with pytest.raises(pipeline.DataNotFoundError) as excinfo:  # only preparation writes data
        pipeline.get_dataset_info(config)
    message = str(excinfo.value)
    assert "not prepared" in message and repr(str(tmp_path)) in message and "ILSVRC2012_img_train.tar" in message
    assert "skipnet_jax.data.prepare" in message and "\n" not in message
    assert not os.listdir(tmp_path)
    preparation.prepare_dataset(config)
    info = pipeline.get_dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 12, 6)
    builder = tfds.builder("imagenet2012", data_dir=str(tmp_path))
    assert builder.info.file_format.value == "array_record"  # prepared for random access

    train = _take(pipeline.create_train_iterator(config), 3)
    assert train[0]["image"].shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(np.sort(np.concatenate([b["label"] for b in train])), np.repeat([0, 1, 2], 4))
    evals = list(pipeline.create_eval_iterator(config))
    labels_file = os.path.join(os.path.dirname(tfds.__file__), "datasets/imagenet2012/validation_labels.txt")
    with open(labels_file) as f:
        synsets = [next(f).strip() for _ in range(6)]
    names = builder.info.features["label"].names
    got = np.concatenate([b["label"] for b in evals])[np.concatenate([b["mask"] for b in evals]) == 1]
    assert sorted(got) == sorted(names.index(s) for s in synsets)


def test_imagenet2012_missing_files_error(tmp_path):
    config = _config("imagenet2012")
    config.data_dir = str(tmp_path / "tfds")
    with pytest.raises(pipeline.DataNotFoundError) as excinfo:
        preparation.prepare_dataset(config)
    message = str(excinfo.value)
    default_manual = os.path.join(str(tmp_path / "tfds"), "downloads", "manual")
    assert repr(default_manual) in message and "\n" not in message
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    config.data.manual_dir = str(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="elsewhere"):
        preparation.prepare_dataset(config)


# ------------------------------------------------------------------ end to end


def _cli(workdir, *overrides, timeout=900):
    command = [
        sys.executable, "-m", "skipnet_jax.main", "--config=configs/imagenet_m.py", f"--workdir={workdir}",
        *overrides,
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_missing_imagenet_files_is_one_line(tmp_path):
    result = _cli(tmp_path / "run", f"--config.data_dir={tmp_path / 'tfds'}", timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "ILSVRC2012_img_train.tar" in errors[0] and "downloads/manual" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_imagenet_recipe_on_image_folder(image_folder, tmp_path):
    """The ImageNet recipe on an image folder (SkipNet-XS: SkipNet-M's own CLI run is the next test)."""
    workdir = tmp_path / "run"
    result = _cli(
        workdir,
        f"--config.dataset={image_folder}",
        "--config.model=skipnet_xs",
        "--config.image_size=64",
        "--config.batch_size=4",
        "--config.eval_batch_size=4",
        "--config.num_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["steps"] == 2 and results["eval_examples"] == 12
    assert results["model"] == "skipnet_xs" and results["dataset"] == image_folder
    assert np.isfinite([results["train_loss"], results["eval_loss"], results["params_global_norm"]]).all()
    assert os.listdir(workdir / "checkpoints") == ["2"]
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["data"]["randaugment_num_layers"] == 2 and saved["dtype"] == "bfloat16"
    assert saved["learning_rate"] == pytest.approx(0.016 * 4 / 256)  # scaled with the batch


def test_cli_imagenet_m_on_tfds_imagenet2012_manual_dir(imagenet_manual_dir, tmp_path):
    """configs/imagenet_m.py as documented: the first run prepares imagenet2012 from the
    official tars in --config.data.manual_dir, trains 2 steps and evaluates the full split."""
    workdir = tmp_path / "run"
    result = _cli(
        workdir,
        f"--config.data_dir={tmp_path / 'tfds'}",
        f"--config.data.manual_dir={imagenet_manual_dir}",
        "--config.image_size=64",
        "--config.batch_size=4",
        "--config.eval_batch_size=4",
        "--config.num_train_steps=2",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["steps"] == 2 and results["eval_examples"] == 6 and results["dataset"] == "imagenet2012"
    assert np.isfinite([results["train_loss"], results["eval_loss"], results["params_global_norm"]]).all()
    assert os.path.isdir(tmp_path / "tfds" / "imagenet2012")


def test_folder_config_object_roundtrip(image_folder):
    """The pipeline reads a plain ConfigDict without the new data fields (old configs)."""
    config = ml_collections.ConfigDict(_config(image_folder).to_dict())
    for field in ("preprocessing", "randaugment_num_layers", "randaugment_magnitude", "manual_dir"):
        del config.data[field]
    batch = next(pipeline.create_train_iterator(config))
    assert batch["image"].shape == (4, 64, 64, 3)
