"""The run layer: a config turned into jit-compiled steps over a data-parallel device mesh.

Training, evaluation, the benchmark and the accelerator check all run the same model,
optimiser, shardings and buffer donation; `build_engine` is the one place that puts them
together, so what is timed or checked is exactly what trains.  The state is replicated
over the mesh and every batch is split along its first axis (`skipnet_jax.sharding`).

Like `skipnet_jax.steps`, this module must not import TensorFlow, directly or indirectly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from skipnet_jax import optim, sharding, steps
from skipnet_jax.steps import StepOptions, TrainState

TrainStepFn = Callable[[TrainState, Any], tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True, eq=False)
class Engine:
    """Model, schedule, optimiser and mesh of one run, and its jitted steps.

    Each ``jitted_*`` call returns a new jitted function (compiled on first use): call it
    once and keep the result.
    """

    model: Any  # a flax Module
    learning_rate_fn: optax.Schedule
    tx: optax.GradientTransformation
    mesh: Mesh
    replicated: NamedSharding  # the train state and the metrics
    data_sharding: NamedSharding  # batches: split along the first axis
    options: StepOptions
    image_size: int

    def _init_fn(self) -> Callable[[], TrainState]:
        return functools.partial(
            steps.create_train_state,
            self.model,
            self.tx,
            seed=self.options.seed,
            image_size=self.image_size,
            ema_decay=self.options.ema_decay,
        )

    def initial_state(self) -> TrainState:
        """The freshly initialised state (`steps.create_train_state`), replicated over the mesh."""
        return jax.jit(self._init_fn(), out_shardings=self.replicated)()

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes with its sharding (what a checkpoint is restored into);
        nothing is compiled or computed."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
            jax.eval_shape(self._init_fn()),
        )

    def jitted_train_step(self, *, halt_on_nonfinite: bool = False) -> TrainStepFn:
        """``(state, batch) -> (state, metrics)``, `steps.train_step` with the state's buffers donated.

        `halt_on_nonfinite`: wrapped in `steps.halt_on_nonfinite`, whose latch lives on the
        device and is carried from call to call here, so once a step is not finite the
        state stays as it was before that step, however many steps were dispatched after
        it.  Without it the result is the `jax.jit` function itself (``.lower()`` works).
        """
        step_fn = functools.partial(
            steps.train_step,
            model=self.model,
            tx=self.tx,
            learning_rate_fn=self.learning_rate_fn,
            options=self.options,
        )
        replicated, data = self.replicated, self.data_sharding
        if not halt_on_nonfinite:
            return jax.jit(
                step_fn, in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=0
            )
        guarded_step = jax.jit(
            functools.partial(steps.halt_on_nonfinite, step_fn=step_fn),
            in_shardings=(replicated, replicated, data),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1),
        )
        halted_at = jax.device_put(jnp.array(-1, jnp.int32), replicated)

        def latched_train_step(state, batch):
            nonlocal halted_at
            state, halted_at, metrics = guarded_step(state, halted_at, batch)
            return state, metrics

        return latched_train_step

    def jitted_eval_step(self, *, use_ema: bool) -> Callable[[TrainState, Any], dict]:
        """``(state, batch) -> sums``, `steps.eval_step` on the EMA weights if `use_ema`."""
        return jax.jit(
            functools.partial(steps.eval_step, model=self.model, use_ema=use_ema),
            in_shardings=(self.replicated, self.data_sharding),
            out_shardings=self.replicated,
        )


def build_engine(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    steps_per_epoch: int,
    num_train_steps: int,
    mesh: Mesh | None = None,
) -> Engine:
    """The engine of `config` for `num_classes` classes; the schedule's epochs are
    `steps_per_epoch` steps, its length `num_train_steps` (`optim.steps_for`).

    `mesh` defaults to every device of every process (`sharding.create_mesh`).  Raises
    ValueError for an unknown schedule or optimiser name.
    """
    model = steps.create_model(config, num_classes)
    learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
    tx = optim.create_optimizer(config, learning_rate_fn)
    mesh = sharding.create_mesh() if mesh is None else mesh
    return Engine(
        model=model,
        learning_rate_fn=learning_rate_fn,
        tx=tx,
        mesh=mesh,
        replicated=sharding.replicated(mesh),
        data_sharding=sharding.batch_sharded(mesh),
        options=StepOptions.from_config(config),
        image_size=int(config.image_size),
    )
