# Evidence only, run after every tune had ended: the test scores of the search trials of three fixed settings at
# their defaults (CCAR-LA, cRT, CB-RS), at each repetition's own seed, to compare the winner with. Not part of ccar tune.
"""Evidence only (after each tune ended): test scores of two fixed reference settings' search trials, at the same
seed, to compare the tune's winner with: CCAR-LA at its defaults (the default job's method) and cRT at its defaults."""
import csv, json, sys
from pathlib import Path
from ccar.engine.evaluate_run import evaluate_run
root = Path("runs/tune-evidence")
DEFAULTS = {"CCAR-LA": "lr x1, loss.omega 0.75, loss.tau 1.0", "cRT": "lr x1, stage2.lr x0.5", "CB-RS": "lr x1"}
out = {}
for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith("top4")):
    rows = list(csv.DictReader(open(d / "trials.csv")))
    res = {}
    for m, lab in DEFAULTS.items():
        r = next((r for r in rows if r["method"] == m and r["knobs"] == lab and r["status"] == "complete"), None)
        if r is None:
            res[m] = None; continue
        res[m] = evaluate_run(d / r["model_dir"])["metrics"]["balanced"]
    t = json.loads((d / "tune.json").read_text())
    out[d.name] = {"winner": t["winner"]["method"], "winner_test_balanced": t["test"]["balanced"], "defaults_test_balanced": res}
    print(d.name, out[d.name], flush=True)
Path("/tmp/reference_eval.json").write_text(json.dumps(out, indent=1))
