"""Installs what skipnet_jax needs and the Python environment lacks, keeping its JAX and TensorFlow.

Colab (like most GPU/TPU images) ships a JAX built for its accelerator (jaxlib plus the CUDA
plugin or libtpu) and a TensorFlow. `pip install -e .` would replace them whenever their versions
differ from setup.cfg's ranges, and a replaced jax silently loses the matching CUDA plugin. This
module installs only what is missing:

- it reads `install_requires` (and, with --extra, `extras_require`) from the repository's
  setup.cfg, evaluating environment markers;
- a requirement on a JAX-family or TensorFlow-family distribution (jax, jaxlib, tensorflow /
  tensorflow-cpu / tf-nightly, tensorboard) that is installed in any version is kept (with a one-line
  warning when that version is outside the tested range); any other requirement already met is
  left alone; the rest is installed;
- it runs `pip install --no-deps -e REPO`, then `pip install -c CONSTRAINTS MISSING...`, the
  constraints file pinning the installed JAX and TensorFlow stacks (jax, jaxlib, the CUDA/ROCm
  plugins, libtpu, nvidia-* libraries, tensorflow, tensorboard, keras) and everything they depend
  on to their installed versions, so that pip cannot upgrade or downgrade them (numpy, protobuf,
  ml_dtypes, ...) as a dependency of something it installs.

Standard library and `packaging` only (pip's vendored copy when `packaging` is not installed), so
that it runs from a fresh clone before the package is installed:

    python -m skipnet_jax.install_missing [--extra export] [--dry-run]   # from the clone's root
    python path/to/clone/skipnet_jax/install_missing.py [--extra export] [--dry-run]
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare environment: pip's vendored copy (packaging is available wherever pip is)
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

PACKAGE = "skipnet-jax"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TENSORFLOW_BUILDS = frozenset(
    {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos",
     "tf-nightly", "tf-nightly-cpu", "tf-nightly-gpu"}
)  # fmt: skip
# A requirement on any member of a group is met by whichever member is installed, in any version.
INTERCHANGEABLE = (
    frozenset({"jax"}),
    frozenset({"jaxlib"}),
    TENSORFLOW_BUILDS,
    frozenset({"tensorboard", "tb-nightly"}),
)
# Further pieces of an accelerator's JAX or of TensorFlow: kept and pinned when installed.
_STACK_PATTERN = re.compile(
    r"jax-(cuda|rocm)\d*-(plugin|pjrt)|libtpu(-nightly)?|nvidia-.+|keras|tf-keras|keras-nightly"
)


def is_kept_family(name: str) -> bool:
    """A distribution of the runtime's JAX or TensorFlow stack: never replaced once installed."""
    name = canonicalize_name(name)
    return any(name in group for group in INTERCHANGEABLE) or bool(_STACK_PATTERN.fullmatch(name))


