#!/bin/sh
# Install the requirements and put Fashion-MNIST (the default dataset) into data/fashion_mnist/.
# Running it twice is harmless. Set PYTHON to choose the interpreter (default: python3).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

echo "== installing Python requirements and this project (editable: scripts run from the repository as typed)"
"$PY" -m pip install -q -r requirements.txt
"$PY" -m pip install -q --no-deps -e .

echo "== Fashion-MNIST into data/fashion_mnist/"
dest=data/fashion_mnist
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
have_all() { for f in $files; do [ -s "$1/$f" ] || return 1; done; }
deb_dir=/usr/share/datasets/fashion-mnist
mkdir -p "$dest"
if have_all "$dest"; then
  echo "already there"
else
  # 1. Debian's package, installed with apt where we may
  if ! have_all "$deb_dir" && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || true
  fi
  if have_all "$deb_dir"; then
    for f in $files; do cp "$deb_dir/$f" "$dest/"; done
    echo "copied from Debian's dataset-fashion-mnist"
  # 2. without root: download the .deb and unpack it with dpkg -x
  elif command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null 2>&1) && dpkg -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x" \
       && have_all "$tmp/x$deb_dir"; then
      for f in $files; do cp "$tmp/x$deb_dir/$f" "$dest/"; done
      echo "unpacked from the downloaded dataset-fashion-mnist package"
    fi
    rm -rf "$tmp"
  fi
fi
# 3. last resort: torchvision's download (inside load_dataset); this also builds the uint8 cache
"$PY" -c "
import sys
from utils.errors import UserError
from utils.data import load_dataset
try:
    d = load_dataset('fashion_mnist', 'data')
except UserError as e:
    sys.exit(f'error: {e}')
print(f'fashion_mnist ready: {len(d.y_train)} training and {len(d.y_test)} test images')
"
