"""What every command line of the package shares: a mistake is one ``error: ...`` line on
stderr and exit status 2, never a traceback or a usage dump, so a user (or a launcher's
log) sees at once which flag, key or file to fix."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn


def first_line(message: Any) -> str:
    """The first non-empty line of `message` (library errors often span paragraphs)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else ""


def fail(message: Any) -> NoReturn:
    """Prints ``error: message`` on stderr and exits with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's parser for ``app.run(main, flags_parser=...)``, every bad flag or
    ``--config.KEY=VALUE`` override reported as one line."""
    from absl import flags  # argparse-only tools need not import absl

    from skipnet_jax import config_validation

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(first_line(e))
    except (AttributeError, KeyError) as e:  # --config.KEY=... with an unknown KEY
        fail(config_validation.describe_unknown_override(argv) or f"invalid --config override: {e}")
    except (TypeError, ValueError) as e:
        fail(f"invalid --config override: {e}")
