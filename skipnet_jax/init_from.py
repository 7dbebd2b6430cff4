"""``config.init_from``: training that starts from the weights of a converted checkpoint
(`python -m skipnet_jax.convert`) instead of a random initialisation."""

from __future__ import annotations

import jax

from skipnet_jax.config_validation import ConfigError
from skipnet_jax.steps import TrainState


def load_initial_weights(directory: str, abstract_state: TrainState) -> dict:
    """``{"params", "batch_stats"}`` of a converted checkpoint (`python -m skipnet_jax.convert`),
    checked against the configured model's shapes."""
    from skipnet_jax import convert  # only needed for init_from

    try:
        variables, meta = convert.load_variables(directory)
    except convert.ConversionError as e:
        raise ConfigError(f"config.init_from={directory!r}: {e}") from e
    wanted = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
    got = {k: variables.get(k, {}) for k in wanted}
    if jax.tree.structure(got) != jax.tree.structure(wanted) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(wanted))
    ):
        raise ConfigError(
            f"config.init_from={directory!r} holds {meta.get('model')} with {meta.get('num_classes')} classes, "
            "which does not fit the configured model/num_classes"
        )
    return got


def with_initial_weights(state: TrainState, weights: dict) -> TrainState:
    """`state` with the weights and BN statistics of `load_initial_weights` (EMA copies too)."""
    params, batch_stats = weights["params"], weights["batch_stats"]
    return state.replace(
        params=params,
        batch_stats=batch_stats,
        opt_state=state.opt_state,
        ema_params=params if state.ema_params else {},
        ema_batch_stats=batch_stats if state.ema_batch_stats else {},
    )
