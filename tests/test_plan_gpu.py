"""GPUs in the plan: names, the target description written from `skipnet_jax.chips`, the
one-line error without JAX's CUDA plugin, and (with the plugin) a compile for 8 H100s on
the plugin's compile-only devices.  Nothing runs on a GPU."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from skipnet_jax import chips
from skipnet_jax.tools import compile_plan

HAS_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None


@pytest.mark.parametrize(("name", "shape"), [("h100:8", (1, 8)), ("H100:2x8", (2, 8)), ("a100:1", (1, 1))])
def test_gpu_names_give_hosts_and_gpus_per_host(name, shape):
    assert chips.is_gpu_name(name)
    assert compile_plan.gpu_shape(name) == shape


@pytest.mark.parametrize("name", ["h100:", "h100:0", "h100:2x", "h100:2x2x2", "h100:eight"])
def test_a_bad_gpu_shape_is_one_line_naming_it(name):
    with pytest.raises(ValueError, match="GPUS or HOSTSxGPUS") as error:
        compile_plan.gpu_shape(name)
    assert "\n" not in str(error.value) and repr(name) in str(error.value)


def test_an_unknown_gpu_is_one_line_naming_the_valid_ones():
    assert not chips.is_gpu_name("v5e:2x2")
    with pytest.raises(ValueError, match=r"unknown GPU 'v100'; valid choices: h100:\.\.\., a100:\.\.\.$"):
        chips.gpu("v100:8")


def test_target_config_carries_the_chip_facts():
    text = chips.gpu_target_config(chips.gpu("h100:8"))
    for field in ("major: 9 minor: 0", "core_count: 132", "fpus_per_core: 128", "device_memory_size: 80000000000",
                  "memory_bandwidth: 3350000000000", 'device_description_str: "NVIDIA H100 80GB HBM3"'):  # fmt: skip
        assert field in text
    assert "core_count: 108" in chips.gpu_target_config(chips.gpu("a100:8"))
    assert text.count("{") == text.count("}")


@pytest.mark.skipif(HAS_PLUGIN, reason="checks the error of a machine without jax_cuda12_plugin; it is installed")
def test_plan_without_the_cuda_plugin_fails_in_one_line_naming_the_install():
    command = [sys.executable, "-m", "skipnet_jax.plan", "--config", "configs/digits.py", "--topology", "h100:8"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --topology='h100:8' needs JAX's CUDA plugin") and "pip install" in last


@pytest.mark.skipif(not HAS_PLUGIN, reason="needs JAX's CUDA plugin (pip install jax-cuda12-plugin==<jax version>)")
def test_plan_compiles_skipnet_xs_for_eight_h100s(tmp_path):
    out = tmp_path / "plan.json"
    command = [
        sys.executable, "-m", "skipnet_jax.plan", "--config", "configs/digits.py", "--topology", "h100:8",
        "--global_batch", "2048", "--num_classes", "10", "--json", str(out), "--config.model=skipnet_xs",
        "--config.image_size=32", "--config.eval_batch_size=64",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(out.read_text())["plans"][0]
    assert (plan["chips"], plan["hosts"], plan["kernels"]) == (8, 1, "gpu")
    train = plan["train"]
    assert train["fits"] and train["per_chip_batch"] == 256
    assert train["flops_per_chip"] > 0 and train["bytes_accessed_per_chip"] > 0
    assert train["cost_source"] != "compiler cost_analysis"  # XLA:GPU's compile-only client has none
    assert set(train["collectives"]) == {"all-reduce"}
