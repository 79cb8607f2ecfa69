"""Headline table of the select-halu sweep: one row per cell, with the chosen rows' gold labels."""
import json, sys, sqlite3
from pathlib import Path
from collections import Counter

out = Path(sys.argv[1])
pool = [json.loads(l) for l in open(sys.argv[2])]
conn = sqlite3.connect(out / "sweep.sqlite"); conn.row_factory = sqlite3.Row
rows = list(conn.execute("SELECT cells.* FROM plan JOIN cells USING (key) ORDER BY plan.position"))
def pct(x): return "—" if x is None else f"{100*x:.1f}%"
def ci(m, k):
    c = m.get("ci95", {}).get(k)
    return f" [{100*c[0]:.1f}, {100*c[1]:.1f}]" if c else ""
print("| method | selection | seed | chosen rows: yes/no | chosen tokens | coverage radius | JSON adherence [95%] | label accuracy [95%] | label F1 | majority | predicted labels | distinct | anchor copy | target copy | general loss | wall |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["status"] != "done":
        print(f"| {r['label']} | not done ({r['status']}) |"); continue
    d = out / "cells" / r["key"]
    m = json.load(open(d / "metrics.json"))
    cfg = json.loads(r["config"])
    s = json.load(open(d / "selection.json"))
    labels = Counter(pool[i]["hallucination"] for i in [l - 1 for l in s["chosen_lines"]])
    res = json.loads(r["result"]) if r["result"] else {}
    gl = res.get("metrics", {}).get("general_loss")
    counts = " / ".join(f"{k} {v}" for k, v in m.get("predicted_label_counts", {}).items() if v)
    below = " **< majority**" if m["label_accuracy"] < m["majority_baseline"] else ""
    print(f"| {cfg['compare']['arms']} | {s['method']} | {s['seed']} | {labels.get('yes',0)}/{labels.get('no',0)} | {s['chosen_tokens']:,} | {s['coverage_radius']:.3f} | "
          f"{pct(m['json_adherence_lenient'])}{ci(m,'json_adherence_lenient')} | {pct(m['label_accuracy'])}{ci(m,'label_accuracy')}{below} | "
          f"{m['label_f1']:.3f} | {pct(m['majority_baseline'])} | {counts} | {pct(m.get('distinct_output_fraction'))} | "
          f"{pct(m.get('anchor_copy_rate'))} | {pct(m.get('target_copy_rate'))} | {gl if gl is None else round(gl,4)} | {r['wall_s']:.0f} s |")
