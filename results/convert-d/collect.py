"""Copy the small results of helper D's runs into results/convert-d/ and write a summary table."""
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, "src")
from xmoe.convert.evaluate import format_table
out = Path("results/convert-d"); out.mkdir(parents=True, exist_ok=True)
rows = []
for d in sorted(Path("runs/convert").glob("d-*")):
    ev = d / "eval.json"
    if not ev.is_file():
        continue
    r = json.loads(ev.read_text())
    (out / f"{d.name}.json").write_text(json.dumps(r, indent=2) + "\n")
    m = r["manifest"]; c = m["config"]
    for row in r["rows"]:
        row = dict(row)
        row["run"] = d.name
        row["method"] = "+".join(k for k, on in [("relufy", c.get("relufy")), ("select", c.get("router_target") == "select"), ("refit", c.get("refit")), ("budget %g" % c["flop_budget"] if c.get("flop_budget") else "", bool(c.get("flop_budget"))), ("distill %d" % m["finetune"]["steps"] if "finetune" in m else "", "finetune" in m)] if on)
        rows.append(row)
cols = ("run", "method")
from xmoe._io import markdown_table
from xmoe.convert.evaluate import TABLE_COLUMNS, SPEED_COLUMNS
table = markdown_table(rows, (("run", "run", "{}"), ("method", "method", "{}")) + TABLE_COLUMNS[2:] + SPEED_COLUMNS)
(out / "summary.md").write_text("# helper D runs (xmoe convert / convert-eval, E = 32, coact)\n\n" + table)
print(table)
