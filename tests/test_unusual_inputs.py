"""Inputs a user meets sooner or later: 16-bit and palette PNGs, a directory named like an image,
symlink loops in an image folder, and workdir paths with spaces and non-ASCII characters."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_digits_config
from PIL import Image

from skipnet_jax import evaluate, train
from skipnet_jax.data import folder, inception


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _rgb(width=24, height=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_16_bit_png_decodes_to_its_8_bit_values():
    values = _rgb()[..., 0]
    sixteen = Image.fromarray(values.astype(np.uint16) * 257)  # 0..255 spread over 0..65535
    assert sixteen.mode.startswith("I;16") or sixteen.mode == "I"
    decoded = inception.decode_rgb(tf.constant(_png(sixteen))).numpy()
    assert decoded.shape == (16, 24, 3) and decoded.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], values)


def test_palette_png_decodes_to_the_palette_colours():
    rgb = _rgb()
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    assert palette_image.mode == "P"
    decoded = inception.decode_rgb(tf.constant(_png(palette_image))).numpy()
    np.testing.assert_array_equal(decoded, np.asarray(palette_image.convert("RGB")))


@pytest.fixture
def odd_folder(tmp_path):
    """train/val with 2 classes of 2 PNGs, plus a directory named like an image and symlink loops."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(2):
                (directory / f"{i}.png").write_bytes(_png(Image.fromarray(_rgb(seed=10 * c + i))))
    (root / "train" / "cat" / "not_an_image.jpg").mkdir()  # a directory with an image's name
    os.symlink(root / "train", root / "train" / "dog" / "loop")  # a cycle back up the tree
    os.symlink("self_loop", root / "train" / "self_loop")  # points at itself: ELOOP
    return str(root)


def test_folder_ignores_directories_named_like_images_and_symlink_loops(odd_folder):
    assert folder.class_names(odd_folder) == ("cat", "dog")  # the dangling loop is no class
    split = folder.load_split(odd_folder, "train")
    assert len(split.paths) == 4 and all(path.endswith(".png") for path in split.paths), split.paths
    assert sorted(int(label) for label in split.labels) == [0, 0, 1, 1]


def test_workdir_with_spaces_and_non_ascii_trains_resumes_and_evaluates(
    digits_data_dir, tmp_path, registered_step_test_net
):
    workdir = str(tmp_path / "run with spaces ünïcødé 運行" / "sub dir")
    # The workdir's path is under test, not the network.
    config = tiny_digits_config(digits_data_dir, model=registered_step_test_net, num_train_steps=8)
    results = train.train_and_evaluate(config, workdir)
    assert results["steps"] == 8 and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["eval_top1"] == results["eval_top1"]
    again = train.train_and_evaluate(config, workdir)  # finished: kept as it is
    assert again == results
    evaluated = evaluate.evaluate_workdir(workdir)
    assert evaluated["eval_top1"] == pytest.approx(results["eval_top1"])
