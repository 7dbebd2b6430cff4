"""The pure step layer: train state, model, and the train/eval step functions.

Everything here is a function of arrays and small frozen settings, with no data
pipeline, checkpoints or logging, so the models, the loss and the steps can be
used in another training loop, on a machine without TensorFlow (this module must
not import it, directly or indirectly). `skipnet_jax.engine` jit-compiles these
functions over a device mesh; `skipnet_jax.train` drives them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from skipnet_jax import losses, models, optim

# Independent RNG streams derived from the seed; dropout folds in the step so a
# resumed run draws exactly the masks an uninterrupted one would.
_INIT_STREAM, _DROPOUT_STREAM = 0, 1
PER_EXAMPLE = "per_example"  # train_step metrics entry with per-example arrays


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The settings `train_step` reads, and nothing else.

    Frozen and hashable: a jitted step closes over these few values instead of the
    whole (mutable) config, so what the compiled step depends on is visible here.
    The seed is not among them: it is a traced argument, so runs that differ only in
    their seed share one compiled step.
    """

    loss: str  # "bias" | "ce"
    label_smoothing: float
    bias_alpha: float
    bias_beta: float
    bias_mode: str  # "local" | "global"
    ema_decay: float  # 0: no EMA
    max_abs_weight: float  # 0: no bound

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepOptions:
        return cls(
            loss=config.loss,
            label_smoothing=float(config.label_smoothing),
            bias_alpha=float(config.bias_loss.alpha),
            bias_beta=float(config.bias_loss.beta),
            bias_mode=config.bias_loss.mode,
            ema_decay=float(config.ema_decay),
            max_abs_weight=float(config.max_abs_weight),
        )


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


def create_train_state(
    model, tx: optax.GradientTransformation, seed: int | jax.Array, *, image_size: int, ema_decay: float
) -> TrainState:
    """Initial parameters, BN statistics and optimiser state (a pure function of the seed,
    which may be traced); EMA copies of the weights when `ema_decay` > 0.

    Compiled as one program even when called eagerly: op by op, every distinct initialiser
    and shape is a small compilation of its own (24 s for SkipNet-XS on a 2-core CPU, against
    6 s for the one program). Under an enclosing `jax.jit` (the engine's) it is inlined."""
    init = functools.partial(_initial_state, model, tx, image_size=image_size, ema_decay=ema_decay)
    return jax.jit(init)(seed)


def one_off_compiler_options(platform: str) -> dict | None:
    """XLA options for programs that run once per run (the initialisation, the final weight
    norm): on CPU, LLVM does not optimise them.  The initialisation's cost is compiling one
    random-number kernel per parameter; for SkipNet-XS on a 2-core CPU at XLA's default level
    that took 19 s of compile against 4.4 s unoptimised, and the parameters agree to float
    rounding (a sum of all their magnitudes differed in the 13th digit).  Multi-process runs
    included: tests/test_distributed.py's 2-process run, initialised this way, matches the
    1-process run to 2.6e-9 in its final parameters.  Other platforms keep their defaults."""
    if platform != "cpu":
        return None
    return {"xla_backend_optimization_level": 0}


