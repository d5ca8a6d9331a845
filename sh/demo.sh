#!/bin/sh
# The demo: a BadNets attack on Fashion-MNIST, then every registered defense on its record
# (`python sweep/run.py --list --kind defense` shows them).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" attack/badnet.py --save_folder_name badnet_demo
"$PY" sweep/run.py --list --kind defense --commands | while read -r script args; do
  # shellcheck disable=SC2086  # the fixed arguments are words
  "$PY" $script $args --result_file badnet_demo
done
