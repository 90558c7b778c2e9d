#!/usr/bin/env bash
# Wheels for a GPU host that already has PyTorch (torch, torchvision, numpy, pillow, pyyaml,
# fsspec, prometheus-client, scikit-learn, safetensors, tqdm) and nothing else of this project's
# stack: an air-gapped node, or one whose image you do not build. `make wheelhouse` writes them
# to wheelhouse/ (git-ignored); copy it over and install without an index:
#   python3 -m pip install --no-index --no-deps wheelhouse/*.whl
# Holds: this project, DeepSpeed (published as source only: built here as a pure-Python wheel,
# its ops compile just in time on the host), pydantic and its parts, webdataset, and what
# `import deepspeed` needs beyond PyTorch (hjson, einops, msgpack). Versions: constraints.txt.
# Ray is left out (about 80 MB): such a host runs the worker loop without it
# (`--without-ray`, docs/engine.md), or installs ray[default,train] from its own mirror.
# The host's Python and platform: PYTHON_VERSION (default: this venv's), PLATFORM (x86_64; aarch64 for Grace).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-wheelhouse}
PYTHON_VERSION=${PYTHON_VERSION:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
PLATFORM=${PLATFORM:-x86_64}
rm -rf "$OUT" && mkdir -p "$OUT"
pin() { sed -n "s/^$1==//p" constraints.txt; }
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(pin deepspeed)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .
"$PY" -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d "$OUT" \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform "manylinux_2_28_$PLATFORM" --platform "manylinux_2_17_$PLATFORM" --platform "manylinux2014_$PLATFORM" \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset braceexpand hjson einops msgpack
ls "$OUT"
du -sh "$OUT"
echo "On the host: python3 -m pip install --no-index --no-deps $OUT/*.whl"
