#!/usr/bin/env bash
# Strict documentation build: every Sphinx warning is an error (used by CI).
# Usage: bash docs/build.sh [extra sphinx-build options]     (needs `pip install -e ".[docs]"`)
set -euo pipefail

DOCS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rm -rf "$DOCS/_build/html" "$DOCS/generated"   # stale autosummary stubs would hide removed objects
# Python-level deprecation notices of the Sphinx extensions (not Sphinx warnings) would flood the CI log
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
exec sphinx-build -W --keep-going -b html "$@" "$DOCS" "$DOCS/_build/html"
