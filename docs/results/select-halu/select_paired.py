"""Paired bootstrap (test rows resampled, 2000 times, seed 0): JSON adherence and label accuracy of each
selection cell minus each random cell of the same method, and minus the mean of the 3 random cells."""
import json, sqlite3, sys
from pathlib import Path
import numpy as np
from tell.metrics import HALU_SCHEMA, parse_lenient, gold_label

out = Path(sys.argv[1])
conn = sqlite3.connect(out / "sweep.sqlite"); conn.row_factory = sqlite3.Row
cells = {}
for r in conn.execute("SELECT key, config FROM cells WHERE status='done'"):
    cfg = json.loads(r["config"])
    gens = [json.loads(l) for l in open(out / "cells" / r["key"] / "generations.jsonl")]
    gens.sort(key=lambda g: g["id"])
    adher = np.array([parse_lenient(g["output"], HALU_SCHEMA) is not None for g in gens], float)
    label = np.array([(p := parse_lenient(g["output"], HALU_SCHEMA)) is not None and p["hallucination"] == gold_label(g["reference"]) for g in gens], float)
    cells[(cfg["compare"]["arms"], cfg["data"]["select"], cfg["select"]["seed"])] = (adher, label, [g["id"] for g in gens])
rng = np.random.default_rng(0)
n = len(next(iter(cells.values()))[0]); idx = rng.integers(0, n, (2000, n))
def ci(d): b = d[idx].mean(1); return f"{100*d.mean():+.1f} [{100*np.quantile(b,.025):+.1f}, {100*np.quantile(b,.975):+.1f}]"
for method in ("sft", "tell"):
    randoms = [cells[k] for k in sorted(cells) if k[0] == method and k[1] == "random"]
    for sel in ("kcenter", "kmeans"):
        k = (method, sel, 42)
        if k not in cells or len(randoms) < 3: continue
        a, l, ids = cells[k]
        assert all(r[2] == ids for r in randoms)
        ra = np.mean([r[0] for r in randoms], 0); rl = np.mean([r[1] for r in randoms], 0)
        per = ", ".join(ci(a - r[0]) for r in randoms)
        print(f"| {method} | {sel} | {ci(a - ra)} | {per} | {ci(l - rl)} |")
