"""Timing the in-tree PyTorch SkipNet on the same work as the JAX step (eager or ``torch.compile``'d).

The reference side of :mod:`skipnet_jax.benchmark` ``--compare torch`` and of the
accelerator check's bench part; PyTorch is imported only when a side is built.
"""

from __future__ import annotations

import time

from skipnet_jax.tools.step_timing import NUM_CLASSES, BenchmarkError, Side

# skipnet_jax model name -> variant key of skipnet_jax.reference.torch_skipnet.VARIANTS
TORCH_VARIANTS = {"skipnet_xs": "xs", "skipnet_s": "s", "skipnet_m": "m", "skipnet_l": "l"}


def torch_device(name: str) -> str:
    """``auto`` -> ``cuda`` where PyTorch sees a GPU, else ``cpu``; a named device must exist.

    Resolved before anything is built, so an unusable device is one ``error:`` line, not a
    traceback after minutes of JAX compilation.
    """
    import torch  # optional, only for the PyTorch comparison

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(f"--torch_device cuda: this PyTorch ({torch.__version__}) sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise BenchmarkError(f"unknown torch device {name!r}; valid choices: auto, cpu, cuda")
    return name


def torch_side(
    config,
    mode: str,
    seed: int = 0,
    name: str = "torch",
    threads: int = 0,
    *,
    device: str = "cpu",
    channels_last: bool = False,
    torch_compile: bool = False,
    compile_mode: str | None = None,
) -> Side:
    """The in-tree PyTorch SkipNet doing the same work as :func:`jax_side`.

    The compute dtype follows ``config.dtype`` the way the JAX side does: ``float32`` runs
    plain float32; ``bfloat16`` runs forward and loss under ``torch.autocast(device,
    bfloat16)`` with float32 parameters (AMP; no gradient scaler, bf16 needs none).
    ``channels_last`` stores weights and the input batch NHWC (what cuDNN's fast
    convolutions want); ``torch_compile`` wraps forward (+ loss, for train) in ``torch.compile``;
    its compilation happens in the first call, which is run and timed here
    (``info["compile_s"]``: compilation plus one step) so that it never lands in a timed
    round.  On CUDA every ``run(k)`` ends with ``torch.cuda.synchronize`` so the clock
    covers finished work, like ``block_until_ready`` on the JAX side.
    """
    import contextlib

    import torch  # optional, only for the PyTorch comparison
    from torch.nn import functional as F

    from skipnet_jax.reference import torch_bias_loss, torch_skipnet

    if config.model not in TORCH_VARIANTS:
        raise BenchmarkError(
            f"--compare torch: {config.model!r} has no PyTorch counterpart; "
            f"valid choices: {', '.join(sorted(TORCH_VARIANTS))}"
        )
    if config.dtype not in ("float32", "bfloat16"):
        raise BenchmarkError(f"--compare torch: no PyTorch counterpart of dtype {config.dtype!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    variant_mode, width = torch_skipnet.VARIANTS[TORCH_VARIANTS[config.model]]
    torch.manual_seed(seed)
    model = torch_skipnet.TorchSkipNet(variant_mode, width, num_classes=NUM_CLASSES, dropout_rate=config.dropout_rate)
    model = model.to(device=dev, memory_format=memory_format)
    g = torch.Generator().manual_seed(seed)
    b, s = config.batch_size, config.image_size
    images = torch.randn(b, 3, s, s, generator=g).to(dev).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (b,), generator=g).to(dev)

    def autocast():
        if config.dtype == "bfloat16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def finish() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if mode == "train":
        model.train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            momentum=config.momentum,
        )
        bias = None
        if config.loss == "bias":
            bias = torch_bias_loss.TorchBiasLoss(
                alpha=config.bias_loss.alpha, beta=config.bias_loss.beta, normalisation_mode=config.bias_loss.mode
            )

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits, features = model.forward_with_features(x)
            return bias(features, logits, y) if bias is not None else F.cross_entropy(logits, y)

        step_loss = torch.compile(forward_loss, mode=compile_mode) if torch_compile else forward_loss

        def run(k: int) -> None:
            for _ in range(k):
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = step_loss(images, labels)
                loss.backward()
                opt.step()
            finish()

    else:
        model.eval()
        forward = torch.compile(model, mode=compile_mode) if torch_compile else model

        def run(k: int) -> None:
            with torch.no_grad(), autocast():
                for _ in range(k):
                    forward(images)
            finish()

    side = Side(name, run, b)
    side.info = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "autocast": "bfloat16" if config.dtype == "bfloat16" else None,
        "channels_last": channels_last,
        "compiled": torch_compile,
        "compile_mode": compile_mode if torch_compile else None,
    }
    if torch_compile:
        t0 = time.perf_counter()
        run(1)
        side.info["compile_s"] = time.perf_counter() - t0
    return side
