"""GSU: cosine and scores on hand-built vectors, top-K and sim_hard against plain loop references."""
from __future__ import annotations

import math

import pytest
import torch

from muse_rec.model.gsu import (
    NO_SCORE,
    cosine,
    distinct_history_sim_soft_scores,
    gather_positions,
    gsu_scores,
    sim_hard_positions,
    sim_soft_scores,
    top_k_positions,
)


def reference_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row: positions by descending score, the higher position first among equal scores."""
    rows = [sorted(range(len(row)), key=lambda i: (-row[i], -i))[:k] for row in scores.tolist()]
    return torch.tensor(rows)


def reference_sim_hard(categories: torch.Tensor, target: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: matching positions newest first, then the non-matching ones newest first; first k."""
    positions, valid = [], []
    for row, wanted in zip(categories.tolist(), target.tolist()):
        newest_first = list(reversed(range(len(row))))
        matches = [i for i in newest_first if row[i] == wanted]
        others = [i for i in newest_first if row[i] != wanted]
        positions.append((matches + others)[:k])
        valid.append([slot < len(matches) for slot in range(k)])
    return torch.tensor(positions), torch.tensor(valid)


def test_cosine_by_hand_with_zero_vectors():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    got = cosine(a.unsqueeze(1), b)
    assert got.shape == (1, 5)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0, -1.0, 1 / math.sqrt(2), 0.0]]))
    zero_target = cosine(torch.zeros(1, 1, 2), b)
    assert torch.equal(zero_target, torch.zeros(1, 5))  # exactly 0, not NaN


def test_cosine_of_dequantised_int8_equals_raw_int8_cast():
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(-127, 128, (4, 6, 128), generator=generator, dtype=torch.int8)
    as_reference = cosine(raw[:, :1].float(), raw.float())
    dequantised = cosine(raw[:, :1].float() / 127, raw.float() / 127)
    torch.testing.assert_close(dequantised, as_reference)


def test_gsu_scores_push_pads_and_missing_scl_to_minus_1_1():
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # second target has no SCL vector
    sequence = torch.tensor([[[0.0, 0.0], [0.0, 3.0], [2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]] * 2)
    scores = gsu_scores(target, sequence)
    expected_first = torch.tensor([NO_SCORE, NO_SCORE, 1.0, -1.0, 1 / math.sqrt(2)])
    torch.testing.assert_close(scores[0], expected_first)
    assert torch.equal(scores[1], torch.full((5,), NO_SCORE))


def test_gsu_scores_agree_with_cosine_on_random_vectors():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(3, 8, generator=generator)
    sequence = torch.randn(3, 20, 8, generator=generator)
    sequence[:, :5] = 0.0  # left padding
    expected = cosine(target.unsqueeze(1), sequence)
    expected[:, :5] = NO_SCORE
    torch.testing.assert_close(gsu_scores(target, sequence), expected)


def test_sim_soft_scores_use_item_and_category_together():
    item, cate = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    seq_items = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    seq_cates = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    # concat: target (1,0,0,1); sequence (1,0,0,1), (0,0,0,1), pad (0,0,0,0)
    scores = sim_soft_scores(item, cate, seq_items, seq_cates)
    torch.testing.assert_close(scores, torch.tensor([[1.0, 1 / math.sqrt(2), NO_SCORE]]))


def test_sim_soft_scores_per_distinct_history_equal_the_per_impression_ones_bit_for_bit():
    generator = torch.Generator().manual_seed(2)
    items, cates = torch.randn(3, 40, 8, generator=generator), torch.randn(3, 40, 8, generator=generator)
    items[:, :6] = cates[:, :6] = 0.0  # pads
    items[1, 20], cates[1, 20] = items[1, 30], cates[1, 30]  # an item seen twice: an exact tie
    history_of_row = torch.tensor([0, 0, 1, 1, 1, 2, 0])
    target_item, target_cate = torch.randn(7, 8, generator=generator), torch.randn(7, 8, generator=generator)
    plain = sim_soft_scores(target_item, target_cate, items[history_of_row], cates[history_of_row])
    assert torch.equal(distinct_history_sim_soft_scores(target_item, target_cate, items, cates, history_of_row), plain)


def test_top_k_by_hand_ties_go_to_the_more_recent_position():
    scores = torch.tensor([[0.5, 0.9, 0.5, NO_SCORE, 0.9, NO_SCORE]])
    assert top_k_positions(scores, 4).tolist() == [[4, 1, 2, 0]]
    assert top_k_positions(scores, 6).tolist() == [[4, 1, 2, 0, 5, 3]]
    assert top_k_positions(scores, 1).dtype == torch.long


@pytest.mark.parametrize("k", [1, 7, 30])
def test_top_k_matches_loop_reference_with_many_ties(k):
    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (50, 30), generator=generator).float() / 4  # 4 distinct values
    scores[:, :8] = NO_SCORE  # pads tie too
    assert torch.equal(top_k_positions(scores, k), reference_top_k(scores, k))


