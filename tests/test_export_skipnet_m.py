"""TFLite and ONNX exports of SkipNet-M (224 px, 1000 classes) match JAX within 1e-4.

The weights are the independent PyTorch reference's randomised ones with calibrated
BatchNorm statistics (skipnet_jax/reference/torch_skipnet.py), converted to Flax the
way released weights are, so every layer and every folded BatchNorm matters.  The inputs
are real JPEG files (written here) preprocessed exactly as ImageNet evaluation does.
"""

import io

import numpy as np
import torch

from skipnet_jax import convert, export, inference, predict
from skipnet_jax.data import pipeline
from skipnet_jax.default_config import get_default_config
from skipnet_jax.models import create_model
from skipnet_jax.reference import torch_skipnet

PARITY_ATOL = 1e-4


def _jpeg(width, height, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack(
        [
            127 + 120 * np.sin(2 * np.pi * (rng.uniform(1, 6) * x + rng.uniform(1, 6) * y + rng.uniform()))
            for _ in range(3)
        ],
        -1,
    )
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_skipnet_m_tflite_and_onnx_match_jax(tmp_path):
    torch.manual_seed(0)
    # last_linear_gain: logits of the size a trained classifier gives on these images (|z| up
    # to ~10; the default gain, calibrated on noise, gives ~100 on smooth images, where the
    # same ~3e-6 relative float error is 3e-4 absolute).
    net = torch_skipnet.randomize_(torch_skipnet.TorchSkipNet("large", 1.0), seed=0, last_linear_gain=0.25).eval()
    variables = convert.torch_state_dict_to_variables(net.state_dict(), "skipnet_m")
    config = get_default_config()
    config.model, config.dataset, config.image_size = "skipnet_m", "imagenet2012", 224
    config.data.preprocessing = "inception"
    loaded = inference.LoadedModel(
        model=create_model("skipnet_m", num_classes=1000), variables=variables, config=config, num_classes=1000,
        kind="converted", source="torch reference", step=None, use_ema=False,
    )  # fmt: skip
    mode, mean, std = pipeline.eval_preprocessing(config)
    images = np.stack(
        [
            predict.preprocess_image(_jpeg(w, h, i), 224, mode, mean, std)
            for i, (w, h) in enumerate([(500, 375), (320, 480)])
        ]
    )
    want = loaded.logits(images)
    assert 2.0 < np.abs(want).max() < 30.0  # logits with a real spread, not ~0

    tflite = export.to_tflite(export.inference_function(loaded), batch_size=2, image_size=224)
    tflite_path, onnx_path = tmp_path / "skipnet_m.tflite", tmp_path / "skipnet_m.onnx"
    tflite_path.write_bytes(tflite)
    onnx_path.write_bytes(export.to_onnx(tflite))

    errors = {}
    for name, got in (
        ("tflite", export.run_tflite(str(tflite_path), images)),
        ("onnx", export.run_onnx(str(onnx_path), images)),
    ):
        assert got.shape == (2, 1000)
        errors[name] = float(np.abs(got - want).max())
    print(f"SkipNet-M export max |logit diff| vs JAX: {errors} (logits up to {np.abs(want).max():.3g})")
    assert max(errors.values()) <= PARITY_ATOL, errors
