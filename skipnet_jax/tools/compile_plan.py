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
from collections.abc import Callable
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
    """A TPU slice described by libtpu, or GPUs described by JAX's CUDA plugin: their
    compile-only devices and their chip (a `chips.Gpu` for GPUs)."""

    topology: str
    chip: chips.Chip
    devices: tuple[Any, ...]

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})

    @property
    def chips(self) -> int:
        if self.devices[0].platform == "gpu":
            return len(self.devices)  # one device per GPU; the plugin gives them no coordinates
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


# The plugin's only requirement is jax-cuda12-pjrt (the NVIDIA library wheels come with its
# "with-cuda" extra, which compile-only devices do not need); it must match jax's version.
GPU_PLUGIN_INSTALL = "pip install jax-cuda12-plugin==<your jax version, e.g. 0.10.2>"
_GPU_SHAPE = re.compile(r"^(?:(?P<hosts>\d+)x)?(?P<per_host>\d+)$")


def gpu_shape(topology: str) -> tuple[int, int]:
    """(hosts, GPUs per host) of a GPU name: ``"h100:8"`` is one host of 8 GPUs,
    ``"h100:2x8"`` two hosts of 8; ValueError (one line) for another shape."""
    _, _, shape = topology.partition(":")
    match = _GPU_SHAPE.match(shape.strip())
    if match is None or int(match["per_host"]) < 1 or int(match["hosts"] or 1) < 1:
        raise ValueError(
            f"--topology={topology!r}: GPU shape {shape!r} is not GPUS or HOSTSxGPUS (e.g. h100:8, h100:2x8)"
        )
    return int(match["hosts"] or 1), int(match["per_host"])


def gpu_slice(topology: str) -> Slice:
    """The compile-only GPUs of `topology` (e.g. "h100:8", "a100:2x8") from JAX's CUDA
    plugin; ValueError (one line) for an unknown GPU or shape, or without the plugin."""
    chip = chips.gpu(topology)
    hosts, per_host = gpu_shape(topology)
    try:
        import jax_cuda12_plugin  # noqa: F401  (only its presence is checked here)
    except ImportError:
        raise ValueError(
            f"--topology={topology!r} needs JAX's CUDA plugin, which is not installed: {GPU_PLUGIN_INSTALL}"
        ) from None
    from jax.experimental import topologies

    try:
        description = topologies.get_topology_desc(
            platform="cuda", target_config=chips.gpu_target_config(chip), topology=f"1x{hosts}x{per_host}"
        )
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--topology={topology!r}: the CUDA plugin cannot describe it: {_one_line(e)}") from None
    return Slice(topology, chip, tuple(description.devices))


def slice_of(topology: str) -> Slice:
    """A GPU slice for a GPU name (`chips.GPUS`), else a TPU slice."""
    return gpu_slice(topology) if chips.is_gpu_name(topology) else tpu_slice(topology)


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


def memory_per_device(compiled) -> dict[str, int]:
    """`memory_analysis()`'s fields of a compiled step, and ``needed_bytes``: what a device
    holds while the step runs (arguments, outputs not aliased to them, temporaries, code)."""
    memory = compiled.memory_analysis()
    mem = {name: int(getattr(memory, name)) for name in MEMORY_FIELDS}
    mem["needed_bytes"] = (
        mem["argument_size_in_bytes"]
        + mem["output_size_in_bytes"]
        - mem["alias_size_in_bytes"]
        + mem["temp_size_in_bytes"]
        + mem["generated_code_size_in_bytes"]
    )
    return mem


