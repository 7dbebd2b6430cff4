"""The training loop: data, checkpoints, logs and results.json around the jitted steps.

`train_and_evaluate` is the only place with side effects.  The pure step functions
(`create_train_state`, `train_step`, `eval_step`, ...) live in `skipnet_jax.steps` and
are re-exported here; `skipnet_jax.engine` builds the model, optimiser, mesh and jitted
steps the loop runs, as evaluation, the benchmark and the accelerator check do.

The tf.data input pipeline is imported inside the functions that read data, so
importing this module needs no TensorFlow.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from skipnet_jax import (
    checkpointing,
    config_validation,
    default_config,
    init_from,
    optim,
    plots,
    reporting,
    sharding,
    steps,
    stopping,
)
from skipnet_jax.config_validation import ConfigError, check_num_classes
from skipnet_jax.engine import Engine, build_engine
from skipnet_jax.reporting import CONFIG_FILE, ProgressReporter, write_results

# The step layer, importable from here too: `skipnet_jax.train.train_step` etc. are the documented names.
from skipnet_jax.steps import (  # noqa: F401 - re-exported
    PER_EXAMPLE,
    StepOptions,
    TrainState,
    compute_dtype,
    create_model,
    create_train_state,
    eval_step,
    halt_on_nonfinite,
    train_step,
)

# Global batches transferred to the devices ahead of the step that uses them.
DEVICE_PREFETCH = 2
# Train steps the host may dispatch ahead of the device. Without a bound the host would queue a
# whole logging window, each queued step holding its input batch in device memory.
MAX_STEPS_IN_FLIGHT = 2


class BadImageError(RuntimeError):
    """An image file of an image-folder dataset cannot be decoded (``config.data.bad_images="error"``)."""


def _report_bad_files(runs: list[tuple[str, ...]], seen: set[str], config, where: str) -> None:
    """Logs each newly met unreadable file once, or stops if the config says so.

    `runs`: per example, the files it skipped (`pipeline.pop_bad_files`).  The
    pipeline has already replaced (train) or masked out (eval) the example; here
    we only decide whether that is acceptable.  An example for which every try
    failed stops the run whatever the config: it was filled with a blank image.
    """
    from skipnet_jax.data import pipeline  # tf.data only where data is read

    for path in (path for run in runs for path in run):
        if path in seen:
            continue
        seen.add(path)
        if config.data.bad_images == "error":
            raise BadImageError(
                f"cannot decode image file {path!r} ({where}); fix or remove it, or set"
                " --config.data.bad_images=skip to skip unreadable files"
            )
        logging.warning("Skipping unreadable image file %s (%s)", path, where)
    for run in runs:
        if len(run) >= pipeline.MAX_CONSECUTIVE_BAD_FILES:
            raise BadImageError(
                f"{len(run)} unreadable image files in a row from {run[0]!r} ({where});"
                " is the dataset directory damaged?"
            )


def evaluate(jitted_eval_step, state, config, data_sharding) -> tuple[dict[str, float], np.ndarray]:
    """Top-1/top-5/loss over the full eval split (padded examples masked out) and the
    ``int64 [C, C]`` confusion matrix (rows: true class)."""
    from skipnet_jax.data import pipeline  # tf.data only where data is read

    totals = None
    iterator = pipeline.create_eval_iterator(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    bad_files: set[str] = set()

    def checked(local_batches):
        for local_batch in local_batches:
            bad = pipeline.pop_bad_files(local_batch, config, config.data.eval_split)
            _report_bad_files(bad, bad_files, config, "eval")
            yield local_batch

    for batch in sharding.prefetch_to_device(checked(iterator), data_sharding, DEVICE_PREFETCH):
        sums = jitted_eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    metrics = {
        "eval_loss": float(totals["loss_sum"]) / max(count, 1.0),
        "eval_top1": float(totals["top1_sum"]) / max(count, 1.0),
        "eval_top5": float(totals["top5_sum"]) / max(count, 1.0),
        "eval_examples": int(count),  # < the split's size only if unreadable files were skipped
    }
    return metrics, np.asarray(totals["confusion"], np.int64)


def _save_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _saved_config_changes(workdir: str, config) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, now)}``: what differs from the config that wrote the workdir's
    checkpoints (its config.json); empty when there is none."""
    saved = reporting.read_json(os.path.join(workdir, CONFIG_FILE))
    if saved is None:
        return {}
    return config_validation.config_changes(saved, json.loads(config.to_json_best_effort()))


