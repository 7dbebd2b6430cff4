"""Export a trained or converted model's inference function to TFLite or ONNX.

Command line::

    python -m skipnet_jax.export --workdir DIR --format tflite|onnx --output FILE \\
        [--batch_size 1] [--no-fold_batch_norm] [--config.KEY=VALUE ...]

``DIR`` is a training workdir (latest checkpoint; the EMA weights when the run kept
them) or a ``python -m skipnet_jax.convert`` output directory, as for
`skipnet_jax.evaluate`.  The exported function is the model in eval mode (batch-norm
running statistics, no dropout):

    input  "images": float32 [batch_size, image_size, image_size, 3], NHWC, preprocessed
                     exactly as for evaluation (`predict.preprocess_image`: resize/crop and
                     the dataset's per-channel normalisation; the model's record of it,
                     `model_data.preprocessing_record`, is printed and in the summary);
    output "logits": float32 [batch_size, num_classes] (apply softmax for probabilities; the
                     only output; the TFLite converter names its tensor "Identity").

How:

1. Batch norm is folded into the convolution before it (`fold_batch_norm`): every
   conv -> BN pair of a `ConvBN` block (all of SkipNet's and MobileNetV3's) becomes one
   convolution with a bias, ``W' = W * gamma / sqrt(var + eps)``,
   ``b' = beta - mean * gamma / sqrt(var + eps)``.  (BatchNorms that do not follow a
   conv in a `ConvBN`, as in the CIFAR ResNet/DenseNet/ShuffleNet, stay as eval-mode
   affine ops; the TFLite converter fuses those it can.)  Every convolution module whose
   ``impl`` field picks a CPU-specific formulation (`DepthwiseConv`'s shifted
   multiply-adds, `Conv`'s 1x1 matrix product) is traced as one plain (grouped)
   convolution instead (`_plain_convolutions`), which maps to the formats' conv /
   depthwise-conv operators.
2. `jax2tf.convert` (native serialization: StableHLO inside a TF function) and
   ``tf.lite.TFLiteConverter.from_concrete_functions`` with TFLite builtin ops only:
   a ``.tflite`` flatbuffer.
3. ONNX: the TFLite model (already lowered to plain builtin ops) is converted by
   ``tf2onnx.convert.from_tflite`` (tf2onnx reads StableHLO-carrying TF graphs not at
   all, TFLite flatbuffers well).

`run_tflite` / `run_onnx` run an exported file with its runtime (the TFLite
interpreter of TensorFlow, or of ``ai_edge_litert`` when installed; ``onnxruntime``).
Needs the ``export`` extras for ONNX: ``tf2onnx``, ``onnx`` and ``onnxruntime``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from skipnet_jax import cli, model_data, reporting
from skipnet_jax.config_validation import ConfigError
from skipnet_jax.models.layers import Conv, ConvBN, DepthwiseConv

FORMATS = ("tflite", "onnx")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ONNX_OPSET = 17
EXPORT_EXTRAS_HINT = "pip install tf2onnx onnx onnxruntime  (the project's `export` extras)"

__all__ = [
    "FORMATS",
    "export",
    "fold_batch_norm",
    "inference_function",
    "main",
    "run_onnx",
    "run_tflite",
    "to_onnx",
    "to_tflite",
]


# --------------------------------------------------------------------------- batch-norm folding


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _copy_tree(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _copy_tree(v) for k, v in tree.items()}
    return tree


def conv_bn_paths(model: nn.Module, variables: dict, image_size: int) -> dict[tuple[str, ...], float]:
    """``{module path: bn epsilon}`` of every `ConvBN` the model calls (shapes only, nothing computed)."""
    found: dict[tuple[str, ...], float] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvBN) and context.method_name == "__call__":
            found[tuple(context.module.path)] = float(context.module.bn_epsilon)
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    return found


def fold_batch_norm(model: nn.Module, variables: dict, image_size: int) -> tuple[dict, frozenset]:
    """Variables with every `ConvBN`'s batch norm folded into its convolution.

    Returns ``(folded, paths)``: in ``folded`` each such block's ``conv/kernel`` is
    ``W * s`` and its ``bn`` holds only ``bias = beta - mean * s`` (``s = gamma /
    sqrt(var + eps)``, per output channel; computed in float64); its batch statistics
    are gone.  Apply with `apply_folded` (which turns those batch norms into a bias add).
    """
    params = _copy_tree(variables["params"])
    batch_stats = _copy_tree(variables.get("batch_stats", {}))
    paths = conv_bn_paths(model, variables, image_size)
    for path, eps in paths.items():
        block_params, block_stats = _get(params, path), _get(batch_stats, path)
        kernel = np.asarray(block_params["conv"]["kernel"], np.float64)
        bn, stats = block_params["bn"], block_stats["bn"]
        gamma = np.asarray(bn.get("scale", 1.0), np.float64)
        beta = np.asarray(bn.get("bias", 0.0), np.float64)
        scale = gamma / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
        dtype = np.asarray(block_params["conv"]["kernel"]).dtype
        block_params["conv"]["kernel"] = (kernel * scale).astype(dtype)  # HWIO: out channels last
        block_params["bn"] = {"bias": (beta - np.asarray(stats["mean"], np.float64) * scale).astype(dtype)}
        del block_stats["bn"]
    return {"params": params, "batch_stats": batch_stats}, frozenset(paths)


def apply_folded(model: nn.Module, folded: dict, images, paths: frozenset):
    """``model.apply(folded, images, train=False)`` with the folded batch norms as bias adds."""

    def bias_add(next_fun, args, kwargs, context):
        module = context.module
        if (
            isinstance(module, nn.BatchNorm)
            and context.method_name == "__call__"
            and isinstance(module.parent, ConvBN)
            and tuple(module.parent.path) in paths
        ):
            x = args[0] if args else kwargs["x"]
            bias = module.get_variable("params", "bias")
            return x + bias.astype(x.dtype)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(bias_add), _plain_convolutions():
        return model.apply(folded, images, train=False)


def _plain_convolutions():
    """Within it, every convolution (`Conv`, `DepthwiseConv`) with an ``impl`` other than
    "lax" (the CPU shifted multiply-adds of `DepthwiseConv`, im2col products) runs as one lax
    convolution instead: the same maths, as the conv operator the formats have."""

    def plain(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, (Conv, DepthwiseConv)) or context.method_name != "__call__" or module.impl == "lax":
            return next_fun(*args, **kwargs)
        return module.clone(parent=None, impl="lax").apply({"params": module.variables["params"]}, *args, **kwargs)

    return nn.intercept_methods(plain)


def _export_model(loaded) -> nn.Module:
    """The loaded model in float32, whatever the training compute dtype was.  (Its
    convolutions become plain conv ops where it is applied, in `_plain_convolutions`.)"""
    model = loaded.model
    if "dtype" in {f.name for f in dataclasses.fields(model)}:
        return model.clone(dtype=jnp.float32)
    return model


def inference_function(loaded, *, fold: bool = True) -> Callable[[jax.Array], jax.Array]:
    """``images -> logits`` of `loaded` (an `inference.LoadedModel`) in eval mode, weights baked in."""
    model = _export_model(loaded)
    variables = jax.tree.map(np.asarray, loaded.variables)
    if fold:
        folded, paths = fold_batch_norm(model, variables, loaded.config.image_size)

        def logits_fn(images):
            return apply_folded(model, folded, images, paths)[0]
    else:

        def logits_fn(images):
            with _plain_convolutions():
                return model.apply(variables, images, train=False)[0]

    return logits_fn


# --------------------------------------------------------------------------- formats


def _tf_function(fn, batch_size: int, image_size: int):
    import tensorflow as tf
    from jax.experimental import jax2tf

    tf_fn = jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=("cpu",))
    spec = tf.TensorSpec((batch_size, image_size, image_size, 3), tf.float32, name=INPUT_NAME)

    @tf.function(input_signature=[spec], autograph=False)
    def serving(images):
        return {OUTPUT_NAME: tf_fn(images)}

    return serving


def to_tflite(fn, *, batch_size: int, image_size: int) -> bytes:
    """The TFLite flatbuffer of ``fn: float32 [B, S, S, 3] -> logits`` (builtin ops only)."""
    import tensorflow as tf

    serving = _tf_function(fn, batch_size, image_size)
    concrete = serving.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], trackable_obj=serving)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def to_onnx(tflite_model: bytes, *, opset: int = ONNX_OPSET) -> bytes:
    """An ONNX model of a TFLite model made by `to_tflite` (via tf2onnx's TFLite reader)."""
    try:
        from tf2onnx import convert as tf2onnx_convert
    except ImportError:
        raise ConfigError(f"ONNX export needs tf2onnx: {EXPORT_EXTRAS_HINT}") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(tflite_model)
        with warnings.catch_warnings():  # tf2onnx reads the file with the deprecated tf.lite.Interpreter
            warnings.simplefilter("ignore", UserWarning)
            model_proto, _ = tf2onnx_convert.from_tflite(path, opset=opset)
    _rename_output(model_proto.graph, OUTPUT_NAME)
    return model_proto.SerializeToString()


def _rename_output(graph, name: str) -> None:
    """Names the graph's single output `name` (TFLite calls it "Identity")."""
    (output,) = graph.output
    old = output.name
    if old == name:
        return
    for node in graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    output.name = name


def export(loaded, fmt: str, output: str, *, batch_size: int = 1, fold: bool = True) -> dict[str, Any]:
    """Writes `loaded`'s inference function as `fmt` to `output`; returns a summary."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r} is not valid; valid choices: {', '.join(FORMATS)}")
    preprocessing = model_data.preprocessing_record(loaded.data_config)  # an unknown dataset fails before the slow part
    if batch_size < 1:
        raise ConfigError(f"--batch_size={batch_size} must be >= 1")
    fn = inference_function(loaded, fold=fold)
    size = loaded.config.image_size
    data = to_tflite(fn, batch_size=batch_size, image_size=size)
    if fmt == "onnx":
        data = to_onnx(data)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with reporting.atomic_write(output, "wb") as f:
        f.write(data)
    return {
        "format": fmt,
        "output": output,
        "bytes": len(data),
        "input": (INPUT_NAME, [batch_size, size, size, 3]),
        "output_tensor": (OUTPUT_NAME, [batch_size, loaded.num_classes]),
        "batch_norm_folded": fold,
        "preprocessing": preprocessing,
    }


# --------------------------------------------------------------------------- runtimes


def _tflite_interpreter(path: str):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated": it is what TF 2.21 has
            warnings.simplefilter("ignore", UserWarning)
            return tf.lite.Interpreter(model_path=path)
    return Interpreter(model_path=path)


def run_tflite(path: str, images: np.ndarray) -> np.ndarray:
    """Logits of a `.tflite` file from `export` on ``images`` (any count: run in its batch size)."""
    interpreter = _tflite_interpreter(path)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    batch = int(inp["shape"][0])
    return _batched(
        images,
        batch,
        lambda x: (
            interpreter.set_tensor(inp["index"], x),
            interpreter.invoke(),
            interpreter.get_tensor(out["index"]).copy(),
        )[-1],
    )


def run_onnx(path: str, images: np.ndarray) -> np.ndarray:
    """Logits of a `.onnx` file from `export` on ``images``, with onnxruntime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(f"running ONNX models needs onnxruntime: {EXPORT_EXTRAS_HINT}") from None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else len(images)
    return _batched(images, batch, lambda x: session.run(None, {inp.name: x})[0])


def _batched(images: np.ndarray, batch: int, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    images = np.asarray(images, np.float32)
    outs = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        real = len(chunk)
        if real < batch:  # pad the last chunk to the fixed batch size
            chunk = np.concatenate([chunk, np.zeros((batch - real, *chunk.shape[1:]), np.float32)])
        outs.append(np.asarray(run(np.ascontiguousarray(chunk)))[:real])
    return np.concatenate(outs)


# --------------------------------------------------------------------------- command line


def main(argv: list[str]) -> None:
    from absl import flags

    from skipnet_jax import inference, workdir_flags

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}")
    workdir_flags.quiet_libraries()
    f = flags.FLAGS
    try:
        if f.format not in FORMATS:
            raise ConfigError(f"--format={f.format!r} is not valid; valid choices: {', '.join(FORMATS)}")
        loaded = inference.load_model(f.workdir, workdir_flags.config_from_flags())
        summary = export(loaded, f.format, f.output, batch_size=f.batch_size, fold=f.fold_batch_norm)
    except (ConfigError, OSError) as e:
        cli.fail(str(e))
    where = f"step {loaded.step}" if loaded.step is not None else "converted"
    print(
        f"exported {loaded.config.model} ({where}{', EMA weights' if loaded.use_ema else ''}) "
        f"as {summary['format']}: {summary['output']} ({summary['bytes']:,} bytes)"
    )
    print(f"  input  {summary['input'][0]}: float32 {summary['input'][1]} (NHWC, normalised as for eval)")
    print(
        f"  preprocessing ({loaded.config.dataset} eval): {model_data.describe_preprocessing(summary['preprocessing'])}"
    )
    print(f"  output {summary['output_tensor'][0]}: float32 {summary['output_tensor'][1]}")
    print(f"  batch norm folded into convolutions: {'yes' if summary['batch_norm_folded'] else 'no'}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app, flags

    from skipnet_jax import workdir_flags

    flags.DEFINE_string("format", None, "tflite | onnx")
    flags.DEFINE_string("output", None, "Output file (.tflite / .onnx).")
    flags.DEFINE_integer("batch_size", 1, "Fixed batch size of the exported model.")
    flags.DEFINE_boolean("fold_batch_norm", True, "Fold ConvBN batch norms into their convolutions.")
    flags.mark_flags_as_required(["format", "output"])
    workdir_flags.define_workdir_flags(sys.argv, "Training workdir or `skipnet_jax.convert` output directory.")
    app.run(main, flags_parser=cli.parse_absl_flags)
