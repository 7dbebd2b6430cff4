"""Shared fixtures: a TFDS data_dir with the bundled digits prepared once per test session."""

import os
import shutil
import tempfile

import pytest

from skipnet_jax.accelerator_check import fast_cpu_compile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Many tests compile the same train/eval steps (in-process, in both pytest-xdist workers and in
# CLI subprocesses, which all inherit the environment); JAX's persistent compilation cache lets
# them compile once.  One fresh temporary directory per suite run: the process that runs the
# session (xdist's controller, or pytest without -n) creates it before the workers start and
# removes it at the end, so nothing leaks from one run into the next (workers and a pytest run
# by a test inherit `_SKIPNET_JAX_TEST_RUN_CACHE` and use that run's directory).  Compiles of
# 0.5 s and more are kept (JAX's default is 1 s; with the fast-compile flags below many take less).
_OWN_CACHE_DIR = None
if "_SKIPNET_JAX_TEST_RUN_CACHE" not in os.environ:
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="skipnet_jax_test_compilation_cache_")
    os.environ["_SKIPNET_JAX_TEST_RUN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


# The suite is bound by XLA compilation on a small CPU and checks values, never speed: skip the
# LLVM back end's expensive optimisations (about 2x faster compiles) in this process and in every
# subprocess it starts (tests that set XLA_FLAGS for a subprocess extend `XLA_FLAGS_FOR_TESTS`).
fast_cpu_compile()
XLA_FLAGS_FOR_TESTS = os.environ["XLA_FLAGS"]


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test subprocess: the suite's, with `devices` CPU devices."""
    return f"{XLA_FLAGS_FOR_TESTS} --xla_force_host_platform_device_count={devices}"


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    from skipnet_jax.data import preparation
    from skipnet_jax.default_config import get_default_config

    path = str(tmp_path_factory.mktemp("tfds_digits"))
    config = get_default_config()
    config.data_dir = path
    preparation.prepare_dataset(config)  # builds the TFDS dataset (no download)
    return path


def tiny_digits_config(data_dir: str, **overrides):
    """A few-step digits config small enough for unit tests (skipnet_xs at 32 px)."""
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.model = "skipnet_xs"
    config.data_dir = data_dir
    config.image_size = 32
    config.batch_size = 32
    config.eval_batch_size = 100  # 360 test examples: the last batch is padded and masked
    config.num_train_steps = 6
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.update(overrides)
    return config