def _config_change(workdir: str, config) -> str:
    """What differs from the config that wrote the workdir's checkpoints (its config.json),
    as the lead of the refusal: the fields, not the thousands of tensor shapes, tell the
    user what to change back."""
    saved = reporting.read_json(os.path.join(workdir, CONFIG_FILE))
    if saved is None:
        return ""
    changed = config_validation.config_differences(saved, json.loads(config.to_json_best_effort()))
    return f"config differs from the workdir's run ({'; '.join(changed)}): " if changed else ""


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in changes.items())


def _check_resume_changes(workdir: str, changes: dict, start_step: int, allow: bool, is_chief: bool) -> None:
    """Refuses to resume from `start_step` with changed optimisation settings (every field not in
    `default_config.RESUME_SAFE_KEYS`) unless `allow`; allowed, appends them to
    WORKDIR/config_changes.json with the step from which the new values apply."""
    altering = {key: change for key, change in changes.items() if key not in default_config.RESUME_SAFE_KEYS}
    if not altering:
        return
    record_path = os.path.join(workdir, reporting.CONFIG_CHANGES_FILE)
    if not allow:
        raise ConfigError(
            f"{workdir} resumes at step {start_step} and steps 1-{start_step} ran with other optimisation "
            f"settings ({_listed(altering)}); rerun with the workdir's settings (its {CONFIG_FILE}), pass "
            f"another --workdir, or pass --allow_changed_config to go on with the new ones (recorded in "
            f"{record_path})"
        )
    logging.warning("Resuming at step %d with changed settings (%s); recorded in %s.",
                    start_step, _listed(altering), record_path)  # fmt: skip
    if is_chief:
        history = (reporting.read_json(record_path) or {}).get("changes", [])
        history.append({
            "from_step": start_step + 1,
            "changed": {key: {"before": a, "after": b} for key, (a, b) in altering.items()},
        })  # fmt: skip
        reporting.write_json(record_path, {"changes": history})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_changed_config: bool = False
) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints if present), evaluates, writes results.json.

    One training run per workdir: while this one runs, another started there fails at
    once (`checkpointing.workdir_lock`).  A resume with changed optimisation settings (any
    field outside `default_config.RESUME_SAFE_KEYS`) is refused with a `ConfigError`
    naming them, unless `allow_changed_config`; then they are recorded in
    WORKDIR/config_changes.json.  Re-running a finished run returns its results and
    changes nothing (a changed setting is reported as not applied)."""
    with contextlib.ExitStack() as held:  # the workdir lock, taken once the workdir exists; released on any exit
        return _train_and_evaluate(config, workdir, held, allow_changed_config)


@dataclasses.dataclass(frozen=True)
class _Run:
    """What `_set_up` hands the loop and `_finish`: a run about to train from `start_step`."""

    config: ml_collections.ConfigDict
    data_config: Any  # `config` completed for the data package, once (`datasets.complete`)
    workdir: str
    info: Any  # pipeline.DatasetInfo
    engine: Engine
    manager: Any  # the orbax CheckpointManager of WORKDIR/checkpoints
    start_step: int
    num_train_steps: int
    num_params: int
    is_chief: bool


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, held: contextlib.ExitStack, allow_changed_config: bool
) -> dict[str, Any]:
    from skipnet_jax.data import pipeline  # tf.data only where data is read

    wall_start = time.time()
    set_up = _set_up(config, workdir, held, allow_changed_config)
    if not isinstance(set_up, tuple):
        return set_up  # the run had finished: its results
    run, state = set_up
    # The loop checks for NaN only when it fetches metrics: unless bad steps are to be skipped,
    # the first one is latched on the device.
    jitted_train_step = run.engine.jitted_train_step(config.seed, halt_on_nonfinite=not config.skip_nonfinite_steps)
    jitted_eval_step = run.engine.jitted_eval_step(use_ema=config.ema_decay > 0)

    reporter = ProgressReporter(
        workdir if run.is_chief else None, run.num_train_steps, config.batch_size, config.log_every_steps
    )
    train_iterator = pipeline.create_train_iterator(
        run.data_config, start_step=run.start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    progress = _Progress(run, reporter)
    state = _train(run, progress, state, train_iterator, jitted_train_step, jitted_eval_step)
    return _finish(run, progress, state, jitted_eval_step, wall_start)


def _set_up(
    config: ml_collections.ConfigDict, workdir: str, held: contextlib.ExitStack, allow_changed_config: bool = False
) -> tuple[_Run, TrainState] | dict[str, Any]:
    """The run and its state (restored, initialised or from ``init_from``), the workdir locked;
    or, for a run that had already finished, its results."""
    from skipnet_jax.data import datasets, pipeline, preparation  # tf.data only where data is read

    try:  # training is the one tool that prepares its dataset (digits, ImageNet from its tars)
        data_config = datasets.complete(config)  # the data functions below use it as it is
        preparation.prepare_dataset(data_config, process_index=jax.process_index(), process_count=jax.process_count())
        info = pipeline.get_dataset_info(data_config)
    except ValueError as e:  # unknown dataset name, missing files: a config problem
        raise ConfigError(str(e).splitlines()[0]) from e
    num_classes = check_num_classes(config, info.num_classes)
    config_validation.check_batch_fits(config, info.num_train_examples, info.name)
    steps_per_epoch, num_train_steps = optim.steps_for(config, info.num_train_examples)
    is_chief = jax.process_index() == 0

    engine = build_engine(config, num_classes, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps)
    # Shapes only: a resumed run never pays for compiling the initialisation.
    abstract_state = engine.abstract_state()
    # Checked before anything is written: a wrong init_from leaves no workdir behind.
    initial_weights = init_from.load_initial_weights(config.init_from, abstract_state) if config.init_from else None

    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # e.g. under /proc, or a parent another process just removed
        raise ConfigError(f"--workdir={workdir!r} cannot be created: {e.strerror or e}") from e
    held.enter_context(checkpointing.workdir_lock(workdir))  # before this run writes anything into the workdir
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    try:  # damaged checkpoints are moved aside; no readable one left (but some were there) stops the run
        restored = checkpointing.restore_latest(manager, abstract_state, quarantine=True)
    except checkpointing.CheckpointMismatchError as e:
        raise ConfigError(_config_change(workdir, config) + str(e)) from e
    if restored is not None:
        state = jax.device_put(restored, engine.replicated)
        logging.info("Resumed from %s at step %d", checkpointing.checkpoint_dir(workdir), int(state.step))
    else:
        state = engine.initial_state(config.seed)
        if initial_weights is not None:
            state = jax.device_put(init_from.with_initial_weights(state, initial_weights), engine.replicated)
            logging.info("Initialised weights from %s", config.init_from)
    start_step = int(state.step)
    changes = _saved_config_changes(workdir, config) if restored is not None else {}
    if start_step >= num_train_steps:
        finished = reporting.read_results(workdir)
        if finished is not None and finished.get("steps") == start_step:
            logging.info("The run in %s finished at step %d; its results are kept as they are.", workdir, start_step)
            if changes:
                logging.warning(
                    "Not applied (the run had finished; nothing was trained or rewritten): %s. "
                    "Pass another --workdir to train with these settings.", _listed(changes),
                )  # fmt: skip
            manager.close()
            return finished
    try:
        _check_resume_changes(workdir, changes, start_step, allow_changed_config, is_chief)
    except ConfigError:
        manager.close()
        raise
    if is_chief:  # only now: a refused resume or a bad init_from leaves the run's config.json as it was
        _save_config(config, workdir)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info(
        "%s on %s: %d classes, %d params, %d train / %d eval examples, %d steps (%d/epoch), %d devices",
        config.model, info.name, num_classes, num_params, info.num_train_examples,
        info.num_eval_examples, num_train_steps, steps_per_epoch, jax.device_count(),
    )  # fmt: skip
    run = _Run(config, data_config, workdir, info, engine, manager, start_step, num_train_steps, num_params, is_chief)
    return run, state


class _Progress:
    """The loop's record of the run: reported metrics, skipped steps and files, histogram
    snapshots.  A resumed run carries on from what was recorded with its checkpoint."""

    def __init__(self, run: _Run, reporter: ProgressReporter):
        self.run, self.reporter = run, reporter
        self.record = reporting.load_run_record(run.workdir, run.start_step) if run.start_step else {}
        self.last_metrics = {
            k: self.record[f"train_{k}"] for k in ("loss", "accuracy") if self.record.get(f"train_{k}") is not None
        }
        self.skipped: list[int] = list(self.record.get("skipped_nonfinite_steps", []))
        self.bad_train_files: set[str] = set(self.record.get("skipped_train_files", []))
        wanted = run.config.loss == "bias"
        self.wanted_snapshots = snapshot_steps(run.num_train_steps) if wanted else frozenset()
        self.snapshots_path = os.path.join(run.workdir, plots.SNAPSHOTS_FILE)
        self.snapshots = plots.load_snapshots(self.snapshots_path) if os.path.exists(self.snapshots_path) else {}
        self.unfetched: list[tuple[int, dict]] = []  # (completed steps, on-device metrics of that step)

    def keep_metrics(self, completed: int, metrics: dict) -> None:
        """Queues a step's on-device metrics for `fetch_metrics`.  The per-example arrays stay
        split over the devices in the step (`engine.Engine.jitted_train_step`); they are kept,
        gathered onto every device, only at the snapshot steps."""
        per_example = metrics.get(PER_EXAMPLE)
        metrics = _without(metrics, PER_EXAMPLE)
        if per_example is not None and completed in self.wanted_snapshots:
            metrics[PER_EXAMPLE] = self.run.engine.replicated_copy(per_example)
        self.unfetched.append((completed, metrics))

    def fetch_metrics(self) -> None:
        """Brings the metrics of the steps run since the last call to the host (one transfer),
        stops on a non-finite step (unless configured to skip), and reports them."""
        config, manager = self.run.config, self.run.manager
        if not self.unfetched:
            return
        wanted, self.unfetched = self.unfetched, []
        for completed, metrics in jax.device_get(wanted):
            if not bool(metrics["finite"]):
                message = stopping.diverged_message(metrics, completed - 1, config.max_abs_weight)
                if not config.skip_nonfinite_steps:
                    manager.wait_until_finished()  # the last good checkpoint is complete before we stop
                    raise stopping.NonFiniteLossError(f"{message}; {stopping.how_to_resume(manager)}")
                logging.warning("%s; skipped that batch (skip_nonfinite_steps=True)", message)
                self.skipped.append(completed - 1)
                continue
            per_example = metrics.pop(PER_EXAMPLE, None)
            if per_example is not None and self.run.is_chief:
                self.snapshots[completed] = {k: np.asarray(v) for k, v in per_example.items()}
                plots.save_snapshots(self.snapshots_path, self.snapshots)  # atomic; survives a restart
            self.last_metrics = {k: float(np.asarray(v)) for k, v in metrics.items() if k != "finite"}
            self.reporter.record(completed, self.last_metrics)

    def save_run_record(self, completed: int) -> None:
        """What a run resumed from checkpoint `completed` carries on from."""
        reporting.save_run_record(
            self.run.workdir,
            completed,
            {
                "train_loss": self.last_metrics.get("loss"),
                "train_accuracy": self.last_metrics.get("accuracy"),
                "examples_per_sec": _throughput(self.reporter, self.record),
                "skipped_nonfinite_steps": self.skipped,
                "skipped_train_files": sorted(self.bad_train_files),
            },
            keep_steps=self.run.manager.all_steps(),
        )


def _train(run: _Run, progress: _Progress, state, train_iterator, jitted_train_step, jitted_eval_step):
    """Steps from `run.start_step` to the end, checkpointing, evaluating and logging on the way;
    the final state.  Raises `stopping.Preempted` after saving when asked to stop."""
    from skipnet_jax.data import pipeline  # tf.data only where data is read

    config, manager, start_step, num_train_steps = run.data_config, run.manager, run.start_step, run.num_train_steps
    data_sharding = run.engine.data_sharding
    in_flight: collections.deque = collections.deque()

    def checked_batches():
        for step in range(start_step, num_train_steps):
            local_batch = next(train_iterator)
            bad = pipeline.pop_bad_files(local_batch, config, config.data.train_split)
            if bad:
                _report_bad_files(bad, progress.bad_train_files, config, f"train step {step}")
            yield local_batch

    batches = sharding.prefetch_to_device(checked_batches(), data_sharding, DEVICE_PREFETCH)
    with (
        checkpointing.out_of_space_stops(manager),
        stopping.PreemptionWatcher() as preemption,
        stopping.finish_saves_on((BadImageError, KeyboardInterrupt), manager),
    ):
        for completed, batch in enumerate(batches, start=start_step + 1):
            state, metrics = jitted_train_step(state, batch)
            progress.keep_metrics(completed, metrics)
            in_flight.append(metrics["finite"])
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:  # waits; the device still has queued steps
                in_flight.popleft().block_until_ready()
            preempted = preemption.requested(manager, completed)
            save = preempted or completed % config.checkpoint_every_steps == 0 or completed == num_train_steps
            evaluate_now = (
                config.eval_every_steps and completed % config.eval_every_steps == 0 and completed != num_train_steps
            )
            # The first step is fetched at once, so throughput and the first log line exclude compilation.
            if save or evaluate_now or completed % config.log_every_steps == 0 or completed == start_step + 1:
                progress.fetch_metrics()  # before saving: a checkpoint never holds a state past a non-finite step
            if save:
                checkpointing.save(manager, completed, state)
                if run.is_chief:
                    progress.save_run_record(completed)
            if preempted:
                manager.wait_until_finished()
                logging.warning(
                    "%s: checkpoint at step %d is saved; rerun the same command to resume.",
                    "Interrupted" if preemption.interrupted else "Preempted",
                    completed,
                )
                raise stopping.Preempted(completed, interrupted=preemption.interrupted)
            if evaluate_now:
                progress.reporter.write_eval(completed, evaluate(jitted_eval_step, state, config, data_sharding)[0])
        progress.fetch_metrics()
        manager.wait_until_finished()
    return state


def _finish(run: _Run, progress: _Progress, state, jitted_eval_step, wall_start: float) -> dict[str, Any]:
    """The final evaluation, results.json and the plots; returns the results."""
    config, info, reporter = run.config, run.info, progress.reporter
    eval_metrics, confusion = evaluate(jitted_eval_step, state, run.data_config, run.engine.data_sharding)
    reporter.write_eval(run.num_train_steps, eval_metrics)
    results = {
        **eval_metrics,
        "train_loss": progress.last_metrics.get("loss"),
        "train_accuracy": progress.last_metrics.get("accuracy"),
        "steps": int(state.step),
        "resumed_from_step": run.start_step,
        "skipped_nonfinite_steps": progress.skipped,
        # Image folders: unreadable files skipped by this process (each process logs its own) and
        # eval examples lost to them (global); empty class directories of the train split.
        "skipped_train_files": sorted(progress.bad_train_files),
        "skipped_eval_examples": info.num_eval_examples - eval_metrics["eval_examples"],
        "empty_class_dirs": list(info.empty_class_dirs),
        "examples_per_sec": _throughput(reporter, progress.record),
        "wall_seconds": time.time() - wall_start,
        "params_global_norm": float(
            jax.jit(optax.global_norm, compiler_options=steps.one_off_compiler_options(run.engine.platform))(
                state.params
            )
        ),
        "num_params": int(run.num_params),
        "model": config.model,
        "dataset": info.name,
        "loss": config.loss,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }
    reasons = {
        "train_loss": "no training step was recorded for this run",
        "train_accuracy": "no training step was recorded for this run",
        "examples_per_sec": "fewer than two training steps ran in one invocation",
    }
    results["null_reasons"] = {
        key: reasons.get(key, "not a finite number")
        for key, value in results.items()
        if value is None or (isinstance(value, float) and not np.isfinite(value))
    }
    if run.is_chief:
        write_results(run.workdir, results)
        _write_plots(run.workdir, reporter, run.num_train_steps, progress.snapshots, confusion, info.class_names)
    reporter.close()
    run.manager.close()
    logging.info("Results: %s", json.dumps(results, sort_keys=True))
    return results


def _throughput(reporter: ProgressReporter, record: dict) -> float | None:
    """Examples/s of this invocation's training, else the recorded one of an earlier invocation."""
    rate = reporter.examples_per_sec()
    return rate if np.isfinite(rate) else record.get("examples_per_sec")


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def snapshot_steps(num_train_steps: int) -> frozenset[int]:
    """Steps whose per-example bias-loss statistics are kept for the histograms:
    the first, 1/4, 1/2, 3/4 of the way, and the last."""
    return frozenset(max(1, round(num_train_steps * f)) for f in (0.0, 0.25, 0.5, 0.75, 1.0))


def _write_plots(workdir, reporter, step, snapshots, confusion, class_names) -> None:
    """WORKDIR/plots/*.png and the same images in TensorBoard.

    A figure that fails to draw is logged, never fatal: results.json and the
    checkpoints are already written.
    """
    try:
        names = class_names if len(class_names) == len(confusion) else None
        written = plots.save_all(workdir, snapshots=snapshots or None, confusion=confusion, class_names=names)
    except Exception:  # noqa: BLE001 - plotting must not fail a finished run
        logging.exception("Could not write the plots to %s", os.path.join(workdir, plots.PLOTS_SUBDIR))
        return
    reporter.write_images(step, written)
    logging.info("Plots: %s", ", ".join(sorted(written.values())))
