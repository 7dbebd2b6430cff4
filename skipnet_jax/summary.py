"""Per-layer summary, parameter count and MACs of any registered model.

Command line::

    python -m skipnet_jax.summary --model skipnet_m [--image_size 224] [--num_classes 1000]
    python -m skipnet_jax.summary --markdown [--image_size 224] [--num_classes 1000]

The first prints one row per layer that owns variables (convolutions, depthwise
convolutions, dense layers, BatchNorms) in call order: its path, output shape (batch 1),
parameter count and MACs, then the totals, beside the paper's figures where known
(:data:`PAPER_FIGURES`, quoted only at 224 px and 1000 classes).  ``--markdown`` prints
one markdown table row per registered model instead (for the README).

How MACs are counted
====================

MACs = multiply-accumulates of convolution and dense layers for ONE image:

* convolution (any groups, incl. depthwise): ``out_H * out_W * k_h * k_w * (in / groups) * out``;
* dense: ``in * out`` per output position (a dense layer on ``(N, in)`` counts ``in * out``;
  the squeeze-excitation's two dense layers are included).

BatchNorm, activations, pooling, the SE multiply, residual additions and biases are not
counted (the convention of the MobileNetV3 / SkipNet papers' "MAdds").

Implementation: the model is traced with ``jax.eval_shape`` (nothing is computed) under
``flax.linen.intercept_methods``; every module ``__call__`` that owns a ``kernel``
parameter directly is a linear layer, and its MACs are
``(output positions per image) * kernel.size`` -- for a conv kernel ``(kh, kw, in/groups,
out)`` and output ``(N, H, W, out)`` that is exactly the formula above; for a dense kernel
``(in, out)`` it is ``in * out`` per position.  This is generic over every registered
model (nothing SkipNet-specific is assumed beyond the paper-figure table).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from skipnet_jax import cli

__all__ = [
    "PAPER_FIGURES",
    "LayerRow",
    "ModelSummary",
    "count_macs",
    "count_params",
    "format_table",
    "main",
    "markdown_table",
    "summarize",
]

# Paper / reference figures at 224 px and 1000 classes (the paper's SkipNet table, the authors' release).
# SkipNet "params"/"macs": what the variant must measure (conv + linear MACs); "paper": the
# paper's own claim.  MobileNetV3 "params" are torchvision's counts and "macs" the MobileNetV3
# paper's MAdds, which conv + dense counting need not reproduce exactly (measured here:
# 216.6M for Large, 56.5M for Small).
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "skipnet_xs": dict(params=2_332_584, macs=78.5e6, paper="~80M FLOPs, 2.3M params, 69.9% top-1"),
    "skipnet_s": dict(params=3_587_416, macs=170.2e6, paper="~150M FLOPs, 3.6M params, 73.8% top-1"),
    "skipnet_m": dict(params=5_532_352, macs=236.6e6, paper="~246M FLOPs, 5.5M params, 76.2% top-1"),
    "skipnet_l": dict(params=7_127_384, macs=347.7e6, paper="~365M FLOPs, 7.1M params, 77.1% top-1"),
    "mobilenet_v3_large": dict(params=5_483_032, macs=219e6, paper="219M MACs, 5.4M params, 75.2% top-1"),
    "mobilenet_v3_small": dict(params=2_542_856, macs=66e6, paper="66M MACs, 2.5M params, 67.4% top-1"),
}
PAPER_IMAGE_SIZE = 224
PAPER_NUM_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer that owns variables: path, output shape (batch 1), #params, MACs."""

    path: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    model: str
    image_size: int
    num_classes: int
    rows: tuple[LayerRow, ...]
    params: int  # all trainable parameters (the 'params' collection)
    batch_stats: int  # BN running statistics (not parameters)
    macs: int  # conv + dense MACs for one image

    @property
    def paper(self) -> dict[str, Any] | None:
        """The paper's figures for this model, if known and at the paper's setting."""
        if self.image_size == PAPER_IMAGE_SIZE and self.num_classes == PAPER_NUM_CLASSES:
            return PAPER_FIGURES.get(self.model)
        return None


def _size(x: Any) -> int:
    return int(math.prod(x.shape))


def _count_tree(tree: Any) -> int:
    import jax

    return int(sum(_size(leaf) for leaf in jax.tree.leaves(tree)))


def summarize(model_name: str, image_size: int = 224, num_classes: int = 1000, **overrides: Any) -> ModelSummary:
    """Trace ``model_name`` (via ``jax.eval_shape``) and count params and MACs per layer.

    ``overrides`` go to ``create_model`` (e.g. ``width_multiplier``).  Raises
    ``ValueError`` for an unknown model or a bad size.
    """
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from skipnet_jax.models import create_model

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    model = create_model(model_name, num_classes=num_classes, **overrides)
    rows: list[LayerRow] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        own = module.variables
        params = own.get("params", {})
        leaves = {k: v for k, v in params.items() if not isinstance(v, dict)}
        has_own_vars = bool(leaves) or any(not isinstance(v, dict) for col in own.values() for v in col.values())
        if not has_own_vars or not hasattr(out, "shape"):
            return out
        path = "/".join(module.scope.path) or model_name
        if rows and rows[-1].path == path:  # a subclass calling its parent's __call__ (layers.BatchNorm)
            return out
        kernel = leaves.get("kernel")
        macs = 0
        if kernel is not None and out.ndim >= 2 and out.shape[0] > 0 and out.shape[-1] > 0:
            positions = _size(out) // (out.shape[0] * out.shape[-1])
            macs = positions * _size(kernel)
        rows.append(
            LayerRow(
                path=path,
                kind=type(module).__name__,
                output_shape=tuple(int(d) for d in out.shape[1:]),
                params=sum(_size(v) for v in leaves.values()),
                macs=int(macs),
            )
        )
        return out

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

    def init(key, images):
        with nn.intercept_methods(interceptor):
            return model.init(key, images, train=False)

    variables = jax.eval_shape(init, jax.random.key(0), x)
    return ModelSummary(
        model=model_name,
        image_size=image_size,
        num_classes=num_classes,
        rows=tuple(rows),
        params=_count_tree(variables.get("params", {})),
        batch_stats=_count_tree(variables.get("batch_stats", {})),
        macs=int(sum(r.macs for r in rows)),
    )


