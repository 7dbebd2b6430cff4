"""Shared fixtures: a TFDS data_dir with the bundled digits prepared once per test session, and
the small test network (tests/step_test_net.py) registered as a model for one test."""

import os
import shutil
import sys
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


# pytest-xdist's default scheduler ("load", what `-n 2` gives) may hand a module's tests to both
# workers, and then a module-scoped fixture (a trained run, test_distributed's six processes, a
# PyTorch model) is built once in each (measured: test_robustness's uninterrupted run twice).
# Under `-n` without an explicit --dist the suite schedules with "loadgroup" instead, with every
# test that uses a module-scoped fixture of its own module in that module's group (one worker);
# the other tests are balanced one by one as before.  Without xdist nothing changes.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    explicit = any(str(arg).startswith(("--dist", "--load")) for arg in config.invocation_params.args)
    if getattr(config.option, "dist", "no") == "load" and not explicit:
        config.option.dist = "loadgroup"  # the controller; its workers learn it from workerinput
    if getattr(config, "workerinput", {}).get("skipnet_loadgroup"):
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["skipnet_loadgroup"] = node.config.getvalue("dist") == "loadgroup"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        module = item.nodeid.split("::")[0]
        fixturedefs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if not any(d.scope == "module" and d.baseid == module for defs in fixturedefs.values() for d in defs):
            continue
        # What xdist does for an `xdist_group` mark ("@group" after the node id); xdist 3.8 sets
        # `item._nodeid`, which pytest 9 no longer reads, so the id is set here.
        grouped = f"{item.nodeid}@{module}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(grouped)
        else:
            item._nodeid = grouped


# The suite is bound by XLA compilation on a small CPU and checks values, never speed: XLA:CPU
# flags that trade run time for compile time (`fast_cpu_compile`) in this process and in every
# subprocess it starts (tests that set XLA_FLAGS for a subprocess extend `XLA_FLAGS_FOR_TESTS`).
# Each program's machine code is also generated in one piece rather than split over threads:
# the suite keeps every core busy with other processes, so those threads only add their own
# cost (SkipNet-XS's train step, 2-core CPU: 7.4 CPU-s of compile against 8.2, median of 3).
fast_cpu_compile("--xla_cpu_parallel_codegen_split_count=1")
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


@pytest.fixture
def registered_step_test_net(monkeypatch):
    """`step_test_net.StepTestNet` in the model registry for one test, as the model that
    ``config.model = step_test_net.STEP_TEST_NET`` selects (dropout and dtype applied by
    `create_model` as for any registered model); removed afterwards."""
    from step_test_net import STEP_TEST_NET, StepTestNet

    from skipnet_jax.models import registry

    monkeypatch.setitem(registry._REGISTRY, STEP_TEST_NET, StepTestNet)
    return STEP_TEST_NET


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


# The short `python -m skipnet_jax.main` digits run that tests/test_robustness.py and
# tests/test_checkpointing.py signal, kill and restart: one config for both, so its train step
# is compiled once per suite run (JAX's persistent cache); each test adds its own checkpoint
# and logging cadence, which the compiled steps do not depend on.
CLI_RUN_FIELDS = {
    "model": "skipnet_xs", "image_size": 32, "batch_size": 32, "eval_batch_size": 100,
    "num_train_steps": 12, "learning_rate": 0.001,
}  # fmt: skip


def cli_run_command(workdir, data_dir, *extra: str, **overrides) -> list[str]:
    """`python -m skipnet_jax.main` on configs/digits.py with `CLI_RUN_FIELDS` and `overrides` as
    "--config.KEY=VALUE" flags, then the `extra` flags."""
    fields = {**CLI_RUN_FIELDS, "data_dir": data_dir, **overrides}
    return [
        sys.executable, "-m", "skipnet_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in fields.items()), *extra,
    ]  # fmt: skip


def cli_run_config(data_dir, **overrides):
    """The config `cli_run_command` gives the CLI, with `overrides` (its "--config.KEY=VALUE" extras)."""
    from skipnet_jax.tools.check_digits import load_config

    config = load_config(os.path.join(REPO_ROOT, "configs", "digits.py"))
    config.update(CLI_RUN_FIELDS, data_dir=str(data_dir))
    config.update(overrides)
    return config
