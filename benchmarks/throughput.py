"""Training throughput by method and batch size: samples/s, step time P50/P90 and where a step's
time goes, one figure for all.

A sweep of benchmarks/train_throughput.py's measurement (`measure`: 2 spawned CPU gloo ranks, or
those of a `--hardware` profile such as h100x1 on NCCL; the real train pipeline's loop,
then instrumented steps split into data, embedding lookup, GSU, dense forward, dense backward,
sparse backward and optimizer; see its docstring) over
--methods x --stages (model.gsu_stage: loader and model side by side) x --batch-sizes, on one
synthetic set (made once, shared with train_throughput.py).
P50/P90 are of the pipelined end-to-end step (the slowest rank's, as collectives end a step on
all ranks together); samples/s is over the whole timed window.

Prints a table, saves benchmarks/results/throughput.json (every run's full result under "runs")
and throughput.png: samples/s bars by method x batch size (P50/P90 step time written on each),
and the split of the instrumented step as stacked bars (share of the step; its length in ms on
top), and evaluation samples/s. Each configuration spawns its own ranks; on a 2-core machine the
default sweep (16 runs) takes about 15-20 minutes, dominated by gsu_stage model at batch 1000.

    python benchmarks/throughput.py [--methods muse,sim_soft,sim_hard,din] [--stages loader,model] [--batch-sizes 250,1000]
        [--repeats 1] [--steps 8] [--warmup 5] [--split-steps 4] [--users 4000] [--set model.scl_storage=int8_replicated]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import plotting
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from muse_rec.config import load_config
from muse_rec.errors import MuseRecError
from train_throughput import METHODS, RESULTS, ROOT, STAGES, add_run_arguments, measure, save_profiles

SHORT_STAGES = {"data": "data", "lookup": "embedding lookup", "gsu": "GSU", "dense_forward": "dense forward",
                "dense_backward": "dense backward", "sparse_backward": "sparse backward + DDP wait",
                "optimizer": "optimizer (dense AdamW)", "sync": "barrier waits"}
COLUMNS = {"data": "data", "lookup": "lookup", "gsu": "GSU", "dense_forward": "dense fwd", "dense_backward": "dense bwd",
           "sparse_backward": "sparse bwd", "optimizer": "optimizer", "sync": "sync"}


def summary(results: list[dict]) -> dict:
    """The row of one configuration in the sweep's table: rates, step percentiles, the mean split over
    ranks and evaluation of its median run by samples/s (the lower middle one of an even count),
    with every run's samples/s: run to run, a 2-core machine varies by about 15 %."""
    result = sorted(results, key=lambda r: r["end_to_end"]["samples_per_second"])[(len(results) - 1) // 2]
    split = {key: round(statistics.mean(result["split_ms_per_rank"][key]), 1) for key, _ in STAGES}
    e2e = result["end_to_end"]
    setup = result["setup"]
    return {"method": setup["method"], "gsu_stage": setup["gsu_stage"], "name": f"{setup['method']} ({setup['gsu_stage']})",
            "batch_size": setup["batch_size_per_rank"], "world_size": setup["world_size"],
            "device_type": setup.get("device_type", "cpu"),
            "samples_per_second": e2e["samples_per_second"], "step_ms_p50": e2e["step_ms_p50"], "step_ms_p90": e2e["step_ms_p90"],
            "split_ms": split, "split_step_ms": result["split_step_ms"], "caveats": result["caveats"],
            "eval_samples_per_second": result["evaluation"]["samples_per_second"],
            "samples_per_second_runs": [r["end_to_end"]["samples_per_second"] for r in results]}


def ranks_name(rows: list[dict]) -> str:
    """'2 CPU ranks', '1 CUDA rank' (of the sweep's first run: all share the options)."""
    world, kind = (rows[0]["world_size"], rows[0]["device_type"].upper()) if rows else (0, "CPU")
    return f"{world} {kind} rank{'s' if world != 1 else ''}"


def print_table(rows: list[dict]) -> None:
    stage_head = "".join(f"{COLUMNS[k]:>11}" for k, _ in STAGES)
    repeated = any(len(r["samples_per_second_runs"]) > 1 for r in rows)
    print(f"\n{ranks_name(rows)}; split: mean ms per instrumented step over the ranks"
          + ("; samples/s and the rest: the median run, 'runs': min-max of every run's samples/s" if repeated else ""))
    print(f"{'method (GSU stage)':<20}{'batch':>6}{'samples/s':>11}" + (f"{'runs':>16}" if repeated else "")
          + f"{'P50 ms':>9}{'P90 ms':>9}{stage_head}{'split sum':>11}{'eval/s':>9}")
    for r in rows:
        spread = f"{min(r['samples_per_second_runs']):,}-{max(r['samples_per_second_runs']):,}"
        print(f"{r['name']:<20}{r['batch_size']:>6}{r['samples_per_second']:>11,}" + (f"{spread:>16}" if repeated else "")
              + f"{r['step_ms_p50']:>9,.0f}{r['step_ms_p90']:>9,.0f}"
              + "".join(f"{r['split_ms'][k]:>11,.1f}" for k, _ in STAGES) + f"{r['split_step_ms']:>11,.0f}{r['eval_samples_per_second']:>9,}")
    print("(data: wait for the next batch; lookup: the 3 embedding collections incl. input/output dist; sparse bwd: gradient\n"
          " all-to-all + fused table update + DDP wait; optimizer: zero_grad + dense AdamW; sync: barrier waits between stages)")


def draw(rows: list[dict], path: Path) -> Path:
    """Left: samples/s, a group of bars per method, one bar per batch size. Right: each run's
    instrumented step split into stages, as shares of the step."""
    methods = list(dict.fromkeys(r["name"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    fig, (rate_ax, split_ax) = plotting.figure(1, 2, max(6.0, 0.9 * len(rows) + 3), 5.0)
    width = 0.8 / len(batches)
    for index, batch in enumerate(batches):
        runs = [(methods.index(r["name"]), r) for r in rows if r["batch_size"] == batch]
        x = [m + (index - (len(batches) - 1) / 2) * width for m, _ in runs]
        bars = rate_ax.bar(x, [r["samples_per_second"] for _, r in runs], width * 0.9, color=plotting.COLORS[index], label=f"batch {batch} per rank")
        for bar, (_, r) in zip(bars, runs):
            rate_ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['samples_per_second']:,}\nP50 {r['step_ms_p50']:,.0f} ms\n"
                         f"P90 {r['step_ms_p90']:,.0f} ms", ha="center", va="bottom", fontsize=6)
    rate_ax.set_xticks(range(len(methods)))
    rate_ax.set_xticklabels(methods)
    rate_ax.set_yscale("log")
    rate_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    rate_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    rate_ax.yaxis.set_minor_formatter(NullFormatter())
    rate_ax.margins(y=0.25)
    rate_ax.set_ylabel("training samples/s (all ranks, log scale)")
    rate_ax.set_title("throughput (pipelined step; P50/P90 of the step time)", fontsize=9)
    rate_ax.legend(fontsize=7)

    shares = {SHORT_STAGES[k]: [100 * r["split_ms"][k] / max(sum(r["split_ms"].values()), 1e-9) for r in rows] for k, _ in STAGES}
    tops = plotting.stacked_bars(split_ax, list(range(len(rows))), shares, 0.7)
    for x, (top, r) in enumerate(zip(tops, rows)):
        split_ax.text(x, top, f"{r['split_step_ms']:,.0f} ms", ha="center", va="bottom", fontsize=7)
    split_ax.set_xticks(range(len(rows)))
    split_ax.set_xticklabels([f"{r['name']}\n{r['batch_size']}" for r in rows], fontsize=8)
    split_ax.set_ylim(0, 112)
    split_ax.set_ylabel("% of the instrumented step")
    split_ax.set_title("where a step goes (instrumented, non-pipelined; step length on top)", fontsize=9)
    split_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return plotting.save(fig, path, f"Training throughput on {ranks_name(rows)}" if rows else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated methods (default {','.join(METHODS)})")
    parser.add_argument("--batch-sizes", default="250,1000", help="comma-separated samples per batch on each rank (default 250,1000)")
    parser.add_argument("--stages", default="loader,model", help="comma-separated model.gsu_stage values, side by side (default loader,model)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each configuration, interleaved (every configuration once, then again), so that the "
                             "machine's drift hits all alike; the table shows the median run and the range (default 1)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: expected at least 1")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} unknown (choose from {', '.join(METHODS)})")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")

    stages = args.stages.split(",")
    workers = [] if args.workers is None else [f"data.num_workers={args.workers}"]  # as train_throughput applies --workers
    for method, stage in itertools.product(methods, stages):  # a wrong --set or stage fails now, not after minutes of runs
        overrides = [*args.set, f"model.gsu_stage={stage}", *workers]
        try:
            load_config(ROOT / "configs" / f"{method}.yaml", overrides)
        except MuseRecError as e:
            parser.error(f"configs/{method}.yaml with {' '.join(overrides)}: {e}")

    started = time.perf_counter()
    configurations = list(itertools.product(methods, stages, batch_sizes))
    results: dict[tuple, list[dict]] = {configuration: [] for configuration in configurations}
    for repeat, (method, stage, batch) in itertools.product(range(args.repeats), configurations):
        label = " ".join([method, f"gsu_stage {stage}", f"batch {batch}", *([args.hardware] if args.hardware else []),
                          *([f"map-rows {args.map_rows}"] if args.map_rows else []), *args.set,
                          *(["default-malloc"] if args.default_malloc else [])])
        print(f"-- {label}" + (f" (run {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""), flush=True)
        try:
            result = measure(method, batch, argparse.Namespace(**{**vars(args), "set": [*args.set, f"model.gsu_stage={stage}"]}), label)
        except MuseRecError as e:  # a profile this machine cannot run, a plan that does not fit
            parser.error(str(e))
        for path in save_profiles(result, RESULTS / "throughput.json"):
            print(f"   profile: {path}")
        results[method, stage, batch].append(result)
        e2e = result["end_to_end"]
        print(f"   {e2e['samples_per_second']:,} samples/s, step P50 {e2e['step_ms_p50']:,.0f} ms, "
              f"P90 {e2e['step_ms_p90']:,.0f} ms ({result['ranks_wall_s']:.0f} s)", flush=True)
    runs = [result for configuration in configurations for result in results[configuration]]
    rows = [summary(results[configuration]) for configuration in configurations]
    print_table(rows)
    for r in rows:
        for caveat in r["caveats"][:-1]:  # the last one (synthetic table sizes) is the same for all
            print(f"caveat ({r['name']}, batch {r['batch_size']}): {caveat}")
    if runs:
        print(f"caveat: {runs[0]['caveats'][-1]}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "throughput.json"
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(time.perf_counter() - started, 1),
                               "methods": methods, "gsu_stages": stages, "batch_sizes": batch_sizes, "overrides": args.set,
                               "repeats": args.repeats,
                               "table": rows, "runs": runs}, indent=2) + "\n")
    png = draw(rows, RESULTS / "throughput.png")
    print(f"saved {out} and {png}")


if __name__ == "__main__":
    main()
