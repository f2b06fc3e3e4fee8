"""Loader throughput: samples/s per worker on synthetic shards with full 1000-long sequences.

The synthetic catalogue is small, so by default the item and SCL maps are padded with filler keys
up to the real p90 size (35.46 M rows): lookups then miss caches as they do on TAOBAO-MM. The SCL
values file is grown as a sparse file (only real rows are written). `--method` sets the batch
layout of that method's model (`muse_rec.batch.batch_layout`, gsu_stage loader by default: the
loader's GSU included; `--set model.gsu_stage=model`: whole sequences). Prints a table and saves
benchmarks/results/loader.json. Target: 20,000 samples/s per core, GSU included.

    python benchmarks/loader.py [--users 10000] [--map-rows 35460000] [--workers 0 1 2] [--method muse] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from muse_rec.batch import BatchLayout, batch_layout
from muse_rec.config import DataConfig, SynthConfig, load_config
from muse_rec.data import gsu as loader_gsu
from muse_rec.data import schema
from muse_rec.data.atomic import npy_memmap_writer, save_npy
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset, assemble_batch, decode_rows, list_row_groups, make_dataloader, read_chunks, slice_pieces
from muse_rec.data.synth import synthesize
from muse_rec.data.vocab import sorted_vocab

TARGET_PER_CORE = 20_000
RESULTS = Path(__file__).resolve().parent / "results"


def inflate_maps(root: Path, rows: int, seed: int = 0) -> None:
    """Pad the p90 item map and the SCL keys with filler IDs up to `rows` keys (values stay aligned)."""
    layout = DatasetLayout(root)
    item_path = layout.map_path(schema.ITEM_MAP, "p90")
    items = np.load(item_path)
    if len(items) >= rows:
        return
    filler = np.random.default_rng(seed).integers(-(2**63), 2**63 - 1, rows - len(items), dtype=np.int64)
    save_npy(item_path, sorted_vocab(items, filler))
    keys, values = np.load(layout.scl_keys_path), np.load(layout.scl_values_path)
    new_keys = sorted_vocab(keys, filler)
    with npy_memmap_writer(layout.scl_values_path, (len(new_keys), schema.SCL_DIM), np.int8) as out:
        out[np.searchsorted(new_keys, keys)] = values  # sparse file: filler rows are never written
    save_npy(layout.scl_keys_path, new_keys)


class GsuClock:
    """Seconds spent in the loader's GSU (`muse_rec.data.gsu`: cosines, top-K, category matches)
    while in use: its functions are wrapped in this process only."""

    FUNCTIONS = ("scl_cosines", "top_k", "newest_matches")

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "GsuClock":
        self.originals = {name: getattr(loader_gsu, name) for name in self.FUNCTIONS}
        for name, function in self.originals.items():
            setattr(loader_gsu, name, self._timed(function))
        return self

    def __exit__(self, *exc) -> None:
        for name, function in self.originals.items():
            setattr(loader_gsu, name, function)

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def phase_times(config: DataConfig, maps: FeatureMaps, layout: BatchLayout) -> dict:
    """Milliseconds per 1000 samples of each step on one core (second pass: caches warm), the
    GSU's share of assembly apart; each row group streamed `data.decode_rows` rows at a time, as
    the loader reads it."""
    groups = list_row_groups(DatasetLayout(config.root), "train")
    clock = GsuClock()
    for group in (*groups, *groups):
        if group is groups[0]:  # a pass starts: only the second one (warm caches) counts
            read = decode = assemble = clock.seconds = 0.0
            rows = 0
        chunks, first = [], 0
        tables = read_chunks(pq.ParquetFile(group.path), group, config.decode_rows)
        while True:
            t0 = time.perf_counter()
            table = next(tables, None)
            t1 = time.perf_counter()
            read += t1 - t0
            if table is None:
                break
            chunks.append((first, decode_rows(table, maps, config.long_seq_len, str(group.path))))
            first += table.num_rows
            decode += time.perf_counter() - t1
        t2 = time.perf_counter()
        with clock:
            for start in range(0, group.num_rows, config.batch_size):
                stop = min(start + config.batch_size, group.num_rows)
                assemble_batch(slice_pieces(chunks, start, stop), np.ones(stop - start, np.float32), config.long_seq_len, layout, maps.scl.values)
        assemble, rows = assemble + time.perf_counter() - t2, rows + group.num_rows
    times = {"read_parquet": read, "decode_remap_pad": decode, "assemble_batch_and_gsu": assemble, "of_which_gsu": clock.seconds}
    return {name: round(1e6 * t / rows, 2) for name, t in times.items()}


def throughput(config: DataConfig, maps: FeatureMaps, workers: int, layout: BatchLayout) -> float:
    """Samples/s of one whole pass, worker start-up included (the page cache is warm by now)."""
    dataset = ShardDataset(config, "train", maps=maps, layout=layout)
    start = time.perf_counter()
    rows = sum(batch.batch_size for batch in make_dataloader(dataset, num_workers=workers))
    return rows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000, help="train users to synthesize (about 11 rows each)")
    parser.add_argument("--map-rows", type=int, default=35_460_000, help="pad item/SCL maps to this many keys (0: no padding)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to measure (0 = in process)")
    parser.add_argument("--data", type=Path, default=RESULTS / "loader-data", help="where the synthetic shards go")
    parser.add_argument("--method", default="muse", help="model.method whose batch layout the loader assembles")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.gsu_stage=model")
    args = parser.parse_args()
    torch.set_num_threads(1)

    synth = SynthConfig(train_users=args.users, test_users=10, full_history_share=1.0)
    synthesize(synth, args.data, progress=True)
    if args.map_rows:
        inflate_maps(args.data, args.map_rows)
    full_config = load_config(None, [f"data.root={args.data}", "data.batch_size=1000", f"model.method={args.method}", *args.set])
    config, layout = full_config.data, batch_layout(full_config.model)
    maps = FeatureMaps.load(DatasetLayout(args.data), config.vocab)
    sequence_bytes = 8 * 2 * config.long_seq_len

    result = {
        "machine": {"cpus": os.cpu_count(), "threads_per_process": torch.get_num_threads(), "platform": platform.platform(), "processor": platform.processor()},
        "data": {"train_rows": ShardDataset(config, "train", maps=maps).plan.total_rows, "item_map_rows": maps.of_column(schema.HIST_ITEMS).num_rows,
                 "scl_rows": maps.scl.num_rows, "id_bytes_per_sample": sequence_bytes},
        "layout": {"method": args.method, "gsu_stage": full_config.model.stage, "sequence_features": layout.sequence_lengths(config.long_seq_len)},
        "ms_per_1000_samples_one_core": phase_times(config, maps, layout),
        "runs": [],
        "target_samples_per_second_per_core": TARGET_PER_CORE,
    }
    for workers in args.workers:
        rate = throughput(config, maps, workers, layout)
        per_worker = rate / max(workers, 1)
        result["runs"].append({"workers": workers, "samples_per_second": round(rate), "per_worker": round(per_worker),
                               "of_target": round(per_worker / TARGET_PER_CORE, 3)})

    print(f"loader on {result['data']['train_rows']:,} rows, maps of {result['data']['item_map_rows']:,} items:")
    print("  one core, ms per 1000 samples: " + ", ".join(f"{k} {v}" for k, v in result["ms_per_1000_samples_one_core"].items()))
    print(f"  {'workers':>7} {'samples/s':>10} {'per worker':>10} {'of target':>9}")
    for run in result["runs"]:
        print(f"  {run['workers']:>7} {run['samples_per_second']:>10,} {run['per_worker']:>10,} {run['of_target']:>9.0%}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "loader.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
