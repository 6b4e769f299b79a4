#!/usr/bin/env bash
# What a lent GPU machine needs from here, packed small enough to travel with the working tree (64 MiB): its
# image holds PyTorch, timm, onnx and onnxruntime but not mlflow and the packages below, and reaches no
# registry. Writes, in .whl/ (ignored by git):
#   site.tar.xz    those packages for Python 3.12 (the image's), at the versions of this .venv, unpacked from
#                  their wheels without mlflow's web UI bundle (~14 MB): unpack it and put it on PYTHONPATH;
#   cifake.tar.xz  with SOURCE_ARCHIVE given, that CIFAKE archive recompressed with xz (~37 MB).
# bench/gpu.sh unpacks site.tar.xz itself.
#
# Usage:
#   bash bench/gpu_bundle.sh [SOURCE_ARCHIVE]
#   bash bench/gpu_bundle.sh ../shared/data/cifake.tar.gz
#   then, on the device (carry .whl): tar xJf .whl/cifake.tar.xz -C /tmp && bash bench/gpu.sh OUT /tmp/cifake 0
set -euo pipefail
# Imported by `experiments/stage.py train` and missing from the device image (2026-11-27).
packages="mlflow mlflow-skinny mlflow-tracing SQLAlchemy alembic Mako greenlet GitPython gitdb smmap
annotated-types pydantic pydantic_core typing-inspection fastapi starlette python-multipart cachetools
cffi pycparser cryptography databricks-sdk google-auth pyasn1 pyasn1-modules importlib_metadata
opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions sqlparse truststore"
pins=()
for package in $packages; do
    version=$(.venv/bin/python -m pip show "$package" | awk '/^Version:/ {print $2}')
    pins+=("$package==${version:?$package is not installed in .venv: run make install first}")
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" "${pins[@]}"
mkdir -p "$work/site" .whl
for wheel in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$work/site"
done
rm -rf "$work/site/mlflow/server/js/build"  # the web UI: 30 MB, and a training run never serves it
tar cf - -C "$work/site" . | xz -T0 -6 > .whl/site.tar.xz
if (( $# )); then
    zcat "$1" | xz -T0 -9 > .whl/cifake.tar.xz
fi
ls -l .whl
