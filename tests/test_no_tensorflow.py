"""The models, the loss and the train/eval steps work on a machine without TensorFlow.

Many JAX GPU environments (containers built for JAX + PyTorch) have no TensorFlow; only the
input pipeline (tf.data/TFDS) and the TensorBoard writer need it. The check runs in a fresh
interpreter in which any ``import tensorflow...`` raises ImportError, as on such a machine.
"""

import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

_BLOCK_TENSORFLOW = """
import importlib.abc
import sys


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tf2onnx"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
"""

_SCRIPT = """
import functools

import jax
import jax.numpy as jnp
import numpy as np

from skipnet_jax import engine, losses, models, optim, sharding, train  # noqa: F401 - engine: imports too
from skipnet_jax.data import digits_arrays
from skipnet_jax.default_config import get_default_config

try:
    import tensorflow  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("tensorflow import was not blocked")

config = get_default_config()
config.model, config.image_size, config.batch_size, config.dtype = "skipnet_xs", 32, 8, "bfloat16"
config.optimizer, config.learning_rate, config.ema_decay = "adamw", 1e-3, 0.99
model = train.create_model(config, num_classes=10)
lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=10, num_train_steps=10)
tx = optim.create_optimizer(config, lr_fn)
mesh = sharding.create_mesh()
replicated, data_sharding = sharding.replicated(mesh), sharding.batch_sharded(mesh)
init = functools.partial(
    train.create_train_state, model, tx, seed=config.seed, image_size=config.image_size, ema_decay=config.ema_decay
)
state = jax.jit(init, out_shardings=replicated)()
options = train.StepOptions.from_config(config)
step = jax.jit(
    functools.partial(train.train_step, seed=config.seed, model=model, tx=tx, learning_rate_fn=lr_fn, options=options),
    in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated), donate_argnums=0,
)
evaluate = jax.jit(functools.partial(train.eval_step, model=model, use_ema=True))

images, labels = digits_arrays.load_raw()
x = np.repeat(np.repeat(images[:8], 4, axis=1), 4, axis=2).astype(np.float32) / 255.0
x = np.broadcast_to(x, (8, 32, 32, 3)).copy()
batch = sharding.to_global_batch({"image": x, "label": labels[:8].astype(np.int32)}, data_sharding)
before = jax.device_get(state.params)
for _ in range(2):
    state, metrics = step(state, batch)
assert int(state.step) == 2 and bool(metrics["finite"]), metrics
assert np.isfinite(float(metrics["loss"])) and 0.699 <= float(metrics["bias_weight_min"]) <= 1.051
moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before, state.params)
assert max(jax.tree.leaves(moved)) > 0.0, "the train step did not change the parameters"
sums = evaluate(state, {**batch, "mask": jnp.ones((8,), jnp.float32)})
assert int(sums["count"]) == 8 and 0 <= int(sums["top1_sum"]) <= 8

logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
loss, _, aux = losses.bias_loss(logits, jnp.array([0, 1]), jnp.ones((2, 2, 2, 3)) * jnp.arange(2.0)[:, None, None, None])
assert np.isfinite(float(loss)) and aux["weights"].shape == (2,)
assert "skipnet_m" in models.list_models()
print("OK", sorted(m for m in sys.modules if m.startswith("tensorflow")))
"""


def test_models_loss_and_steps_run_without_tensorflow():
    code = _BLOCK_TENSORFLOW + textwrap.dedent(_SCRIPT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK []"
