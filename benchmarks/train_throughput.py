"""End-to-end training throughput on CPU ranks (gloo) or GPUs (NCCL), and where a training step's time goes.

Reference dimensions: batch 1000 per rank, 1000-long sequences (the method's configs/<method>.yaml,
so `--method din` reads its 50-long sequence). A synthetic set is made once under
benchmarks/results/throughput-data (with `--map-rows N`, under throughput-data-N, its item and SCL
maps padded to N keys as benchmarks/loader.py does: tables of N rows with synthetic weights). The
ranks are spawned here (file:// rendezvous; gloo and one intra-op thread per rank on CPU as torchrun
sets it, NCCL and one GPU per rank on CUDA) and build the model exactly as `build_model` does.

Without `--hardware`, `--world-size` CPU ranks (default 2) plan collectively at start-up, as before.
With `--hardware PROFILE` (configs/hardware/), the device type and world size are the profile's;
the plan is made offline for it first (as `muse-rec plan`), the ranks train with that plan, and
the measured peak memory is set against the planner's estimate of it (CUDA:
torch.cuda.max_memory_allocated; CPU: peak RSS). On CUDA the sparse tables use fbgemm's CUDA
kernels with fused (in-backward) Adam, the batches are pinned and copied by the pipeline, and a
verdict against `--target` (25,000 samples/s, issue 4's figure for one H100) is printed.

1. End-to-end: the real pipeline's `progress` loop (`muse_rec.train.pipeline.train_pipeline`:
   TrainPipelineSparseDist, sim_soft's eager one) with the real DataLoader, timed per
   step after warm-up steps; samples/s = world * batch / window. CPU time of the rank processes,
   their loader workers and everything else on the machine is read from /proc over the timed window.
   On CUDA nothing synchronises inside the window (losses are read after it); it starts and ends
   with one torch.cuda.synchronize, and the per-step times (P50/P90) are CUDA events recorded on
   the compute stream between steps (the host-side times are kept too).
2. Split: after `pipeline.detach()`, instrumented non-pipelined steps through DMP (so DDP still
   all-reduces the dense gradients) with barriers between stages (their waits are reported apart):
   data (`next()` on the loader; on CUDA plus the host-to-device copy), embedding lookup (the three
   collections incl. input and output dist: DMP entry to the dense module's input), GSU
   (`Retrieval`: scores, top-K, gather; sim_soft's scores and top-K between its two lookups),
   dense forward (ESU + tower + loss), dense backward (to the last gradient reaching a lookup
   output), sparse backward (gradient all-to-all and the fused in-backward table update, plus
   DDP's all-reduce wait), optimizer (zero_grad + step: the dense AdamW; the sparse tables were
   already updated inside backward). On CUDA every
   mark is taken after torch.cuda.synchronize (only here). A separate pass times each collection
   and the GSU's scores and top-K alone. The pipelined step overlaps the next batch's input dist
   and the loader with compute, so it can be shorter than the instrumented one.
3. Evaluation: the model in eval mode without gradient, as `muse-rec evaluate` runs it, the
   loader included, at the training batch size (`--eval-steps` batches a rank).
4. The loader alone: samples/s of rank 0's batches on one core in this process (workers=0),
   compared with the training samples/s per rank to say whether the loader is the bottleneck.

Prints a table and saves benchmarks/results/train_throughput.json (`--out`; one entry per run
label, so runs of several methods sit side by side). benchmarks/throughput.py sweeps methods and
batch sizes with the same `measure` and draws them.

Each CPU rank calls `keep_freed_memory` as `muse-rec train` does on CPU (glibc: no mmap for large
blocks, no heap trimming), so the step's large temporaries (a 1000 x 1001 x 128 float32 SCL lookup
is 512 MB) reuse heap pages; `--default-malloc` measures without it (2.7-4x slower for muse).
`--set` passes config overrides.

    python benchmarks/train_throughput.py [--method muse] [--batch-size 1000] [--steps 8] [--users 4000]
        [--default-malloc] [--set model.scl_storage=int8_replicated]

On the GPU host (one H100, issue 4: p90-size tables of 35.46 M item and 35.46 M SCL rows, batch
1000, 1000-long sequences, NCCL, fused Adam, data loading included; export PYTHONPATH as
shared/gpu/README.md says first). 8 loader workers of 16 cores; 6000 users are about 66 batches,
enough for the warm-up, timed and split steps without the loader starting over:

    python benchmarks/train_throughput.py --hardware h100x1 --map-rows 35460000 --users 6000 \
        --workers 8 --warmup 10 --steps 40 --split-steps 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loader import inflate_maps
from muse_rec.batch import batch_layout
from muse_rec.config import Config, SynthConfig, load_config
from muse_rec.data import schema
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset, make_dataloader
from muse_rec.data.synth import synthesize
from muse_rec.distributed.planning import load_config_with_profile, plan_offline, save_plan
from muse_rec.distributed.sharding import DENSE_MULTIPLIER, RESERVED_SHARE
from muse_rec.errors import MuseRecError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("muse", "sim_soft", "sim_hard", "din")
TARGET_SAMPLES_PER_SECOND = 25_000
"""Issue 4's target for one H100: training samples/s, data loading included."""
ESTIMATE = ("weights", "optimizer", "buffers", "replicated")
"""The parts of the planner's per-rank estimate (muse_rec.distributed.planning.RankMemory)."""
STAGES = (
    ("data", "data (wait for next batch; CUDA: + host-to-device copy)"),
    ("lookup", "embedding lookup (all collections, in/out dist)"),
    ("gsu", "GSU in the model (top-K + gather)"),
    ("dense_forward", "dense forward (ESU + tower + loss)"),
    ("dense_backward", "dense backward"),
    ("sparse_backward", "sparse backward (grad a2a + fused update) + DDP wait"),
    ("optimizer", "optimizer (zero_grad + dense AdamW step)"),
    ("sync", "barrier waits (rank skew)"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc accounting -------------------------------------------------------------------------------
def proc_snapshot() -> dict[int, tuple[int, float, float, int]]:
    """pid -> (ppid, user s, sys s, minor faults) of every readable process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
        out[int(name)] = (int(fields[1]), int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK, int(fields[7]))
    return out


def machine_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


def cpu_by_class(before: dict, after: dict, rank_pids: set[int], seconds: float) -> dict:
    """Cores used (user, sys) over the window by the ranks, their descendants (loader workers) and the rest."""

    def kind(pid: int) -> str:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in rank_pids:
                return "ranks" if seen == 0 else "loader_workers"
            pid, seen = after.get(pid, before.get(pid, (0,)))[0], seen + 1
        return "other_processes"

    totals = {k: [0.0, 0.0] for k in ("ranks", "loader_workers", "other_processes")}
    for pid, (_, user, system, _) in after.items():
        _, user0, system0, _ = before.get(pid, (0, 0.0, 0.0, 0))
        bucket = totals[kind(pid)]
        bucket[0] += max(user - user0, 0.0)
        bucket[1] += max(system - system0, 0.0)
    return {k: {"user_cores": round(u / seconds, 2), "sys_cores": round(s / seconds, 2)} for k, (u, s) in totals.items()}


def busy_processes(seconds: float = 1.0, exclude: set[int] = frozenset()) -> list[dict]:
    """Processes using more than 10% of a core over a short sample (before the benchmark starts)."""
    before, start = proc_snapshot(), time.perf_counter()
    time.sleep(seconds)
    after, wall = proc_snapshot(), time.perf_counter() - start
    busy = []
    for pid, (_, user, system, _) in after.items():
        if pid in exclude or pid not in before:
            continue
        cores = (user + system - before[pid][1] - before[pid][2]) / wall
        if cores > 0.1:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                command = "?"
            busy.append({"pid": pid, "cores": round(cores, 2), "command": command[:120]})
    return sorted(busy, key=lambda p: -p["cores"])


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; ru_maxrss where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare_data(data: Path, users: int, map_rows: int = 0) -> Path:
    """The synthetic set (made once; with `map_rows`, in a folder of its own, its item and SCL maps
    padded to that many keys as benchmarks/loader.py does, so the tables weigh what that many rows weigh)."""
    data = data if not map_rows else data.with_name(f"{data.name}-{map_rows}")
    synthesize(SynthConfig(train_users=users, test_users=10, full_history_share=1.0), data, progress=True)
    if map_rows:
        inflate_maps(data, map_rows)
    return data


def planned_offline(config: Config, directory: str) -> list:
    """Plan `config` for its hardware profile as `muse-rec plan` does, save the plan in `directory`
    and point `config.sharding.plan` at it (the ranks train with exactly this plan); the planner's
    per-rank memory (RankMemory) of that plan, with the SCL values file each host maps (`host_mapped`)."""
    plan, estimate = plan_offline(config, config.hardware, config.data.vocab)
    path = Path(directory) / "plan.json"
    save_plan(path, plan, config.hardware, estimate[0].host_mapped)
    config.sharding.plan = str(path)
    return estimate


# -- the rank processes -----------------------------------------------------------------------------
def batches_forever(dataset: ShardDataset, workers: int, restarts: list[int], pin_memory: bool = False):
    """The rank's batches, starting over (a new DataLoader) when they run out; counts the restarts.
    On CUDA pinned, as `muse-rec train` makes them (the pipeline copies them without blocking)."""
    while True:
        yield from make_dataloader(dataset, num_workers=workers, pin_memory=pin_memory)
        restarts[0] += 1


def materialize(out) -> None:
    """Wait for a (sharded) collection's output and touch its values."""
    from torchrec.distributed.types import Awaitable
    from torchrec.sparse.jagged_tensor import KeyedTensor

    while isinstance(out, Awaitable):
        out = out.wait()
    if isinstance(out, KeyedTensor):
        out.values()
    else:
        for jagged in out.values():
            jagged.values()


def profile_steps(pipeline, batches, steps: int) -> str:
    """torch.profiler over `steps` pipelined steps: the operators by self CPU time (the whole step,
    loader wait, collectives and the fused sparse update included)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            pipeline.progress(batches)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)


def evaluation_rate(model, batches, device: torch.device, steps: int, barrier, now) -> dict:
    """Evaluation as `muse_rec.train.loop.evaluate` runs it (the model in eval mode, no gradient,
    the next batch from the loader inside the window): samples/s of this rank over `steps`
    batches after one warm-up, at the training batch size."""
    model.eval()
    with torch.no_grad():
        model(next(batches).to(device, non_blocking=True))
        barrier()
        start, rows = now(), 0
        for _ in range(steps):
            batch = next(batches)
            model(batch.to(device, non_blocking=True))
            rows += batch.batch_size
        barrier()
        seconds = now() - start
    model.train()
    return {"steps": steps, "samples": rows, "seconds": seconds}  # unrounded: samples/s divides by it


def plan_summary(plan) -> dict:
    return {
        f"{module}.{table}": {"type": p.sharding_type, "ranks": p.ranks}
        for module, tables in plan.plan.items()
        for table, p in tables.items()
    }


def worker(rank: int, world: int, config: Config, init_file: str, out_dir: str, opts: dict) -> None:
    from muse_rec.distributed.sharding import dense_module
    from muse_rec.model import gsu
    from muse_rec.train.loop import Runtime, build_model, keep_freed_memory
    from muse_rec.train.pipeline import train_pipeline

    torch.set_num_threads(opts["threads"])
    cuda = opts["device_type"] == "cuda"
    if cuda:  # as init_distributed: NCCL, one GPU per rank (LOCAL_RANK = rank: one host)
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if not opts["default_malloc"]:
            keep_freed_memory()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def now() -> float:
        """perf_counter, after the GPU has finished what was queued (instrumented split only)."""
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def barrier() -> None:
        dist.barrier(device_ids=[device.index]) if cuda else dist.barrier()

    rank_pids = [None] * world
    dist.all_gather_object(rank_pids, os.getpid())
    result: dict = {"rank": rank, "pid": os.getpid()}

    start = time.perf_counter()
    maps = FeatureMaps.load(DatasetLayout(config.data.root), config.data.vocab, strict=config.data.strict)
    sharded = build_model(config, maps, Runtime(rank, world, device))
    result["build_s"] = round(time.perf_counter() - start, 2)
    if cuda:
        result["device_memory"] = {"after_build": torch.cuda.memory_allocated(device)}
    result["peak_rss_after_build"] = status_bytes("VmHWM")
    if rank == 0:
        result["plan"] = plan_summary(sharded.plan)
    dataset = ShardDataset(config.data, "train", rank, world, maps, layout=batch_layout(config.model))
    result["batches_per_rank"] = len(dataset)
    restarts = [0]
    batches = batches_forever(dataset, config.data.num_workers, restarts, pin_memory=cuda)
    model = sharded.model
    model.train()

    # 1. end to end: the real pipeline --------------------------------------------------------------
    pipeline = train_pipeline(model, sharded.optimizer, device, config.model)
    for _ in range(opts["warmup"]):
        pipeline.progress(batches)
    barrier()
    if cuda:  # the window starts with an idle GPU; no synchronize inside it
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(opts["steps"] + 1)]
    restarts_before = restarts[0]
    procs0 = proc_snapshot() if rank == 0 else None
    busy0 = machine_ticks()
    times0 = os.times()
    faults0 = proc_snapshot()[os.getpid()][3]
    step_ms, losses = [], []
    window = time.perf_counter()
    for step in range(opts["steps"]):
        if cuda:
            events[step].record()
        t = time.perf_counter()
        loss = pipeline.progress(batches)[0]
        step_ms.append(1e3 * (time.perf_counter() - t))
        losses.append(loss.detach())  # read after the window: float() would wait for the GPU every step
    if cuda:
        events[-1].record()
        torch.cuda.synchronize(device)  # the window ends when the GPU has done its queued work
    window = time.perf_counter() - window
    losses = [float(v) for v in losses]
    if cuda:  # the step as the GPU's compute stream ran it (no host sync); host-side times kept apart
        result["host_step_ms"] = [round(t, 1) for t in step_ms]
        step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
        result["device_memory"]["peak_pipelined"] = torch.cuda.max_memory_allocated(device)
    result["peak_rss_pipelined"] = status_bytes("VmHWM")
    times1, busy1, procs1 = os.times(), machine_ticks(), proc_snapshot()
    faults1 = procs1[os.getpid()][3]
    if rank == 0:
        result["cpu_cores_in_window"] = cpu_by_class(procs0, procs1, set(rank_pids), window)
        result["machine_busy_cores_in_window"] = round((busy1[0] - busy0[0]) / window, 2)
    if opts["profile_steps"]:  # after the timed window and its CPU accounting: the profiled steps stay out of both
        result["profile"] = profile_steps(pipeline, batches, opts["profile_steps"])
    result["pipelined"] = {
        "pipeline": type(pipeline).__name__,
        "step_ms": [round(t, 1) for t in step_ms],
        "window_s": round(window, 3),
        "losses": [round(v, 5) for v in losses],
        "user_s": round(times1.user - times0.user, 2),
        "sys_s": round(times1.system - times0.system, 2),
        "minor_faults_per_step": round((faults1 - faults0) / opts["steps"]),
        "loader_restarts_in_window": restarts[0] - restarts_before,
    }
    pipeline.detach()

    # 2. split: instrumented, non-pipelined steps through DMP ------------------------------------
    inner = dense_module(model)
    dense = inner.dense
    marks: dict = {}

    def stage_barrier() -> None:
        t = now()
        barrier()
        marks["sync"] = marks.get("sync", 0.0) + now() - t

    def grad_arrived(grad):
        marks["dense_backward_end"] = max(marks.get("dense_backward_end", 0.0), now())

    def before_dense(module, args):
        marks["lookup_end"] = now()
        (x,) = args
        marks["inputs"] = x
        stage_barrier()
        marks["dense_start"] = now()
        if torch.is_grad_enabled():
            for tensor in x:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(grad_arrived)

    def after_dense(module, args, output):
        marks["dense_end"] = now()

    retrieval = inner.retrieval
    original_retrieve = retrieval.forward

    def timed_retrieve(full):
        t = now()
        out = original_retrieve(full)
        marks["gsu"] = marks.get("gsu", 0.0) + now() - t
        marks["full"] = full
        return out

    original_sim_soft_positions = retrieval.sim_soft_positions

    def timed_sim_soft_positions(*args):
        t = now()
        out = original_sim_soft_positions(*args)
        marks["gsu"] = marks.get("gsu", 0.0) + now() - t
        return out

    hooks = [dense.register_forward_pre_hook(before_dense), dense.register_forward_hook(after_dense)]
    retrieval.forward = timed_retrieve  # this process's instance only
    retrieval.sim_soft_positions = timed_sim_soft_positions
    split_steps: list[dict] = []
    anatomy_steps: list[dict] = []
    anatomy_counts: dict[str, list[dict]] = {}
    faults0 = proc_snapshot()[os.getpid()][3]
    for step in range(opts["split_warmup"] + opts["split_steps"]):
        marks.clear()
        stage_barrier()
        t0 = now()
        sharded.optimizer.zero_grad()
        t1 = now()
        batch = next(batches).to(device, non_blocking=True)  # a no-op on CPU
        t2 = now()
        stage_barrier()
        t3 = now()
        loss, _ = model(batch)
        t4 = now()
        stage_barrier()
        t5 = now()
        loss.backward()
        t6 = now()
        sharded.optimizer.step()
        t7 = now()
        gsu_s = marks.get("gsu", 0.0)
        dense_backward_end = marks.get("dense_backward_end", t5)
        stage = {
            "data": t2 - t1,
            "lookup": marks["lookup_end"] - t3 - gsu_s,  # the model's GSU runs before the dense module
            "gsu": gsu_s,
            "dense_forward": t4 - marks["dense_start"],
            "dense_backward": dense_backward_end - t5,
            "sparse_backward": t6 - dense_backward_end,
            "optimizer": (t1 - t0) + (t7 - t6),
            "sync": marks["sync"],
        }
        # anatomy (not part of the step): each collection alone, then the GSU's scores and top-K
        marks.pop("inputs")
        full = marks.pop("full", None)  # None where the loader ran the GSU
        anatomy = {}
        with torch.no_grad():
            for name, kjt in (("id_tables", batch.id_features), ("sequence_tables", batch.sequence_features), ("scl_table", batch.scl_features)):
                if kjt is None:  # gsu_stage loader: no SCL table
                    continue
                barrier()
                f, c, t = proc_snapshot()[os.getpid()][3], os.times(), now()
                materialize(getattr(inner, name)(kjt))
                anatomy[f"lookup_{name}"] = now() - t
                c2 = os.times()
                anatomy_counts.setdefault(name, []).append(
                    {"user_ms": 1e3 * (c2.user - c.user), "sys_ms": 1e3 * (c2.system - c.system), "minor_faults": proc_snapshot()[os.getpid()][3] - f,
                     "rows_per_sample": kjt.values().numel() / batch.batch_size}
                )
            method, k = config.model.method, config.model.keep_top
            if method == "sim_soft":  # its scoring lookup again, untimed: what the scores read
                full = inner.full_inputs(batch, batch.top_cosines)
            if full is not None and method in ("muse", "sim_soft"):
                t = now()
                if method == "muse":
                    scores = gsu.scores_of(full.cosines)
                else:  # as the model scores: per distinct history
                    scores = gsu.distinct_history_sim_soft_scores(full.target_item, full.target_cate, full.items, full.cates, full.history_of_row)
                t_mid = now()
                gsu.top_k_positions(scores, k)
                anatomy["gsu_scores"], anatomy["gsu_top_k"] = t_mid - t, now() - t_mid
        del full, batch, loss
        if step >= opts["split_warmup"]:
            split_steps.append({k: 1e3 * v for k, v in stage.items()})
            anatomy_steps.append({k: 1e3 * v for k, v in anatomy.items()})
    faults1 = proc_snapshot()[os.getpid()][3]
    for h in hooks:
        h.remove()
    del retrieval.forward, retrieval.sim_soft_positions
    result["split_ms"] = {k: round(statistics.mean(s[k] for s in split_steps), 1) for k in split_steps[0]}
    result["split_ms_per_step"] = [{k: round(v, 1) for k, v in s.items()} for s in split_steps]
    result["anatomy_ms"] = {k: round(statistics.mean(s[k] for s in anatomy_steps), 1) for k in anatomy_steps[0]}
    result["anatomy_ms_per_step"] = [{k: round(v, 1) for k, v in s.items()} for s in anatomy_steps]
    result["anatomy_cpu"] = {
        name: {key: round(statistics.mean(c[key] for c in counts[opts["split_warmup"]:])) for key in counts[0]} for name, counts in anatomy_counts.items()
    }
    result["split_minor_faults_per_step"] = round((faults1 - faults0) / (opts["split_warmup"] + opts["split_steps"]))
    result["evaluation"] = evaluation_rate(model, batches, device, opts["eval_steps"], barrier, now)
    result["loader_restarts"] = restarts[0]
    if cuda:
        result["device_memory"]["peak"] = torch.cuda.max_memory_allocated(device)
    result["peak_rss"] = status_bytes("VmHWM")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    barrier()
    dist.destroy_process_group()


# -- the parent ---------------------------------------------------------------------------------------
def loader_alone(config: Config, maps: FeatureMaps, world: int, batches: int) -> dict:
    """Rank 0's first batches produced on one core in this process (read, decode, assemble); two
    passes, the second (page cache and allocator warm) is the figure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dataset = ShardDataset(config.data, "train", 0, world, maps, layout=batch_layout(config.model))
    rates = []
    for _ in range(2):
        rows, count, start = 0, 0, time.perf_counter()
        for batch in make_dataloader(dataset, num_workers=0):
            rows, count = rows + batch.batch_size, count + 1
            if count >= batches:
                break
        seconds = time.perf_counter() - start
        rates.append(rows / seconds)
    torch.set_num_threads(threads)
    return {"batches": count, "samples_per_second_one_core": round(rates[-1]), "first_pass_samples_per_second": round(rates[0]),
            "ms_per_batch": round(1e3 * rows / rates[-1] / count, 1)}


def memory_against_estimate(ranks: list[dict], estimate: list, cuda: bool) -> dict:
    """Per rank: the planner's estimate of the plan the ranks trained with (its parts, and the total
    in the memory it planned: device memory on CUDA, host memory on CPU, with the cap) against the
    measured peak: torch.cuda.max_memory_allocated over build and pipelined steps on CUDA (the
    instrumented split's peak apart), the rank's peak RSS (VmHWM, Python and torch included) on CPU."""
    per_rank = []
    for m, r in zip(estimate, ranks):
        planned, cap = (m.hbm, m.hbm_cap) if cuda else (m.ddr, m.ddr_cap)
        if cuda:
            measured = {"after_build": r["device_memory"]["after_build"], "peak_pipelined": r["device_memory"]["peak_pipelined"],
                        "peak_with_split": r["device_memory"]["peak"]}
        else:
            measured = {"peak_rss_after_build": r["peak_rss_after_build"], "peak_pipelined": r["peak_rss_pipelined"], "peak_with_split": r["peak_rss"]}
        per_rank.append({
            "rank": m.rank, "estimate_bytes": {**{k: getattr(m, k) for k in ESTIMATE}, "planned_memory": planned}, "cap_bytes": cap,
            "usable_bytes": round((1 - RESERVED_SHARE) * cap), "measured_bytes": measured,
            "ratio": round(measured["peak_pipelined"] / planned, 3) if planned else None,
        })
    return {
        "measured": "device memory, torch.cuda.max_memory_allocated" if cuda else "host memory, peak RSS (VmHWM) of the rank process",
        "ratio_note": "peak in the pipelined steps / the planner's estimate of that memory"
                      + ("" if cuda else " (RSS includes Python and torch: benchmarks/memory.py measures its baseline apart)"),
        "reservation_note": f"the planner also reserves {DENSE_MULTIPLIER} x the dense parameters' bytes and {RESERVED_SHARE:.0%} of "
                            "each rank's cap outside the estimate ('usable' is the cap less that share)",
        "host_mapped_bytes": estimate[0].host_mapped,
        "host_mapped_note": "the int8 SCL values file the loaders memory-map at gsu_stage loader: host memory (page cache), "
                            "once per host whatever its ranks and workers, in no rank's estimate",
        "ranks": per_rank,
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one measurement, shared with benchmarks/throughput.py (which sweeps method
    and batch size itself)."""
    parser.add_argument("--steps", type=int, default=8, help="timed pipelined steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5, help="pipelined warm-up steps (the heap grows over the first few)")
    parser.add_argument("--split-steps", type=int, default=4, help="timed instrumented steps (after one warm-up)")
    parser.add_argument("--users", type=int, default=4000, help="train users of the synthetic set (about 11 rows each)")
    parser.add_argument("--world-size", type=int, default=None, help="CPU ranks without --hardware (default 2); with it, the profile's")
    parser.add_argument("--hardware", default=None,
                        help="hardware profile (configs/hardware/, e.g. h100x1): its device type (NCCL on CUDA) and world size, "
                             "planned offline for it and trained with that plan, peak memory against the planner's estimate")
    parser.add_argument("--map-rows", type=int, default=0,
                        help="pad the item and SCL maps to this many keys (35460000: the p90 tables; 0: the synthetic sizes)")
    parser.add_argument("--target", type=float, default=TARGET_SAMPLES_PER_SECOND, help="samples/s the verdict of a CUDA run is against")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (torchrun sets OMP_NUM_THREADS=1)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers per rank (default: the method config's data.num_workers)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides, e.g. model.scl_storage=int8_replicated")
    parser.add_argument("--data", type=Path, default=RESULTS / "throughput-data", help="where the synthetic set goes (with --map-rows N: beside it, -N)")
    parser.add_argument("--eval-steps", type=int, default=6, help="timed evaluation batches (no gradient, after the split), at least 1")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timed window, torch.profiler over STEPS pipelined steps; each rank's operator table "
                             "(by self CPU time) is saved beside --out as <out stem>-profile-<label>-rank<r>.txt")
    parser.add_argument("--default-malloc", action="store_true",
                        help="skip keep_freed_memory (glibc's default mmap/trim behaviour), to measure its effect")


def measure(method: str, batch_size: int, args: argparse.Namespace, label: str | None = None) -> dict:
    """One run: `method` at `batch_size` per rank with the options of `add_run_arguments`; the
    result that `report` prints and `save_run` keeps."""
    if args.eval_steps < 1:  # its samples/s would divide by a window of 0 s
        raise MuseRecError(f"--eval-steps {args.eval_steps}: expected at least 1 evaluation batch")
    load_before = os.getloadavg()
    busy_before = busy_processes(1.0, exclude={os.getpid()})
    data = prepare_data(args.data, args.users, args.map_rows)
    overrides = [f"data.root={data}", f"data.batch_size={batch_size}", *args.set]
    if args.workers is not None:
        overrides.append(f"data.num_workers={args.workers}")
    base = ROOT / "configs" / f"{method}.yaml"
    config = load_config_with_profile(base, args.hardware, overrides) if args.hardware else load_config(base, overrides)
    if args.hardware:
        device_type, world = config.hardware.device_type, config.hardware.world_size
        if args.world_size not in (None, world):
            raise MuseRecError(f"--world-size {args.world_size}: profile {args.hardware} runs {world} rank(s)")
        if device_type == "cuda" and torch.cuda.device_count() < world:
            raise MuseRecError(f"profile {args.hardware} needs {world} GPU(s), this machine has {torch.cuda.device_count()}")
    else:
        device_type, world = "cpu", args.world_size or 2
    cuda = device_type == "cuda"
    maps = FeatureMaps.load(DatasetLayout(data), config.data.vocab)
    batch = config.data.batch_size
    label = label or " ".join([method, *([args.hardware] if args.hardware else []), *([f"map-rows {args.map_rows}"] if args.map_rows else []),
                               *args.set, *(["default-malloc"] if args.default_malloc else [])])

    needed = args.warmup + args.steps + 2 + 1 + args.split_steps + args.profile + 1 + args.eval_steps
    available = len(ShardDataset(config.data, "train", 0, world, maps))
    if available < needed:
        print(f"note: {available} batches per rank, {needed} needed: the loader starts over (a restart is counted in the JSON)", file=sys.stderr)
    loader = loader_alone(config, maps, world, min(available, max(1, -(-20_000 // batch))))  # two row groups or more

    opts = {"steps": args.steps, "warmup": args.warmup, "split_steps": args.split_steps, "split_warmup": 1,
            "threads": args.threads, "default_malloc": args.default_malloc, "device_type": device_type, "profile_steps": args.profile,
            "eval_steps": args.eval_steps}
    with tempfile.TemporaryDirectory() as tmp:
        estimate = planned_offline(config, tmp) if args.hardware else None
        started = time.perf_counter()
        mp.spawn(worker, args=(world, config, str(Path(tmp) / "init"), tmp, opts), nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
        ranks_s = time.perf_counter() - started

    # end to end: a step ends on every rank together (collectives), so the slowest rank sets it
    steps = [max(r["pipelined"]["step_ms"][i] for r in ranks) for i in range(args.steps)]
    window = max(r["pipelined"]["window_s"] for r in ranks)
    rate = world * batch * args.steps / window
    per_rank = rate / world
    split = {k: [r["split_ms"][k] for r in ranks] for k in ranks[0]["split_ms"]}
    mean_split = {k: statistics.mean(v) for k, v in split.items()}
    total = sum(mean_split.values())
    anatomy = {k: [r["anatomy_ms"][k] for r in ranks] for k in ranks[0]["anatomy_ms"]}
    loader_rate = loader["samples_per_second_one_core"]
    data_share = mean_split["data"] / total
    bottleneck = loader_rate < per_rank or data_share > 0.1
    verdict = (
        f"{'yes' if bottleneck else 'no'}: the loader makes {loader_rate:,} samples/s on one core, training consumes "
        f"{per_rank:,.0f} samples/s per rank ({loader_rate / per_rank:.0f}x headroom; loading costs about "
        f"{per_rank / loader_rate:.0%} of a core per rank), and the training loop waits {mean_split['data']:.0f} ms "
        f"of a {total:.0f} ms step ({data_share:.1%}) for its next batch"
    )
    memory = memory_against_estimate(ranks, estimate, cuda) if estimate else None
    largest = max((k for k, _ in STAGES if k != "sync"), key=lambda k: mean_split[k])
    target_verdict = None
    loader_cores_at_target = args.target / world / loader_rate  # CUDA: the loader's cores per GPU at the target
    if cuda:
        target_verdict = (
            f"{'meets' if rate >= args.target else 'misses'} the target: {rate:,.0f} samples/s on {world} GPU(s) against "
            f"{args.target:,.0f} ({rate / args.target:.0%}); the largest part of the instrumented {total:.0f} ms step is "
            f"{largest} ({mean_split[largest]:.0f} ms, {mean_split[largest] / total:.0%}); at the target a step may take "
            f"{1e3 * world * batch / args.target:.0f} ms, and the loader needs about "
            f"{loader_cores_at_target:.1f} cores of this host per GPU"
        )
    cpu = ranks[0]["cpu_cores_in_window"]
    caveats = []
    other = cpu["other_processes"]["user_cores"] + cpu["other_processes"]["sys_cores"]
    if other > 0.2 or sum(p["cores"] for p in busy_before) > 0.5:
        caveats.append(
            f"machine not idle: {other:.2f} cores used by other processes during the timed window; before the start "
            f"load average {load_before[0]:.2f} and busy processes {[(p['command'][:60], p['cores']) for p in busy_before]}"
        )
    if any(r["pipelined"]["loader_restarts_in_window"] for r in ranks):
        caveats.append("the loader started over inside the timed window (too few --users for the steps)")
    if args.map_rows:
        caveats.append(
            f"tables padded to {maps.scl.num_rows:,} SCL and {maps.of_column(schema.HIST_ITEMS).num_rows:,} item rows (synthetic weights), "
            "but the lookups touch only the synthetic catalogue's rows: they hit caches more often than on the real set"
        )
    else:
        caveats.append(
            f"tables sized by the synthetic catalogue ({maps.scl.num_rows:,} SCL rows), far smaller than TAOBAO-MM's p90 "
            "(35.46 M): lookups hit caches more often than on the real set"
        )
    return {
        "label": label,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_before": [round(v, 2) for v in load_before], "busy_processes_before": busy_before,
                    "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "LD_PRELOAD", "GLIBC_TUNABLES"))}},
        "setup": {"method": config.model.method, "gsu_stage": config.model.stage, "device_type": device_type, "hardware": args.hardware, "world_size": world,
                  "batch_size_per_rank": batch, "map_rows": args.map_rows, "table_rows": maps.table_rows(),
                  "long_seq_len": config.data.long_seq_len, "keep_top": config.model.keep_top,
                  "scl_storage": config.model.scl_storage, "loader_workers_per_rank": config.data.num_workers,
                  "threads_per_rank": args.threads, "default_malloc": args.default_malloc, "warmup_steps": args.warmup, "timed_steps": args.steps,
                  "split_steps": args.split_steps, "overrides": args.set, "sparse_optimizer": "fused Adam (fbgemm)" if cuda else config.optim.sparse_cpu,
                  "plan": ranks[0]["plan"]},
        "data": {"root": str(data), "train_users": args.users, "batches_per_rank": ranks[0]["batches_per_rank"],
                 "loader_restarts": max(r["loader_restarts"] for r in ranks)},
        "end_to_end": {"step_ms_p50": round(percentile(steps, 50), 1), "step_ms_p90": round(percentile(steps, 90), 1),
                       "step_ms_mean": round(1e3 * window / args.steps, 1), "samples_per_second": round(rate),
                       "samples_per_second_per_rank": round(per_rank),
                       "samples_per_second_at_p50_step": round(world * batch / (percentile(steps, 50) / 1e3)), "step_ms": [round(s, 1) for s in steps],
                       "step_ms_from": "CUDA events on each rank's compute stream (no synchronize in the window but at its ends)" if cuda
                                       else "wall time of each pipeline.progress call",
                       **({"host_step_ms_rank0": ranks[0]["host_step_ms"]} if cuda else {}),
                       "losses_rank0": ranks[0]["pipelined"]["losses"], "pipeline": ranks[0]["pipelined"]["pipeline"]},
        "target": {"samples_per_second": args.target, "verdict": target_verdict} if cuda else None,
        "memory": memory,
        "cpu_in_timed_window": {"cores_by_class": cpu, "machine_busy_cores": ranks[0]["machine_busy_cores_in_window"],
                                "per_rank": [{"user_s": r["pipelined"]["user_s"], "sys_s": r["pipelined"]["sys_s"],
                                              "minor_faults_per_step": r["pipelined"]["minor_faults_per_step"]} for r in ranks]},
        "split_ms_per_rank": split,
        "split_share": {k: round(v / total, 3) for k, v in mean_split.items()},
        "split_step_ms": round(total, 1),
        "split_note": "instrumented non-pipelined steps through DMP, barriers between stages (their waits under 'sync'); "
                      "the sparse tables are updated by fused optimizers inside backward ('sparse_backward'), so "
                      "'optimizer' is the dense AdamW only",
        "anatomy_ms_per_rank": anatomy,
        "anatomy_cpu_per_rank": [r["anatomy_cpu"] for r in ranks],
        "anatomy_note": "a separate no-grad pass per step, not part of the step: each collection alone (input dist, lookup, "
                        "output dist) and the GSU's scores and top-K alone; with page faults in play it is not additive with the step",
        "evaluation": {"samples_per_second": round(sum(r["evaluation"]["samples"] for r in ranks) / max(r["evaluation"]["seconds"] for r in ranks)),
                       "batches_per_rank": ranks[0]["evaluation"]["steps"],
                       "note": "model.eval(), no gradient, loader included, at the training batch size, all ranks together"},
        "loader_alone": loader,
        "loader_cores_per_rank": round(per_rank / loader_rate, 2),
        **({"loader_cores_per_gpu_at_target": round(loader_cores_at_target, 2)} if cuda else {}),
        "loader_is_bottleneck": bottleneck,
        "verdict": verdict,
        "caveats": caveats,
        "ranks_wall_s": round(ranks_s, 1),
        "profiles": [r.get("profile") for r in ranks],
        "build_s": [r["build_s"] for r in ranks],
    }


def report(result: dict) -> None:
    """Print one run's result (from `measure`) as a table."""
    setup, e2e, split = result["setup"], result["end_to_end"], result["split_ms_per_rank"]
    world, steps = setup["world_size"], setup["timed_steps"]
    mean_split = {k: statistics.mean(v) for k, v in split.items()}
    total, loader = sum(mean_split.values()), result["loader_alone"]
    cpu = result["cpu_in_timed_window"]["cores_by_class"]
    kind = setup.get("device_type", "cpu").upper()
    print(f"{result['label']}: {world} {kind} rank(s) x batch {setup['batch_size_per_rank']}, sequence {setup['long_seq_len']}, "
          f"{setup['loader_workers_per_rank']} loader worker(s) and {setup['threads_per_rank']} thread(s) per rank")
    print(f"  end to end ({e2e['pipeline']}, {steps} steps after {setup['warmup_steps']} warm-up): step P50 "
          f"{e2e['step_ms_p50']:,.0f} ms, P90 {e2e['step_ms_p90']:,.0f} ms -> "
          f"{e2e['samples_per_second']:,} samples/s ({e2e['samples_per_second_per_rank']:,} per rank; "
          f"{e2e['samples_per_second_at_p50_step']:,} at the P50 step)")
    print("  CPU in that window (cores, user+sys): " + ", ".join(
        f"{k} {v['user_cores']:.2f}+{v['sys_cores']:.2f}" for k, v in cpu.items())
        + f"; minor faults per step per rank {[r['minor_faults_per_step'] for r in result['cpu_in_timed_window']['per_rank']]}")
    print(f"  split (instrumented non-pipelined step, mean of {setup['split_steps']}):")
    header = "".join(f"{f'rank {r} ms':>11}" for r in range(world))
    print(f"    {'stage':<54}{header}{'share':>7}")
    for key, name in STAGES:
        print(f"    {name:<54}" + "".join(f"{v:>11,.0f}" for v in split[key]) + f"{mean_split[key] / total:>7.1%}")
    print(f"    {'step':<54}" + "".join(f"{sum(v[r] for v in split.values()):>11,.0f}" for r in range(world)))
    print("    separately (no grad, not in the step):")
    for key, values in result["anatomy_ms_per_rank"].items():
        print(f"      {key:<52}" + "".join(f"{v:>11,.0f}" for v in values))
    rows = {name: [cpu[name]["rows_per_sample"] for cpu in result["anatomy_cpu_per_rank"]] for name in result["anatomy_cpu_per_rank"][0]}
    print("    rows looked up per sample (each collection's input KJT, before its input dist): "
          + ", ".join(f"{name} {'/'.join(f'{v:,}' for v in values)}" for name, values in rows.items()))
    print("    (the sparse tables' optimizer is fused into backward: its update is in 'sparse backward')")
    evaluation = result["evaluation"]
    print(f"  evaluation (no gradient, loader included, {evaluation['batches_per_rank']} batches a rank): {evaluation['samples_per_second']:,} samples/s")
    print(f"  loader alone: {loader['samples_per_second_one_core']:,} samples/s on one core ({loader['ms_per_batch']} ms a batch)")
    print(f"  loader is the bottleneck: {result['verdict']}")
    memory = result.get("memory")
    if memory:
        mib = 1 << 20
        print(f"  memory ({memory['measured']}) against the planner's estimate of this plan, MiB:")
        print(f"    {'rank':<6}" + "".join(f"{h:>13}" for h in (*ESTIMATE, "estimate", "cap", "peak", "with split", "ratio")))
        for r in memory["ranks"]:
            e, m = r["estimate_bytes"], r["measured_bytes"]
            cells = [*(e[k] for k in ESTIMATE), e["planned_memory"], r["cap_bytes"], m["peak_pipelined"], m["peak_with_split"]]
            print(f"    {r['rank']:<6}" + "".join(f"{c / mib:>13,.0f}" for c in cells) + f"{r['ratio']:>12.2f}x")
        print(f"    ratio: {memory['ratio_note']}; {memory['reservation_note']}")
        print(f"    host: {memory['host_mapped_bytes'] / mib:,.0f} MiB mapped, {memory['host_mapped_note']}")
    for caveat in result["caveats"]:
        print(f"  caveat: {caveat}")
    if result.get("target"):
        print(f"  verdict: {result['target']['verdict']}")


def save_profiles(result: dict, out: Path) -> list[Path]:
    """Move the ranks' profiler tables (`--profile`) out of `result` into text files beside `out`."""
    paths = []
    for rank, table in enumerate(result.pop("profiles", [])):
        if table:
            path = out.with_name(f"{out.stem}-profile-{result['label'].replace(' ', '_').replace('/', '_')}-rank{rank}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(table)
            paths.append(path)
    return paths


def save_run(result: dict, out: Path) -> None:
    """Keep `result` as the entry of its label in `out`, beside the other runs there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved = saved if isinstance(saved, dict) and "runs" in saved else {"runs": {}}
    saved["runs"][result["label"]] = result
    out.write_text(json.dumps(saved, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="muse", help="configs/<method>.yaml is the base config")
    parser.add_argument("--batch-size", type=int, default=1000, help="samples per batch on each rank")
    add_run_arguments(parser)
    parser.add_argument("--label", default=None, help="entry name in the JSON (default: method, profile, map rows, overrides)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_throughput.json", help="the JSON (one entry per label)")
    args = parser.parse_args()

    try:
        result = measure(args.method, args.batch_size, args, args.label)
    except MuseRecError as e:  # a wrong --set or profile, a plan that does not fit
        parser.error(str(e))
    report(result)
    out = args.out
    profiles = save_profiles(result, out)
    save_run(result, out)
    print(f"saved {out} (entry {result['label']!r})" + "".join(f", {p}" for p in profiles))


if __name__ == "__main__":
    main()
