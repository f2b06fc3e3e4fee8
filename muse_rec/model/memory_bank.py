"""The LEMUR memory bank: one 128-d row per item-table row, a TorchRec table written in place.

Reads are ordinary lookups of an `EmbeddingCollection` table (`bank_table_config`), so the bank is
sharded by the plan like every other table (row-wise over the ranks on the GPU profiles), looked
up through TorchRec's all-to-all, saved and resharded by the checkpoint, and counted by the
planner. It is frozen to the optimizers (SGD with lr 0, as the SCL table) and its lookups are
detached: history reads carry no gradient. Writes go straight into the rows this rank holds:
`BankWriter` receives every rank's freshly encoded (row, value) pairs through an exchange
function (an all-gather; `muse_rec.distributed.memory_bank` installs it) and each rank stores
those that fall into its own pieces of the table. Never-written rows are zero, and a zero row is
the "missing" flag: an encoder output is never exactly zero.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig

from muse_rec import schema

BANK_TABLE = "bank"
BANK_FEATURES = (schema.TARGET_ITEM, schema.HIST_ITEMS)
"""The bank is keyed by item row and read for the target and the sequence: the item table's
features, consumed from the same `Batch.sequence_features` KJT."""

Exchange = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def bank_table_config(num_rows: int, dtype: str) -> EmbeddingConfig:
    return EmbeddingConfig(
        name=BANK_TABLE,
        num_embeddings=num_rows,
        embedding_dim=schema.SCL_DIM,
        feature_names=list(BANK_FEATURES),
        data_type=DataType.FP16 if dtype == "fp16" else DataType.FP32,
        init_fn=lambda weight: None,  # zeroed by `BankWriter.clear` once the table is materialised
    )


def missing(rows: torch.Tensor) -> torch.Tensor:
    """A bank read is missing where the row is all zeros (never written)."""
    return (rows == 0).all(dim=-1)


def _local_exchange(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows, values


class StatSums(nn.Module):
    """Sums of statistics kept on the device (no sync a step), read and reset by `pop_stats`."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.register_buffer("stats", torch.zeros(len(names), dtype=torch.float64), persistent=False)

    def pop_stats(self) -> torch.Tensor:
        """The sums since the last call, then reset."""
        out = self.stats.clone()
        self.stats.zero_()
        return out


