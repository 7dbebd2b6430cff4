"""All defaults (see skipnet_jax/default_config.py for what each field means).

python -m skipnet_jax.main --config configs/default.py --workdir /tmp/skipnet
"""

from skipnet_jax.default_config import get_default_config


def get_config():
    return get_default_config()