def count_macs(model_name: str, image_size: int = 224, num_classes: int = 1000) -> int:
    """Conv + dense multiply-accumulates of ``model_name`` for one image."""
    return summarize(model_name, image_size, num_classes).macs


def count_params(model_name: str, image_size: int = 224, num_classes: int = 1000) -> int:
    """Number of trainable parameters (BN running statistics excluded)."""
    return summarize(model_name, image_size, num_classes).params


def _m(macs: float) -> str:
    return f"{macs / 1e6:.1f}M"


def _pct(ours: float, ref: float) -> str:
    return f"{100.0 * (ours - ref) / ref:+.2f}%"


def format_table(s: ModelSummary) -> str:
    """The per-layer table and totals as text."""
    shapes = ["x".join(str(d) for d in r.output_shape) for r in s.rows]
    w_path = max([len("layer")] + [len(r.path) for r in s.rows])
    w_kind = max([len("type")] + [len(r.kind) for r in s.rows])
    w_shape = max([len("output")] + [len(x) for x in shapes])
    header = f"{'layer':<{w_path}}  {'type':<{w_kind}}  {'output':>{w_shape}}  {'params':>10}  {'MACs':>13}"
    lines = [
        f"{s.model} at {s.image_size}x{s.image_size}, {s.num_classes} classes (output shapes and MACs for one image)",
        header,
        "-" * len(header),
    ]
    for r, shape in zip(s.rows, shapes):
        lines.append(f"{r.path:<{w_path}}  {r.kind:<{w_kind}}  {shape:>{w_shape}}  {r.params:>10,}  {r.macs:>13,}")
    lines.append("-" * len(header))
    lines.append(f"parameters:  {s.params:,}")
    lines.append(f"batch_stats: {s.batch_stats:,} (BN running statistics, not parameters)")
    lines.append(f"MACs:        {s.macs:,} ({_m(s.macs)}; conv + dense layers)")
    paper = s.paper
    if paper:
        lines.append(
            f"expected:    {paper['params']:,} parameters ({_pct(s.params, paper['params'])}), "
            f"{_m(paper['macs'])} MACs ({_pct(s.macs, paper['macs'])})"
        )
        lines.append(f"paper:       {paper['paper']}")
    elif s.model in PAPER_FIGURES:
        lines.append(f"(reference figures are for {PAPER_IMAGE_SIZE} px and {PAPER_NUM_CLASSES} classes)")
    return "\n".join(lines)


def markdown_table(model_names: list[str] | None = None, image_size: int = 224, num_classes: int = 1000) -> str:
    """A markdown table of params and MACs of every registered model vs the reference."""
    from skipnet_jax.models import list_models

    names = list_models() if model_names is None else list(model_names)
    at_paper = image_size == PAPER_IMAGE_SIZE and num_classes == PAPER_NUM_CLASSES
    lines = [
        f"| model | parameters | MACs ({image_size} px, {num_classes} classes) "
        f"| reference parameters | reference MACs | paper |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in names:
        try:
            s = summarize(name, image_size, num_classes)
        except Exception as e:  # noqa: BLE001 - one model failing should not hide the others
            lines.append(f"| {name} | error: {str(e).splitlines()[0] if str(e) else type(e).__name__} | | | | |")
            continue
        ref = PAPER_FIGURES.get(name) if at_paper else None
        if ref:
            ref_params = f"{ref['params']:,} ({_pct(s.params, ref['params'])})"
            ref_macs = f"{_m(ref['macs'])} ({_pct(s.macs, ref['macs'])})"
            paper = ref["paper"]
        else:
            ref_params = ref_macs = paper = "-"
        lines.append(f"| {name} | {s.params:,} | {_m(s.macs)} | {ref_params} | {ref_macs} | {paper} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "Registered model name (see skipnet_jax.models.list_models()).")
    flags.DEFINE_integer("image_size", 224, "Square input size in pixels.")
    flags.DEFINE_integer("num_classes", 1000, "Number of classes of the last layer.")
    flags.DEFINE_boolean("markdown", False, "Print a markdown table of all registered models.")


def main(argv: list[str]) -> None:
    from absl import flags, logging

    from skipnet_jax.models import list_models

    logging.set_verbosity(logging.WARNING)  # e.g. JAX's INFO note about the missing TPU backend
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.image_size < 1:
        cli.fail(f"--image_size must be positive, got {f.image_size}")
    if f.num_classes < 1:
        cli.fail(f"--num_classes must be positive, got {f.num_classes}")
    if f.markdown:
        if f.model is not None:
            cli.fail("pass either --model or --markdown, not both")
        print(markdown_table(None, f.image_size, f.num_classes))
        return
    if f.model is None:
        cli.fail(f"--model is required (or --markdown); valid choices: {', '.join(list_models())}")
    if f.model not in list_models():
        cli.fail(f"unknown model {f.model!r}; valid choices: {', '.join(list_models())}")
    try:
        s = summarize(f.model, f.image_size, f.num_classes)
    except ValueError as e:
        cli.fail(str(e).splitlines()[0] if str(e) else "cannot build the model")
    print(format_table(s))


if __name__ == "__main__":
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.parse_absl_flags)
