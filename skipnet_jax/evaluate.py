"""Evaluate a training workdir's latest checkpoint, or a converted checkpoint, on the full eval split.

Command line::

    python -m skipnet_jax.evaluate --workdir DIR [--config CONFIG] [--config.KEY=VALUE ...]

``DIR`` is either

* a training workdir (``DIR/checkpoints/<step>``): the newest readable checkpoint is
  restored with `checkpointing.restore_latest`; the config is ``DIR/config.json`` unless
  ``--config`` names a config file; the EMA weights are used when the run kept them
  (``ema_decay > 0``), exactly as the training loop's evaluation does; or
* a directory written by ``python -m skipnet_jax.convert`` (``DIR/model.json``): the
  model, class count, dataset and eval preprocessing (image size, resize/crop mode,
  mean/std: `model_data.preprocessing_record`) come from ``model.json``, everything else
  (data_dir, batch size) from `default_config`; ``--config FILE`` replaces all but the
  model and class count.  A ``model.json`` without ``dataset`` / ``preprocessing`` (as
  earlier versions wrote) takes them from the config too: ``--config.dataset``, default
  ``digits``.

``--config.KEY=VALUE`` overrides apply on top of either (e.g. ``--config.data_dir=...``
or ``--config.eval_batch_size=64``).  A dataset whose class count is not the model's is
an error naming both counts, never a silent mismatch.  The evaluation is
training's: `train.evaluate` over the engine's jitted `steps.eval_step` (top-1, top-5,
cross-entropy and the confusion matrix over every example, the last batch padded and masked).

Writes ``DIR/eval_results.json`` (never ``results.json``) with ``eval_top1``,
``eval_top5``, ``eval_loss``, ``eval_examples``, ``per_class_accuracy``,
``confusion_matrix`` (rows: true class), ``class_names``, ``preprocessing`` and where
the weights came from, and ``DIR/plots/confusion_matrix.png``.  Problems (no checkpoint,
a config that does not fit the checkpoint, a missing dataset) end with one
``error: ...`` line and exit status 2.

The model and its weights come from `skipnet_jax.inference.load_model`, as for predict
and export.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from skipnet_jax import cli, inference, model_data, plots, reporting, train, workdir_flags
from skipnet_jax.config_validation import ConfigError
from skipnet_jax.data import pipeline
from skipnet_jax.reporting import EVAL_RESULTS_FILE

__all__ = ["evaluate_model", "evaluate_workdir", "main"]


def evaluate_model(loaded: inference.LoadedModel) -> dict[str, Any]:
    """`train.evaluate` of `loaded` on ``config.data.eval_split``, plus per-class accuracy."""
    if jax.process_count() > 1:
        raise ConfigError("skipnet_jax.evaluate runs in a single process")
    config = loaded.data_config  # completed once, when the model was loaded
    try:
        info = pipeline.get_dataset_info(config)
    except ValueError as e:  # unknown dataset, data not prepared
        raise ConfigError(str(e).splitlines()[0]) from None
    if info.num_classes != loaded.num_classes:
        raise ConfigError(
            f"the model has {loaded.num_classes} classes but config.dataset={config.dataset!r} has "
            f"{info.num_classes}; choose the dataset it was trained on (--config FILE or --config.dataset=...)"
        )
    engine = loaded.engine  # `loaded`'s own model: a caller may have built it with settings of its own
    jitted = engine.jitted_eval_step(use_ema=False)  # eval_state() holds the weights to use as its params
    state = jax.device_put(loaded.eval_state(), engine.replicated)
    try:
        metrics, matrix = train.evaluate(jitted, state, config, engine.data_sharding)
    except ValueError as e:  # e.g. a dataset that is not prepared
        raise ConfigError(str(e).splitlines()[0]) from None
    totals = matrix.sum(axis=1)
    per_class = np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
    return {
        **metrics,
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "confusion_matrix": matrix.tolist(),
    }


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """What the CLI does: load, evaluate, write ``eval_results.json`` and the confusion-matrix plot."""
    start = time.time()
    loaded = inference.load_model(workdir, config)
    config = loaded.data_config
    results = evaluate_model(loaded)
    class_names = list(loaded.class_names) if loaded.class_names else [str(i) for i in range(loaded.num_classes)]
    results |= {
        "class_names": class_names,
        "model": config.model,
        "dataset": config.dataset,
        "eval_split": config.data.eval_split,
        "image_size": config.image_size,
        "preprocessing": model_data.preprocessing_record(config),
        "weights": loaded.kind,
        "source": loaded.source,
        "step": loaded.step,
        "used_ema": loaded.use_ema,
        "wall_seconds": time.time() - start,
    }
    workdir = os.path.abspath(workdir)
    reporting.write_json(os.path.join(workdir, EVAL_RESULTS_FILE), results)
    fig = plots.confusion_matrix_figure(
        np.asarray(results["confusion_matrix"]),
        class_names,
        title=(
            f"{config.model} on {config.dataset}:{config.data.eval_split} "
            f"(top-1 {results['eval_top1']:.4f}, {results['eval_examples']} examples)"
        ),
    )
    plots.save_figure(fig, plots.plot_path(workdir, "confusion_matrix"))
    return results


# --------------------------------------------------------------------------- command line


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings are passed as --config.KEY=VALUE")
    workdir_flags.quiet_libraries()
    try:
        results = evaluate_workdir(flags.FLAGS.workdir, workdir_flags.config_from_flags())
    except (ConfigError, OSError) as e:
        cli.fail(str(e))
    print(
        f"{results['model']} ({results['weights']}{', step ' + str(results['step']) if results['step'] is not None else ''}"
        f"{', EMA' if results['used_ema'] else ''}) on {results['dataset']}:{results['eval_split']}"
    )
    print(f"  top-1  {results['eval_top1']:.4f}")
    print(f"  top-5  {results['eval_top5']:.4f}")
    print(f"  loss   {results['eval_loss']:.4f}")
    print(f"  examples {results['eval_examples']}")
    workdir = os.path.abspath(flags.FLAGS.workdir)
    print(f"wrote {os.path.join(workdir, EVAL_RESULTS_FILE)} and {plots.plot_path(workdir, 'confusion_matrix')}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    workdir_flags.define_workdir_flags(
        sys.argv, "Training workdir (checkpoints/) or `skipnet_jax.convert` output (model.json)."
    )
    app.run(main, flags_parser=cli.parse_absl_flags)
