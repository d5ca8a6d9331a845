#!/bin/sh
# The demo: a BadNets attack on Fashion-MNIST, then every defense on its record.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" attack/badnet.py --save_folder_name badnet_demo
for d in defense/*.py; do
  case "$d" in */__init__.py) continue;; esac
  name=$(basename "$d" .py)
  [ "$name" = ft ] && continue  # fst.py runs the same code; ft.py needs --ft_mode
  "$PY" "$d" --result_file badnet_demo
done
