"""End-to-end training on the bundled digits: results, checkpoints, exact resume, options."""

import functools
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_digits_config
from step_test_net import StepTestNet

from skipnet_jax import optim, steps, train

RESULT_KEYS = {
    "eval_top1", "eval_top5", "eval_loss", "train_loss", "steps", "examples_per_sec",
    "wall_seconds", "params_global_norm", "eval_examples",
}  # fmt: skip


def _read_results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


def _strict_json(path):
    """Parses like a non-Python reader: NaN/Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_train_evaluate_resume_exactly_and_a_finished_run_keeps_its_results(
    digits_data_dir, tmp_path, registered_step_test_net
):
    # The loop's results, checkpoints and resume are under test, not the network (SkipNet-XS's
    # exact resume: test_robustness).
    config = tiny_digits_config(digits_data_dir, model=registered_step_test_net, num_train_steps=8)
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)

    assert RESULT_KEYS <= set(results)
    assert results == _read_results(workdir)
    assert results["steps"] == 8 and results["eval_examples"] == 360  # every test example, none dropped
    assert 0.0 <= results["eval_top1"] <= results["eval_top5"] <= 1.0
    assert np.isfinite([results["train_loss"], results["eval_loss"], results["params_global_norm"]]).all()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    # A run restarted from the step-4 checkpoint must end exactly where the uninterrupted one did:
    # same data order, same dropout masks, same optimiser state.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    os.remove(resumed / "results.json")
    again = train.train_and_evaluate(config, str(resumed))
    assert again["resumed_from_step"] == 4
    for key in ("eval_top1", "eval_top5", "eval_loss", "train_loss", "params_global_norm"):
        assert again[key] == results[key], key

    # Re-running a finished run trains nothing and leaves results.json byte for byte (the same
    # config, so these runs reuse the steps compiled above).
    results_path = resumed / "results.json"
    written = results_path.read_bytes()
    assert _strict_json(results_path) == again and again["null_reasons"] == {}
    assert train.train_and_evaluate(config, str(resumed)) == again
    assert results_path.read_bytes() == written

    # Preempted (or killed) after the last checkpoint, before results.json: the rerun only
    # evaluates, and the train metrics and throughput come from the checkpoint's run record.
    results_path.unlink()
    last = train.train_and_evaluate(config, str(resumed))
    assert last["resumed_from_step"] == 8 and last["steps"] == 8
    for key in ("train_loss", "train_accuracy", "examples_per_sec", "eval_top1", "params_global_norm"):
        assert last[key] == again[key], key
    assert last["null_reasons"] == {} and _strict_json(results_path) == last


def test_skipped_steps_accumulate_across_resumes(digits_data_dir, tmp_path, registered_step_test_net):
    config = tiny_digits_config(
        digits_data_dir, model=registered_step_test_net, num_train_steps=4, checkpoint_every_steps=2,
        skip_nonfinite_steps=True, optimizer="sgd", learning_rate=1e30, loss="ce", schedule="constant",
    )  # fmt: skip
    first = train.train_and_evaluate(config, str(tmp_path))
    assert first["skipped_nonfinite_steps"], "the huge learning rate should make some step non-finite"
    # A longer run: a change the resume must be allowed to make.  The schedule is constant, so
    # the longer run's step is the same program (compiled once, then read from the cache).
    config.num_train_steps = 6
    second = train.train_and_evaluate(config, str(tmp_path), allow_changed_config=True)
    assert second["resumed_from_step"] == 4
    assert (
        second["skipped_nonfinite_steps"][: len(first["skipped_nonfinite_steps"])] == first["skipped_nonfinite_steps"]
    )
    assert all(step >= 4 for step in second["skipped_nonfinite_steps"][len(first["skipped_nonfinite_steps"]) :])
    _strict_json(tmp_path / "results.json")


def test_cross_entropy_ema_bf16_rmsprop(digits_data_dir, tmp_path, registered_step_test_net):
    config = tiny_digits_config(
        digits_data_dir,
        model=registered_step_test_net,  # the loop's options are under test, not the network
        num_train_steps=3,
        loss="ce",
        ema_decay=0.99,
        dtype="bfloat16",
        optimizer="rmsprop",
        learning_rate=0.01,
        schedule="exponential",
        warmup_epochs=0.1,
        label_smoothing=0.1,
        grad_clip_norm=1.0,
    )
    results = train.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 3 and results["loss"] == "ce"
    assert np.isfinite(results["eval_loss"])


def _step_test_model(config):
    return StepTestNet(num_classes=10, dropout_rate=config.dropout_rate, dtype=steps.compute_dtype(config))


def _one_step(config, seed=0):
    """A fresh state, one jitted train step on a fixed random batch, and that batch."""
    model = _step_test_model(config)
    tx = optim.create_optimizer(config, optax.constant_schedule(config.learning_rate))
    state = train.create_train_state(
        model, tx, seed=config.seed, image_size=config.image_size, ema_decay=config.ema_decay
    )
    rng = np.random.default_rng(seed)
    batch = {
        "image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
    }
    step = functools.partial(
        train.train_step,
        model=model,
        tx=tx,
        learning_rate_fn=optax.constant_schedule(0.0),
        options=train.StepOptions.from_config(config),
        seed=config.seed,
    )
    return model, state, batch, jax.jit(step)


def test_ema_label_smoothing_and_bf16_take_effect():
    config = tiny_digits_config(
        "/nonexistent", loss="ce", ema_decay=0.99, label_smoothing=0.1, optimizer="sgd", learning_rate=0.3
    )
    model, state, batch, step = _one_step(config)
    new_state, metrics = step(state, batch)
    # EMA with the warm-up decay of step 0: min(0.99, 1/10) of the old weights, the rest new.
    expected_ema = jax.tree.map(lambda old, new: 0.1 * old + 0.9 * new, state.params, new_state.params)
    chex.assert_trees_all_close(new_state.ema_params, expected_ema, rtol=1e-6, atol=1e-7)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new_state.ema_params, state.params))
    # Label smoothing: the loss is the cross-entropy against (1 - 0.1) one-hot + 0.1 / 10. A few
    # steps on the batch first, so the predictions are far from uniform (where both losses agree).
    for _ in range(3):
        state, metrics = step(new_state, batch)
        new_state, metrics = step(state, batch)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    dropout = _dropout_key(config, int(state.step))
    (logits, _), _ = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": dropout})
    )(variables, batch["image"])
    smoothed = optax.smooth_labels(jax.nn.one_hot(batch["label"], 10), 0.1)
    chex.assert_trees_all_close(metrics["loss"], optax.softmax_cross_entropy(logits, smoothed).mean(), rtol=1e-5)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    assert abs(float(metrics["loss"]) - float(plain)) > 1e-3
    # bfloat16 compute: the step's convolutions and matmuls run in bf16; float32's do not.
    assert "bf16" not in _matmul_dtypes(step, state, batch)
    config.dtype = "bfloat16"
    _, state16, batch16, step16 = _one_step(config)
    assert "bf16" in _matmul_dtypes(step16, state16, batch16)


def _dropout_key(config, step):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), steps._DROPOUT_STREAM), step)


def _matmul_dtypes(step, state, batch) -> set[str]:
    """Element types named on the convolution and matrix-product lines of the step's program."""
    lines = [
        line
        for line in step.lower(state, batch).as_text().splitlines()
        if "convolution" in line or "dot_general" in line
    ]
    return {dtype for dtype in ("bf16", "f32") if any(dtype in line for line in lines)}


