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
    # gsu_stage model: with the fp16 SCL table the full vocabulary does not fit cpu-2core (the case to check)
    done = subprocess.run([sys.executable, str(SCRIPT), "--profiles", "cpu-2core,h100x1", "--out", str(out), "--set", "model.gsu_stage=model"],
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


TRAIN_THROUGHPUT = SCRIPT.with_name("train_throughput.py")


def test_train_throughput_trains_with_the_profiles_offline_plan_and_sets_memory_against_it(tmp_path):
    """The path a GPU run takes (`--hardware h100x1`), on the CPU profile: the plan made offline for
    the profile, the ranks trained with it, measured peak against the planner's estimate, in the JSON.
    sim_soft: its GSU runs in the model, so the split also times the scoring over whole sequences."""
    out = tmp_path / "tt.json"
    done = subprocess.run(
        [sys.executable, str(TRAIN_THROUGHPUT), "--method", "sim_soft", "--hardware", "cpu-2core", "--batch-size", "16", "--steps", "2", "--warmup", "1",
         "--split-steps", "1", "--users", "80", "--data", str(tmp_path / "data"), "--out", str(out),
         "--set", "data.long_seq_len=100", "model.keep_top=20"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "against the planner's estimate of this plan" in done.stdout and "verdict:" not in done.stdout  # the target is for CUDA runs
    (run,) = json.loads(out.read_text())["runs"].values()
    assert (run["setup"]["device_type"], run["setup"]["world_size"], run["setup"]["hardware"]) == ("cpu", 2, "cpu-2core")
    assert run["target"] is None and run["end_to_end"]["samples_per_second"] > 0 and len(run["end_to_end"]["step_ms"]) == 2
    ranks = run["memory"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert 0 < r["estimate_bytes"]["planned_memory"] <= r["usable_bytes"] < r["cap_bytes"]
        assert r["measured_bytes"]["peak_pipelined"] > 0 and r["ratio"] > 0
    assert set(run["split_ms_per_rank"]) >= {"data", "lookup", "gsu", "dense_forward", "dense_backward", "optimizer"}
    assert run["setup"]["method"] == "sim_soft" and all(ms >= 0 for ms in run["anatomy_ms_per_rank"]["gsu_scores"])
    # gsu_stage loader: the host maps the int8 SCL values (row 0, 'missing', is not stored), once, outside every rank's estimate
    assert run["memory"]["host_mapped_bytes"] == (run["setup"]["table_rows"]["scl"] - 1) * 128 > 0
    assert "MiB mapped" in done.stdout and 0 < run["loader_cores_per_rank"]


def test_train_throughput_refuses_a_gpu_profile_without_the_gpus(tmp_path):
    done = subprocess.run([sys.executable, str(TRAIN_THROUGHPUT), "--hardware", "h100x1", "--users", "20", "--data", str(tmp_path / "data"),
                           "--out", str(tmp_path / "tt.json")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "profile h100x1 needs 1 GPU(s), this machine has 0" in done.stderr


QUALITY = SCRIPT.with_name("quality.py")


def quality_report(gaucs: dict[str, float], oracle: float, se: float = 0.003) -> dict:
    """The parts of a quality.json that the separation check and the figure read."""
    results = {m: {"gauc": g, "gauc_bootstrap_se": se} for m, g in gaucs.items()}
    return {"results": results, "oracle": {"gauc": oracle, "gauc_bootstrap_se": se},
            "setup": {"users": 6000, "test_users": 4000, "nproc": 2, "synth_config": "configs/synthetic_separating.yaml"}}


def test_quality_separation_check_needs_the_order_the_gaps_and_room_below_the_oracle():
    sys.path.insert(0, str(QUALITY.parent))
    try:
        import quality
    finally:
        sys.path.remove(str(QUALITY.parent))
    separated = quality_report({"muse": 0.75, "sim_soft": 0.72, "sim_hard": 0.70, "din": 0.66}, oracle=0.77)
    check = quality.separation(separated["results"], separated["oracle"])
    assert check["ok"] and [round(g["gap_in_se"], 3) for g in check["gaps"]] == [10.0, 6.667, 13.333]
    assert "MET" in quality.separation_text(check) and "NOT MET" not in quality.separation_text(check)
    ceiling = quality_report({"muse": 0.765, "sim_soft": 0.72, "sim_hard": 0.70, "din": 0.66}, oracle=0.77)
    assert not quality.separation(ceiling["results"], ceiling["oracle"])["ok"]  # MUSE within 0.01 of the oracle
    tied = quality_report({"muse": 0.75, "sim_soft": 0.70, "sim_hard": 0.695, "din": 0.66}, oracle=0.77)
    check = quality.separation(tied["results"], tied["oracle"])
    assert not check["ok"] and [g["ok"] for g in check["gaps"]] == [True, False, True]  # 0.005 < 2 SE
    partial = quality_report({"muse": 0.75, "din": 0.66}, oracle=0.77)
    assert quality.separation(partial["results"], partial["oracle"]) is None


def test_quality_replot_draws_the_figure_beside_the_json(tmp_path):
    report = quality_report({"muse": 0.75, "sim_soft": 0.72, "sim_hard": 0.70, "din": 0.66}, oracle=0.77)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(report))
    done = subprocess.run([sys.executable, str(QUALITY), "--replot", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    png = (tmp_path / "quality.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
