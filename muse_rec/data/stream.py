"""Stream a split through the loader and summarise what was read: the data pipeline's smoke run."""
from __future__ import annotations

import logging
import time

from tqdm import tqdm

from muse_rec.batch import Batch
from muse_rec.config import DataConfig
from muse_rec.data.loader import ShardDataset, make_dataloader

log = logging.getLogger(__name__)


def stream_split(config: DataConfig, split: str, progress: bool = True) -> dict:
    """Read a whole split as rank 0 of 1; report rows, clicks, speed and the share of row-0 lookups."""
    dataset = ShardDataset(config, split)
    zeros: dict[str, int] = {}
    lookups: dict[str, int] = {}
    rows = clicks = 0
    first: Batch | None = None
    start = time.perf_counter()
    for batch in tqdm(make_dataloader(dataset), total=len(dataset), desc=f"stream {split}", unit="batch", disable=not progress):
        first = first or batch
        real = batch.weights > 0
        rows += int(real.sum())
        clicks += int(batch.labels[real].sum())
        for kjt in _kjts(batch):
            for key in kjt.keys():
                values = Batch.sequence(kjt, key)[real]
                zeros[key] = zeros.get(key, 0) + int((values == 0).sum())
                lookups[key] = lookups.get(key, 0) + values.numel()
    seconds = time.perf_counter() - start
    summary = {
        "split": split,
        "rows": rows,
        "batches": len(dataset),
        "click_rate": clicks / max(rows, 1),
        "seconds": round(seconds, 3),
        "samples_per_second": round(rows / max(seconds, 1e-9)),
        "row0_share": {key: round(zeros[key] / max(lookups[key], 1), 4) for key in zeros},
        "first_row": _first_row(first) if first is not None else None,
    }
    log.info("%s: %d rows in %d batches, %.0f samples/s", split, rows, len(dataset), summary["samples_per_second"])
    return summary


def _kjts(batch: Batch) -> list:
    return [kjt for kjt in (batch.id_features, batch.sequence_features, batch.scl_features) if kjt is not None]


def _first_row(batch: Batch) -> dict:
    """The first sample as table rows: scalars, and the last 5 positions of each sequence."""
    row = {key: int(Batch.sequence(batch.id_features, key)[0, 0]) for key in batch.id_features.keys()}
    for kjt in _kjts(batch)[1:]:
        for key in kjt.keys():
            row[f"{key}[-5:]"] = Batch.sequence(kjt, key)[0, -5:].tolist()
    return row | {"label": float(batch.labels[0]), "raw_user_id": int(batch.user_ids[0])}


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['split']}: {summary['rows']:,} rows in {summary['batches']} batches, "
        f"click rate {summary['click_rate']:.3f}, {summary['samples_per_second']:,} samples/s",
        "  share of lookups that hit row 0 (padding or out of vocabulary):",
    ]
    lines += [f"    {key:>12}: {share:.3f}" for key, share in summary["row0_share"].items()]
    if summary["first_row"]:
        lines.append("  first row (table rows): " + ", ".join(f"{k}={v}" for k, v in summary["first_row"].items()))
    return "\n".join(lines)
