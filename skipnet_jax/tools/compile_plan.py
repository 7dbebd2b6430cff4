"""What `skipnet_jax.plan` measures: a config's steps compiled by the real TPU compiler for a
slice this machine does not have, and what the compiled program says of memory, work,
traffic and communication.

libtpu describes any slice (`jax.experimental.topologies.get_topology_desc`) as devices
that can be compiled for but not run on; the steps are lowered through the same
`skipnet_jax.engine` that training uses, from shapes alone (`Engine.lower_train_step`),
so what is planned is exactly what would train.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any

import numpy as np
from jax.sharding import Mesh

from skipnet_jax import chips, sharding

# Collective operations of XLA's HLO, as its text names them (an async pair counts once,
# by its "-start" half).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# The memory_analysis() fields whose sum is what a step holds on a device while it runs.
MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_DTYPE_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE_LINE = re.compile(
    r"^\s*%?[\w.\-]+ = (?P<type>\(.*?\)|\S+) (?P<kind>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)
_ARRAY_TYPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice described by libtpu: its compile-only devices and their chip."""

    topology: str
    chip: chips.Chip
    devices: tuple[Any, ...]

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def chips(self) -> int:
        return len({(d.process_index, tuple(d.coords)) for d in self.devices})

    @property
    def devices_per_chip(self) -> int:
        """2 where libtpu exposes each TensorCore of a chip as a device (v4 without megacore)."""
        return len(self.devices) // self.chips

    def mesh(self) -> Mesh:
        """The one-axis data-parallel mesh `sharding.create_mesh` builds on a real slice."""
        return Mesh(np.asarray(self.devices), (sharding.DATA_AXIS,))


