#!/bin/sh
# Make Fashion-MNIST available without a download where possible: Debian's dataset-fashion-mnist package.
# Elsewhere ccar downloads the files on first use (checksum-verified) into ~/.cache/ccar.
set -e
dir=/usr/share/datasets/fashion-mnist
if [ -n "${CCAR_FASHION_MNIST:-}" ] || [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's dataset-fashion-mnist (IDX files in $dir)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST not found in $dir; ccar will download it on first use (or set CCAR_FASHION_MNIST=FOLDER)"
fi