def test_top_k_orders_negative_scores_and_both_zeros_like_the_reference():
    """The integer keys of float bits: negative scores below positive ones, -0.0 tied with 0.0."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 25, generator=generator)
    scores[:, :4] = NO_SCORE
    scores[:, 4:10] = torch.tensor([0.0, -0.0, 0.0, -0.0, -1e-30, 1e-30])
    scores[:, 10] = scores[:, 11]  # an exact tie of arbitrary values
    for k in (1, 12, 25):
        assert torch.equal(top_k_positions(scores, k), reference_top_k(scores, k)), k


@pytest.mark.parametrize("k", [0, 7])
def test_top_k_rejects_k_outside_the_sequence(k):
    with pytest.raises(ValueError, match="k <= sequence length 6"):
        top_k_positions(torch.zeros(2, 6), k)


def test_sim_hard_by_hand():
    categories = torch.tensor(
        [
            [0, 0, 5, 3, 5, 7, 5],  # 3 matches of 5: fewer than K
            [5, 5, 5, 5, 5, 5, 5],  # more matches than K
            [0, 0, 0, 2, 2, 0, 2],  # target 0 matches the pads, like the reference's raw compare
            [0, 0, 1, 1, 1, 1, 1],  # no match at all
        ]
    )
    target = torch.tensor([5, 5, 0, 9])
    positions, valid = sim_hard_positions(categories, target, 4)
    assert positions.tolist() == [[6, 4, 2, 5], [6, 5, 4, 3], [5, 2, 1, 0], [6, 5, 4, 3]]
    assert valid.tolist() == [
        [True, True, True, False],
        [True, True, True, True],
        [True, True, True, True],
        [False, False, False, False],
    ]
    assert positions.dtype == torch.long and valid.dtype == torch.bool


@pytest.mark.parametrize("k", [1, 10, 40])
def test_sim_hard_matches_loop_reference(k):
    generator = torch.Generator().manual_seed(100 + k)
    categories = torch.randint(0, 5, (60, 40), generator=generator)  # 0 = pad/OOV among them
    categories[:, :10] = 0
    target = torch.randint(0, 6, (60,), generator=generator)  # 5 never occurs: no matches
    positions, valid = sim_hard_positions(categories, target, k)
    expected_positions, expected_valid = reference_sim_hard(categories, target, k)
    assert torch.equal(positions, expected_positions)
    assert torch.equal(valid, expected_valid)


def test_sim_hard_rejects_k_longer_than_the_sequence():
    with pytest.raises(ValueError, match="found k=5"):
        sim_hard_positions(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long), 5)


def test_gather_positions_ids_and_embeddings():
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    positions = torch.tensor([[3, 0], [1, 1]])
    assert gather_positions(ids, positions).tolist() == [[13, 10], [21, 21]]

    embeddings = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3).requires_grad_()
    gathered = gather_positions(embeddings, positions)
    assert gathered.shape == (2, 2, 3)
    assert torch.equal(gathered[0, 0], embeddings[0, 3].detach())
    assert torch.equal(gathered[1, 1], embeddings[1, 1].detach())
    gathered.sum().backward()
    # each gathered row sends its gradient back once per time it was picked
    assert embeddings.grad[:, :, 0].tolist() == [[1, 0, 0, 1], [0, 2, 0, 0]]
