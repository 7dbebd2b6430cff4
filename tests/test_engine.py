"""The run layer: engines are reused across seeds, and a reused engine computes what a new one does."""

import chex
import jax
import numpy as np
from conftest import tiny_digits_config

from skipnet_jax import engine as engine_lib
from skipnet_jax import sharding


def _build(config, **kw):
    return engine_lib.build_engine(config, 10, steps_per_epoch=10, num_train_steps=6, **kw)


def _batch(engine, seed):
    rng = np.random.default_rng(seed)
    host = {
        "image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=8).astype(np.int32),
    }
    return sharding.to_global_batch(host, engine.data_sharding)


def test_engines_differing_only_in_seed_or_data_are_shared_and_others_are_not():
    config = tiny_digits_config("/a", dropout_rate=0.5)
    first = _build(config)
    assert _build(tiny_digits_config("/b", seed=7, dropout_rate=0.5)) is first
    assert _build(tiny_digits_config("/a", dropout_rate=0.4)) is not first
    assert _build(tiny_digits_config("/a", learning_rate=0.5, dropout_rate=0.5)) is not first
    assert _build(config, reuse=False) is not first
    assert first.jitted_eval_step(use_ema=False) is first.jitted_eval_step(use_ema=False)


def test_a_reused_engine_with_another_seed_computes_what_a_new_engine_does(registered_step_test_net):
    """The seed is a traced argument of the shared compiled steps: initial weights and dropout
    masks of seed 1 through the engine built for seed 0 equal those of a new seed-1 engine."""
    model = registered_step_test_net  # the engine, not the network, is under test
    shared = _build(tiny_digits_config("/a", model=model, dropout_rate=0.5))
    fresh = _build(tiny_digits_config("/a", model=model, dropout_rate=0.5, seed=1), reuse=False)
    results = []
    for engine in (shared, fresh):
        state = engine.initial_state(1)
        state, metrics = engine.jitted_train_step(1)(state, _batch(engine, 0))
        results.append(jax.device_get((state.params, metrics["loss"])))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=1e-6)

    seed0 = jax.device_get(shared.initial_state(0).params)
    assert not np.allclose(seed0["classifier"]["kernel"], results[0][0]["classifier"]["kernel"])
