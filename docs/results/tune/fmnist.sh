#!/bin/sh
# (the runs of docs/tune.md; run from the repository root after `make keel`; outputs in runs/tune-evidence/)
# Fashion-MNIST-LT IF 100 in study 1's setting (width-8 CNN, 12 epochs, float32), 3 repetitions of ccar tune, 10 min each
cd "$(dirname "$0")/../../.."  # the repository root
for seed in 0 10 20; do
  /usr/bin/time -f "wall %e s" nice -n 10 .venv/bin/ccar tune --config configs/default.yaml model.width=8 epochs=12 amp=off \
      seed=$seed budget=10m out=runs/tune-evidence/fmnist-s$seed > runs/tune-evidence/fmnist-s$seed.log 2>&1
done
