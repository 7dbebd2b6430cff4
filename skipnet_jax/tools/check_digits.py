"""The accelerator check's ``digits`` part: the digits config trained and evaluated through the real jitted steps."""

from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Any

from skipnet_jax.tools.digits_input import DigitsInput


def load_config(path: str):
    """``get_config()`` of a config file (trusted Python, as for ``main --config``)."""
    spec = importlib.util.spec_from_file_location("_accelerator_check_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def digits_config(args: argparse.Namespace):
    """configs/digits.py with this run's dtype, and model / length when asked."""
    config = load_config(args.digits_config)
    config.dtype = args.digits_dtype
    if args.digits_model is not None:
        config.model = args.digits_model
    if args.digits_steps is not None:
        config.num_train_steps = args.digits_steps
    return config


def train_digits(config, threshold: float, seed: int) -> dict[str, Any]:
    """Trains and evaluates `config` on the digits with the real jitted steps; checks top-1."""
    import jax
    import jax.numpy as jnp

    from skipnet_jax import optim, sharding
    from skipnet_jax.engine import build_engine

    config.seed = seed
    data = DigitsInput(config.image_size, config.batch_size, config.eval_batch_size, seed)
    num_classes = int(data.train_labels.max()) + 1
    steps_per_epoch, num_steps = optim.steps_for(config, data.num_train)
    engine = build_engine(config, num_classes, steps_per_epoch=steps_per_epoch, num_train_steps=num_steps, reuse=False)
    data_sharding = engine.data_sharding

    state = engine.initial_state(seed)
    step_fn = engine.jitted_train_step(seed)
    eval_fn = engine.jitted_eval_step(use_ema=config.ema_decay > 0)
    first = sharding.to_global_batch(data.train_batch(0), data_sharding)
    t0 = time.perf_counter()
    compiled_step = step_fn.lower(state, first).compile()
    compile_s = time.perf_counter() - t0

    losses = []
    t0 = time.perf_counter()
    for step in range(num_steps):
        batch = first if step == 0 else sharding.to_global_batch(data.train_batch(step), data_sharding)
        state, metrics = compiled_step(state, batch)
        losses.append((metrics["loss"], metrics["finite"]))  # fetched once, at the end
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0
    losses = jax.device_get(losses)
    nonfinite = [i for i, (_, finite) in enumerate(losses) if not bool(finite)]

    t0 = time.perf_counter()
    totals = None
    for host_batch in data.eval_batches():
        sums = eval_fn(state, sharding.to_global_batch(host_batch, data_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    eval_s = time.perf_counter() - t0
    count = int(totals["count"])
    top1 = float(totals["top1_sum"]) / count
    ok = top1 >= threshold and not nonfinite and count == len(data.test_labels)
    return {
        "ok": ok,
        "model": config.model,
        "dtype": config.dtype,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "optimizer": config.optimizer,
        "learning_rate": config.learning_rate,
        "loss": config.loss,
        "steps": num_steps,
        "epochs": num_steps / steps_per_epoch,
        "threshold": threshold,
        "eval_top1": top1,
        "eval_top5": float(totals["top5_sum"]) / count,
        "eval_loss": float(totals["loss_sum"]) / count,
        "eval_correct": round(float(totals["top1_sum"])),
        "eval_examples": count,
        "train_examples": data.num_train,
        "first_loss": float(losses[0][0]),
        "last_loss": float(losses[-1][0]),
        "nonfinite_steps": nonfinite,
        "compile_s": compile_s,
        "train_s": train_s,
        "train_examples_per_sec": num_steps * config.batch_size / train_s,
        "eval_s": eval_s,
        "input": "NumPy copy of the tf.data 'simple' digits preprocessing; NumPy random draws (see DigitsInput)",
    }
