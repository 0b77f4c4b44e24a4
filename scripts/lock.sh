#!/usr/bin/env bash
# Regenerate requirements.lock: every run-time dependency of the package (pyproject.toml's
# [project].dependencies and the `kube` extra, which the image needs, transitively) pinned to
# one version with the sha256 of every file PyPI publishes for it, plus the build backend
# (setuptools) the Containerfile builds the package with. The Containerfile installs it with
# `pip install --require-hashes`.
#
# Usage: scripts/lock.sh [--upgrade | --upgrade-package NAME ...]   (arguments go to pip-compile)
#
# pip-tools runs in a throwaway virtualenv: it is not a dependency of the project. Environment
# markers are evaluated for the Python that runs this script, so run it with the image's
# Python minor version (python:3.11 in the Containerfile) on Linux, for example:
#   PYTHON=python3.11 scripts/lock.sh
#   podman run --rm -v "$PWD:/src:Z" -w /src python:3.11-slim bash scripts/lock.sh
# Without --upgrade, versions already in the lock are kept (pip-compile reuses them).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PIP_TOOLS_VERSION=7.6.2
venv=$(mktemp -d "${TMPDIR:-/tmp}/gfb-lock.XXXXXX")
trap 'rm -rf "$venv"' EXIT

"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "pip-tools==$PIP_TOOLS_VERSION"
# --all-build-deps --allow-unsafe: setuptools (the build backend) is pinned and hashed too, so
# the image builds the package offline from the lock (--no-build-isolation).
# --strip-extras: a constraint file pip accepts with --require-hashes.
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$venv/bin/pip-compile" \
  --quiet --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
  --extra kube --output-file requirements.lock "$@" pyproject.toml
echo "lock: requirements.lock written with $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
