"""The loader's GSU (`muse_rec.data.gsu`) by hand and against the model's plain reference functions:
exact ties, pads, items and targets without SCL vector, fewer matches than K, OOV categories."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from muse_rec.data import gsu as loader_gsu
from muse_rec.model import gsu

VALUES = np.array([[3, 4, 0], [4, 3, 0], [-3, -4, 0], [0, 0, 0], [3, 4, 0]], np.int8)
"""SCL rows 1..5 (row r is VALUES[r - 1]): row 5 repeats row 1, row 4 is a stored zero vector."""


def test_cosines_by_hand_once_per_history():
    targets = np.array([1, 2, 0])  # the third target has no SCL vector
    histories = np.array([[0, 1, 2, 3, 4, 5]])  # pad, ..., a zero vector, a copy of row 1
    cosines = loader_gsu.scl_cosines(VALUES, targets, histories, np.array([0, 0, 0]))
    np.testing.assert_array_equal(cosines[0], np.float32([0, 1, 24 / 25, -1, 0, 1]))
    np.testing.assert_array_equal(cosines[1], np.float32([0, 24 / 25, 1, -24 / 25, 0, 24 / 25]))
    np.testing.assert_array_equal(cosines[2], np.zeros(6, np.float32))


def test_cosines_equal_the_models_exact_scl_cosines():
    rng = np.random.default_rng(0)
    values = rng.integers(-127, 128, (50, 128), dtype=np.int8)
    histories = rng.integers(0, 51, (3, 40))
    targets, of_row = rng.integers(0, 51, 7), np.array([0, 0, 1, 1, 1, 2, 2])
    table = torch.cat([torch.zeros(1, 128), torch.from_numpy(values).float()])
    want = gsu.scl_cosines(table[torch.from_numpy(targets)], table[torch.from_numpy(histories[of_row])])
    assert torch.equal(torch.from_numpy(loader_gsu.scl_cosines(values, targets, histories, of_row)), want)


def test_top_k_by_hand_pads_and_missing_vectors_last_equal_scores_newest_first():
    cosines = np.float32([[0.0, 0.5, -0.2, 0.5, 0.0, 0.9]])
    assert loader_gsu.top_k(cosines, 6).tolist() == [[5, 3, 1, 2, 4, 0]]
    assert loader_gsu.top_k(np.zeros((1, 4), np.float32), 2).tolist() == [[3, 2]]  # a target without vector


@pytest.mark.parametrize("k", [1, 7, 30])
def test_top_k_equals_the_reference_with_many_ties(k):
    rng = np.random.default_rng(k)
    cosines = (rng.integers(-4, 5, (50, 30)) / 4).astype(np.float32)  # 9 values, 0 among them
    cosines[:, :8] = 0.0  # pads
    want = gsu.top_k_positions(gsu.scores_of(torch.from_numpy(cosines)), k)
    assert torch.equal(torch.from_numpy(loader_gsu.top_k(cosines, k)), want)


@pytest.mark.parametrize("k", [1, 10, 40])
def test_newest_matches_equal_the_reference(k):
    rng = np.random.default_rng(100 + k)
    categories = rng.integers(0, 5, (60, 40))  # 0: pad or OOV category
    categories[:, :10] = 0
    target = rng.integers(0, 6, 60)  # 5 never occurs: no match; 0 (OOV target) matches pads
    positions, valid = loader_gsu.newest_matches(categories, target, k)
    want_positions, want_valid = gsu.sim_hard_positions(torch.from_numpy(categories), torch.from_numpy(target), k)
    assert torch.equal(torch.from_numpy(positions), want_positions) and torch.equal(torch.from_numpy(valid), want_valid)
    assert (~valid).any() and valid.any()  # fewer matches than K occur


def test_k_outside_the_sequence_is_refused():
    with pytest.raises(ValueError, match="found k=5"):
        loader_gsu.top_k(np.zeros((1, 4), np.float32), 5)


@pytest.mark.parametrize("int8_products", [False, True])
def test_cosines_at_kept_positions_equal_the_whole_rows_on_either_product_kernel(int8_products, monkeypatch):
    """sim_hard reads a history's vectors only where one of its samples keeps a position; the
    cosines there equal the whole-row ones, with int8 (VNNI) or float32 products alike."""
    if int8_products and not loader_gsu._INT8_PRODUCTS:
        pytest.skip("this CPU has no int8 matrix-product kernel")
    monkeypatch.setattr(loader_gsu, "_INT8_PRODUCTS", int8_products)
    rng = np.random.default_rng(7)
    values = rng.integers(-127, 128, (50, 128), dtype=np.int8)
    values[3] = 0  # a stored zero vector
    histories = rng.integers(0, 51, (3, 40))
    targets, of_row = rng.integers(0, 51, 7), np.array([0, 0, 1, 1, 1, 2, 2])
    targets[2] = 0  # a target without vector
    positions = np.stack([rng.choice(40, 12, replace=False) for _ in of_row])
    whole = loader_gsu.scl_cosines(values, targets, histories, of_row)
    kept = loader_gsu.scl_cosines(values, targets, histories, of_row, positions)
    np.testing.assert_array_equal(kept, np.take_along_axis(whole, positions, axis=1))
    table = torch.cat([torch.zeros(1, 128), torch.from_numpy(values).float()])
    assert torch.equal(torch.from_numpy(whole), gsu.scl_cosines(table[torch.from_numpy(targets)], table[torch.from_numpy(histories[of_row])]))


def test_pairwise_cosines_are_the_exact_scl_cosines_before_their_float32_rounding():
    rng = np.random.default_rng(2)
    values = rng.integers(-127, 128, (50, 128), dtype=np.int8)
    values[6] = 0  # a stored zero vector
    rows, others = np.append(rng.integers(1, 51, 8), 0), np.append(rng.integers(0, 51, 30), 7)  # row 0 and the zero vector (row 7) last
    pairwise = loader_gsu.pairwise_cosines(values, rows, others)
    assert pairwise.dtype == np.float64
    want = loader_gsu.scl_cosines(values, rows, others[None, :], np.zeros(9, np.int64))
    np.testing.assert_array_equal(pairwise.astype(np.float32), want)
    assert not pairwise[:, -1].any() and not pairwise[-1].any()  # the zero vector and row 0: cosine 0


def test_paired_cosines_are_each_rows_own_pairwise_cosines():
    """Each anchor against its own candidates (lemur's hard negatives): bit for bit the pairwise
    cosines of that anchor; row 0 and a stored zero vector on either side give 0."""
    rng = np.random.default_rng(3)
    values = rng.integers(-127, 128, (50, 128), dtype=np.int8)
    values[6] = 0
    rows = np.array([3, 7, 0, 12])
    others = rng.integers(0, 51, (4, 9))
    others[0, -1] = 7
    paired = loader_gsu.paired_cosines(values, rows, others)
    assert paired.dtype == np.float64 and paired.shape == (4, 9)
    for i in range(4):
        np.testing.assert_array_equal(paired[i], loader_gsu.pairwise_cosines(values, rows[i : i + 1], others[i])[0])
    assert paired[0, -1] == 0 and not paired[1:3].any()
