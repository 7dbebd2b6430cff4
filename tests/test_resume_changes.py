"""What a careless rerun cannot do to a run: resume with other optimisation settings
unnoticed, change a finished run without saying so, or start with a batch larger than the data.

The workdir is built without training: the tiny digits model's state (zeros of the right
shapes, nothing compiled) saved as checkpoint 4 next to the config.json of the run that wrote
it.  Resuming stops in `train._set_up`, before any step is compiled.
"""

from __future__ import annotations

import contextlib
import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_digits_config

from skipnet_jax import checkpointing, reporting, train
from skipnet_jax.config_validation import ConfigError

STEP = 4


@pytest.fixture
def resumable(digits_data_dir, tmp_path, registered_step_test_net):
    """``(workdir, config)``: checkpoint 4 of an 8-step run with `config`, and its config.json.
    Of the small test network: what resuming checks does not depend on the network."""
    config = tiny_digits_config(digits_data_dir, model=registered_step_test_net, num_train_steps=8)
    engine = train.build_engine(config, 10, steps_per_epoch=45, num_train_steps=8)
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), engine.abstract_state()).replace(step=np.int32(STEP))
    workdir = str(tmp_path / "run")
    manager = checkpointing.create_manager(workdir, keep=3)
    checkpointing.save(manager, STEP, state)
    manager.wait_until_finished()
    manager.close()
    train._save_config(config, workdir)
    return workdir, config


def _set_up(config, workdir, allow=False):
    """The run `train_and_evaluate` would start (its checkpoint manager closed again)."""
    with contextlib.ExitStack() as held:
        set_up = train._set_up(config, workdir, held, allow)
    if isinstance(set_up, tuple):
        set_up[0].manager.close()
    return set_up


def _read(path):
    with open(path) as f:
        return json.load(f)


def test_resume_with_a_changed_learning_rate_is_refused_naming_it(resumable):
    workdir, config = resumable
    saved = open(os.path.join(workdir, "config.json"), "rb").read()
    config.learning_rate = 0.01
    config.log_every_steps = 1  # a harmless change is not named
    with pytest.raises(ConfigError) as caught:
        train.train_and_evaluate(config, workdir)
    message = str(caught.value)
    assert "\n" not in message
    assert "resumes at step 4 and steps 1-4 ran with other optimisation settings (learning_rate 0.001 -> 0.01)" in (
        message
    )
    assert "--allow_changed_config" in message and "log_every_steps" not in message
    assert open(os.path.join(workdir, "config.json"), "rb").read() == saved  # the run's record is unchanged
    assert not os.path.exists(os.path.join(workdir, reporting.CONFIG_CHANGES_FILE))


@pytest.mark.parametrize(
    "field, value",
    [("batch_size", 16), ("adam_b1", 0.8), ("schedule", "constant"), ("weight_decay", 0.0), ("loss", "ce")],
)
def test_every_optimisation_field_is_refused(resumable, field, value):
    workdir, config = resumable
    config[field] = value
    with pytest.raises(ConfigError, match=rf"settings \({field} "):
        _set_up(config, workdir)


def test_harmless_changes_resume_as_before(resumable):
    workdir, config = resumable
    config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 2, 2
    run, state = _set_up(config, workdir)
    assert run.start_step == STEP == int(state.step)
    assert _read(os.path.join(workdir, "config.json"))["eval_every_steps"] == 2
    assert not os.path.exists(os.path.join(workdir, reporting.CONFIG_CHANGES_FILE))


def test_an_allowed_change_is_recorded_with_the_steps_it_applies_to(resumable):
    workdir, config = resumable
    config.learning_rate = 0.01
    run, _ = _set_up(config, workdir, allow=True)
    assert run.start_step == STEP
    assert _read(os.path.join(workdir, "config.json"))["learning_rate"] == 0.01
    record = _read(os.path.join(workdir, reporting.CONFIG_CHANGES_FILE))
    assert record == {"changes": [{"from_step": 5, "changed": {"learning_rate": {"before": 0.001, "after": 0.01}}}]}
    # A second allowed change is appended: the record says which steps ran under which values.
    config.learning_rate, config.num_train_steps = 0.02, 10
    _set_up(config, workdir, allow=True)
    changes = _read(os.path.join(workdir, reporting.CONFIG_CHANGES_FILE))["changes"]
    assert changes[1] == {
        "from_step": 5,
        "changed": {
            "learning_rate": {"before": 0.01, "after": 0.02},
            "num_train_steps": {"before": 8, "after": 10},
        },
    }


def test_rerunning_a_finished_run_with_an_override_says_it_was_not_applied(resumable, monkeypatch):
    workdir, config = resumable
    config.num_train_steps = STEP
    train._save_config(config, workdir)
    results = {"steps": STEP, "eval_top1": 0.5}
    reporting.write_results(workdir, results)
    warnings = []
    monkeypatch.setattr(train.logging, "warning", lambda message, *args: warnings.append(message % args))
    config.learning_rate = 0.5
    assert train.train_and_evaluate(config, workdir) == results
    (warning,) = warnings
    assert warning.startswith("Not applied (the run had finished; nothing was trained or rewritten): learning_rate")
    assert _read(os.path.join(workdir, "config.json"))["learning_rate"] == 0.001


