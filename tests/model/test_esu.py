"""ESU modules on hand-built cases: SimTier bin edges, SA-TA and target attention, masks, mean pool."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from muse_rec.model.esu import SelfAttentiveTargetAttention, SimTier, TargetAttention, mean_pool


def identity_projections(*linears: torch.nn.Linear) -> None:
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(torch.eye(linear.in_features))
            linear.bias.zero_()


def simtier_with_unit_weights() -> SimTier:
    simtier = SimTier()
    with torch.no_grad():
        simtier.weight.fill_(1.0)
    return simtier


def test_simtier_bin_edges():
    cosines = torch.tensor([[-1.0, -0.95, -0.9, 0.0, 0.05, 0.1, 1.0]])
    expected_counts = torch.zeros(22)
    for bin_id, count in {0: 1, 1: 2, 10: 1, 11: 2, 20: 1}.items():
        expected_counts[bin_id] = count
    torch.testing.assert_close(simtier_with_unit_weights()(cosines)[0], torch.log(expected_counts + 1))


@pytest.mark.parametrize(
    "cos,bin_id",
    [(0.1 + 1e-6, 12), (-0.9 + 1e-6, 2), (-1e-6, 10), (1e-6, 11), (0.95, 20), (1.2, 21), (-1.2, 0)],
)
def test_simtier_just_past_an_edge_and_clamped(cos, bin_id):
    out = simtier_with_unit_weights()(torch.tensor([[cos]]))[0]
    assert out.nonzero().flatten().tolist() == [bin_id]
    assert out[bin_id].item() == pytest.approx(math.log(2))


def test_simtier_counts_pads_unless_masked_and_does_not_normalise_by_length():
    simtier = SimTier()
    weight = simtier.weight.detach()
    cosines = torch.tensor([[0.0, 0.0, 0.0, 0.5]])  # three pads (cosine 0 -> bin 10), one at 0.5 -> bin 15
    reference = simtier(cosines)[0]
    assert reference[10].item() == pytest.approx(math.log(4) * weight[10].item())
    assert reference[15].item() == pytest.approx(math.log(2) * weight[15].item())

    masked = simtier(cosines, mask=torch.tensor([[False, False, False, True]]))[0]
    assert masked[10].item() == 0.0
    assert masked[15].item() == pytest.approx(math.log(2) * weight[15].item())

    doubled = simtier(cosines.repeat(1, 2))[0]
    assert doubled[10].item() == pytest.approx(math.log(7) * weight[10].item())


def test_simtier_parameters():
    torch.manual_seed(0)
    simtier = SimTier()
    assert [p.shape for p in simtier.parameters()] == [torch.Size([22])]
    assert 0.0 <= simtier.weight.min().item() and simtier.weight.max().item() < 1.0
    assert simtier.weight.std().item() > 0.1  # uniform, not a constant
    with pytest.raises(ValueError, match="even number of bins"):
        SimTier(21)


def reference_sa_ta(module: SelfAttentiveTargetAttention, target, sequence, similarity) -> torch.Tensor:
    """SA-TA written out one sample and one position at a time."""
    g1, g2, g3 = module.gates.tolist()
    tau = module.tau[0].item()
    outputs = []
    for b in range(target.shape[0]):
        q = F.silu(module.query(target[b]))
        logits, values = [], []
        for k in range(sequence.shape[1]):
            key = F.silu(module.key(sequence[b, k]))
            a_id = torch.dot(key, q)
            bias = similarity[b, k] / tau
            logits.append(g1 * a_id + g2 * bias + g3 * a_id * bias)
            values.append(F.silu(module.value(sequence[b, k])))
        weights = torch.softmax(torch.stack(logits), dim=0) + 1e-7
        outputs.append(sum(w * v for w, v in zip(weights, values)))
    return torch.stack(outputs)


def test_sa_ta_by_hand_semantic_bias_only():
    module = SelfAttentiveTargetAttention(2)
    identity_projections(module.query, module.key, module.value)
    with torch.no_grad():
        module.gates.copy_(torch.tensor([0.0, 1.0, 0.0]))  # logits = R / tau
    target = torch.tensor([[3.0, -2.0]])
    sequence = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    similarity = torch.tensor([[0.0, 0.1 * math.log(2)]])  # R / 0.1 = (0, ln 2): weights 1/3, 2/3
    silu_1 = 1 / (1 + math.exp(-1))
    expected = torch.tensor([[(1 / 3 + 1e-7) * silu_1, (2 / 3 + 1e-7) * silu_1]])
    torch.testing.assert_close(module(target, sequence, similarity), expected)


def test_sa_ta_matches_loop_reference_with_trained_looking_gates():
    torch.manual_seed(3)
    module = SelfAttentiveTargetAttention(8)
    with torch.no_grad():
        module.gates.copy_(torch.tensor([0.7, 1.3, -0.4]))
        module.tau[0] = 0.25
    target, sequence = torch.randn(4, 8), torch.randn(4, 6, 8)
    sequence[:, :2] = 0.0  # pads take part in the reference softmax
    similarity = torch.rand(4, 6) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            module(target, sequence, similarity), reference_sa_ta(module, target, sequence, similarity)
        )


def test_sa_ta_init_and_the_unused_second_temperature():
    module = SelfAttentiveTargetAttention(32)
    assert module.tau.tolist() == pytest.approx([0.1, 0.1]) and module.gates.tolist() == [1.0, 1.0, 1.0]
    assert sum(p.numel() for p in module.parameters()) == 3 * (32 * 32 + 32) + 2 + 3
    target, sequence, similarity = torch.randn(2, 32), torch.randn(2, 5, 32), torch.rand(2, 5)
    before = module(target, sequence, similarity)
    with torch.no_grad():
        module.tau[1] = 1000.0
    after = module(target, sequence, similarity)
    assert torch.equal(before, after)
    after.sum().backward()
    assert module.tau.grad[0].item() != 0.0 and module.tau.grad[1].item() == 0.0


def test_target_attention_by_hand_pads_take_part_unless_masked():
    module = TargetAttention(2)
    identity_projections(module.query, module.key)
    target = torch.tensor([[1.0, 0.0]])
    sequence = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]])  # middle one is a pad
    e = math.e
    total = e + 1 + e**2  # scores (1, 0, 2)
    weights = [e / total + 1e-7, 1 / total + 1e-7, e**2 / total + 1e-7]
    expected = torch.tensor([[weights[0] * 1 + weights[2] * 2, 0.0]])
    torch.testing.assert_close(module(target, sequence), expected)

    masked_total = e + e**2
    masked = module(target, sequence, mask=torch.tensor([[True, False, True]]))
    expected_masked = (e / masked_total + 1e-7) * 1 + (e**2 / masked_total + 1e-7) * 2
    torch.testing.assert_close(masked, torch.tensor([[expected_masked, 0.0]]))


def test_target_attention_parameters_and_keys_as_values():
    module = TargetAttention(32)
    assert sum(p.numel() for p in module.parameters()) == 2 * (32 * 32 + 32)
    module(torch.randn(3, 32), torch.randn(3, 7, 32)).sum().backward()
    assert module.key.weight.grad.abs().sum() > 0 and module.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: TargetAttention(4), lambda: SelfAttentiveTargetAttention(4)])
def test_masked_attention_ignores_masked_positions_and_survives_empty_rows(make):
    torch.manual_seed(5)
    module = make()
    target, sequence, similarity = torch.randn(2, 4), torch.randn(2, 5, 4), torch.rand(2, 5)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])

    def run(seq, sim, m):
        return module(target, seq, m) if isinstance(module, TargetAttention) else module(target, seq, sim, m)

    out = run(sequence, similarity, mask)
    changed = sequence.clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(run(changed, torch.where(mask, similarity, 7.0), mask), out)
    assert torch.equal(out[1], torch.zeros(4))  # no real behaviour: pools to 0
    torch.testing.assert_close(run(sequence, similarity, torch.ones(2, 5, dtype=torch.bool)), run(sequence, similarity, None))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_mean_pool_by_hand():
    sequence = torch.tensor([[[0.0, 0.0], [2.0, 4.0], [4.0, 8.0]], [[0.0, 0.0]] * 3])
    torch.testing.assert_close(mean_pool(sequence), torch.tensor([[2.0, 4.0], [0.0, 0.0]]))
    mask = torch.tensor([[False, True, True], [False, False, False]])
    torch.testing.assert_close(mean_pool(sequence, mask), torch.tensor([[3.0, 6.0], [0.0, 0.0]]))
