"""Evaluate, predict and export a trained model (skipnet_jax.evaluate / .predict / .export).

One tiny digits training run (30 steps, with EMA) is shared by every test here, trained once
per test session even when pytest-xdist spreads these tests over several workers.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, tiny_digits_config

from skipnet_jax import convert, evaluate, export, inference, plots, predict, train
from skipnet_jax.config_validation import ConfigError
from skipnet_jax.data import pipeline, preprocess

NUM_STEPS = 30
PARITY_ATOL = 1e-4


def _run(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", f"skipnet_jax.{module}", *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _train(digits_data_dir, workdir):
    config = tiny_digits_config(
        digits_data_dir,
        num_train_steps=NUM_STEPS,
        checkpoint_every_steps=15,
        log_every_steps=5,
        eval_every_steps=15,
        ema_decay=0.5,
        learning_rate=3e-3,
    )
    return config, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def run(digits_data_dir, tmp_path_factory):
    """A finished 30-step run with EMA weights: (workdir, config, results).

    Under pytest-xdist the tests of this module may be spread over several workers; the
    first one to get here trains (under a file lock, in a directory of this test run that
    all workers share) and every worker gets its own copy of the finished workdir.
    """
    workdir = str(tmp_path_factory.mktemp("inference_run"))
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:  # no xdist: nothing to share
        config, results = _train(digits_data_dir, workdir)
        return workdir, config, results
    import fcntl
    import shutil

    shared = tmp_path_factory.getbasetemp().parent / f"skipnet_inference_{run_id}"
    shared.mkdir(exist_ok=True)
    trained = shared / "run"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (trained / "results.json").exists():
            shutil.rmtree(trained, ignore_errors=True)  # an earlier worker's failed attempt
            _train(digits_data_dir, str(trained))
    shutil.copytree(trained, workdir, dirs_exist_ok=True)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    config = inference.config_from_json(os.path.join(workdir, "config.json"))
    config.data_dir = digits_data_dir  # this worker's copy of the data
    return workdir, config, results


@pytest.fixture(scope="module")
def loaded(run):
    workdir, _, _ = run
    return inference.load_model(workdir)


@pytest.fixture(scope="module")
def eval_images(loaded):
    """The first eval batch exactly as the training loop's evaluation sees it."""
    batch = next(pipeline.create_eval_iterator(loaded.config))
    return batch["image"][:16], batch["label"][:16]


@pytest.fixture(scope="module")
def digit_files(run, tmp_path_factory):
    """The first digits test image as an 8x8 grayscale PNG (lossless) and a 48x64 RGB JPEG."""
    import tensorflow_datasets as tfds
    from PIL import Image

    _, config, _ = run
    builder = tfds.builder("digits", data_dir=config.data_dir)
    example = next(builder.as_dataset(split="test", shuffle_files=False).take(1).as_numpy_iterator())
    pixels = example["image"][..., 0]
    out = tmp_path_factory.mktemp("images")
    png, jpg = str(out / "digit.png"), str(out / "digit photo.jpg")
    Image.fromarray(pixels, "L").save(png)
    Image.fromarray(pixels, "L").resize((64, 48), Image.BILINEAR).convert("RGB").save(jpg, quality=95)
    return png, jpg, int(example["label"])


def test_load_model_uses_the_ema_weights(run, loaded):
    workdir, _, _ = run
    assert loaded.kind == "checkpoint" and loaded.step == NUM_STEPS and loaded.use_ema
    assert loaded.source == os.path.join(workdir, "checkpoints", str(NUM_STEPS))
    assert loaded.class_names == tuple(str(i) for i in range(10))
    # The restored state's EMA and raw weights differ; evaluation takes the EMA ones.
    from skipnet_jax import checkpointing

    manager = checkpointing.create_manager(workdir, keep=3)
    raw = manager.restore(NUM_STEPS)
    manager.close()
    ema_kernel = raw["ema_params"]["classifier"]["kernel"]
    assert not np.allclose(raw["params"]["classifier"]["kernel"], ema_kernel)
    np.testing.assert_array_equal(loaded.variables["params"]["classifier"]["kernel"], ema_kernel)


