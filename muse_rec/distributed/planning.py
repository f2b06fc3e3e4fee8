"""Sharding plans per hardware, made offline: no data, no GPU, no process group.

`muse-rec plan --hardware h100x8 --vocab full` builds the model on the meta device with the table
sizes of the chosen vocabulary (from the data directory's feature maps where they exist, else the
released TAOBAO-MM sizes), attaches the fused optimizers the job would use (so the planner counts
their state), plans it for the profile's topology and writes the plan as a small JSON file that
`train --plan` hands to DMP. A plan names its device type and world size, and is refused by a job
that runs on others. Beside it, a per-rank memory table says what each rank holds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch
import yaml
from torchrec.distributed.planner.shard_estimators import _calculate_optimizer_sizes
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Topology
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)

from muse_rec.config import Config, HardwareConfig, config_from_dict, load_config, to_dict
from muse_rec.data import schema
from muse_rec.data.atomic import atomic_path
from muse_rec.data.feature_map import _load_npy
from muse_rec.data.layout import DatasetLayout
from muse_rec.distributed.sharding import attach_sparse_optimizers, make_planner, planned_tables, replicated_bytes, sharders
from muse_rec.distributed.topology import GIB, topology_from_profile
from muse_rec.errors import ConfigError, MuseRecError
from muse_rec.model.factory import make_model
from muse_rec.model.muse import MuseModel

__all__ = [  # topology_from_profile lives in muse_rec.distributed.topology (sharding.py needs it too)
    "RankMemory", "TAOBAO_MM_ITEM_ROWS", "TAOBAO_MM_ROWS", "hardware_profile_path", "load_config_with_profile", "load_plan",
    "memory_table", "placement_table", "plan_offline", "rank_memory", "save_plan", "table_rows", "topology_from_profile",
]

log = logging.getLogger(__name__)

PROFILES_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
PROFILE_SECTIONS = ("hardware", "sharding")
PLAN_FORMAT = "muse-rec sharding plan 1"

TAOBAO_MM_ROWS = {
    schema.USER: 6_929_671, "130_1": 11, "130_2": 3, "130_3": 49, "130_4": 493, "130_5": 6,
    schema.CATE_MAP: 26_397, "213": 542, "214": 121, "scl": 35_458_467,
}
"""Vocabulary sizes of the released TAOBAO-MM without the padding row (shared/spec/taobao-mm.md)."""
TAOBAO_MM_ITEM_ROWS = {"p90": 35_458_467, "full": 243_363_020}
"""The item vocabulary's; p90 is the SCL table's 35,458,467 keys (the spec's "about 35.46 M")."""


# -- hardware profiles -----------------------------------------------------------------------------
def hardware_profile_path(profile: str) -> Path:
    """`profile` as a path, or the name of a file in configs/hardware/ (`h100x8`)."""
    path = Path(profile)
    if path.exists():
        return path
    named = PROFILES_DIR / f"{profile}.yaml"
    if named.exists():
        return named
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
    raise ConfigError(f"hardware profile {profile!r}: no such file, and not a profile in {PROFILES_DIR} ({known})")


def load_config_with_profile(config_path: str | Path | None, profile: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, the config file, the hardware profile, then overrides. A profile sets `hardware`
    and may tune `sharding` (e.g. UVM caching where the tables would not fit otherwise)."""
    path = hardware_profile_path(profile)
    try:
        load_config(path)  # every check of a config file, before the raw tree is merged
    except ConfigError as e:
        raise ConfigError(f"hardware profile {path}: {e}") from None
    tree = yaml.safe_load(path.read_text()) or {}
    extra = sorted(set(tree) - set(PROFILE_SECTIONS))
    if extra:
        raise ConfigError(f"hardware profile {path}: only {' and '.join(PROFILE_SECTIONS)} belong in a profile, found {', '.join(extra)}")
    return config_from_dict(_merge(to_dict(load_config(config_path)), tree), overrides)


def _merge(base: dict, update: dict) -> dict:
    return {**base, **{k: _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v for k, v in update.items()}}


# -- table sizes -----------------------------------------------------------------------------------
def table_rows(root: str | Path, vocab: str) -> tuple[dict[str, int], str]:
    """Rows of every table (padding row included) and where they came from: each map's length from
    its header in `root`'s feature maps where the file exists (nothing else is read), else the
    released size."""
    layout = DatasetLayout(root)
    paths = {field: layout.map_path(field, vocab) for field in schema.FEATURE_MAPS} | {"scl": layout.scl_keys_path}
    released = TAOBAO_MM_ROWS | {schema.ITEM_MAP: TAOBAO_MM_ITEM_ROWS[vocab]}
    missing = [key for key, path in paths.items() if not path.exists()]
    rows = {key: (released[key] if key in missing else len(_load_npy(path))) + 1 for key, path in paths.items()}
    if not missing:
        source = f"the feature maps in {layout.feature_map_dir}"
    elif len(missing) == len(paths):
        source = f"the released TAOBAO-MM sizes (no feature maps in {layout.feature_map_dir})"
    else:
        source = f"the feature maps in {layout.feature_map_dir}, released TAOBAO-MM sizes for {', '.join(missing)}"
    return rows, source


# -- offline planning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankMemory:
    """What one rank holds, in bytes. `weights` and `optimizer` are its shards of the planned tables
    wherever they live (device memory; host memory for UVM kernels and on CPU); `buffers` is the
    rest of the planner's estimate (lookup inputs and outputs, UVM caches); `replicated` the int8
    SCL table outside the plan; `host_mapped` the SCL values file the data loaders map at
    `model.gsu_stage: loader`, held once per host (page cache shared by every process there),
    outside the plan and the caps: a profile's host-memory cap leaves headroom for the page cache
    (configs/hardware/). `hbm` and `ddr` are the totals per memory with their caps.
    `cost_ms` is the planner's estimate of the rank's step time, by part (its shards' perf sums)."""

    rank: int
    weights: int
    optimizer: int
    buffers: int
    replicated: int
    host_mapped: int
    hbm: int
    hbm_cap: int
    ddr: int
    ddr_cap: int
    cost_ms: dict[str, float]

    @property
    def fits(self) -> bool:
        return self.hbm <= self.hbm_cap and self.ddr <= self.ddr_cap


def plan_offline(config: Config, hardware: HardwareConfig, vocab: str) -> tuple[ShardingPlan, list[RankMemory]]:
    """The plan the job `config` would use on `hardware` with the `vocab` item vocabulary, and what
    each rank holds under it. Runs anywhere: the model lives on the meta device."""
    rows, source = table_rows(config.data.root, vocab)
    log.info("table sizes (%s vocabulary) from %s", vocab, source)
    topology = topology_from_profile(hardware)
    model = make_model(config.model, rows, device=torch.device("meta"))
    attach_sparse_optimizers(model, config.optim, topology.compute_device)
    planner = make_planner(model, config.sharding, topology, config.data)
    try:
        plan = planner.plan(model, sharders())
    except PlannerError as e:
        raise MuseRecError(
            f"the {vocab} tables do not fit {hardware.world_size} x {hardware.device_type} as profiled "
            f"(let sharding.tables shard the big tables row_wise or with fused_uvm_caching, or change model.scl_storage): {e}"
        ) from None
    host_mapped = (rows["scl"] - 1) * schema.SCL_DIM if model.layout.cosines else 0
    return plan, rank_memory(planner._best_plan, topology, replicated_bytes(model), host_mapped)


COST_PARTS = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "prefetch_compute")
"""The parts of TorchRec's per-shard `Perf` estimate, in ms per step."""


def rank_memory(options: list[ShardingOption], topology: Topology, replicated: int, host_mapped: int = 0) -> list[RankMemory]:
    """Per-rank sums over the planner's chosen shards. Optimizer state is TorchRec's own estimate
    (Adam: 2 x the weights, row-wise Adagrad: one float a row, SGD: none)."""
    totals = {rank: dict(weights=0, optimizer=0, hbm=0, ddr=0) for rank in range(topology.world_size)}
    costs = {rank: dict.fromkeys(COST_PARTS, 0.0) for rank in range(topology.world_size)}
    for option in options:
        optimizer_class = getattr(option.tensor, "_optimizer_classes", [None])[0]
        for shard in option.shards:
            weights = prod(shard.size) * option.tensor.element_size()
            total = totals[shard.rank]
            total["weights"] += weights
            total["optimizer"] += _calculate_optimizer_sizes([weights], optimizer_class, option.tensor.shape)[0]
            total["hbm"] += shard.storage.hbm
            total["ddr"] += shard.storage.ddr
            for part in COST_PARTS:
                costs[shard.rank][part] += getattr(shard.perf, part)
    on_cpu = topology.compute_device == "cpu"
    return [
        RankMemory(
            rank=rank,
            weights=t["weights"],
            optimizer=t["optimizer"],
            buffers=t["hbm"] + t["ddr"] - t["weights"] - t["optimizer"],
            replicated=replicated,
            host_mapped=host_mapped,
            hbm=t["hbm"] + (0 if on_cpu else replicated),
            hbm_cap=topology.devices[rank].storage.hbm,
            ddr=t["ddr"] + (replicated if on_cpu else 0),
            ddr_cap=topology.devices[rank].storage.ddr,
            cost_ms={**costs[rank], "total": sum(costs[rank].values())},
        )
        for rank, t in totals.items()
    ]


# -- reports ---------------------------------------------------------------------------------------
def memory_table(memory: list[RankMemory], device_type: str) -> str:
    """Markdown, GiB: one row per rank."""
    header = ["rank", "weights", "optimizer", "weights + optimizer", "I/O buffers, caches", "replicated SCL", "SCL file (mmap, per host)"]
    header += (["device memory / cap"] if device_type == "cuda" else []) + ["host memory / cap", "fits"]
    lines = [_row(header), _row(["---"] * len(header))]
    for m in memory:
        cells = [str(m.rank), _gib(m.weights), _gib(m.optimizer), _gib(m.weights + m.optimizer), _gib(m.buffers), _gib(m.replicated), _gib(m.host_mapped)]
        cells += [f"{_gib(m.hbm)} / {_gib(m.hbm_cap)}"] if device_type == "cuda" else []
        cells += [f"{_gib(m.ddr)} / {_gib(m.ddr_cap)}", "yes" if m.fits else "NO"]
        lines.append(_row(cells))
    return "\n".join(lines)


def placement_table(plan: ShardingPlan) -> str:
    """Markdown: where each table went."""
    lines = [_row(["table", "sharding", "kernel", "ranks", "rows per shard"]), _row(["---"] * 5)]
    for path, module_plan in plan.plan.items():
        for name, p in module_plan.items():
            rows = sorted({s.shard_sizes[0] for s in p.sharding_spec.shards})
            lines.append(_row([f"{path}.{name}", p.sharding_type, p.compute_kernel, _ranges(p.ranks), " / ".join(f"{r:,}" for r in rows)]))
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> '0-3, 5'."""
    spans: list[list[int]] = []
    for r in sorted(set(ranks)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# -- plan files ------------------------------------------------------------------------------------
_SAVED_FIELDS = ("sharding_type", "compute_kernel", "ranks", "sharding_spec", "cache_params")


def save_plan(path: str | Path, plan: ShardingPlan, hardware: HardwareConfig, host_mapped: int = 0) -> None:
    """The plan as JSON (written atomically), with the device type and world size it was made for
    (and the whole profile, for the record), and what each host holds outside the plan: the SCL
    values file the loaders map at gsu_stage loader (`RankMemory.host_mapped`)."""
    if hardware.device_type is None or hardware.world_size is None:
        raise ConfigError("a saved plan needs hardware.device_type and hardware.world_size (a hardware profile)")
    saved = {
        "format": PLAN_FORMAT,
        "device_type": hardware.device_type,
        "world_size": hardware.world_size,
        "hardware": dataclasses.asdict(hardware),
        "host": {"scl_values_file_bytes": host_mapped, "held": "memory-mapped by the data loaders, once per host (page cache)"},
        "plan": {module: {name: _parameter_to_json(name, p) for name, p in tables.items()} for module, tables in plan.plan.items()},
    }
    with atomic_path(path) as tmp:  # keys in the plan's order, so the loaded plan prints the same
        tmp.write_text(json.dumps(saved, indent=1) + "\n")


def _parameter_to_json(name: str, p: ParameterSharding) -> dict:
    """Only what our plans use; anything else set would be lost, so it is refused."""
    unsaved = [f.name for f in dataclasses.fields(p) if f.name not in _SAVED_FIELDS and getattr(p, f.name) is not None]
    load_factor = p.cache_params.load_factor if p.cache_params is not None else None
    if unsaved or _cache_params(load_factor) != p.cache_params:
        raise MuseRecError(
            f"table {name}: a plan file holds {', '.join(_SAVED_FIELDS)} (cache load factor only); "
            f"this plan also sets {unsaved or p.cache_params}"
        )
    return {
        "sharding_type": p.sharding_type,
        "compute_kernel": p.compute_kernel,
        "ranks": p.ranks,
        "cache_load_factor": load_factor,
        "shards": [{"offsets": s.shard_offsets, "sizes": s.shard_sizes, "placement": str(s.placement)} for s in p.sharding_spec.shards],
    }


def load_plan(path: str | Path, device_type: str, world_size: int, model: MuseModel | None = None) -> ShardingPlan:
    """A plan written by `save_plan`, for a job on `world_size` ranks of `device_type` (and, given
    the job's `model`, for its table sizes); a plan made for other hardware is refused, saying
    which of the two differs."""
    try:
        saved = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"sharding plan {path} does not exist (write one with `muse-rec plan`)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"sharding plan {path} is not valid JSON: {e}") from None
    if not isinstance(saved, dict) or saved.get("format") != PLAN_FORMAT:
        raise ConfigError(f"{path} is not a muse-rec sharding plan (expected \"format\": {PLAN_FORMAT!r})")
    differences = [
        f"{what} {saved.get(key)!r}, this job {running!r}"
        for what, key, running in (("device type", "device_type", device_type), ("world size", "world_size", world_size))
        if saved.get(key) != running
    ]
    if differences:
        raise ConfigError(
            f"sharding plan {path} was made for other hardware ({'; '.join(differences)}): "
            "make one for this hardware with `muse-rec plan --hardware <profile>`"
        )
    try:
        plan = ShardingPlan(
            {
                module: EmbeddingModuleShardingPlan({name: _parameter_from_json(p) for name, p in tables.items()})
                for module, tables in saved["plan"].items()
            }
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"sharding plan {path} is malformed: {type(e).__name__} {e}") from None
    if model is not None:
        _check_fits_model(plan, model, path)
    return plan


def _check_fits_model(plan: ShardingPlan, model: MuseModel, path: str | Path) -> None:
    """A plan made for other table sizes (another vocabulary, data set or SCL storage) would fail
    deep inside DMP; say which tables differ instead."""
    expected = {(module, t.name): (t.num_embeddings, t.embedding_dim) for module, _, t in planned_tables(model)}
    found = {(module, name): _extent(p) for module, tables in plan.plan.items() for name, p in tables.items()}
    problems = [
        f"{module}.{name}: {_shape(found.get((module, name)))} in the plan, {_shape(expected.get((module, name)))} in the model"
        for module, name in sorted(expected.keys() | found.keys())
        if expected.get((module, name)) != found.get((module, name))
    ]
    if problems:
        raise MuseRecError(
            f"sharding plan {path} does not fit this model (made for another vocabulary, data set or model.scl_storage?): "
            + "; ".join(problems)
        )


def _extent(parameter: ParameterSharding) -> tuple[int, int]:
    shards = parameter.sharding_spec.shards
    return max(s.shard_offsets[0] + s.shard_sizes[0] for s in shards), max(s.shard_offsets[1] + s.shard_sizes[1] for s in shards)


def _shape(shape: tuple[int, int] | None) -> str:
    return "absent" if shape is None else f"{shape[0]:,} x {shape[1]}"


def _parameter_from_json(p: dict) -> ParameterSharding:
    return ParameterSharding(
        sharding_type=p["sharding_type"],
        compute_kernel=p["compute_kernel"],
        ranks=p["ranks"],
        sharding_spec=EnumerableShardingSpec(
            [ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=s["placement"]) for s in p["shards"]]
        ),
        cache_params=_cache_params(p["cache_load_factor"]),
    )


def _cache_params(load_factor: float | None) -> CacheParams | None:
    return None if load_factor is None else CacheParams(load_factor=load_factor)
