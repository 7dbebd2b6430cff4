"""Fuzz of invalid command-line overrides through the real CLI entry points (in-process).

Each override must end in exit code 2 with exactly one `error:` line naming the key, no
traceback, and nothing created or changed in an existing workdir.
"""

import os
import sys

import pytest
from absl import flags
from conftest import REPO_ROOT

from skipnet_jax import cli, train
from skipnet_jax import main as main_cli

INVALID = [
    # (override, key the message must name)
    ("model=skipnet_xxl", "model"), ("model=", "model"), ("model=resnet50", "model"),
    ("dataset=", "dataset"),
    ("image_size=0", "image_size"), ("image_size=-5", "image_size"), ("image_size=31", "image_size"),
    ("image_size=abc", "image_size"), ("image_size=1.5", "image_size"),
    ("batch_size=0", "batch_size"), ("batch_size=-1", "batch_size"), ("batch_size=abc", "batch_size"),
    ("eval_batch_size=0", "eval_batch_size"), ("eval_batch_size=-2", "eval_batch_size"),
    ("num_classes=0", "num_classes"), ("num_classes=1", "num_classes"), ("num_classes=-2", "num_classes"),
    ("num_train_steps=abc", "num_train_steps"), ("num_train_steps=1.5", "num_train_steps"),
    ("num_epochs=0", "num_epochs"), ("num_epochs=-1", "num_epochs"),
    ("seed=-1", "seed"), ("seed=2147483648", "seed"),
    ("optimizer=adam", "optimizer"), ("optimizer=SGD", "optimizer"), ("optimizer=", "optimizer"),
    ("learning_rate=0", "learning_rate"), ("learning_rate=-0.1", "learning_rate"),
    ("learning_rate=nan", "learning_rate"), ("learning_rate=inf", "learning_rate"),
    ("learning_rate=abc", "learning_rate"),
    ("momentum=1.0", "momentum"), ("momentum=-0.1", "momentum"), ("nesterov=maybe", "nesterov"),
    ("rmsprop_decay=1.0", "rmsprop_decay"), ("rmsprop_eps=0", "rmsprop_eps"),
    ("adam_b1=1.0", "adam_b1"), ("adam_b2=-0.5", "adam_b2"), ("adam_eps=0", "adam_eps"),
    ("weight_decay=-1e-4", "weight_decay"), ("grad_clip_norm=-1", "grad_clip_norm"),
    ("label_smoothing=1.0", "label_smoothing"), ("label_smoothing=-0.1", "label_smoothing"),
    ("ema_decay=1.0", "ema_decay"), ("dropout_rate=1.0", "dropout_rate"), ("dropout_rate=-0.2", "dropout_rate"),
    ("schedule=linear", "schedule"), ("warmup_epochs=-1", "warmup_epochs"), ("warmup_epochs=1000", "warmup_epochs"),
    ("lr_decay_rate=0", "lr_decay_rate"), ("lr_decay_rate=1.5", "lr_decay_rate"),
    ("lr_decay_epochs=0", "lr_decay_epochs"), ("lr_step_epochs=(3,2)", "lr_step_epochs"),
    ("lr_step_epochs=(-1,)", "lr_step_epochs"), ("lr_step_factor=0", "lr_step_factor"),
    ("lr_step_factor=2", "lr_step_factor"), ("lr_end_factor=-0.5", "lr_end_factor"),
    ("loss=focal", "loss"), ("loss=BIAS", "loss"),
    ("bias_loss.alpha=0", "bias_loss.alpha"), ("bias_loss.alpha=-1", "bias_loss.alpha"),
    ("bias_loss.beta=1.0", "bias_loss.beta"), ("bias_loss.beta=2", "bias_loss.beta"),
    ("bias_loss.mode=batch", "bias_loss.mode"),
    ("log_every_steps=0", "log_every_steps"), ("eval_every_steps=-1", "eval_every_steps"),
    ("checkpoint_every_steps=0", "checkpoint_every_steps"), ("keep_checkpoints=0", "keep_checkpoints"),
    ("data.prefetch=-1", "data.prefetch"), ("data.shuffle_buffer=0", "data.shuffle_buffer"),
    ("data.mean=(0.5,0.5)", "data.mean"), ("data.std=(1,0,1)", "data.std"),
    ("dtype=float16", "dtype"), ("init_from=/nonexistent/converted", "init_from"),
    ("skip_nonfinite_steps=perhaps", "skip_nonfinite_steps"),
    ("foo=1", "foo"), ("bias_loss.gamma=1", "bias_loss.gamma"), ("data.size=3", "data.size"),
    ("bias_loss.beta=-1e308", "bias_loss.beta"), ("bias_loss.alpha=1e308", "bias_loss.alpha"),
    ("bias_loss.alpha=89", "bias_loss.alpha"),
    ("weight_decay_mask=biases", "weight_decay_mask"), ("data.drop_remainder=maybe", "data.drop_remainder"),
    ("data.preprocessing=fancy", "data.preprocessing"), ("data.bad_images=sometimes", "data.bad_images"),
    ("data.randaugment_num_layers=-1", "data.randaugment_num_layers"),
    ("data.randaugment_magnitude=11", "data.randaugment_magnitude"), ("data.manual_dir=", "data.manual_dir"),
]  # fmt: skip


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "results.json").write_text('{"eval_top1": 0.5}')
    return tmp_path


def _snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns, p.stat().st_size) for p in directory.rglob("*"))


def test_at_least_fifty_cases():
    assert len(INVALID) >= 50


@pytest.mark.parametrize("override, key", INVALID, ids=[case[0] for case in INVALID])
def test_invalid_override(override, key, workdir, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a: pytest.fail(f"--config.{override} was accepted"))
    before = _snapshot(workdir)
    argv = ["main", "--config=configs/digits.py", f"--workdir={workdir}", f"--config.{override}"]
    # config_flags reads the --config.KEY overrides from sys.argv and defines one flag per KEY
    # when it parses --config; a previous case's override flags are removed first.
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)
    with pytest.raises(SystemExit) as exit_info:
        main_cli.main(cli.parse_absl_flags(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert key in lines[0], lines[0]
    assert "Unknown command line flag" not in lines[0], "the override was never applied"
    assert _snapshot(workdir) == before
    assert os.path.exists(workdir / "results.json")
