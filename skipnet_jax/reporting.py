"""Console progress, TensorBoard scalars and images, and results.json (the loop's only outputs)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from typing import IO

from absl import logging


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class ProgressReporter:
    """Averages per-step metrics over a logging window and reports them.

    Throughput is measured from the end of the first recorded step, so it
    excludes compilation.
    """

    def __init__(self, workdir: str | None, num_train_steps: int, batch_size: int, log_every_steps: int):
        self._writer = None
        if workdir:
            # flax's SummaryWriter is TensorFlow's: imported only when there is a log to write.
            from flax.metrics import tensorboard

            self._writer = tensorboard.SummaryWriter(os.path.join(workdir, TENSORBOARD_SUBDIR))
        self._num_train_steps = num_train_steps
        self._batch_size = batch_size
        self._log_every = log_every_steps
        self._window: list[dict[str, float]] = []
        self._first_step: int | None = None
        self._first_time = 0.0
        self._last_step = 0
        self._last_time = 0.0
        self._window_start: tuple[int, float] | None = None

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of the step that brought the count of completed steps to `step`."""
        now = time.perf_counter()
        if self._first_step is None:
            self._first_step, self._first_time = step, now
            self._window_start = (step, now)
        self._last_step, self._last_time = step, now
        self._window.append(metrics)
        if step % self._log_every == 0 or step == self._num_train_steps:
            self._flush(step, now)

    def _flush(self, step: int, now: float) -> None:
        averages = {k: sum(m[k] for m in self._window) / len(self._window) for k in self._window[-1]}
        start_step, start_time = self._window_start
        rate = (step - start_step) * self._batch_size / (now - start_time) if step > start_step else float("nan")
        eta = (self._num_train_steps - step) * self._batch_size / rate if rate > 0 else float("nan")
        logging.info(
            "step %d/%d  loss %.4f  acc %.3f  lr %.4g  %.1f img/s  ETA %s",
            step, self._num_train_steps, averages["loss"], averages["accuracy"],
            averages["learning_rate"], rate, _format_duration(eta),
        )  # fmt: skip
        if self._writer:
            for key, value in averages.items():
                self._writer.scalar(f"train/{key}", value, step)
            if math.isfinite(rate):
                self._writer.scalar("train/examples_per_sec", rate, step)
            self._writer.flush()
        self._window = []
        self._window_start = (step, now)

    def write_eval(self, step: int, metrics: dict[str, float]) -> None:
        logging.info(
            "eval at step %d: top-1 %.4f  top-5 %.4f  loss %.4f  (%d examples)",
            step, metrics["eval_top1"], metrics["eval_top5"], metrics["eval_loss"], metrics["eval_examples"],
        )  # fmt: skip
        if self._writer:
            for key in ("eval_top1", "eval_top5", "eval_loss"):
                self._writer.scalar(f"eval/{key[5:]}", metrics[key], step)
            self._writer.flush()

    def write_images(self, step: int, png_paths: dict[str, str]) -> None:
        """Adds PNG files (e.g. WORKDIR/plots/*.png) to TensorBoard as images ``plots/<name>``."""
        if not self._writer:
            return
        from matplotlib import image as mpimg  # only when there are plots

        for name, path in png_paths.items():
            rgb = (mpimg.imread(path)[..., :3] * 255).round().astype("uint8")
            self._writer.image(f"plots/{name}", rgb, step)
        self._writer.flush()

    def examples_per_sec(self) -> float:
        """Training throughput after the first (compiling) step; NaN if too few steps ran."""
        if self._first_step is None or self._last_step <= self._first_step:
            return float("nan")
        return (self._last_step - self._first_step) * self._batch_size / (self._last_time - self._first_time)

    def close(self) -> None:
        if self._writer:
            self._writer.close()


CONFIG_FILE = "config.json"  # WORKDIR/config.json: the resolved config of the run
# WORKDIR/config_changes.json: the optimisation settings changed on a resume, with the step from
# which each new value applied (train.py writes it; absent when nothing was changed)
CONFIG_CHANGES_FILE = "config_changes.json"
RESULTS_FILE = "results.json"  # WORKDIR/results.json: the finished run's numbers
# WORKDIR/run_record.json: per checkpointed step, what a resumed run must carry on from (last
# train metrics, skipped steps and files); results.json is built from it when the loop is not
# re-run (a finished run, or one preempted at its last step).
TENSORBOARD_SUBDIR = "tensorboard"  # the event files of the run
RUN_RECORD_FILE = "run_record.json"
# WORKDIR/eval_results.json: written by `python -m skipnet_jax.evaluate`, never by training.
EVAL_RESULTS_FILE = "eval_results.json"


def finite_or_none(data):
    """`data` with every NaN/Infinity float replaced by None (JSON null), recursively.

    Strict JSON has no NaN: readers other than Python's (jq, browsers, other languages)
    reject a file holding one.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(v) for v in data]
    return data


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """Opens ``PATH.tmp`` for writing and renames it onto `path` when the block ends.

    The rename replaces the file in one step, so a crash (or a reader) never sees a
    truncated file in place of the previous one.  When the block raises, the temporary
    file is removed and `path` is left as it was.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path: str, data: dict) -> None:
    """Writes `data` to `path` as strict JSON (non-finite floats become null), atomically."""
    with atomic_write(path) as f:
        json.dump(finite_or_none(data), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when the file is missing or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_results(workdir: str, results: dict) -> None:
    """Writes WORKDIR/results.json atomically."""
    write_json(os.path.join(workdir, RESULTS_FILE), results)


def read_results(workdir: str) -> dict | None:
    return read_json(os.path.join(workdir, RESULTS_FILE))


def load_run_record(workdir: str, step: int) -> dict:
    """What was recorded when the checkpoint of `step` was saved ({} if nothing was)."""
    records = read_json(os.path.join(workdir, RUN_RECORD_FILE)) or {}
    record = records.get(str(step))
    return record if isinstance(record, dict) else {}


def save_run_record(workdir: str, step: int, record: dict, keep_steps) -> None:
    """Adds the record of `step`; drops those of steps whose checkpoints are gone."""
    path = os.path.join(workdir, RUN_RECORD_FILE)
    records = read_json(path) or {}
    records[str(step)] = record
    wanted = {str(s) for s in keep_steps} | {str(step)}
    write_json(path, {k: v for k, v in records.items() if k in wanted})