def test_a_step_that_would_explode_the_weights_is_rejected():
    config = tiny_digits_config("/nonexistent", loss="ce", optimizer="sgd", learning_rate=1e8, max_abs_weight=1e4)
    _, state, batch, step = _one_step(config)
    new_state, metrics = step(state, batch)
    assert not bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    assert float(metrics["max_abs_weight"]) > 1e4  # what the update would have made
    chex.assert_trees_all_equal(new_state.params, state.params)
    # The same step with the bound off goes through (finite, absurd weights).
    config.max_abs_weight = 0.0
    _, state, batch, step = _one_step(config)
    new_state, metrics = step(state, batch)
    assert bool(metrics["finite"]) and float(metrics["max_abs_weight"]) > 1e4


def test_init_from_is_checked_before_the_workdir_exists_and_then_used(
    digits_data_dir, tmp_path, registered_step_test_net
):
    from skipnet_jax import convert
    from skipnet_jax.config_validation import ConfigError

    workdir = tmp_path / "run"
    (tmp_path / "not_converted").mkdir()
    config = tiny_digits_config(
        digits_data_dir,
        model=registered_step_test_net,
        num_train_steps=1,
        optimizer="sgd",
        learning_rate=1e-9,
        init_from=str(tmp_path / "not_converted"),
    )
    with pytest.raises(ConfigError, match=r"config\.init_from="):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
    # A converted directory of the configured model: training starts from its weights.
    model = train.create_model(config, num_classes=10)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(123))
    convert.save_variables(variables, tmp_path / "converted", model_name=config.model, num_classes=10)
    config.init_from = str(tmp_path / "converted")
    results = train.train_and_evaluate(config, str(workdir))
    np.testing.assert_allclose(results["params_global_norm"], float(optax.global_norm(variables["params"])), rtol=1e-6)