def test_a_global_batch_larger_than_the_train_split_is_refused_before_anything_is_written(digits_data_dir, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_digits_config(digits_data_dir, batch_size=100_000)
    with pytest.raises(ConfigError) as caught:
        train.train_and_evaluate(config, str(workdir))
    assert str(caught.value) == (
        "config.batch_size=100000 is larger than the train split (digits 'train': 1437 examples); "
        "set --config.batch_size to at most 1437"
    )
    assert not workdir.exists()


# --- predict/evaluate/export on a directory without a model ------------------------------------


def test_a_missing_workdir_is_not_a_directory_and_an_empty_one_holds_no_model(tmp_path):
    from skipnet_jax import inference

    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for load in (inference.load_config, inference.load_model):
        with pytest.raises(ConfigError, match=rf"^--workdir {missing} is not a directory \(it does not exist\)$"):
            load(str(missing))
        with pytest.raises(ConfigError, match=rf"^--workdir {empty} holds no model: no config\.json or checkpoints/"):
            load(str(empty))


def test_predict_names_the_workdir_before_the_images(tmp_path):
    """The directory is checked first, with or without --config: a missing model is the
    problem to report, not the image paths."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    (tmp_path / "empty").mkdir()
    for workdir, extra, expected in (
        (tmp_path / "missing", (), "is not a directory (it does not exist)"),
        (tmp_path / "empty", ("--config=configs/digits.py",), "holds no model: no config.json"),
    ):
        argv = [sys.executable, "-m", "skipnet_jax.predict", f"--workdir={workdir}", *extra, "no_such.jpg"]
        result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: --workdir {workdir} {expected}"), line


# --- A full disk during a checkpoint save --------------------------------------------------------


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, caplog):
    """orbax writes the arrays in a background thread; TensorStore reports the full disk as
    RESOURCE_EXHAUSTED with the OS error.  Whichever manager call meets it, the loop's guard
    turns it into one `CheckpointWriteError`, removes ``<step>.orbax-checkpoint-tmp`` and
    drops orbax's tracebacks."""
    import errno
    import logging

    import jax.numpy as jnp
    from orbax.checkpoint._src.serialization import serialization

    state = {"w": jnp.ones((8, 8)), "step": jnp.asarray(0)}
    manager = checkpointing.create_manager(str(tmp_path), keep=3)
    checkpointing.save(manager, 2, state)
    manager.wait_until_finished()

    async def disk_full(*args, **kwargs):
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "w/0": [OS error: {os.strerror(errno.ENOSPC)}]')

    monkeypatch.setattr(serialization, "async_serialize_from_host", disk_full)
    caplog.set_level(logging.ERROR)
    with pytest.raises(checkpointing.CheckpointWriteError) as caught:
        with checkpointing.out_of_space_stops(manager):
            checkpointing.save(manager, 4, state)
            manager.wait_until_finished()
    manager.close()
    message = str(caught.value)
    directory = checkpointing.checkpoint_dir(str(tmp_path))
    assert "\n" not in message
    assert message.startswith(f"checkpoint {directory}/4 could not be written: no space left on device (")
    assert "the earlier checkpoints (2) are intact; free space (" in message
    assert message.endswith("and rerun the same command to resume from step 2")
    assert sorted(os.listdir(directory)) == ["2"]  # the partial 4.orbax-checkpoint-tmp is gone
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_other_errors_pass_the_full_disk_guard_unchanged(tmp_path):
    manager = checkpointing.create_manager(str(tmp_path), keep=3)
    with pytest.raises(RuntimeError, match=r"^RESOURCE_EXHAUSTED: out of memory on device$"):
        with checkpointing.out_of_space_stops(manager):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory on device")  # XLA's OOM is no full disk
    manager.close()
    assert checkpointing.is_out_of_space(OSError(28, "No space left on device"))


# --- The data config is completed and validated once per command ---------------------------------


@pytest.fixture
def data_validations(monkeypatch):
    """Counts `config_validation.validate_data_config` calls (each `datasets.complete` makes one)."""
    from skipnet_jax import config_validation

    calls = []
    real = config_validation.validate_data_config

    def counted(config):
        calls.append(config)
        return real(config)

    monkeypatch.setattr(config_validation, "validate_data_config", counted)
    return calls


def test_training_completes_its_data_config_once(resumable, data_validations):
    """What a training run does with its data: prepare, describe, the train and eval streams."""
    from skipnet_jax.data import pipeline

    workdir, config = resumable
    run, _ = _set_up(config, workdir)
    pipeline.create_train_iterator(run.data_config, start_step=run.start_step)
    pipeline.create_eval_iterator(run.data_config)
    pipeline.num_eval_batches(run.data_config)
    assert len(data_validations) == 1


def test_evaluate_predict_and_export_complete_the_data_config_once(resumable, data_validations):
    """Loading the model completes it; the eval stream (evaluate), the eval transform's
    settings (predict) and the preprocessing record (predict, export) reuse it."""
    from skipnet_jax import inference, model_data
    from skipnet_jax.data import pipeline

    workdir, _ = resumable
    loaded = inference.load_model(workdir)
    pipeline.create_eval_iterator(loaded.data_config)
    model_data.eval_preprocessing(loaded.data_config)
    model_data.preprocessing_record(loaded.data_config)
    assert len(data_validations) == 1
