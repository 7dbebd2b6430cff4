"""What the training loop prints: absl INFO progress lines of this package on stderr, nothing else.

Under `absl.app.run` (the CLIs) absl's handler is installed and INFO is shown; elsewhere (a
notebook, a script calling `train.train_and_evaluate`) absl INFO records are dropped, so a
training run is silent until it ends. `configure_logging()` makes both cases the same.
"""

from __future__ import annotations

import logging as logging_lib
import os

from absl import flags, logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _PackageRecordsOnly(logging_lib.Filter):
    """Drops other libraries' INFO/DEBUG chatter (orbax logs every checkpoint file operation,
    jax its backend probing); their warnings and errors pass."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return record.levelno >= logging_lib.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def configure_logging() -> logging_lib.Handler:
    """Shows this package's progress ("step 50/674 loss ... ETA 1m02s") on stderr and other
    libraries' warnings and errors; drops other libraries' INFO. Idempotent.

    Outside `app.run` this installs absl's handler on the root logger (as `app.run` does) and sets
    absl's verbosity to INFO; an explicitly set verbosity (`--verbosity`, `logging.set_verbosity`)
    is left as it is. The handler writes to the current `sys.stderr` (a notebook cell's output).
    """
    if not flags.FLAGS.is_parsed():
        # absl prints "Logging before flag parsing goes to stderr." once before its flags are
        # parsed; outside app.run that is the normal case, not a warning.
        logging._warn_preinit_stderr = False
    logging.use_absl_handler()
    if flags.FLAGS["verbosity"].using_default_value:
        logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _PackageRecordsOnly) for f in handler.filters):
        handler.addFilter(_PackageRecordsOnly())
    return handler
