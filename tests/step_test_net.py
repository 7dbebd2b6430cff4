"""A two-layer network with SkipNet's interface, for tests of the train step, the engine and
the training loop, whose behaviour does not depend on the network.

With it a step takes under 1 CPU-s to initialise and compile, against ~20 for SkipNet-XS at
32 px (2-core CPU).  SkipNet-XS's own step is trained by the CLI tests (test_robustness,
test_distributed, test_checkpointing) and the models by test_models.
"""

import flax.linen as nn
import jax.numpy as jnp

# The name under which conftest's `registered_step_test_net` fixture registers it (config.model).
STEP_TEST_NET = "step_test_net"


class StepTestNet(nn.Module):
    """Two strided conv + BatchNorm layers, a dropout and a classifier, returning
    ``(logits, {"features": ...})`` as the registered models do."""

    num_classes: int
    dropout_rate: float = 0.2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train=False):
        x = images
        for features in (8, 16):
            x = nn.Conv(features, (3, 3), strides=2, dtype=self.dtype)(x)
            x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
            x = nn.hard_swish(x)
        pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(pooled), {"features": x}