def _group(name: str) -> frozenset[str] | None:
    return next((group for group in INTERCHANGEABLE if name in group), None)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do about one requirement line of setup.cfg."""

    requirement: str  # as written (comment stripped)
    action: str  # "skip" (marker false here), "ok" (met), "keep" (JAX/TensorFlow installed), "install"
    installed: str | None = None  # "<distribution> <version>" when one is installed
    warning: str | None = None

    @property
    def name(self) -> str:
        return canonicalize_name(Requirement(self.requirement).name)

    @property
    def to_install(self) -> str:
        """The requirement without its marker, as given to pip."""
        req = Requirement(self.requirement)
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        return f"{req.name}{extras}{req.specifier}" if not req.url else f"{req.name}{extras} @ {req.url}"


@dataclasses.dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    pins: tuple[tuple[str, str], ...]  # (distribution, installed version), sorted: the constraints file

    @property
    def missing(self) -> list[str]:
        return [d.to_install for d in self.decisions if d.action == "install"]

    @property
    def warnings(self) -> list[str]:
        return [d.warning for d in self.decisions if d.warning]


def _in_range(specifier: SpecifierSet, version: str) -> bool:
    try:
        return specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _marker_applies(req: Requirement, environment: Mapping[str, str] | None) -> bool:
    if req.marker is None:
        return True
    env = dict(default_environment())
    env.update(environment or {})
    env.setdefault("extra", "")
    return req.marker.evaluate(env)


def decide(requirement: str, installed: Mapping[str, str], environment: Mapping[str, str] | None = None) -> Decision:
    """The decision for one requirement, given installed {canonical name: version}."""
    req = Requirement(requirement)
    name = canonicalize_name(req.name)
    if not _marker_applies(req, environment):
        return Decision(requirement, "skip")
    group = _group(name)
    if group is not None:
        present = sorted(n for n in group if n in installed)
        if present:  # a JAX / TensorFlow already here: kept whatever its version
            dist = name if name in present else present[0]
            version = installed[dist]
            warning = None
            if not _in_range(req.specifier, version):
                warning = (
                    f"warning: keeping the installed {dist} {version}; skipnet_jax is tested with "
                    f"{requirement.split(';')[0].strip()} (if something fails, install a {req.name} in that range)"
                )
            return Decision(requirement, "keep", f"{dist} {version}", warning)
        return Decision(requirement, "install")
    if name in installed:
        if _in_range(req.specifier, installed[name]):
            return Decision(requirement, "ok", f"{name} {installed[name]}")
        return Decision(requirement, "install", f"{name} {installed[name]}")
    return Decision(requirement, "install")


def dependency_closure(
    roots: Iterable[str],
    installed: Mapping[str, str],
    requires: Mapping[str, Sequence[str]],
    environment: Mapping[str, str] | None = None,
) -> set[str]:
    """`roots` and every installed distribution they depend on (through installed ones only).

    `requires` maps a canonical name to its `Requires-Dist` lines; requirements of extras and
    ones whose markers do not apply here are not followed.
    """
    seen: set[str] = set()
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for line in requires.get(name, ()):
            try:
                req = Requirement(line)
            except ValueError:
                continue
            if _marker_applies(req, {**(environment or {}), "extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def make_plan(
    requirements: Iterable[str],
    installed: Mapping[str, str],
    requires: Mapping[str, Sequence[str]] | None = None,
    environment: Mapping[str, str] | None = None,
) -> Plan:
    """Decisions for `requirements` and the pins of the constraints file.

    `installed`: {canonical distribution name: version}; `requires`: {canonical name: its
    Requires-Dist lines} for the dependency closure of the kept stack (none followed if omitted);
    `environment`: marker variables overriding this interpreter's (e.g. {"platform_machine": "aarch64"}).
    """
    installed = {canonicalize_name(k): v for k, v in installed.items()}
    decisions = tuple(decide(r, installed, environment) for r in requirements)
    stack = {name for name in installed if is_kept_family(name)}
    pinned = dependency_closure(stack, installed, requires or {}, environment)
    # A requirement of ours that an installed dependency of the stack does not meet is installed
    # anyway (then pip warns if the stack objects); JAX/TensorFlow themselves are never replaced.
    pinned -= {d.name for d in decisions if d.action == "install" and not is_kept_family(d.name)}
    return Plan(decisions, tuple(sorted((name, installed[name]) for name in pinned)))


def constraints_text(plan: Plan) -> str:
    lines = [
        "# skipnet_jax.install_missing: the installed JAX and TensorFlow stacks and their dependencies,",
        "# pinned to their installed versions so that pip neither upgrades nor replaces them.",
    ]
    lines += [f"{name}=={version}" for name, version in plan.pins]
    return "\n".join(lines) + "\n"


def pip_commands(
    plan: Plan, repo: str, constraints_path: str, *, install_package: bool = True, quiet: bool = False
) -> list[list[str]]:
    pip = [sys.executable, "-m", "pip", "install"] + (["-q"] if quiet else [])
    commands = []
    if install_package:
        commands.append([*pip, "--no-deps", "-e", repo])
    if plan.missing:
        commands.append([*pip, "-c", constraints_path, *plan.missing])
    return commands


# ---- the environment -----------------------------------------------------------------------


def read_requirements(setup_cfg: str, extras: Iterable[str] = ()) -> list[str]:
    """`[options] install_requires` (plus the named `[options.extras_require]`) of setup.cfg,
    one requirement per entry, comments dropped."""
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(setup_cfg):
        raise FileNotFoundError(setup_cfg)
    values = [parser.get("options", "install_requires")]
    for extra in extras:
        if not parser.has_option("options.extras_require", extra):
            choices = ", ".join(parser.options("options.extras_require"))
            raise ValueError(f"setup.cfg has no extra {extra!r} (extras: {choices})")
        values.append(parser.get("options.extras_require", extra))
    requirements = []
    for value in values:
        for line in value.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                Requirement(line)  # fails loudly on a line that is not a requirement
                requirements.append(line)
    return requirements


def python_requires(setup_cfg: str) -> str | None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(setup_cfg)
    return parser.get("options", "python_requires", fallback=None)


def installed_distributions() -> tuple[dict[str, str], dict[str, list[str]]]:
    """({canonical name: version}, {canonical name: Requires-Dist lines}) of this interpreter;
    the first of several copies on sys.path (the importable one) wins."""
    versions: dict[str, str] = {}
    requires: dict[str, list[str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        name = canonicalize_name(name)
        if name not in versions:
            versions[name] = dist.version
            requires[name] = list(dist.requires or [])
    return versions, requires


def editable_location(name: str = PACKAGE) -> str | None:
    """The directory an editable install of `name` points to, if there is one (a clone's own
    `*.egg-info`, found first when the clone is the working directory, is not an install)."""
    from urllib.parse import unquote, urlparse

    for dist in metadata.distributions(name=name):
        info = json.loads(dist.read_text("direct_url.json") or "{}")
        if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
            return os.path.realpath(unquote(urlparse(info["url"]).path))
    return None


def describe(plan: Plan) -> list[str]:
    """One line per requirement: the action, the requirement (marker left out) and why."""
    rows = []
    for d in plan.decisions:
        requirement, _, marker = d.requirement.partition(";")
        note = {
            "keep": f"kept: {d.installed}",
            "ok": f"installed: {d.installed}",
            "skip": f"not for this environment: {marker.strip()}",
        }.get(d.action, f"to install (now {d.installed})" if d.installed else "to install")
        rows.append((d.action, requirement.strip(), note))
    width = max((len(r[1]) for r in rows), default=0)
    return [f"  {action:<8} {requirement:<{width}}  {note}" for action, requirement, note in rows]


def _run(command: list[str]) -> int:
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, check=False).returncode


def install(
    plan: Plan,
    repo: str,
    *,
    install_package: bool = True,
    quiet: bool = False,
    run: Callable[[list[str]], int] | None = None,
) -> int:
    """Runs the pip commands (through `run`, default: a subprocess) with the constraints file in
    place; returns pip's exit status."""
    run = run or _run
    with tempfile.TemporaryDirectory(prefix="skipnet_install_") as tmp:
        constraints_path = os.path.join(tmp, "constraints.txt")
        with open(constraints_path, "w") as f:
            f.write(constraints_text(plan))
        for command in pip_commands(plan, repo, constraints_path, install_package=install_package, quiet=quiet):
            rc = run(command)
            if rc:
                if "-c" in command:
                    print(
                        "error: pip could not install the missing packages without changing the kept JAX/TensorFlow "
                        "or what they depend on (pinned: " + ", ".join(f"{n}=={v}" for n, v in plan.pins) + "). "
                        "Install a JAX in setup.cfg's range for this accelerator, then rerun.",
                        file=sys.stderr,
                    )
                return rc
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m skipnet_jax.install_missing",
        description="Install skipnet_jax (editable) and only the requirements this environment lacks; "
        "the installed JAX (with its CUDA/TPU plugin) and TensorFlow are kept.",
    )
    parser.add_argument("--repo", default=REPO_ROOT, help="the clone holding setup.cfg (default: %(default)s)")
    parser.add_argument(
        "--extra", action="append", default=[], help="also install this extra of setup.cfg (e.g. export)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the pip commands; install nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="pass -q to pip")
    args = parser.parse_args(argv)

    repo = os.path.realpath(args.repo)
    setup_cfg = os.path.join(repo, "setup.cfg")
    try:
        requirements = read_requirements(setup_cfg, args.extra)
    except (OSError, ValueError, configparser.Error) as e:
        print(f"error: {setup_cfg}: {e}", file=sys.stderr)
        return 2
    before, requires = installed_distributions()
    plan = make_plan(requirements, before, requires)
    install_package = editable_location() != repo

    print(f"skipnet_jax install plan (Python {platform.python_version()}, {setup_cfg}):")
    print("\n".join(describe(plan)))
    python_range = python_requires(setup_cfg)
    if python_range and not _in_range(SpecifierSet(python_range), platform.python_version()):
        print(f"warning: Python {platform.python_version()} is outside setup.cfg's python_requires {python_range}")
    for warning in plan.warnings:
        print(warning)
    if not install_package and not plan.missing:
        print("Nothing to install.")
        return 0
    if args.dry_run:
        print("Would run (the constraints file below as CONSTRAINTS):")
        for command in pip_commands(plan, repo, "CONSTRAINTS", install_package=install_package, quiet=args.quiet):
            print("  " + shlex.join(command))
        print(constraints_text(plan), end="")
        return 0

    rc = install(plan, repo, install_package=install_package, quiet=args.quiet)
    if rc:
        return rc
    after, _ = installed_distributions()
    changed = [f"{n} {before[n]} -> {after.get(n, 'removed')}" for n in sorted(before) if after.get(n) != before[n]]
    moved_pins = [c for c in changed if any(c.startswith(n + " ") for n, _ in plan.pins)]
    if moved_pins:
        print("error: pinned packages changed: " + ", ".join(moved_pins), file=sys.stderr)
        return 1
    print("Kept: " + (", ".join(f"{n} {v}" for n, v in plan.pins if is_kept_family(n)) or "nothing (none installed)"))
    for d in plan.decisions:
        if d.action == "keep" and d.installed.split()[0] != d.name:
            print(
                f"(pip's report that {PACKAGE} requires {d.name}, which is not installed, is expected: "
                f"the installed {d.installed} provides it)"
            )
    if changed:
        print(
            "Changed versions of packages installed before (restart Python if one was imported): " + ", ".join(changed)
        )
    still_missing = make_plan(requirements, after).missing
    if still_missing:
        print("error: still missing after pip: " + " ".join(still_missing), file=sys.stderr)
        return 1
    print("Done: every requirement is installed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
