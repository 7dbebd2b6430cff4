"""Learning-rate schedules and optimisers, built from optax pieces."""

from __future__ import annotations

import collections
import math

import jax
import ml_collections
import optax


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then the configured decay.

    Epoch-denominated settings are converted with `steps_per_epoch` so a config
    reads the same whatever the batch size.
    """
    peak = config.learning_rate
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), max(num_train_steps - 1, 0))
    decay_steps = max(num_train_steps - warmup_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.lr_end_factor)
    elif config.schedule == "exponential":
        decay = optax.exponential_decay(
            peak,
            transition_steps=max(round(config.lr_decay_epochs * steps_per_epoch), 1),
            decay_rate=config.lr_decay_rate,
            staircase=True,
        )
    elif config.schedule == "step":
        # Epochs that round to the same step each still apply their factor there (optax takes
        # one scale per boundary, so coinciding boundaries are merged by multiplying).
        steps = collections.Counter(
            max(round(epoch * steps_per_epoch) - warmup_steps, 1) for epoch in config.lr_step_epochs
        )
        decay = optax.piecewise_constant_schedule(peak, {s: config.lr_step_factor**n for s, n in steps.items()})
    elif config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.schedule={config.schedule!r} is not valid")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def weight_decay_mask(params) -> dict:
    """True for conv and dense kernels; BatchNorm scales/biases and biases are not decayed."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: getattr(path[-1], "key", None) == "kernel" and leaf.ndim > 1, params
    )


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """The configured optimiser with masked weight decay and optional clipping.

    SGD and RMSProp use coupled L2 decay (added to the gradient, as PyTorch's
    `weight_decay` and TF's kernel regularisers); AdamW uses decoupled decay.
    RMSProp follows TensorFlow: accumulator initialised to 1, epsilon inside
    the square root, heavy-ball momentum.
    """
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "adamw":
        parts.append(
            optax.adamw(
                learning_rate_fn,
                b1=config.adam_b1,
                b2=config.adam_b2,
                eps=config.adam_eps,
                weight_decay=config.weight_decay,
                mask=weight_decay_mask,
            )
        )
        return optax.chain(*parts)
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
    if config.optimizer == "sgd":
        parts.append(optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov))
    elif config.optimizer == "rmsprop":
        parts.append(
            optax.rmsprop(
                learning_rate_fn,
                decay=config.rmsprop_decay,
                eps=config.rmsprop_eps,
                initial_scale=1.0,
                eps_in_sqrt=True,
                momentum=config.momentum or None,
            )
        )
    else:
        raise ValueError(f"config.optimizer={config.optimizer!r} is not valid")
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


def steps_for(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, num_train_steps): an epoch is ceil(examples / global batch) steps."""
    steps_per_epoch = max(math.ceil(num_train_examples / config.batch_size), 1)
    if config.num_train_steps > 0:
        return steps_per_epoch, int(config.num_train_steps)
    return steps_per_epoch, max(math.ceil(config.num_epochs * steps_per_epoch), 1)
