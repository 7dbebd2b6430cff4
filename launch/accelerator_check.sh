#!/usr/bin/env bash
# One short run that checks a GPU (or TPU) machine end to end: the TensorFlow-free tests,
# the digits trained to >= 0.97 eval top-1 in bfloat16, and SkipNet-M JAX vs PyTorch
# (eager and torch.compile) throughput. See `python -m skipnet_jax.accelerator_check --help`
# and the module docstring.
#
#   launch/accelerator_check.sh [--out results.json] [--tiny] [other accelerator_check flags]
#
# Runs from the repository root whatever the current directory. Packages missing on the
# machine (ml-collections, on an image without it) can be carried as wheels in .whl/ at the
# repository root; when that folder holds wheels they are installed first, without network
# and without their dependencies, into WHEEL_TARGET (default /tmp/skipnet_site), which is
# put in front of PYTHONPATH. Prepare them where pip has network, in the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
#
# (ml-collections is pure Python; its own needs, absl-py and PyYAML, are usually there).
#
# Environment: PYTHON (default: python3) is the interpreter; everything else is passed
# through. Exit status: that of the check (0 passed, 1 a part failed, 2 bad arguments or a
# missing package), or pip's when the wheels do not install.
set -euo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
  target=${WHEEL_TARGET:-/tmp/skipnet_site}
  echo "installing ${#wheels[@]} carried wheel(s) into $target: ${wheels[*]}" >&2
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "${wheels[@]}"
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1
exec "$python" -m skipnet_jax.accelerator_check "$@"
