"""The plan command and the TPU program it compiles, on libtpu's compile-only devices.

The real TPU compiler runs here on the CPU (the ``tpu`` extra brings libtpu); nothing is
executed on a TPU.
"""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from jax.sharding import Mesh

from skipnet_jax import engine, sharding
from skipnet_jax.default_config import get_default_config
from skipnet_jax.tools import compile_plan
from skipnet_jax.tools.check_digits import load_config

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu beside the suite's other processes
pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")

# With the per-example metrics requested replicated, the step compiled for this slice held
# all-gathers from 128 examples per chip on (1 at 128, 4 at 256, none at 64); the compile
# takes 45 CPU-s at 128 against 80 at 256 on a 2-core host.
PER_CHIP_BATCH = 128


def _xs_engine(mesh):
    config = get_default_config()
    config.model, config.image_size, config.dtype = "skipnet_xs", 32, "bfloat16"
    return engine.build_engine(config, 10, steps_per_epoch=10, num_train_steps=100, mesh=mesh, reuse=False)


def _grouped_convolutions(lowered) -> int:
    """Depthwise convolutions left as convolutions (``lax``) in a lowered step's StableHLO."""
    text = lowered.as_text()
    return sum(
        1 for line in text.splitlines() if "stablehlo.convolution" in line and "feature_group_count = 1 " not in line
    )


def test_auto_kernels_follow_the_platform_of_the_mesh_not_of_the_host():
    """On this CPU host, a step built for a TPU slice uses lax's depthwise convolutions (the
    TPU's), and one built for the host's CPU devices the shifted multiply-adds."""
    tpu_mesh = compile_plan.tpu_slice("v5e:2x2").mesh()
    cpu_mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
    tpu_lowered = _xs_engine(tpu_mesh).lower_train_step(64, halt_on_nonfinite=True)
    cpu_lowered = _xs_engine(cpu_mesh).lower_train_step(64, halt_on_nonfinite=True)
    assert jax.default_backend() == "cpu"
    assert _grouped_convolutions(tpu_lowered) > 0
    assert _grouped_convolutions(cpu_lowered) == 0


def test_plan_command_compiles_a_v5e_slice_and_its_step_communicates_only_reductions(tmp_path):
    out = tmp_path / "plan.json"
    command = [
        sys.executable, "-m", "skipnet_jax.plan", "--config", "configs/digits.py", "--topology", "v5e:2x2",
        "--global_batch", str(4 * PER_CHIP_BATCH), "--num_classes", "10", "--json", str(out),
        "--config.model=skipnet_xs", "--config.image_size=32", "--config.eval_batch_size=64",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "v5e:2x2" in result.stdout and "train" in result.stdout
    (plan,) = json.loads(out.read_text())["plans"]
    chex.assert_equal((plan["chips"], plan["devices"], plan["hosts"], plan["kernels"]), (4, 4, 1, "tpu"))
    train = plan["train"]
    chex.assert_equal(
        (train["global_batch"], train["per_chip_batch"], train["fits"]), (4 * PER_CHIP_BATCH, PER_CHIP_BATCH, True)
    )
    memory = train["memory_per_device"]
    assert memory["temp_size_in_bytes"] > 0
    # The arguments against an independent count: the donated train state (every device holds
    # all of it; the alias) is at least its arrays' logical bytes, and TPU layouts pad each of
    # its ~700 small arrays to tiles by at most a quarter in all (measured: 15.9 MB -> 17.7 MB);
    # the rest is this chip's share of the batch (PER_CHIP_BATCH float32 32x32x3 images and int32 labels)
    # and the seed, padded to at most one 4 KiB tile.
    config = load_config(os.path.join(REPO_ROOT, "configs", "digits.py"))
    config.update(model="skipnet_xs", image_size=32, batch_size=4 * PER_CHIP_BATCH, eval_batch_size=64)
    cli_engine = engine.build_engine(
        config,
        10,
        steps_per_epoch=1000,
        num_train_steps=100_000,
        mesh=compile_plan.tpu_slice("v5e:2x2").mesh(),
        reuse=False,
    )
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cli_engine.abstract_state()))
    assert state_bytes <= memory["alias_size_in_bytes"] <= 1.25 * state_bytes, (memory, state_bytes)
    batch_bytes = PER_CHIP_BATCH * (32 * 32 * 3 * 4 + 4)
    rest = memory["argument_size_in_bytes"] - memory["alias_size_in_bytes"] - batch_bytes
    assert 4 <= rest <= 4096, (memory, batch_bytes)
    assert train["flops_per_chip"] > 0 and train["bytes_accessed_per_chip"] > 0
    assert train["roofline"]["examples_per_sec"] == pytest.approx(PER_CHIP_BATCH / train["roofline"]["step_s"])
    assert train["traffic"]["bytes"] > 0 and train["traffic"]["categories"] and train["traffic"]["top"]

    # Data parallelism with replicated weights needs reductions only: the gradients, every
    # BatchNorm's statistics over the global batch (forward mean and variance, backward
    # sums) and the loss's min/max and metrics.  No all-gather: a per-example array
    # requested replicated made one at this batch (`PER_CHIP_BATCH`).
    collectives = train["collectives"]
    assert set(collectives) <= {"all-reduce"}, collectives
    batch_norms = len(jax.tree.leaves(cli_engine.abstract_state().batch_stats)) // 2  # mean and var of each layer
    assert collectives["all-reduce"]["count"] <= 3 * batch_norms + 10, (collectives, batch_norms)