_STEP_SETUP_LR = optax.linear_schedule(1e-3, 2e-3, 10)


@pytest.fixture(scope="module")
def step_setup():
    config = tiny_digits_config("/nonexistent", bias_loss={"alpha": 0.3, "beta": 0.3, "mode": "global"})
    model = _step_test_model(config)
    tx = optim.create_optimizer(config, _STEP_SETUP_LR)
    state = train.create_train_state(
        model, tx, seed=config.seed, image_size=config.image_size, ema_decay=config.ema_decay
    )
    options = train.StepOptions.from_config(config)
    step = jax.jit(
        lambda s, b, seed=config.seed: train.train_step(
            s, b, seed, model=model, tx=tx, learning_rate_fn=_STEP_SETUP_LR, options=options
        )
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32),
    }
    return state, step, batch


def test_train_step_reports_bias_statistics(step_setup):
    state, step, batch = step_setup
    new_state, metrics = step(state, batch)
    assert int(new_state.step) == 1 and bool(metrics["finite"])
    assert 0.7 - 1e-6 <= float(metrics["bias_weight_min"]) <= float(metrics["bias_weight_mean"]) <= 1.05
    assert float(metrics["variance_min"]) <= float(metrics["variance_mean"]) <= float(metrics["variance_max"])
    # "global" mode carries the running minimum of the variance in the state.
    chex.assert_trees_all_close(new_state.loss_state["running_min"], metrics["variance_min"])


def test_non_finite_step_keeps_the_state(step_setup):
    state, step, batch = step_setup
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    new_state, metrics = step(state, bad)
    assert not bool(metrics["finite"])
    chex.assert_trees_all_equal(new_state.params, state.params)
    chex.assert_trees_all_equal(new_state.opt_state, state.opt_state)
    assert int(new_state.step) == 1  # the data position still advances


def test_logged_learning_rate_is_the_one_applied_after_a_skipped_step(step_setup):
    state, step, batch = step_setup
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    state, first = step(state, batch)
    state, skipped = step(state, bad)
    state, third = step(state, batch)
    assert bool(first["finite"]) and not bool(skipped["finite"]) and bool(third["finite"])
    assert int(state.step) == 3 and int(optim.schedule_count(state.opt_state)) == 2
    # The third step applied the optimiser's second update, at the schedule's step 1.
    chex.assert_trees_all_close(third["learning_rate"], _STEP_SETUP_LR(1))
    assert float(third["learning_rate"]) != float(_STEP_SETUP_LR(2))


def test_halt_on_nonfinite_latches_the_first_bad_step(step_setup):
    """The loop fetches metrics only every few steps: once a step is non-finite, the steps
    dispatched after it must leave the state exactly as it was before the bad step."""
    state, step, batch = step_setup
    guarded = jax.jit(lambda s, h, b: train.halt_on_nonfinite(s, h, b, jnp.int32(0), step_fn=step))
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    halted = jnp.array(-1, jnp.int32)
    good_state, halted, _ = guarded(state, halted, batch)
    assert int(halted) == -1 and int(good_state.step) == 1
    after_bad, halted, metrics = guarded(good_state, halted, bad)
    assert not bool(metrics["finite"]) and int(halted) == 1  # the index of the bad step
    after_more, halted, metrics = guarded(after_bad, halted, batch)
    assert bool(metrics["finite"]) and int(halted) == 1
    assert int(after_more.step) == 2  # the bad step itself advanced the data position, nothing later
    chex.assert_trees_all_equal(after_more.replace(step=good_state.step), good_state)
    # Without a latch, the same good batch would have trained on.
    trained_on, _ = step(after_bad, batch)
    assert not all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), trained_on.params, good_state.params))
    )