class BankWriter(StatSums):
    """Writes encoded items into this rank's pieces of the bank, and keeps the bank's statistics
    since the last `pop_stats`: staleness and coverage (see `STATS`).

    Holds no module: the pieces are plain tensor views of the (sharded) table, set by `bind`, so
    TorchRec's pipeline tracer treats this module as a leaf.
    """

    STATS = (
        "written_items", "target_items_known",  # distinct encoded targets; those already in the bank
        "staleness_sum", "staleness_items",  # cosine(new value, cached value) over the known ones
        "refreshed_items", "refresh_staleness_sum",  # rows re-encoded by the refresh (already in the bank); cosine sum
    )

    def __init__(self) -> None:
        super().__init__(self.STATS)
        self.pieces: list[tuple[int, int, torch.Tensor]] | None = None  # None until bound; [] on a rank holding none
        self.exchange: Exchange = _local_exchange
        self.held_ranges: list[tuple[int, int]] = []  # the rows this rank holds: sorted, disjoint [start, stop)
        self.register_buffer("_held_starts", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("_held_offsets", torch.zeros(1, dtype=torch.long), persistent=False)

    def bind(self, pieces: list[tuple[int, int, torch.Tensor]], exchange: Exchange | None = None) -> None:
        """(first row, first column, tensor) of every piece of the bank this rank holds."""
        self.pieces = pieces
        self.exchange = exchange or _local_exchange
        self.held_ranges = _union(sorted((first, first + piece.shape[0]) for first, _, piece in pieces))
        device = pieces[0][2].device if pieces else self._held_starts.device
        sizes = torch.tensor([hi - lo for lo, hi in self.held_ranges], dtype=torch.long, device=device)
        self._held_starts = torch.tensor([lo for lo, _ in self.held_ranges], dtype=torch.long, device=device)
        self._held_offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])

    @property
    def held_count(self) -> int:
        """Rows this rank holds (a row held by several column pieces counts once)."""
        return sum(hi - lo for lo, hi in self.held_ranges)

    def held_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The rows at `positions` (< held_count) of this rank's held rows in ascending order; from
        the ranges, so no per-row index is kept (243 M rows would take 2 GB of int64)."""
        index = torch.searchsorted(self._held_offsets[1:], positions, right=True)
        return self._held_starts[index] + positions - self._held_offsets[index]

    @torch.no_grad()
    def clear(self) -> None:
        for _, _, piece in self.pieces or []:
            piece.zero_()

    @torch.no_grad()
    def forward(
        self, rows: torch.Tensor, values: torch.Tensor, refresh_rows: torch.Tensor | None = None, refresh_values: torch.Tensor | None = None
    ) -> None:
        """Store `values` (N, 128) at bank `rows` (N,), and the refreshed history rows beside them,
        deduplicated; collective (every rank calls it). Targets count for target coverage and
        staleness; refreshed rows for the refresh's own count and staleness. An item that is a target
        on one rank and refreshed on another keeps the target's value (both are this step's encoder)."""
        self._check_bound()
        rows, values = _last_of_each(rows, values)
        is_target = torch.ones(rows.numel(), 1, device=values.device)
        if refresh_rows is not None:
            refresh_rows, refresh_values = _last_of_each(refresh_rows, refresh_values)
            rows = torch.cat([refresh_rows, rows])
            values = torch.cat([refresh_values.float(), values.float()])
            is_target = torch.cat([torch.zeros(refresh_rows.numel(), 1, device=values.device), is_target])
        rows, packed = self.exchange(rows, torch.cat([values.float(), is_target], dim=1))
        order = torch.sort(packed[:, -1], stable=True).indices  # refreshes first: a target's value is the last of its row
        rows, packed = _last_of_each(rows[order], packed[order])  # an item encoded on several ranks: identical values
        self._store(rows, packed[:, :-1], packed[:, -1] > 0, only_written=False)

    @torch.no_grad()
    def store_local(self, rows: torch.Tensor, values: torch.Tensor, only_written: bool, counted: bool | None = None) -> torch.Tensor:
        """Store rows this rank holds (distinct), no exchange: the warm start (counted nowhere), the
        sweep refresh (`only_written`: a never-written row stays missing; counted as refreshed) and
        the whole-bank re-encode (only_written, `counted` False: its own statistics). Returns (2,):
        the sum of cosine(new, cached value) over the rows already written, and their count."""
        self._check_bound()
        counted = only_written if counted is None else counted
        return self._store(rows, values.float(), torch.zeros_like(rows, dtype=torch.bool) if counted else None, only_written)

    def _store(self, rows: torch.Tensor, values: torch.Tensor, is_target: torch.Tensor | None, only_written: bool) -> torch.Tensor:
        """is_target: per row, counted as a target write (True) or as a refresh (False); None: not
        counted. Returns (2,): cosine sum and count over the rows already written."""
        staleness = torch.zeros(2, dtype=torch.float64, device=self.stats.device)
        for first_row, first_column, piece in self.pieces:
            local = (rows >= first_row) & (rows < first_row + piece.shape[0])
            index = rows[local].to(piece.device) - first_row
            new = values[local][:, first_column : first_column + piece.shape[1]].to(piece.device)
            old = piece[index].float()
            known = ~missing(old)
            if only_written:
                new = torch.where(known.unsqueeze(-1), new, old)
            if first_column == 0:  # count each item once, on the piece holding its first columns
                cosine = F.cosine_similarity(new, old, dim=-1)
                staleness += torch.stack([(cosine * known).sum(), known.sum()]).to(staleness)
            if first_column == 0 and is_target is not None:
                target = is_target[local].to(piece.device)
                self._add("written_items", target.sum())
                self._add("target_items_known", (known & target).sum())
                self._add("staleness_sum", (cosine * (known & target)).sum())
                self._add("staleness_items", (known & target).sum())
                self._add("refreshed_items", (known & ~target).sum())
                self._add("refresh_staleness_sum", (cosine * (known & ~target)).sum())
            piece[index] = new.to(piece.dtype)
        return staleness

    def _check_bound(self) -> None:
        if self.pieces is None:
            raise RuntimeError("BankWriter: no bank pieces bound (muse_rec.distributed.memory_bank.bind_memory_bank)")

    def _add(self, name: str, amount: torch.Tensor | int) -> None:
        self.stats[self.STATS.index(name)] += torch.as_tensor(amount, dtype=torch.float64, device=self.stats.device)

READ_STATS = ("short_hits", "short_lookups", "long_hits", "long_lookups", "target_hits", "target_lookups")
"""Bank reads found / looked up: history (non-padding positions), short and long, and the targets
read from the bank instead of encoded (outside the p share, or all of them with eval_target bank)."""
PAIR_STATS = ("pair_loss_sum", "pair_steps", "pairs")
"""lemur's co-occurrence loss summed over training steps, the steps, and the pairs they had."""


def bank_metrics(sums: torch.Tensor) -> dict[str, float | None]:
    """Coverage and staleness from the sums of `BankWriter.STATS`, `READ_STATS` and `PAIR_STATS` (one
    rank's or all ranks'). Target coverage: the share of target lookups the bank could answer: the distinct
    encoded targets already in it before their write, and the targets read from it. Staleness: the
    cosine between a target's fresh encoding and the value it replaces (the paper's measure);
    `bank_staleness_refresh` the same for the rows the refresh re-encoded, `bank_refreshed_rows` how
    many (already in the bank) it re-encoded. With co-occurrence pairs: their loss, the mean over
    steps and ranks, and the pairs a step (all ranks)."""
    s = dict(zip(BankWriter.STATS + READ_STATS + PAIR_STATS, sums.tolist()))
    s["target_found"] = s["target_items_known"] + s["target_hits"]
    s["target_total"] = s["written_items"] + s["target_lookups"]

    def share(hits: str, total: str) -> float | None:
        return s[hits] / s[total] if s[total] else None  # nothing counted (e.g. no write in evaluation)

    return {
        "bank_coverage_target": share("target_found", "target_total"),
        "bank_coverage_short": share("short_hits", "short_lookups"),
        "bank_coverage_long": share("long_hits", "long_lookups"),
        "bank_staleness_cosine": share("staleness_sum", "staleness_items"),
        "bank_refreshed_rows": s["refreshed_items"],
        "bank_staleness_refresh": share("refresh_staleness_sum", "refreshed_items"),
    } | ({"cooccurrence_loss": share("pair_loss_sum", "pair_steps"), "cooccurrence_pairs": s["pairs"] / s["pair_steps"]} if s["pair_steps"] else {})


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [start, stop) ranges merged where they overlap or touch."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif hi > lo:
            out.append((lo, hi))
    return out


def _last_of_each(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One (row, value) per distinct row: the last occurrence."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    last = torch.full((unique.numel(),), -1, dtype=torch.long, device=rows.device)
    last.scatter_reduce_(0, inverse, torch.arange(rows.numel(), device=rows.device), reduce="amax")
    return unique, values[last]
