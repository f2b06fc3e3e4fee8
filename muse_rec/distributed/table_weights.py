"""Writing table weights into whatever shards this rank holds: deterministic init and the SCL table.

TorchRec's `init_fn` sees only a local shard, so a table initialised through it differs with the
sharding. Here every value is a function of (seed, table, global row): the same weights on 1 or
N ranks, table- or row-wise, which makes sharded and unsharded runs comparable and a run
reproducible on other hardware. Rows are written in blocks of `BLOCK_ROWS` from the block's own
generator, so no full-size temporary ever exists (the SCL table is 35 M x 128).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from muse_rec.data.feature_map import SclIndex
from muse_rec.model.tables import TRUNCATE_BOUND, ReplicatedInt8Table

BLOCK_ROWS = 1 << 16
SCL_WEIGHT_SUFFIX = "scl_table.embeddings.scl.weight"
UNTRAINED_SUFFIXES = (SCL_WEIGHT_SUFFIX, "bank_table.embeddings.bank.weight")
"""Tables that are filled, not initialised: the SCL table (from its values file) and lemur's memory bank (zeros)."""


def local_pieces(weight: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
    """(first table row, first column, tensor) of each piece of a table this rank holds."""
    if hasattr(weight, "local_shards"):  # a ShardedTensor: this rank's row-, column- or table-wise shards
        return [(s.metadata.shard_offsets[0], s.metadata.shard_offsets[1], s.tensor) for s in weight.local_shards()]
    return [(0, 0, weight)]


def _write_blocks(weight: torch.Tensor, rows_of_block) -> None:
    """Fill every local piece from `rows_of_block(block index) -> (BLOCK_ROWS, full width) array`."""
    with torch.no_grad():
        for first_row, first_column, piece in local_pieces(weight):
            columns = slice(first_column, first_column + piece.shape[1])
            row = first_row
            while row < first_row + piece.shape[0]:
                block, offset = divmod(row, BLOCK_ROWS)
                take = min(BLOCK_ROWS - offset, first_row + piece.shape[0] - row)
                values = rows_of_block(block)[offset : offset + take, columns]
                piece[row - first_row : row - first_row + take].copy_(torch.from_numpy(np.ascontiguousarray(values)))
                row += take


def truncated_normal(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    """N(0, std) restricted to [-TRUNCATE_BOUND, TRUNCATE_BOUND], the distribution of torch's
    trunc_normal_: draws outside are drawn again (clipping would pile them onto the bounds). `std` is
    the normal's before the cut; at any std well below the bounds (the default 0.001) nothing is
    outside and the values are N(0, std)."""
    values = rng.standard_normal(shape) * std
    outside = np.flatnonzero(np.abs(values) > TRUNCATE_BOUND)
    while outside.size:  # a share P(|x| > bound) drawn again each round: a few rounds
        values.flat[outside] = rng.standard_normal(outside.size) * std
        outside = outside[np.abs(values.flat[outside]) > TRUNCATE_BOUND]
    return values.astype(np.float32)


def init_trainable_tables(model: nn.Module, seed: int, std: float) -> list[str]:
    """The reference's init, `truncated_normal`, for every trainable table; returns their names."""
    names = []
    for key, weight in model.state_dict().items():
        if not key.endswith(".weight") or ("embedding_bags." not in key and "embeddings." not in key) or key.endswith(UNTRAINED_SUFFIXES):
            continue
        table_seed = zlib.crc32(f"{seed}/{key}".encode())
        width = weight.size(1)

        def rows_of_block(block: int, table_seed: int = table_seed, width: int = width) -> np.ndarray:
            return truncated_normal(np.random.default_rng([table_seed, block]), (BLOCK_ROWS, width), std)

        _write_blocks(weight, rows_of_block)
        names.append(key)
    return names


def load_scl_table(model: nn.Module, scl: SclIndex, device: torch.device) -> None:
    """Table row i + 1 = line i of the SCL values file (raw int8 values: exact in fp16; cosines
    are scale invariant); row 0 stays zero. A replicated int8 table takes the memory-mapped file
    itself on CPU (one copy in the page cache for all ranks of a host), a copy on a GPU. A model
    without SCL table (gsu_stage loader: the loaders read the file) is left as it is."""
    replicated = [m for m in model.modules() if isinstance(m, ReplicatedInt8Table)]
    if replicated:
        writable_view = np.load(scl.values_path, mmap_mode="c")  # copy-on-write: torch wants writable memory; nothing writes
        replicated[0].set_values(torch.from_numpy(writable_view).to(device))
        return
    values = scl.values

    def rows_of_block(block: int) -> np.ndarray:
        first = block * BLOCK_ROWS  # table row of the block's first line
        out = np.zeros((BLOCK_ROWS, values.shape[1]), np.float32)
        lo, hi = max(first, 1), min(first + BLOCK_ROWS, len(values) + 1)
        if hi > lo:
            out[lo - first : hi - first] = values[lo - 1 : hi - 1]
        return out

    for key in [k for k in model.state_dict() if k.endswith(SCL_WEIGHT_SUFFIX)]:
        _write_blocks(model.state_dict()[key], rows_of_block)
