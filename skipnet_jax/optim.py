"""Learning-rate schedules and optimisers, built from optax pieces."""

from __future__ import annotations

import collections
import functools
import math

import jax
import ml_collections
import optax


def _cosine(config, peak: float, decay_steps: int, steps_per_epoch: int, warmup_steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(peak, decay_steps, alpha=config.lr_end_factor)


def _exponential(config, peak: float, decay_steps: int, steps_per_epoch: int, warmup_steps: int) -> optax.Schedule:
    return optax.exponential_decay(
        peak,
        transition_steps=max(round(config.lr_decay_epochs * steps_per_epoch), 1),
        decay_rate=config.lr_decay_rate,
        staircase=True,
    )


def _step(config, peak: float, decay_steps: int, steps_per_epoch: int, warmup_steps: int) -> optax.Schedule:
    # Epoch e's decay starts at step round(e * steps_per_epoch): for whole epochs that is the
    # first step of epoch e, where a per-epoch scheduler (PyTorch's MultiStepLR) changes the lr.
    # Epochs that round to the same step each still apply their factor there (optax takes one
    # scale per boundary, so coinciding boundaries are merged by multiplying).
    steps = collections.Counter(
        max(round(epoch * steps_per_epoch) - warmup_steps, 1) for epoch in config.lr_step_epochs
    )
    return optax.piecewise_constant_schedule(peak, {s: config.lr_step_factor**n for s, n in steps.items()})


def _constant(config, peak: float, decay_steps: int, steps_per_epoch: int, warmup_steps: int) -> optax.Schedule:
    return optax.constant_schedule(peak)


# config.schedule -> the decay after warmup; the keys are the valid choices.
SCHEDULES = {"cosine": _cosine, "exponential": _exponential, "step": _step, "constant": _constant}


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then the configured decay.

    Epoch-denominated settings are converted with `steps_per_epoch` so a config
    reads the same whatever the batch size.
    """
    if config.schedule not in SCHEDULES:
        raise ValueError(f"config.schedule={config.schedule!r} is not valid; valid choices: {', '.join(SCHEDULES)}")
    peak = config.learning_rate
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), max(num_train_steps - 1, 0))
    decay_steps = max(num_train_steps - warmup_steps, 1)
    decay = SCHEDULES[config.schedule](config, peak, decay_steps, steps_per_epoch, warmup_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


# config.weight_decay_mask -> which parameters are decayed, as a predicate of (tree path, leaf).
WEIGHT_DECAY_MASKS = {
    "kernels": lambda path, leaf: getattr(path[-1], "key", None) == "kernel" and leaf.ndim > 1,
    "all": lambda path, leaf: True,
}


def weight_decay_mask(params, which: str = "kernels") -> dict:
    """True for the parameters that are decayed.  "kernels": conv and dense kernels only
    (BatchNorm scales/biases and biases are not decayed); "all": every parameter."""
    return jax.tree_util.tree_map_with_path(WEIGHT_DECAY_MASKS[which], params)


def _coupled_decay(config) -> list[optax.GradientTransformation]:
    """L2 decay added to the gradient (PyTorch's `weight_decay`, TF's kernel regularisers)."""
    if config.weight_decay <= 0:
        return []
    mask = functools.partial(weight_decay_mask, which=config.weight_decay_mask)
    return [optax.add_decayed_weights(config.weight_decay, mask=mask)]


def _sgd(config, learning_rate_fn: optax.Schedule) -> list[optax.GradientTransformation]:
    return [
        *_coupled_decay(config),
        optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
    ]


def _rmsprop(config, learning_rate_fn: optax.Schedule) -> list[optax.GradientTransformation]:
    return [
        *_coupled_decay(config),
        optax.rmsprop(
            learning_rate_fn,
            decay=config.rmsprop_decay,
            eps=config.rmsprop_eps,
            initial_scale=1.0,
            eps_in_sqrt=True,
            momentum=config.momentum or None,
        ),
    ]


def _adamw(config, learning_rate_fn: optax.Schedule) -> list[optax.GradientTransformation]:
    mask = functools.partial(weight_decay_mask, which=config.weight_decay_mask)
    return [
        optax.adamw(
            learning_rate_fn,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=mask,
        )
    ]


# config.optimizer -> its transformations (weight decay included); the keys are the valid choices.
OPTIMIZERS = {"sgd": _sgd, "rmsprop": _rmsprop, "adamw": _adamw}


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """The configured optimiser with masked weight decay and optional clipping.

    SGD and RMSProp use coupled L2 decay (added to the gradient, as PyTorch's
    `weight_decay` and TF's kernel regularisers); AdamW uses decoupled decay.
    `weight_decay_mask` selects the decayed parameters.  RMSProp follows
    TensorFlow: accumulator initialised to 1, epsilon inside the square root,
    heavy-ball momentum.
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"config.optimizer={config.optimizer!r} is not valid; valid choices: {', '.join(OPTIMIZERS)}")
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts += OPTIMIZERS[config.optimizer](config, learning_rate_fn)
    return optax.chain(*parts)


def schedule_count(opt_state) -> jax.Array:
    """The number of updates the optimiser has applied: the step its learning-rate schedule
    is evaluated at next.  It trails the train state's step by the number of skipped
    non-finite steps, whose updates (count included) are discarded."""
    is_schedule_state = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule_state) if is_schedule_state(s)]
    if not states:
        raise ValueError("the optimiser state holds no learning-rate schedule count")
    return states[0].count


def steps_per_epoch(num_examples, batch_size, drop_remainder):
    """Train steps in one epoch: floor(num_examples / batch_size) with `drop_remainder` (the
    incomplete last batch is dropped), else ceil(num_examples / batch_size).

    Plain arithmetic, so it takes ints or ml_collections FieldReferences alike: a config can
    hold a step count that follows later `--config.batch_size` / `data.drop_remainder`
    overrides (see recipes.py).
    """
    keep_remainder = 1 - drop_remainder
    return (num_examples + (batch_size - 1) * keep_remainder) // batch_size


def steps_for(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, num_train_steps), the epoch as `steps_per_epoch` defines it."""
    per_epoch = steps_per_epoch(num_train_examples, config.batch_size, config.data.drop_remainder)
    if per_epoch < 1 and config.data.drop_remainder:
        raise ValueError(
            f"config.data.drop_remainder=True with {num_train_examples} train examples and "
            f"batch_size={config.batch_size} leaves no whole batch; set a batch_size <= {num_train_examples} "
            "or data.drop_remainder=False"
        )
    per_epoch = max(per_epoch, 1)
    if config.num_train_steps > 0:
        return per_epoch, int(config.num_train_steps)
    return per_epoch, max(math.ceil(config.num_epochs * per_epoch), 1)
