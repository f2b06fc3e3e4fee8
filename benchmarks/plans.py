"""Sharding plans at a glance: per-rank memory and the planner's cost estimate for every hardware
profile in configs/hardware/ and both item vocabularies (p90: 35.46 M rows, full: 243.36 M).

Each plan is made offline exactly as `muse-rec plan` makes it (`plan_offline`: the model on the
meta device, table sizes from data.root's feature maps where they exist, else the released
TAOBAO-MM sizes, fused optimizers attached so their state counts). Per rank: the planner's
weights, optimizer state, I/O buffers and caches, the replicated int8 SCL table, against the
rank's cap (device memory on CUDA, host memory on CPU); and the planner's cost estimate, the
per-step time (ms) of the embedding lookups' compute and communication it minimises, summed over
each rank's shards (its objective is the slowest rank's). Where the planner finds no plan
(the full vocabulary on cpu-2core), the entry says "does not fit" with the storage it needed.
Each plan is compared with the committed one in plans/ (same placement or not).

Prints a table, saves benchmarks/results/plans.json and one figure, plans.png (a panel per
profile: stacked memory bars per rank, p90 plain and full hatched, the cap as a line). Takes a
few seconds, no data, GPU or process group needed.

    python benchmarks/plans.py [--config configs/muse.yaml] [--profiles cpu-2core,h100x8] [--vocabs p90,full]
        [--set model.scl_storage=int8_replicated] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import plotting
from muse_rec.distributed import planning
from muse_rec.errors import ConfigError, MuseRecError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VOCABS = ("p90", "full")
MEMORY = ("weights", "optimizer", "buffers", "replicated")
_NEEDED = re.compile(r"Global storage (requirement|available) for model parallel: Storage\(hbm = ([\d.]+) GB, ddr = ([\d.]+) GB\)")


def committed(profile: str, vocab: str, plan, hardware) -> str:
    """'same' when plans/<profile>-<vocab>.json places every table as this plan does, 'differs'
    otherwise, 'none' without such a file."""
    path = ROOT / "plans" / f"{profile}-{vocab}.json"
    if not path.exists():
        return "none"
    with tempfile.TemporaryDirectory() as tmp:
        planning.save_plan(Path(tmp) / "plan.json", plan, hardware)
        fresh = json.loads((Path(tmp) / "plan.json").read_text())["plan"]
    return "same" if json.loads(path.read_text()).get("plan") == fresh else "differs"


def entry(config_path: Path, spec: str, vocab: str, overrides: list[str]) -> dict:
    """One profile (`spec`: a name in configs/hardware/ or a path) x vocabulary: the plan's
    per-rank memory and cost, or why there is none."""
    profile = planning.hardware_profile_path(spec).stem
    config = planning.load_config_with_profile(config_path, spec, overrides)
    hardware = config.hardware
    memory_kind = "hbm" if hardware.device_type == "cuda" else "ddr"
    rows, source = planning.table_rows(config.data.root, vocab)
    result = {"profile": profile, "vocab": vocab, "device_type": hardware.device_type, "world_size": hardware.world_size,
              "memory": "device" if memory_kind == "hbm" else "host", "table_rows": rows, "table_sizes_from": source}
    try:
        plan, memory = planning.plan_offline(config, hardware, vocab)
    except MuseRecError as e:
        # TorchRec's "GB" there are GiB (bytes / 1024**3)
        found = {kind: float(hbm if memory_kind == "hbm" else ddr) for kind, hbm, ddr in _NEEDED.findall(str(e))}
        return {**result, "fits": False, "needs_gib": found.get("requirement"), "available_gib": found.get("available"),
                "error": str(e).splitlines()[0]}
    costs = [{k: round(v, 3) for k, v in m.cost_ms.items()} for m in memory]
    ranks = [
        {"rank": m.rank, **{k: round(getattr(m, k) / plotting.GIB, 3) for k in MEMORY},
         "used": round(getattr(m, memory_kind) / plotting.GIB, 3), "cap": round(getattr(m, f"{memory_kind}_cap") / plotting.GIB, 3),
         "fits": m.fits, "cost_ms": costs[m.rank]}
        for m in memory
    ]
    return {**result, "fits": all(r["fits"] for r in ranks), "ranks": ranks,
            "step_cost_ms": max(c["total"] for c in costs), "committed_plan": committed(profile, vocab, plan, hardware)}


def print_table(entries: list[dict]) -> None:
    """Like the README's table: the busiest rank of each plan."""
    print(f"{'profile':<15}{'vocab':<6}{'ranks':>6}{'weights+opt':>12}{'buffers':>9}{'used / cap GiB':>26}{'cost ms':>10}  {'fits':<5}committed plan")
    for e in entries:
        head = f"{e['profile']:<15}{e['vocab']:<6}{e['world_size']:>6}"
        if "ranks" not in e:
            needs = f"needs {e['needs_gib']:.1f}, has {e['available_gib']:.1f} (all ranks)" if e["needs_gib"] is not None else e["error"][:60]
            print(f"{head}{'-':>12}{'-':>9}{needs:>36}  no")
            continue
        busiest = max(e["ranks"], key=lambda r: r["used"])
        used = f"{busiest['used']:.2f} / {busiest['cap']:.2f} ({e['memory']})"
        print(f"{head}{busiest['weights'] + busiest['optimizer']:>12.2f}{busiest['buffers']:>9.2f}{used:>26}"
              f"{e['step_cost_ms']:>10.1f}  {'yes' if e['fits'] else 'NO':<5}{e['committed_plan']}")


