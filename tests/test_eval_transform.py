"""One eval transform: evaluate, predict and export see the same pixels of an image.

evaluate reads an image folder through the tf.data eval iterator; predict prepares a file
with `predict.load_images`; export's model expects that input and records it
(`predict.preprocessing_record`, which a converted model's model.json carries).  All go
through `transforms.eval_image`: for the "simple" mode a non-square image is centre-cropped
to a square, never stretched.
"""

import io

import numpy as np
import pytest
from PIL import Image

from skipnet_jax import predict
from skipnet_jax.data import pipeline
from skipnet_jax.default_config import get_default_config

SIZE = 32
# (width, height): landscape, portrait and square files, none of them SIZE px.
SHAPES = ((60, 40), (36, 50), (45, 45))


def _png(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def folder(tmp_path):
    """root/{train,val}/{a,b}/: the val files are the shapes above, in sorted order."""
    paths = []
    for split in ("train", "val"):
        for c, name in enumerate("ab"):
            (tmp_path / split / name).mkdir(parents=True)
            for i, (width, height) in enumerate(SHAPES):
                path = tmp_path / split / name / f"img{i}.png"
                path.write_bytes(_png(width, height, seed=10 * c + i))
                if split == "val":
                    paths.append(str(path))
    return str(tmp_path), paths


def _config(root, preprocessing):
    config = get_default_config()
    config.dataset = root
    config.image_size = SIZE
    config.eval_batch_size = len(SHAPES) * 2
    config.data.eval_split = "val"
    config.data.preprocessing = preprocessing
    config.data.prefetch = 0
    return config


@pytest.mark.parametrize("preprocessing", ["simple", "inception"])
def test_evaluate_predict_and_export_see_the_same_pixels(folder, preprocessing):
    root, paths = folder
    config = _config(root, preprocessing)
    (batch,) = list(pipeline.create_eval_iterator(config))
    evaluated = batch["image"]
    assert evaluated.shape == (len(paths), SIZE, SIZE, 3) and batch["mask"].all()

    predicted = predict.load_images(paths, config)
    np.testing.assert_allclose(predicted, evaluated, rtol=0, atol=1e-6)

    # export: its model's input is described by the record it prints (and model.json stores);
    # a config rebuilt from that record prepares the same pixels.
    record = predict.preprocessing_record(config)
    assert record["mode"] == preprocessing
    assert record["crop"] == ("center_square" if preprocessing == "simple" else "center")
    rebuilt = get_default_config()
    rebuilt.dataset = root
    predict.apply_preprocessing_record(rebuilt, record, "model.json")
    np.testing.assert_allclose(predict.load_images(paths, rebuilt), evaluated, rtol=0, atol=1e-6)


def test_simple_mode_crops_the_centre_square_instead_of_stretching(folder):
    """The landscape file's centre square, resized, is what every command sees; a stretched
    whole image is not."""
    import tensorflow as tf

    from skipnet_jax.data import preprocess

    root, paths = folder
    config = _config(root, "simple")
    _, mean, std = predict.eval_preprocessing(config)
    with open(paths[0], "rb") as f:
        pixels = np.asarray(Image.open(f).convert("RGB"))  # 40 x 60
    square = pixels[:, 10:50]
    expected = preprocess.normalize(
        preprocess.resize(tf.image.convert_image_dtype(square, tf.float32), SIZE), mean, std
    )
    stretched = preprocess.normalize(
        preprocess.resize(tf.image.convert_image_dtype(pixels, tf.float32), SIZE), mean, std
    )
    (batch,) = list(pipeline.create_eval_iterator(config))
    np.testing.assert_allclose(batch["image"][0], expected, atol=1e-6)
    assert np.abs(batch["image"][0] - stretched.numpy()).max() > 0.1
