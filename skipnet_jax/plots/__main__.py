"""``python -m skipnet_jax.plots --workdir DIR``: see :func:`skipnet_jax.plots.files.main`."""

import os
import sys

from skipnet_jax.plots.files import main

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
