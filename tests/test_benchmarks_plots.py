"""benchmarks/plans.py as a user runs it (its own interpreter: the benchmarks are scripts, not a
package): offline plans for two profiles, the JSON's entries and a real PNG."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "plans.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plans_script_writes_per_rank_memory_costs_and_a_figure(tmp_path):
    out = tmp_path / "results"
    # run where no data/ folder is: table sizes are the released TAOBAO-MM ones
    done = subprocess.run([sys.executable, str(SCRIPT), "--profiles", "cpu-2core,h100x1", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"saved {out / 'plans.json'} and {out / 'plans.png'}" in done.stdout

    plans = {(e["profile"], e["vocab"]): e for e in json.loads((out / "plans.json").read_text())["plans"]}
    assert set(plans) == {(p, v) for p in ("cpu-2core", "h100x1") for v in ("p90", "full")}
    fits = plans["h100x1", "full"]
    assert fits["fits"] and fits["memory"] == "device" and len(fits["ranks"]) == 1
    rank = fits["ranks"][0]
    assert {"weights", "optimizer", "buffers", "replicated", "used", "cap", "cost_ms"} <= rank.keys()
    assert 0 < rank["used"] <= rank["cap"] and rank["cost_ms"]["total"] > 0 and fits["step_cost_ms"] == rank["cost_ms"]["total"]
    assert "released TAOBAO-MM sizes" in fits["table_sizes_from"]
    assert len(plans["cpu-2core", "p90"]["ranks"]) == 2 and plans["cpu-2core", "p90"]["memory"] == "host"
    too_big = plans["cpu-2core", "full"]  # 243 M items do not fit two 9 GiB CPU ranks
    assert not too_big["fits"] and "ranks" not in too_big and too_big["needs_gib"] > too_big["available_gib"] > 0

    png = (out / "plans.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
