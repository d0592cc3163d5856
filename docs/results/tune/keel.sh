#!/bin/sh
# (the runs of docs/tune.md; run from the repository root after `make keel`; outputs in runs/tune-evidence/)
# Study 2's tables and MLP (configs/sweeps/keel-natural-lt.yaml's base), 3 repetitions of ccar tune each, 10 min each,
# two at a time with one thread each
cd "$(dirname "$0")/../../.."  # the repository root
one() {  # table seed
  /usr/bin/time -f "wall %e s" nice -n 10 .venv/bin/ccar tune dataset=csv data_root=data/keel/$1 epochs=40 \
      model.name=mlp 'model.hidden=[64]' optim.lr=0.05 optim.batch_size=64 optim.warmup_epochs=1 optim.schedule=cosine \
      optim.weight_decay=5e-4 amp=off threads=1 seed=$2 budget=10m out=runs/tune-evidence/keel-$1-s$2 \
      > runs/tune-evidence/keel-$1-s$2.log 2>&1
}
for pair in "abalone 0|yeast 0" "page-blocks 0|ecoli 0" "abalone 10|yeast 10" "page-blocks 10|ecoli 10" \
            "abalone 20|yeast 20" "page-blocks 20|ecoli 20"; do
  a=$(echo "$pair" | cut -d'|' -f1); b=$(echo "$pair" | cut -d'|' -f2)
  one $a & one $b & wait
done