def draw(entries: list[dict], path: Path) -> Path:
    """A panel per profile: per-rank stacked memory (p90 left, plain; full right, hatched) and the cap."""
    profiles = list(dict.fromkeys(e["profile"] for e in entries))
    cols = min(3, len(profiles))
    rows = -(-len(profiles) // cols)
    fig, axes = plotting.figure(rows, cols, 5.2, 3.6)
    vocabs = list(dict.fromkeys(e["vocab"] for e in entries))
    width = 0.8 / len(vocabs)
    for ax, profile in zip(axes, profiles):
        notes = []
        for index, vocab in enumerate(vocabs):
            e = next((e for e in entries if e["profile"] == profile and e["vocab"] == vocab), None)
            if e is None:
                continue
            offset = (index - (len(vocabs) - 1) / 2) * width
            if "ranks" not in e:
                needs = (f"\nthe planned tables need {e['needs_gib']:.1f} GiB,\n{e['available_gib']:.1f} GiB are free "
                         f"over the {e['world_size']} ranks") if e["needs_gib"] is not None else ""
                ax.text(0.5, 0.55 - 0.3 * index, f"{vocab}: does not fit{needs}", transform=ax.transAxes, ha="center", va="center",
                        fontsize=8, color="firebrick", bbox={"facecolor": "white", "edgecolor": "firebrick"})
                notes.append(f"{vocab}: does not fit")
                continue
            x = [r["rank"] + offset for r in e["ranks"]]
            plotting.stacked_bars(ax, x, {k: [r[k] for r in e["ranks"]] for k in MEMORY}, width * 0.9,
                                  hatch="//" if index else None, legend=index == 0)
            notes.append(f"{vocab}: {e['step_cost_ms']:,.1f} ms")
        mine = [e for e in entries if e["profile"] == profile]
        world, device, kind = mine[0]["world_size"], mine[0]["device_type"], mine[0]["memory"]
        planned = [e for e in mine if "ranks" in e]
        if planned:
            cap = planned[0]["ranks"][0]["cap"]
            ax.axhline(cap, color="firebrick", linestyle="--", linewidth=1)
            ax.text(world - 0.5, cap, f"cap {cap:.1f} GiB", ha="right", va="bottom", fontsize=8, color="firebrick")
        ax.set_xticks(range(world))
        ax.set_xlim(-0.6, world - 0.4)
        ax.set_xlabel("rank" + ("  (" + ", ".join(f"{v} {'hatched' if i else 'plain'}" for i, v in enumerate(vocabs)) + ")" if len(vocabs) > 1 else ""))
        ax.set_ylabel(f"{kind} memory, GiB")
        ax.set_title(f"{profile}: {world} x {device}\nplanner step cost (slowest rank) {'; '.join(notes)}", fontsize=9)
    for ax in axes[len(profiles):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="upper left")
    return plotting.save(fig, path, "Planned memory per rank (TorchRec planner estimates, not measured)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "muse.yaml", help="the job to plan (default configs/muse.yaml)")
    parser.add_argument("--profiles", default=None, help="comma-separated profiles (names in configs/hardware/ or paths; default: all there)")
    parser.add_argument("--vocabs", default=",".join(VOCABS), help="comma-separated item vocabularies (default p90,full)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.scl_storage=int8_replicated")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of plans.json and plans.png (default benchmarks/results)")
    args = parser.parse_args()
    profiles = args.profiles.split(",") if args.profiles else sorted(p.stem for p in planning.PROFILES_DIR.glob("*.yaml"))
    vocabs = args.vocabs.split(",")
    unknown = sorted(set(vocabs) - set(VOCABS))
    if unknown:
        parser.error(f"--vocabs: {', '.join(unknown)} unknown (choose from {', '.join(VOCABS)})")
    started = time.perf_counter()
    try:  # an unknown profile or a wrong --set (a plan that does not fit is an entry, not an error)
        entries = [entry(args.config, profile, vocab, args.set) for profile in profiles for vocab in vocabs]
    except ConfigError as e:
        parser.error(str(e))
    print_table(entries)
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": str(args.config), "overrides": args.set,
              "units": {"memory": "GiB per rank", "cost": "ms per step, the planner's estimate of the embedding lookups (compute + comms)"},
              "seconds": round(time.perf_counter() - started, 1), "plans": entries}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "plans.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = draw(entries, args.out / "plans.png")
    print(f"saved {out} and {png}")


if __name__ == "__main__":
    main()
