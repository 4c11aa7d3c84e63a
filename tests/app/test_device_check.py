"""``benchmarks/device_check.py --small`` runs end to end on the CPU, as on a device machine:
without gguf, jaxtyping and highspy (hidden from the interpreter), every group of the table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HIDE = "import sys; sys.modules.update(gguf=None, jaxtyping=None, highspy=None)\n"


def test_device_check_small_runs_every_group(tmp_path):
    out = tmp_path / "device_check.json"
    args = ["--small", "--shapes", "smollm2", "1.5b", "--batch", "1", "--members", "2", "--budget-s", "1e9",
            "--out", str(out)]
    code = HIDE + (f"import runpy; sys.argv = ['device_check.py', *{args!r}]; "
                   f"runpy.run_path({str(ROOT / 'benchmarks' / 'device_check.py')!r}, run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAXENS_TYPECHECK="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert not report["info"]["partial"]
    assert any("gguf" in n for n in report["info"]["notes"]) and any("jaxtyping" in n for n in report["info"]["notes"])
    rows = {(row["group"], row["name"], row.get("members")): row for row in report["rows"]}
    assert {g for g, _, _ in rows} == {"single", "ensemble", "bottleneck", "lp"}
    assert "(skipped)" not in {name for _, name, _ in rows}
    for shape in ("smollm2", "1.5b"):
        row = rows["single", f"jaxens {shape}", 1]
        # the same random weights in jaxens and transformers: same logits, same greedy tokens
        assert row["max_abs_logit_diff"] < 1e-4 and row["greedy_agree"] == report["info"]["new_tokens"]
        assert row["ratio"] > 0 and math.isfinite(row["ratio"])
    for key in (("ensemble", "me", 2), ("bottleneck", "bottleneck-kl (hard all)", 2)):
        assert rows[key]["ratio"] > 0 and math.isfinite(rows[key]["ratio"])
    (lp,) = [row for (g, _, _), row in rows.items() if g == "lp"]
    assert lp["ratio"] > 0 and lp["rel_gap"] < 1e-2, lp
    # the printed table has every row
    assert r.stdout.count("\n| ") == len(report["rows"]) + 1
