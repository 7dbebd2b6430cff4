"""What every command line of the package shares: a mistake is one ``error: ...`` line on
stderr and exit status 2, never a traceback or a usage dump, so a user (or a launcher's
log) sees at once which flag, key or file to fix."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
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
    """argparse whose errors are one line (argparse prints the whole usage first).  Only for
    `install_missing`, which runs before the package's dependencies (absl among them) are
    installed; every other command parses absl flags."""

    def error(self, message: str) -> NoReturn:
        fail(message)


# Arguments that ask a command for its flags instead of running it.
HELP_ARGUMENTS = ("-h", "--help", "--helpshort", "--helpfull", "-help")


def parse_command_flags(
    define: Callable[[Any], None], argv: Sequence[str] | None, prog: str, description: str
) -> argparse.Namespace:
    """The absl flags of a command that defines them itself, parsed from `argv` (without the
    program name; None: ``sys.argv[1:]``).

    `define(flag_values)` defines the flags on a `FlagValues` of the command's own (not
    absl's global ``FLAGS``), so that the command can run in a process where other
    commands' flags are defined too.  ``--help`` prints `prog`, `description` and every flag
    with its help and default, then exits 0; a bad flag or a stray argument is one
    ``error: ...`` line and exit status 2.  Returns the flag values as attributes.
    """
    from absl import flags

    args = list(sys.argv[1:] if argv is None else argv)
    flag_values = flags.FlagValues()
    define(flag_values)
    if any(arg in HELP_ARGUMENTS for arg in args):
        print(
            f"usage: {prog} [--FLAG=VALUE ...]\n\n{description}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}"
        )
        sys.exit(0)
    try:
        rest = flag_values([prog, *args])[1:]
    except flags.Error as e:
        fail(first_line(e))
    if rest:
        fail(f"unexpected arguments {rest}; {prog} takes only --FLAG=VALUE flags (--help lists them)")
    return argparse.Namespace(**flag_values.flag_values_dict())


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