def test_evaluate_matches_training_and_writes_files(run, loaded):
    workdir, _, results = run
    with open(os.path.join(workdir, "results.json")) as f:
        results_json_before = f.read()
    out = evaluate.evaluate_workdir(workdir)
    for key in ("eval_top1", "eval_top5", "eval_examples"):
        assert out[key] == results[key], key
    assert out["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-6)
    assert out["used_ema"] and out["step"] == NUM_STEPS and out["weights"] == "checkpoint"
    matrix = np.array(out["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 360
    assert np.trace(matrix) / 360 == pytest.approx(out["eval_top1"])
    np.testing.assert_array_equal(matrix.sum(axis=1), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])  # test split per class

    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f)["confusion_matrix"] == out["confusion_matrix"]
    with open(os.path.join(workdir, "results.json")) as f:
        assert f.read() == results_json_before  # never overwritten
    png = os.path.join(workdir, "plots", "confusion_matrix.png")
    assert os.path.getsize(png) > 15_000

    # The plots command now has TensorBoard curves (with eval points) and the confusion matrix.
    written = plots.save_all(workdir)
    assert {"training_curves", "bias_vs_cross_entropy", "confusion_matrix"} <= set(written)
    scalars = plots.read_scalars(os.path.join(workdir, "tensorboard"))
    np.testing.assert_array_equal(scalars["eval/top1"][0], [15, NUM_STEPS])
    assert os.path.getsize(written["training_curves"]) > 30_000


def test_evaluate_converted_dir_equals_workdir(run, loaded, tmp_path):
    _, config, results = run
    converted = convert.save_variables(
        jax.device_get(loaded.variables),
        str(tmp_path / "converted"),
        model_name=config.model,
        num_classes=10,
        data_config=config,
    )
    # The run's dataset and eval preprocessing (32 px, not the default 224) travel with the
    # weights; only the machine-local data_dir is given.
    own = inference.load_config(converted)
    assert (own.dataset, own.image_size) == ("digits", 32)
    own.data_dir = config.data_dir
    out = evaluate.evaluate_workdir(converted, own)
    assert out["weights"] == "converted" and out["step"] is None and not out["used_ema"]
    assert (out["eval_top1"], out["eval_top5"]) == (results["eval_top1"], results["eval_top5"])
    assert out["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-5)
    assert out["preprocessing"] == {
        "mode": "simple",
        "image_size": 32,
        "crop": "center_square",
        "mean": list(preprocess.DIGITS_MEAN),
        "std": list(preprocess.DIGITS_STD),
    }
    assert os.path.exists(os.path.join(converted, "eval_results.json"))


def test_evaluate_cli(run, tmp_path):
    workdir, _, results = run
    # An override on top of the workdir's own config.json (same numbers).
    result = _run("evaluate", f"--workdir={workdir}", "--config.data.prefetch=0")
    assert result.returncode == 0, result.stderr
    assert f"top-1  {results['eval_top1']:.4f}" in result.stdout
    with open(os.path.join(workdir, "eval_results.json")) as f:
        assert json.load(f)["eval_top1"] == results["eval_top1"]

    result = _run("evaluate", f"--workdir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert "no checkpoint" in line or "config.json" in line


def test_predict_png_matches_the_eval_pipeline(loaded, eval_images, digit_files):
    png, jpg, label = digit_files
    images, labels = eval_images
    assert labels[0] == label  # the file is the first test example
    mode, mean, std = predict.eval_preprocessing(loaded.config)
    assert mode == "simple"
    with open(png, "rb") as f:
        image = predict.preprocess_image(f.read(), 32, mode, mean, std)
    np.testing.assert_allclose(image, images[0], atol=1e-6)

    out = predict.predict(loaded, [png, jpg])
    np.testing.assert_allclose(out[0]["logits"], loaded.logits(images)[0], atol=1e-5)
    for p in out:
        probs = [prob for _, _, prob in p["top"]]
        assert len(p["top"]) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert [name for _, name, _ in p["top"]] == [str(i) for i, _, _ in p["top"]]


def test_predict_cli_on_a_jpeg(run, digit_files, loaded):
    workdir, _, _ = run
    _png, jpg, _ = digit_files
    expected = predict.predict(loaded, [jpg])[0]["top"]  # compiled here first: the CLI finds it in JAX's cache
    result = _run("predict", f"--workdir={workdir}", jpg)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[1] == jpg and len(lines) == 7
    for rank, (line, (_index, name, prob)) in enumerate(zip(lines[2:], expected), 1):
        assert line.split() == [f"{rank}.", name, f"{prob:.4f}"]
    with pytest.raises(ConfigError, match="cannot decode image"):
        predict.load_images([os.path.join(workdir, "config.json")], loaded.config)


def test_fold_batch_norm_is_exact(loaded, eval_images):
    images, _ = eval_images
    fn = export.inference_function(loaded, fold=True)
    folded = np.asarray(jax.jit(fn)(images))
    np.testing.assert_allclose(folded, loaded.logits(images), atol=1e-5)
    model = export._export_model(loaded)
    variables, paths = export.fold_batch_norm(model, jax.device_get(loaded.variables), 32)
    num_bn = sum(
        1 for path, _ in jax.tree_util.tree_leaves_with_path(loaded.variables["batch_stats"]) if path[-1].key == "mean"
    )
    assert len(paths) == num_bn > 40
    assert not jax.tree.leaves(variables["batch_stats"])  # every BN of SkipNet is folded


def _sharpened(loaded, factor=40.0):
    """`loaded` with its classifier scaled up: logits of order 10 instead of a barely trained model's ~0.3."""
    import dataclasses

    params = dict(jax.device_get(loaded.variables["params"]))
    params["classifier"] = {k: np.asarray(v) * factor for k, v in params["classifier"].items()}
    return dataclasses.replace(loaded, variables={**loaded.variables, "params": params})


@pytest.mark.parametrize("sharpen", [False, True], ids=["trained", "sharpened"])
def test_export_tflite_parity(loaded, eval_images, tmp_path, sharpen):
    images, _ = eval_images
    model = _sharpened(loaded) if sharpen else loaded
    path = str(tmp_path / "model.tflite")
    summary = export.export(model, "tflite", path, batch_size=4)
    assert summary["bytes"] == os.path.getsize(path)
    assert summary["preprocessing"] == predict.preprocessing_record(loaded.config)
    assert summary["preprocessing"]["image_size"] == summary["input"][1][1] == 32
    got = export.run_tflite(path, images[:10])  # 10 images: the last batch of 4 is padded
    want = model.logits(images)[:10]
    assert got.shape == (10, 10)
    err = np.abs(got - want).max()
    print(f"TFLite max |logit diff| = {err:.3g} (logits up to {np.abs(want).max():.3g})")
    assert err <= PARITY_ATOL
    if sharpen:
        assert np.abs(want).max() > 5


def test_export_onnx_cli_parity(run, loaded, eval_images, digit_files, tmp_path):
    workdir, _, _ = run
    path = str(tmp_path / "model.onnx")
    result = _run("export", f"--workdir={workdir}", "--format=onnx", f"--output={path}", "--batch_size=8")
    assert result.returncode == 0, result.stderr
    assert "EMA weights" in result.stdout and "folded into convolutions: yes" in result.stdout
    assert "preprocessing (digits eval): centre square, resize to 32, mean (0.3054, 0.3054, 0.3054)" in result.stdout
    import onnx

    model = onnx.load(path)
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    # Every conv (depthwise ones too) is one Conv node with its batch norm folded in.
    num_conv_bn = len(export.conv_bn_paths(loaded.model, jax.device_get(loaded.variables), 32))
    assert ops.count("Conv") == num_conv_bn > 40
    images, _ = eval_images
    png, jpg, _ = digit_files
    from_files = predict.predict(loaded, [png, jpg])
    batch = np.concatenate([images, predict.load_images([png, jpg], loaded.config)])
    got = export.run_onnx(path, batch)
    want = np.concatenate([loaded.logits(images), np.stack([p["logits"] for p in from_files])])
    err = np.abs(got - want).max()
    print(f"ONNX max |logit diff| = {err:.3g} (logits up to {np.abs(want).max():.3g})")
    assert err <= PARITY_ATOL

    with pytest.raises(ConfigError, match="valid choices: tflite, onnx"):
        export.export(loaded, "coreml", path)