def analyse(compiled, tpu: Slice, per_chip_batch: int, lowered=None) -> dict:
    """Memory, FLOPs, bytes, collectives and the roofline of one compiled step, per chip
    (`lowered`, the step before compiling, gives GPUs their FLOPs: `step_cost`)."""
    mem = memory_per_device(compiled)
    needed = mem["needed_bytes"]
    hlo_text = compiled.as_text()
    cost, cost_source = step_cost(compiled, hlo_text, lowered, len(tpu.devices))
    per_chip = tpu.devices_per_chip
    flops = float(cost.get("flops", 0.0)) * per_chip
    moved = float(cost.get("bytes accessed", 0.0)) * per_chip
    hbm_per_device = tpu.chip.hbm_bytes / per_chip
    compute_s, memory_s = flops / tpu.chip.bf16_flops, moved / tpu.chip.hbm_bytes_per_sec
    step_s = max(compute_s, memory_s)
    found = collectives(hlo_text)
    return {
        "memory_per_device": mem | {"hbm_bytes": hbm_per_device},
        "fits": needed <= hbm_per_device,
        "hbm_margin_bytes": hbm_per_device - needed,
        "flops_per_chip": flops,
        "bytes_accessed_per_chip": moved,
        "cost_source": cost_source,
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


def step_cost(compiled, hlo_text: str, lowered=None, devices: int = 1) -> tuple[dict, str]:
    """({"flops", "bytes accessed"} per device, where they came from).

    The compiler's own cost analysis where it has one (TPU).  XLA:GPU's compile-only client
    has none, so for GPUs XLA's HLO cost analysis runs through the host's CPU client: the
    bytes on the compiled module, the FLOPs on the `lowered` (not yet optimised) one divided
    by its ``devices``, since the compiled module's convolutions are cuDNN custom calls
    whose FLOPs the analysis does not count (the lowered module still has them as
    convolutions; dividing by the devices counts the replicated optimiser update once per
    step instead of once per device, a small undercount).  Failing that, the bytes are
    `traffic`'s and the FLOPs unknown (0).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost:
        return dict(cost), "compiler cost_analysis"
    try:
        import jax
        from jax._src.lib import xla_client

        client = jax.devices("cpu")[0].client
        module = compiled.runtime_executable().hlo_modules()[0]
        cost = dict(xla_client._xla.hlo_module_cost_analysis(client, module))
        if lowered is None:
            return cost, "XLA HLO cost analysis of the compiled module (convolutions' FLOPs missing)"
        program = lowered.compiler_ir("hlo").get_hlo_module()
        cost["flops"] = float(xla_client._xla.hlo_module_cost_analysis(client, program)["flops"]) / devices
        return cost, "XLA HLO cost analysis: FLOPs of the lowered program / devices, bytes of the compiled one"
    except (AttributeError, ImportError, IndexError, RuntimeError, TypeError):  # a private API that may change
        return {"flops": 0.0, "bytes accessed": float(traffic(hlo_text)["bytes"])}, "HLO text traffic; FLOPs unknown"


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
    if opcode in ("copy-done", "slice-done"):
        return "async copies/slices"
    if opcode in ("copy", "convert", "transpose"):
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


def _computations(lines: list[str]) -> dict[str, list[str]]:
    """The instruction lines of each computation, by computation name."""
    found: dict[str, list[str]] = {}
    current = None
    for line in lines:
        header = _COMPUTATION.match(line)
        if header and " = " not in line:
            current = found.setdefault(header["name"], [])
        elif current is not None and _INSTRUCTION.match(line):
            current.append(line)
    return found


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, result type, opcode, operand list) of one instruction line, or None."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    rest = line[match.end() :]
    type_end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    call = re.match(r"\s*([a-z][\w\-]*)\(", rest[type_end:]) if type_end > 0 else None
    if call is None:
        return None
    args_start = type_end + call.end() - 1
    return match["name"], rest[:type_end], call[1], rest[args_start : _balanced(rest, args_start)]


def traffic(hlo_text: str, top: int = 10) -> dict:
    """Bytes moved per step, attributed: each top-level instruction of the entry and of
    the non-fusion computations it calls (while bodies, branches) counts its operands
    and its result; a fusion counts once, its internals not at all.  Compiled TPU HLO
    names operands without their types, so operand sizes are looked up by name.  A
    fusion is attributed by the ``op_name`` of its fused computation's convolution if it
    has one (a depthwise one when its ``feature_group_count`` > 1), else of its root,
    else its own.  Returns the total, the bytes by category (largest first) and the
    ``top`` largest instructions."""
    computations = {
        name: [(line, _split_instruction(line)) for line in body]
        for name, body in _computations(hlo_text.splitlines()).items()
    }
    sizes, fused, inner_name, inner_groups = {}, set(), {}, {}
    for name, parsed in computations.items():
        body = [line for line, _ in parsed]
        for line, parts in parsed:
            if parts:
                sizes[parts[0]] = _type_bytes(parts[1])
            if " fusion(" in line or "to_apply=" in line:
                fused.update(_FUSION_CALLS.findall(line))
        # A convolution inside a fusion names it (the rest is fused into its input or output).
        ordered = sorted(body, key=lambda x: (" convolution(" not in x, "ROOT " not in x))
        named = [m[1] for m in map(_OP_NAME.search, ordered) if m]
        inner_name[name] = named[0] if named else ""
        groups = [int(g) for line in body for g in re.findall(r"feature_group_count=(\d+)", line)]
        inner_groups[name] = max(groups, default=1)
    by_category: collections.Counter = collections.Counter()
    instructions = []
    for computation, parsed in computations.items():
        if computation in fused:
            continue
        for line, parts in parsed:
            if parts is None:
                continue
            name, result_type, opcode, operands = parts
            if opcode in _NO_TRAFFIC or opcode in ("copy-start", "slice-start"):
                continue
            if 'custom_call_target="ConcatBitcast"' in line:
                continue  # reinterprets slices that are already adjacent in memory: nothing moves
            if opcode in ("copy-done", "slice-done"):
                # An asynchronous copy or slice (the compiler moving data between memories)
                # reads and writes the size of its result.
                moved = 2 * _type_bytes(result_type)
            elif opcode.endswith("-done"):
                continue  # a collective's -start counted its data
            else:
                operand_bytes = _type_bytes(operands) or sum(
                    sizes.get(operand, 0) for operand in re.findall(r"%([\w.\-]+)", operands)
                )
                moved = _type_bytes(result_type) + operand_bytes
            op_name = _OP_NAME.search(line)
            op_name = op_name[1] if op_name else ""
            called = _FUSION_CALLS.findall(line) if opcode == "fusion" else []
            detail = line
            if called:
                op_name = inner_name.get(called[0], "") or op_name
                detail = f"{line} feature_group_count={inner_groups.get(called[0], 1)}"
            category = traffic_category(opcode, op_name, detail)
            by_category[category] += moved
            instructions.append({"name": name, "opcode": opcode, "bytes": moved, "category": category,
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


def largest_fitting_batch(
    needed_bytes: Callable[[int], int | None],
    capacity: float,
    granularity: int,
    limit: int,
    known: dict[int, int | None] | None = None,
) -> int | None:
    """The largest batch (a multiple of ``granularity``, at most ``limit``) whose
    ``needed_bytes(batch)`` is at most ``capacity``; None if not even ``granularity`` fits.

    Each call of ``needed_bytes`` is a compile of minutes, so the search predicts rather than
    doubling and bisecting: what a step holds is close to affine in its batch (activations
    grow with it; weights and optimiser state do not), so the line through the two
    measurements nearest the boundary says where the capacity is crossed.  A prediction that
    does not halve the bracket is followed by a bisection step, so a curve far from affine
    still ends in logarithmically many steps.  Near the capacity the TPU compiler
    rematerialises to fit and the curve flattens, even dips (SkipNet-M on v5e: 15.71 GB at
    1632 per chip, 15.47 GB at 1728), so the answer is a batch that fits whose next multiple
    of ``granularity`` does not; monotonicity is assumed, as by bisection.  For SkipNet-M on
    v5e (from the planned 256 per chip) that took 10 compiles, 2 of them refused in seconds,
    where doubling from 8 and then bisecting takes 16.
    ``needed_bytes`` returns None for a batch the compiler itself refused as too large;
    ``known`` holds measurements already made (e.g. of the planned batch).
    """
    measured = {batch: value for batch, value in (known or {}).items() if batch % granularity == 0}
    low, high = 0, limit + granularity  # the largest batch known to fit, the smallest known not to

    def record(batch: int) -> None:
        nonlocal low, high
        value = measured[batch]
        if value is not None and value <= capacity:
            low = max(low, batch)
        else:
            high = min(high, batch)

    for batch in measured:
        record(batch)
    if not measured:
        measured[granularity] = needed_bytes(granularity)
        record(granularity)
    bisect_next = False
    while high - low > granularity:
        width = high - low
        candidate = None if bisect_next else _crossing(measured, capacity, low, high)
        if candidate is None:  # no line to follow yet: double up, or halve the bracket
            candidate = 2 * low if high > limit else (low + high) // 2
        candidate = candidate // granularity * granularity
        candidate = min(max(candidate, low + granularity), high - granularity)
        measured[candidate] = needed_bytes(candidate)
        record(candidate)
        bisect_next = not bisect_next and high <= limit and 2 * (high - low) > width
    return low or None


def _crossing(measured: dict[int, int | None], capacity: float, low: int, high: int) -> int | None:
    """Where the line through the two measured batches nearest the bracket [low, high]
    reaches ``capacity``; None without two measurements or a rising line."""
    points = sorted((b, v) for b, v in measured.items() if v is not None)
    below = [p for p in points if p[0] <= low][-2:]
    above = [p for p in points if p[0] >= high][:1]
    pair = (below[-1:] + above) if above and below else below
    if len(pair) < 2:
        return None
    (b1, v1), (b2, v2) = pair
    if v2 <= v1:
        return None
    return int(b1 + (capacity - v1) * (b2 - b1) / (v2 - v1))
