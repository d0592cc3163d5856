#!/bin/sh
# (the runs of docs/tune.md; run from the repository root after `make keel`; outputs in runs/tune-evidence/)
# The same tunes, resumed in a copy of their folder with a wider confirmation: top=4 methods over seeds=5
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"; cd "$ROOT/runs/tune-evidence"
for t in abalone yeast page-blocks ecoli; do for s in 0 10 20; do
  rm -rf keel-$t-s$s-top4 && cp -r keel-$t-s$s keel-$t-s$s-top4 && rm -rf keel-$t-s$s-top4/winner
  (cd "$ROOT" && /usr/bin/time -f "wall %e s" nice -n 10 .venv/bin/ccar tune dataset=csv data_root=data/keel/$t epochs=40 \
      model.name=mlp 'model.hidden=[64]' optim.lr=0.05 optim.batch_size=64 optim.warmup_epochs=1 optim.schedule=cosine \
      optim.weight_decay=5e-4 amp=off threads=1 seed=$s budget=10m seeds=5 top=4 out=runs/tune-evidence/keel-$t-s$s-top4) \
      > keel-$t-s$s-top4.log 2>&1
done; done