def tpu_slice(topology: str) -> Slice:
    """The compile-only devices of `topology` (e.g. "v5e:2x2", "v4:2x2x2"); ValueError (one
    line) for an unknown generation or a shape libtpu does not accept."""
    chip = chips.tpu_chip(topology)
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except (RuntimeError, ValueError) as e:  # libtpu's own message for a shape it does not build
        raise ValueError(f"--topology={topology!r}: libtpu cannot describe it: {_one_line(e)}") from None
    return Slice(topology, chip, tuple(description.devices))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def collectives(hlo_text: str) -> list[dict]:
    """Each collective of a compiled module's HLO text: its kind, the bytes of its result
    and the JAX operation it came from (the ``op_name`` metadata, "" when the compiler
    dropped it)."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.match(line)
        if match is None:
            continue
        op_name = _OP_NAME.search(line)
        found.append(
            {
                "kind": match["kind"],
                "bytes": _type_bytes(match["type"]),
                "shape": match["type"].split("{")[0] if not match["type"].startswith("(") else match["type"],
                "op_name": op_name[1] if op_name else "",
            }
        )
    return found


def _type_bytes(hlo_type: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_TYPE.findall(hlo_type):
        count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += count * _DTYPE_BYTES.get(dtype, 4)
    return total


def collective_summary(found: list[dict]) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": total}}`` for the kinds present."""
    summary: dict[str, dict[str, int]] = {}
    for c in found:
        entry = summary.setdefault(c["kind"], {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c["bytes"]
    return summary


def collective_sources(found: list[dict]) -> list[dict]:
    """Collectives grouped by kind and source operation (the op_name without its layer
    path), most frequent first: the audit of what communicates and why."""
    groups: collections.Counter = collections.Counter()
    sizes: collections.Counter = collections.Counter()
    for c in found:
        key = (c["kind"], _op_kind(c["op_name"]))
        groups[key] += 1
        sizes[key] += c["bytes"]
    return [{"kind": k, "source": s, "count": n, "bytes": sizes[(k, s)]} for (k, s), n in groups.most_common()]


def _op_kind(op_name: str) -> str:
    """``jit(f)/jvp(SkipNet)/stage2/block0/bn/reduce_sum`` -> ``jvp/bn/reduce_sum``: the
    transformation, the layer type and the primitive, without the block's position."""
    if not op_name:
        return "(no metadata)"
    parts = op_name.split("/")
    transform = next((p.split("(")[0] for p in parts[1:] if p.startswith(("jvp(", "transpose("))), "")
    tail = "/".join(parts[-2:])
    return f"{transform}/{tail}" if transform else tail


def analyse(compiled, tpu: Slice, per_chip_batch: int) -> dict:
    """Memory, FLOPs, bytes, collectives and the roofline of one compiled step, per chip."""
    memory = compiled.memory_analysis()
    mem = {name: int(getattr(memory, name)) for name in MEMORY_FIELDS}
    needed = (
        mem["argument_size_in_bytes"]
        + mem["output_size_in_bytes"]
        - mem["alias_size_in_bytes"]
        + mem["temp_size_in_bytes"]
        + mem["generated_code_size_in_bytes"]
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    per_chip = tpu.devices_per_chip
    flops = float(cost.get("flops", 0.0)) * per_chip
    traffic = float(cost.get("bytes accessed", 0.0)) * per_chip
    hbm_per_device = tpu.chip.hbm_bytes / per_chip
    compute_s, memory_s = flops / tpu.chip.bf16_flops, traffic / tpu.chip.hbm_bytes_per_sec
    step_s = max(compute_s, memory_s)
    hlo_text = compiled.as_text()
    found = collectives(hlo_text)
    return {
        "memory_per_device": mem | {"needed_bytes": needed, "hbm_bytes": hbm_per_device},
        "fits": needed <= hbm_per_device,
        "hbm_margin_bytes": hbm_per_device - needed,
        "flops_per_chip": flops,
        "bytes_accessed_per_chip": traffic,
        "collectives": collective_summary(found),
        "collective_sources": collective_sources(found),
        "traffic": traffic(hlo_text),
        "roofline": {
            "compute_s": compute_s,
            "memory_s": memory_s,
            "step_s": step_s,
            "bound": "memory" if memory_s >= compute_s else "compute",
            "examples_per_sec": per_chip_batch / step_s if step_s > 0 else None,
        },
    }


# Instructions that move no bytes of their own (names, views, control flow's carriers).
_NO_TRAFFIC = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
               "replica-id", "while", "conditional", "call", "opt-barrier")  # fmt: skip
_COMPUTATION = re.compile(r"^(?P<entry>ENTRY )?%?(?P<name>[\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = ")
_FUSION_CALLS = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")


def _balanced(text: str, start: int) -> int:
    """The index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def traffic_category(opcode: str, op_name: str, line: str = "") -> str:
    """The source of one instruction's traffic, from its opcode and ``op_name`` metadata."""
    name = op_name.lower()
    if opcode in ("copy", "copy-start", "convert", "transpose"):
        return "converts/copies"
    if any(opcode.startswith(c) for c in COLLECTIVES):
        return "collectives"
    if "conv_general_dilated" in name or opcode == "convolution":
        depthwise = re.search(r"feature_group_count=(\d+)", line)
        kind = "depthwise" if depthwise and int(depthwise[1]) > 1 else "convolution"
        return f"{kind} bwd" if "transpose(" in name else f"{kind} fwd"
    if "bias_loss" in name or "loss" in name.split("/")[-2:-1]:
        return "bias loss"
    if any(k in name for k in ("optax", "optimizer", "update", "sgd", "momentum", "apply_gradients")):
        return "optimiser update"
    if "/bn" in name or "batchnorm" in name or "batch_norm" in name:
        if any(k in name for k in ("reduce", "mean", "var", "square")):
            return "BatchNorm statistics"
        return "BatchNorm normalise"
    if any(k in name for k in ("relu", "max", "gate", "sigmoid", "tanh")):
        return "activation/gates"
    if not name:
        return "(no metadata)"
    return "other"


def traffic(hlo_text: str, top: int = 10) -> dict:
    """Bytes moved per step, attributed: each top-level instruction of the entry and of
    the non-fusion computations it calls (while bodies, branches) counts its operands
    and its result; a fusion counts once, its internals not at all.  Returns the total,
    the bytes by category (largest first) and the ``top`` largest instructions."""
    lines = hlo_text.splitlines()
    fused = {m for line in lines if " fusion(" in line or "to_apply=" in line for m in _FUSION_CALLS.findall(line)}
    by_category: collections.Counter = collections.Counter()
    instructions = []
    current = None
    for line in lines:
        header = _COMPUTATION.match(line)
        if header and " = " not in line:
            current = header["name"]
            continue
        match = _INSTRUCTION.match(line)
        if match is None or current is None or current in fused:
            continue
        rest = line[match.end() :]
        type_end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
        result_type = rest[:type_end]
        call = re.match(r"\s*([a-z][\w\-]*)\(", rest[type_end:])
        if call is None:
            continue
        opcode = call[1]
        if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
            continue
        args_start = type_end + call.end() - 1
        operands = rest[args_start : _balanced(rest, args_start)]
        moved = _type_bytes(result_type) + _type_bytes(operands)
        op_name = _OP_NAME.search(line)
        op_name = op_name[1] if op_name else ""
        category = traffic_category(opcode, op_name, line)
        by_category[category] += moved
        instructions.append({"name": match["name"], "opcode": opcode, "bytes": moved, "category": category,
                             "op_name": op_name})  # fmt: skip
    instructions.sort(key=lambda i: -i["bytes"])
    return {
        "bytes": sum(by_category.values()),
        "categories": [{"category": c, "bytes": b} for c, b in by_category.most_common()],
        "top": instructions[:top],
    }


def compile_step(lowered) -> tuple[Any, float]:
    """(the compiled step, seconds the TPU compiler took)."""
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a compile failed because the program does not fit the chip's memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()
