"""Measured peak memory per rank of a short real training run, against the TorchRec planner's
estimate for exactly that run.

The plan is made offline first (`plan_offline`, the same call as `muse-rec plan`) for the run's
config, hardware profile, batch size and table sizes (the synthetic set's feature maps), saved
with `save_plan`, and the ranks train with `sharding.plan=<that file>`: the estimate and the
measurement are of the same plan. The ranks are spawned here and set up as `muse-rec train` sets
them up (`init_distributed`: gloo and keep_freed_memory on CPU, NCCL on CUDA; `build_model`), then
run `--steps` steps of the real train pipeline (`muse_rec.train.pipeline.train_pipeline`) on the real DataLoader.

Per rank: the planner's weights, optimizer state, I/O buffers and replicated SCL table (their sum
is its estimate), and measured: resident memory (VmRSS) after the imports and the process group
(baseline: Python, torch, torchrec), after loading the feature maps, after building the sharded
model, and the peak (VmHWM, the kernel's high-water mark: what the planner's host-memory cap must
hold on CPU); on CUDA, torch.cuda.max_memory_allocated against the device-memory estimate. The
ratio is (peak - baseline) / estimate. Loader workers are processes of their own (their largest
peak RSS is reported apart; they share the rank's pages copy-on-write).

Prints a table, saves benchmarks/results/memory.json (one entry per label, so runs of several
methods sit side by side) and memory.png (the run just made; per rank: the estimate's stacked
parts beside the measured baseline and peak).

The synthetic tables are small (about 40k item rows), so the estimate is dominated by the I/O
buffers; `--map-rows 2000000` pads the item and SCL maps (as benchmarks/loader.py does) so the
tables weigh what 2 M rows weigh.

    python benchmarks/memory.py [--method muse] [--hardware cpu-2core] [--batch-size 1000] [--steps 6]
        [--users 2000] [--map-rows 0] [--set model.scl_storage=int8_replicated]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

import plotting
from muse_rec.config import Config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.planning import load_config_with_profile, plan_offline, save_plan, table_rows
from muse_rec.distributed.sharding import DENSE_MULTIPLIER
from muse_rec.errors import MuseRecError
from muse_rec.batch import batch_layout
from train_throughput import ESTIMATE, METHODS, batches_forever, plan_summary, prepare_data, save_run, status_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def worker(rank: int, world: int, config: Config, port: int, out_dir: str, opts: dict) -> None:
    """One rank: the setup of `muse-rec train` (torchrun's environment), memory read at each stage."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts["threads"])
    from muse_rec.train.loop import build_model, init_distributed, shutdown_distributed
    from muse_rec.train.pipeline import train_pipeline

    runtime = init_distributed()
    cuda = runtime.device.type == "cuda"
    rss = {"baseline": status_bytes("VmRSS")}
    maps = FeatureMaps.load(DatasetLayout(config.data.root), config.data.vocab, strict=config.data.strict)
    rss["after_maps"] = status_bytes("VmRSS")
    start = time.perf_counter()
    sharded = build_model(config, maps, runtime)
    build_s = time.perf_counter() - start
    rss["after_build"] = status_bytes("VmRSS")
    device = {"after_build": torch.cuda.memory_allocated(runtime.device)} if cuda else {}

    restarts = [0]
    dataset = ShardDataset(config.data, "train", rank, world, maps, layout=batch_layout(config.model))
    batches = batches_forever(dataset, config.data.num_workers, restarts, pin_memory=cuda)
    pipeline = train_pipeline(sharded.model, sharded.optimizer, runtime.device, config.model)
    sharded.model.train()
    losses = []
    start = time.perf_counter()
    for _ in range(opts["steps"]):
        losses.append(round(float(pipeline.progress(batches)[0]), 5))
    train_s = time.perf_counter() - start
    rss["after_steps"] = status_bytes("VmRSS")
    rss["peak"] = status_bytes("VmHWM")
    if cuda:
        device["peak"] = torch.cuda.max_memory_allocated(runtime.device)
    pipeline.detach()
    del pipeline, batches  # the DataLoader shuts its workers down and reaps them: their peak is now in RUSAGE_CHILDREN
    result = {"rank": rank, "pid": os.getpid(), "rss": rss, "device": device, "losses": losses, "build_s": round(build_s, 2),
              "train_s": round(train_s, 2), "loader_restarts": restarts[0],
              "loader_worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    if rank == 0:
        result["plan"] = plan_summary(sharded.plan)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace) -> dict:
    data = prepare_data(args.data, args.users, args.map_rows)
    overrides = [f"data.root={data}", f"data.batch_size={args.batch_size}", *args.set]
    config = load_config_with_profile(ROOT / "configs" / f"{args.method}.yaml", args.hardware, overrides)
    hardware = config.hardware
    if hardware.device_type == "cuda" and torch.cuda.device_count() < hardware.world_size:
        raise MuseRecError(f"profile {args.hardware} needs {hardware.world_size} GPU(s), this machine has {torch.cuda.device_count()}")
    rows, source = table_rows(config.data.root, config.data.vocab)
    plan, estimate = plan_offline(config, hardware, config.data.vocab)
    world = hardware.world_size
    batches = len(ShardDataset(config.data, "train", 0, world, FeatureMaps.load(DatasetLayout(data), config.data.vocab)))
    if batches < args.steps + 2:
        print(f"note: {batches} batches per rank for {args.steps} steps: the loader starts over (more --users avoids it)", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        plan_path = Path(tmp) / "plan.json"
        save_plan(plan_path, plan, hardware)
        config.sharding.plan = str(plan_path)
        opts = {"steps": args.steps, "threads": args.threads}
        started = time.perf_counter()
        mp.spawn(worker, args=(world, config, free_port(), tmp, opts), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        wall = time.perf_counter() - started

    cuda = hardware.device_type == "cuda"
    per_rank = []
    for m, r in zip(estimate, ranks):
        parts = {k: getattr(m, k) for k in ESTIMATE}
        total = sum(parts.values())
        measured = dict(r["rss"])
        if cuda:
            measured |= {"device_after_build": r["device"]["after_build"], "device_peak": r["device"]["peak"]}
        grown = measured["device_peak"] if cuda else measured["peak"] - measured["baseline"]
        per_rank.append({
            "rank": m.rank, "estimate_bytes": {**parts, "total": total}, "cap_bytes": m.hbm_cap if cuda else m.ddr_cap,
            "measured_bytes": measured, "loader_worker_peak_rss_bytes": r["loader_worker_peak_rss"],
            "ratio": round(grown / total, 3) if total else None,
            "ratio_note": "device peak / estimate" if cuda else "(peak RSS - baseline RSS) / estimate",
            "build_s": r["build_s"], "train_s": r["train_s"], "loader_restarts": r["loader_restarts"],
        })
    label = args.label or " ".join([args.method, f"batch {args.batch_size}", args.hardware,
                                    *([f"map-rows {args.map_rows}"] if args.map_rows else []), *args.set])
    return {
        "label": label,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "setup": {"method": args.method, "hardware": args.hardware, "device_type": hardware.device_type, "world_size": world,
                  "batch_size_per_rank": config.data.batch_size, "long_seq_len": config.data.long_seq_len, "steps": args.steps,
                  "loader_workers_per_rank": config.data.num_workers, "threads_per_rank": args.threads, "overrides": args.set,
                  "scl_storage": config.model.scl_storage, "vocab": config.data.vocab, "train_users": args.users,
                  "map_rows": args.map_rows, "table_rows": rows, "table_sizes_from": source, "plan": ranks[0]["plan"],
                  "dense_reservation_note": f"the planner also reserves {DENSE_MULTIPLIER} x the dense parameters' bytes and "
                                            "15 % of each rank's cap outside these estimates"},
        "measured": "device memory (torch.cuda.max_memory_allocated)" if cuda else "host memory (VmRSS, VmHWM of each rank process)",
        "ranks": per_rank,
        "losses_rank0": ranks[0]["losses"],
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
    }


def report(result: dict) -> None:
    setup = result["setup"]
    mib = 1 << 20
    print(f"{result['label']}: {setup['world_size']} x {setup['device_type']} ranks, batch {setup['batch_size_per_rank']}, "
          f"{setup['steps']} steps; tables from {setup['table_sizes_from']}; measured: {result['measured']}")
    cuda = setup["device_type"] == "cuda"
    head = ["weights", "optimizer", "I/O buffers", "replicated", "estimate", "baseline", "after maps", "after build", "peak", "ratio"]
    print(f"  {'MiB':<6}" + "".join(f"{h:>12}" for h in head) + f"{'loader worker':>15}")
    for r in result["ranks"]:
        e, m = r["estimate_bytes"], r["measured_bytes"]
        built, peak = (m["device_after_build"], m["device_peak"]) if cuda else (m["after_build"], m["peak"])
        cells = [e["weights"], e["optimizer"], e["buffers"], e["replicated"], e["total"], 0 if cuda else m["baseline"], 0 if cuda else m["after_maps"], built, peak]
        print(f"  {'rank ' + str(r['rank']):<6}" + "".join(f"{c / mib:>12,.0f}" for c in cells)
              + f"{r['ratio']:>11.2f}x" + f"{r['loader_worker_peak_rss_bytes'] / mib:>15,.0f}")
    print(f"  ratio: {result['ranks'][0]['ratio_note']}; {setup['dense_reservation_note']}")


def draw(result: dict, path: Path) -> Path:
    """Per rank: the estimate's parts stacked, beside the measured memory (baseline, then what the run added)."""
    cuda = result["setup"]["device_type"] == "cuda"
    fig, (ax,) = plotting.figure(1, 1, max(7.0, 2.5 * len(result["ranks"]) + 2), 5.5)
    ranks = [r["rank"] for r in result["ranks"]]
    mib = 1 << 20
    plotting.stacked_bars(ax, [x - 0.2 for x in ranks], {f"estimate: {k}": [r["estimate_bytes"][k] / mib for r in result["ranks"]] for k in ESTIMATE}, 0.38)
    if cuda:
        measured = {"measured: device memory after build": [r["measured_bytes"]["device_after_build"] / mib for r in result["ranks"]],
                    "measured: device peak in the steps": [(r["measured_bytes"]["device_peak"] - r["measured_bytes"]["device_after_build"]) / mib
                                                           for r in result["ranks"]]}
    else:
        stages = ("baseline", "after_maps", "after_build", "peak")
        names = ("baseline RSS (python, torch, process group)", "+ feature maps", "+ model build (tables, optimizer state, dense)",
                 "+ training steps, to the peak RSS")
        measured = {f"measured: {name}": [(r["measured_bytes"][stage] - (r["measured_bytes"][stages[i - 1]] if i else 0)) / mib for r in result["ranks"]]
                    for i, (stage, name) in enumerate(zip(stages, names))}
    tops = plotting.stacked_bars(ax, [x + 0.2 for x in ranks], measured, 0.38, hatch="..", first_color=len(ESTIMATE))
    for x, top, r in zip(ranks, tops, result["ranks"]):
        ax.text(x + 0.2, top, f"{'peak' if cuda else 'above baseline'}:\n{r['ratio']:.2f}x the estimate", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(ranks)
    ax.set_xticklabels([f"rank {r}\nestimate | measured" for r in ranks])
    ax.set_xlim(min(ranks) - 0.6, max(ranks) + 0.6)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    ax.margins(y=0.12)
    setup = result["setup"]
    return plotting.save(fig, path, f"{result['label']} ({setup['world_size']} x {setup['device_type']}, {setup['steps']} steps):\n"
                                    "the planner's estimate vs the measured peak, per rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=(*METHODS, "lemur"), default="muse", help="configs/<method>.yaml is the base config")
    parser.add_argument("--hardware", default="cpu-2core", help="hardware profile to plan for and run on (sets device type and world size)")
    parser.add_argument("--batch-size", type=int, default=1000, help="samples per batch on each rank")
    parser.add_argument("--steps", type=int, default=6, help="training steps (the peak is reached within the first few)")
    parser.add_argument("--users", type=int, default=2000, help="train users of the synthetic set (about 11 rows each)")
    parser.add_argument("--map-rows", type=int, default=0, help="pad the item and SCL maps to this many keys (0: the synthetic sizes)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (torchrun sets OMP_NUM_THREADS=1)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.scl_storage=int8_replicated")
    parser.add_argument("--data", type=Path, default=RESULTS / "memory-data", help="where the synthetic set goes")
    parser.add_argument("--label", default=None, help="entry name in the JSON (default: method, batch, profile, overrides)")
    args = parser.parse_args()
    try:
        result = measure(args)
    except MuseRecError as e:  # a wrong --set or profile, a plan that does not fit
        parser.error(str(e))
    report(result)
    out = RESULTS / "memory.json"
    save_run(result, out)
    png = draw(result, RESULTS / "memory.png")
    print(f"saved {out} (entry {result['label']!r}) and {png}")


if __name__ == "__main__":
    main()