def test_plan_refuses_an_unknown_generation_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "skipnet_jax.plan", "--config", "configs/digits.py", "--topology", "v9z:2x2"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --topology='v9z:2x2'") and "v5e" in last, result.stderr[-2000:]


_HLO = """HloModule jit_step, entry_computation_layout={(bf16[8,4]{1,0})->f32[8,4]{1,0}}

%fused_computation (param_0: bf16[8,4]) -> f32[8,4] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  ROOT %convert.1 = f32[8,4]{1,0} convert(bf16[8,4]{1,0} %param_0)
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(f32[] %x, f32[] %y)
}

ENTRY %main (p0: bf16[8,4]) -> f32[8,4] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %fusion = f32[8,4]{1,0} fusion(bf16[8,4]{1,0} %p0), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(f)/jvp(SkipNet)/stage1/block0/bn/mul"}
  %all-reduce = f32[8,4]{1,0} all-reduce(f32[8,4]{1,0} %fusion), to_apply=%add, metadata={op_name="jit(f)/psum"}
  %convolution = f32[8,4]{1,0} convolution(f32[8,4]{1,0} %all-reduce, f32[8,4]{1,0} %all-reduce), dim_labels=bf_io->bf, feature_group_count=4, metadata={op_name="jit(f)/transpose(jvp(SkipNet))/conv/conv_general_dilated"}
  ROOT %copy = f32[8,4]{1,0} copy(f32[8,4]{1,0} %convolution)
}
"""


def test_traffic_counts_top_level_instructions_once_by_category():
    found = compile_plan.traffic(_HLO, top=2)
    # fusion 64 + 128, all-reduce 128 + 128, depthwise 3 * 128, copy 128 + 128: the fused
    # computation's convert and the reducer's add are not counted again.
    assert found["bytes"] == 192 + 256 + 384 + 256
    assert {c["category"]: c["bytes"] for c in found["categories"]} == {
        "BatchNorm normalise": 192, "collectives": 256, "depthwise bwd": 384, "converts/copies": 256,
    }  # fmt: skip
    assert [i["name"] for i in found["top"]] == ["convolution", "all-reduce"]


# Compiled TPU HLO: operands named without types, an asynchronous copy between memories, a
# fusion without metadata named by its fused convolution, a ConcatBitcast that moves nothing.
_TPU_HLO = """HloModule jit_step

%fused_conv (param_0: bf16[8,4], param_1: bf16[1,4]) -> bf16[8,4] {
  %param_0 = bf16[8,4]{1,0} parameter(0)
  %param_1 = bf16[1,4]{1,0} parameter(1)
  ROOT %convolution.3 = bf16[8,4]{1,0} convolution(%param_0, %param_1), feature_group_count=4, metadata={op_name="jit(f)/jvp(SkipNet)/dw/conv/conv_general_dilated"}
}

ENTRY %main (p0: bf16[8,4], p1: bf16[1,4]) -> bf16[8,4] {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %p1 = bf16[1,4]{1,0} parameter(1)
  %copy-start = (bf16[8,4]{1,0:S(1)}, bf16[8,4]{1,0}, u32[]{:S(2)}) copy-start(%p0)
  %copy-done = bf16[8,4]{1,0:S(1)} copy-done(%copy-start)
  %fusion.1 = bf16[8,4]{1,0} fusion(%copy-done, %p1), kind=kOutput, calls=%fused_conv
  %custom-call.1 = bf16[8,4]{1,0} custom-call(%fusion.1), custom_call_target="ConcatBitcast"
  ROOT %copy = bf16[8,4]{1,0} copy(%custom-call.1)
}
"""


def test_traffic_of_compiled_tpu_hlo_looks_operands_up_by_name():
    found = compile_plan.traffic(_TPU_HLO)
    # copy-done 2 * 64, the fusion 64 + 64 + 8 (depthwise, by its convolution), copy 64 + 64.
    assert {c["category"]: c["bytes"] for c in found["categories"]} == {
        "async copies/slices": 128, "depthwise fwd": 136, "converts/copies": 128,
    }  # fmt: skip
    assert found["bytes"] == 392
