#!/bin/sh
# The test suite (CPU, a few minutes). Extra arguments go to pytest, e.g. sh sh/test.sh -k badnet
set -e
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m pytest tests "$@"