def _initial_state(model, tx: optax.GradientTransformation, seed, *, image_size: int, ema_decay: float) -> TrainState:
    rng = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(rng, images, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    use_ema = ema_decay > 0
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


def train_step(
    state: TrainState, batch, seed: int | jax.Array, *, model, tx, learning_rate_fn, options: StepOptions
) -> tuple[TrainState, dict]:
    """One optimisation step on a (global) batch; returns the new state and scalar metrics.

    `seed` is the run's seed (traced under jit); dropout masks are drawn from it and the step.

    A step whose loss or gradient is not finite, or that would take a weight beyond
    ``options.max_abs_weight``, leaves everything but the step counter unchanged and
    reports `finite = False`, so the loop can stop with the last good weights (or skip
    the batch, if configured to).
    """
    dropout_rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM), state.step)
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
        if options.label_smoothing > 0:
            targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), options.label_smoothing)
        if options.loss == "bias":
            loss, loss_state, loss_aux = losses.bias_loss(
                logits,
                targets,
                aux["features"],
                alpha=options.bias_alpha,
                beta=options.bias_beta,
                mode=options.bias_mode,
                state=state.loss_state,
            )
        else:
            cross_entropy = losses.softmax_cross_entropy(logits, targets)
            loss, loss_state = jnp.mean(cross_entropy), state.loss_state
            loss_aux = {"cross_entropy": cross_entropy}
        return loss, (logits, updates["batch_stats"], loss_state, loss_aux)

    (loss, (logits, batch_stats, loss_state, loss_aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, loss_state=loss_state
    )
    if options.ema_decay > 0:
        # Warm the decay up so early EMA weights are not dominated by the random init.
        decay = jnp.minimum(options.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        new_state = new_state.replace(
            ema_params=_ema_update(state.ema_params, params, decay),
            ema_batch_stats=_ema_update(state.ema_batch_stats, batch_stats, decay),
        )
    max_abs_weight = jnp.max(jnp.stack([jnp.max(jnp.abs(p)) for p in jax.tree.leaves(params)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(max_abs_weight)
    if options.max_abs_weight > 0:
        finite &= max_abs_weight <= options.max_abs_weight
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1)  # the data position advances either way

    metrics = {
        "loss": loss,
        "cross_entropy": jnp.mean(loss_aux["cross_entropy"]),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        # The rate this step's update used: the optimiser's count skips discarded steps.
        "learning_rate": learning_rate_fn(optim.schedule_count(state.opt_state)),
        "grad_norm": grad_norm,
        # The largest |weight| this step produced (kept only if the step is accepted).
        "max_abs_weight": max_abs_weight,
        "finite": finite,
    }
    if options.loss == "bias":
        metrics |= {
            "bias_weight_mean": jnp.mean(loss_aux["weights"]),
            "bias_weight_min": jnp.min(loss_aux["weights"]),
            "variance_mean": jnp.mean(loss_aux["variance"]),
            "variance_min": jnp.min(loss_aux["variance"]),
            "variance_max": jnp.max(loss_aux["variance"]),
            "normalized_variance_mean": jnp.mean(loss_aux["normalized_variance"]),
            # Per-example values for the variance/weight histograms (B floats each; the
            # loop keeps them only at a few steps, see `snapshot_steps`).
            PER_EXAMPLE: {
                "normalized_variance": loss_aux["normalized_variance"],
                "weights": loss_aux["weights"],
            },
        }
    return new_state, metrics


def halt_on_nonfinite(
    state: TrainState, halted_at: jax.Array, batch, seed: jax.Array, *, step_fn
) -> tuple[TrainState, jax.Array, dict]:
    """`step_fn` (a bound `train_step`), made a no-op from the first non-finite step on.

    `halted_at` is -1 until a step reports ``finite = False``, then that step's index.
    The training loop fetches metrics only every few steps (a host round trip per
    step would leave an accelerator idle); this device-side latch guarantees that when
    it does notice a NaN, the state it holds is exactly the one before the bad step,
    however many steps were dispatched after it.
    """
    new_state, metrics = step_fn(state, batch, seed)
    halted = halted_at >= 0
    new_state = jax.tree.map(lambda new, old: jnp.where(halted, old, new), new_state, state)
    halted_at = jnp.where(halted | metrics["finite"], halted_at, state.step)
    return new_state, halted_at, metrics


def eval_step(state: TrainState, batch, *, model, use_ema: bool) -> dict:
    """Sums of loss and top-1/top-5 hits, and the confusion matrix, over the real (mask = 1) examples."""
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
        # rows: true class, columns: top-1 prediction (int32: exact counts)
        "confusion": jnp.zeros((logits.shape[-1],) * 2, jnp.int32).at[labels, top_k[:, 0]].add(mask.astype(jnp.int32)),
    }
