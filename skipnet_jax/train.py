"""Training and evaluation: small pure step functions and the loop that drives them.

`create_train_state`, `train_step` and `eval_step` are pure functions of
arrays (jit-compiled over a data-parallel mesh); `train_and_evaluate` is the
only place with side effects (data, checkpoints, logs, results.json).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from skipnet_jax import checkpointing, losses, models, optim, sharding
from skipnet_jax.config_validation import ConfigError, check_num_classes
from skipnet_jax.data import pipeline
from skipnet_jax.reporting import ProgressReporter, write_results

# Independent RNG streams derived from the seed; dropout folds in the step so a
# resumed run draws exactly the masks an uninterrupted one would.
_INIT_STREAM, _DROPOUT_STREAM = 0, 1


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # {} when EMA is off
    ema_batch_stats: Any
    loss_state: Any  # running minimum of the "global" bias-loss normalisation


def compute_dtype(config: ml_collections.ConfigDict):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype]


def create_model(config: ml_collections.ConfigDict, num_classes: int):
    return models.create_model(
        config.model, num_classes=num_classes, dropout_rate=config.dropout_rate, dtype=compute_dtype(config)
    )


def create_train_state(config, model, tx: optax.GradientTransformation) -> TrainState:
    """Initial parameters, BN statistics and optimiser state (a pure function of the seed)."""
    rng = jax.random.fold_in(jax.random.key(config.seed), _INIT_STREAM)
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init(rng, images, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    use_ema = config.ema_decay > 0
    return TrainState(
        step=jnp.array(0, jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=params if use_ema else {},
        ema_batch_stats=batch_stats if use_ema else {},
        loss_state=losses.init_bias_loss_state(),
    )


def _ema_update(ema, new, decay):
    return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)


def train_step(state: TrainState, batch, *, model, tx, learning_rate_fn, config) -> tuple[TrainState, dict]:
    """One optimisation step on a (global) batch; returns the new state and scalar metrics.

    A step whose loss or gradient is not finite leaves the state unchanged and
    reports `finite = False`, so the loop can stop with the last good state.
    """
    dropout_rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _DROPOUT_STREAM), state.step)
    labels = batch["label"]

    def loss_fn(params):
        (logits, aux), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        targets = labels
        if config.label_smoothing > 0:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), config.label_smoothing)
        if config.loss == "bias":
            loss, loss_state, loss_aux = losses.bias_loss(
                logits,
                targets,
                aux["features"],
                alpha=config.bias_loss.alpha,
                beta=config.bias_loss.beta,
                mode=config.bias_loss.mode,
                state=state.loss_state,
            )
        else:
            cross_entropy = losses.softmax_cross_entropy(logits, targets)
            loss, loss_state = jnp.mean(cross_entropy), state.loss_state
            loss_aux = {"cross_entropy": cross_entropy}
        return loss, (logits, updates["batch_stats"], loss_state, loss_aux)

    (loss, (logits, batch_stats, loss_state, loss_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, loss_state=loss_state
    )
    if config.ema_decay > 0:
        # Warm the decay up so early EMA weights are not dominated by the random init.
        decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        new_state = new_state.replace(
            ema_params=_ema_update(state.ema_params, params, decay),
            ema_batch_stats=_ema_update(state.ema_batch_stats, batch_stats, decay),
        )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)

    metrics = {
        "loss": loss,
        "cross_entropy": jnp.mean(loss_aux["cross_entropy"]),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": learning_rate_fn(state.step),
        "grad_norm": grad_norm,
        "finite": finite,
    }
    if config.loss == "bias":
        metrics |= {
            "bias_weight_mean": jnp.mean(loss_aux["weights"]),
            "bias_weight_min": jnp.min(loss_aux["weights"]),
            "variance_mean": jnp.mean(loss_aux["variance"]),
            "variance_min": jnp.min(loss_aux["variance"]),
            "variance_max": jnp.max(loss_aux["variance"]),
            "normalized_variance_mean": jnp.mean(loss_aux["normalized_variance"]),
        }
    return new_state, metrics


def eval_step(state: TrainState, batch, *, model, use_ema: bool) -> dict:
    """Sums of loss and top-1/top-5 hits over the real (mask = 1) examples of a batch."""
    params, batch_stats = (state.ema_params, state.ema_batch_stats) if use_ema else (state.params, state.batch_stats)
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"]
    cross_entropy = losses.softmax_cross_entropy(logits, labels)
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    return {
        "loss_sum": jnp.sum(cross_entropy * mask),
        "top1_sum": jnp.sum((top_k[:, 0] == labels) * mask),
        "top5_sum": jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def evaluate(jitted_eval_step, state, config, data_sharding) -> dict[str, float]:
    """Top-1/top-5/loss over the full eval split; padded examples are masked out."""
    totals = None
    iterator = pipeline.create_eval_iterator(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    for local_batch in iterator:
        sums = jitted_eval_step(state, sharding.to_global_batch(local_batch, data_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "eval_loss": float(totals["loss_sum"]) / count,
        "eval_top1": float(totals["top1_sum"]) / count,
        "eval_top5": float(totals["top5_sum"]) / count,
        "eval_examples": int(count),
    }


def _save_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints if present), evaluates, writes results.json."""
    wall_start = time.time()
    try:
        info = pipeline.get_dataset_info(config)
    except ValueError as e:  # unknown dataset name, missing files: a config problem
        raise ConfigError(str(e).splitlines()[0]) from e
    num_classes = check_num_classes(config, info.num_classes)
    steps_per_epoch, num_train_steps = optim.steps_for(config, info.num_train_examples)
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_chief:
        _save_config(config, workdir)

    model = create_model(config, num_classes)
    learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
    tx = optim.create_optimizer(config, learning_rate_fn)
    mesh = sharding.create_mesh()
    replicated, data_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    state = jax.jit(functools.partial(create_train_state, config, model, tx), out_shardings=replicated)()
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    restored = checkpointing.restore_latest(manager, state)
    if restored is not None:
        state = jax.device_put(restored, replicated)
        logging.info("Resumed from %s at step %d", checkpointing.checkpoint_dir(workdir), int(state.step))
    start_step = int(state.step)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "%s on %s: %d classes, %d params, %d train / %d eval examples, %d steps (%d/epoch), %d devices",
        config.model, info.name, num_classes, num_params, info.num_train_examples,
        info.num_eval_examples, num_train_steps, steps_per_epoch, jax.device_count(),
    )  # fmt: skip

    jitted_train_step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn, config=config),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    jitted_eval_step = jax.jit(
        functools.partial(eval_step, model=model, use_ema=config.ema_decay > 0),
        in_shardings=(replicated, data_sharding),
        out_shardings=replicated,
    )

    reporter = ProgressReporter(
        workdir if is_chief else None, num_train_steps, config.batch_size, config.log_every_steps
    )
    train_iterator = pipeline.create_train_iterator(
        config, start_step=start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    pending = None  # metrics of the previous step, checked while the current one runs
    last_metrics: dict[str, float] = {}
    for step in range(start_step, num_train_steps):
        batch = sharding.to_global_batch(next(train_iterator), data_sharding)
        state, metrics = jitted_train_step(state, batch)
        if pending is not None:
            last_metrics = _check_finite(jax.device_get(pending), step - 1)
            reporter.record(step, last_metrics)
        pending = metrics
        completed = step + 1
        if completed % config.checkpoint_every_steps == 0 or completed == num_train_steps:
            last_metrics = _check_finite(jax.device_get(pending), step)
            reporter.record(completed, last_metrics)
            pending = None
            checkpointing.save(manager, completed, state)
        if config.eval_every_steps and completed % config.eval_every_steps == 0 and completed != num_train_steps:
            reporter.write_eval(completed, evaluate(jitted_eval_step, state, config, data_sharding))
    if pending is not None:
        last_metrics = _check_finite(jax.device_get(pending), num_train_steps - 1)
        reporter.record(num_train_steps, last_metrics)
    manager.wait_until_finished()

    eval_metrics = evaluate(jitted_eval_step, state, config, data_sharding)
    reporter.write_eval(num_train_steps, eval_metrics)
    results = {
        **eval_metrics,
        "train_loss": last_metrics.get("loss", float("nan")),
        "train_accuracy": last_metrics.get("accuracy", float("nan")),
        "steps": int(state.step),
        "resumed_from_step": start_step,
        "examples_per_sec": reporter.examples_per_sec(),
        "wall_seconds": time.time() - wall_start,
        "params_global_norm": float(jax.jit(optax.global_norm)(state.params)),
        "num_params": int(num_params),
        "model": config.model,
        "dataset": info.name,
        "loss": config.loss,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    if is_chief:
        write_results(workdir, results)
    reporter.close()
    manager.close()
    logging.info("Results: %s", json.dumps(results, sort_keys=True))
    return results


def _check_finite(metrics: dict, step: int) -> dict[str, float]:
    """Host-side scalars of a finished step; raises (stopping training) on a non-finite step."""
    if not bool(metrics["finite"]):
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); the state was not updated and the last checkpoint is kept"
        )
    return {k: float(np.asarray(v)) for k, v in metrics.items() if k != "finite"}
