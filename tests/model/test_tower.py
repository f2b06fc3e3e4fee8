"""Tower: reference init, Dice by hand, the input layout, the loss, and the dense parameter count."""
from __future__ import annotations

import math

import pytest
import torch

from muse_rec.model.esu import SelfAttentiveTargetAttention, SimTier, TargetAttention, mean_pool
from muse_rec.model.tower import (
    Dice,
    ReferenceLinear,
    Tower,
    tower_input,
    tower_input_dim,
    two_class_loss_and_prob,
)

D, K, SHORT = 16, 50, 50


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_reference_linear_init_also_after_meta_materialisation():
    torch.manual_seed(0)
    linear = ReferenceLinear(400, 300)
    assert linear.weight.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.02)
    assert abs(linear.weight.mean().item()) < 1e-3
    assert torch.equal(linear.bias, torch.full((300,), 0.1))

    meta = ReferenceLinear(400, 300, device="meta").to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.bias, torch.full((300,), 0.1))
    assert meta.weight.std().item() == pytest.approx(1 / math.sqrt(400), rel=0.02)


def test_dice_by_hand():
    dice = Dice(2)
    assert dice.alpha.tolist() == [-0.25, -0.25]
    x = torch.tensor([[1.0, 3.0]])  # LayerNorm: mean 2, variance 1 -> (-1, 1)
    p = [sigmoid(-1.0), sigmoid(1.0)]
    expected = [p[i] * v + -0.25 * (1 - p[i]) * v for i, v in enumerate([1.0, 3.0])]
    torch.testing.assert_close(dice(x), torch.tensor([expected]))
    # eps 1e-12 as in the reference: a spread of 1e-3 still normalises to about (-1, 1)
    close = torch.tensor([[1.0, 1.001]])
    expected_close = [p[i] * v + -0.25 * (1 - p[i]) * v for i, v in enumerate([1.0, 1.001])]
    torch.testing.assert_close(dice(close), torch.tensor([expected_close]), rtol=1e-3, atol=0)


def test_dice_is_per_sample_and_has_only_its_alphas():
    torch.manual_seed(1)
    dice = Dice(8)
    batch = torch.randn(5, 8)
    torch.testing.assert_close(dice(batch)[2:3], dice(batch[2:3]))
    dice.eval()
    torch.testing.assert_close(dice(batch)[2:3], dice(batch[2:3]))
    assert [name for name, _ in dice.named_parameters()] == ["alpha"]


def test_tower_layers_and_logits():
    tower = Tower()
    linears = [m for m in tower.layers if isinstance(m, ReferenceLinear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(308, 256), (256, 128), (128, 64), (64, 2)]
    kinds = [type(m) for m in tower.layers]
    assert kinds == [ReferenceLinear, Dice] * 4  # Dice after every Linear, the last included
    assert tower(torch.randn(3, 308)).shape == (3, 2)


def test_tower_input_order_and_width():
    assert tower_input_dim(16) == 308
    widths = {
        "short_attention": 2 * D,
        "long_attention": 2 * D,
        "long_mean": 2 * D,
        "short_mean": 2 * D,
        "ad": 4 * D,
        "user": 3 * D + 3 * (D // 2),
        "simtier_short": 22,
        "simtier_long": 22,
    }
    pieces = {name: torch.full((2, width), float(i)) for i, (name, width) in enumerate(widths.items())}
    features = tower_input(**dict(reversed(pieces.items())))  # keyword order must not matter
    assert features.shape == (2, 308)
    expected = torch.cat([torch.full((width,), float(i)) for i, width in enumerate(widths.values())])
    assert torch.equal(features[0], expected)


def test_loss_and_prob_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax (1/2, 1/2) and (3/4, 1/4)
    labels = torch.tensor([1.0, 0.0])
    loss, score = two_class_loss_and_prob(logits, labels, torch.ones(2))
    rows = [-math.log(0.5 + 1e-7), -math.log(0.75 + 1e-7)]
    assert loss.item() == pytest.approx(sum(rows) / 2)
    torch.testing.assert_close(score, torch.tensor([0.5 + 1e-7, 0.25 + 1e-7]))

    first_only, _ = two_class_loss_and_prob(logits, labels, torch.tensor([1.0, 0.0]))
    assert first_only.item() == pytest.approx(rows[0])


def test_loss_clips_probabilities_at_one():
    logits = torch.tensor([[100.0, -100.0]], requires_grad=True)  # prob (1 + 1e-7 -> 1, 1e-7)
    loss, score = two_class_loss_and_prob(logits, torch.tensor([0.0]), torch.ones(1))
    assert loss.item() == 0.0
    assert score.item() == pytest.approx(1e-7)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(1, 2))  # clipped: no gradient, as in the reference


def test_weight_zero_rows_change_nothing():
    torch.manual_seed(2)
    logits = torch.randn(6, 2, requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    loss, _ = two_class_loss_and_prob(logits, labels, weights)
    real_only, _ = two_class_loss_and_prob(logits[:4], labels[:4], torch.ones(4))
    assert loss.item() == pytest.approx(real_only.item())
    loss.backward()
    assert torch.equal(logits.grad[4:], torch.zeros(2, 2))

    padding_only, _ = two_class_loss_and_prob(logits, labels, torch.zeros(6))
    assert padding_only.item() == 0.0
    logits.grad = None
    padding_only.backward()
    assert torch.equal(logits.grad, torch.zeros(6, 2))


class ReferenceDensePart(torch.nn.Module):
    """The reference's dense modules at D = 16, K = 50, wired as the model will wire them."""

    def __init__(self) -> None:
        super().__init__()
        self.simtier_short, self.simtier_long = SimTier(), SimTier()
        self.long_attention = SelfAttentiveTargetAttention(2 * D)
        self.short_attention = TargetAttention(2 * D)
        self.tower = Tower(tower_input_dim(D))

    def forward(self, target, short, long, r_short, r_long, ad, user):
        features = tower_input(
            short_attention=self.short_attention(target, short),
            long_attention=self.long_attention(target, long, r_long),
            long_mean=mean_pool(long),
            short_mean=mean_pool(short),
            ad=ad,
            user=user,
            simtier_short=self.simtier_short(r_short),
            simtier_long=self.simtier_long(r_long),
        )
        return self.tower(features)


def test_dense_parameter_count_is_the_reference_126165():
    model = ReferenceDensePart()

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(model.tower) == 120_386 + (256 + 128 + 64 + 2)  # Linears + Dice alphas
    assert count(model.simtier_short) + count(model.simtier_long) == 44
    assert count(model.long_attention) == 3_168 + 2 + 3  # 3 Linears, tau (2: see SA-TA), gates (3)
    assert count(model.short_attention) == 2_112
    assert count(model) == 126_165


def test_dense_part_trains_end_to_end():
    torch.manual_seed(4)
    model = ReferenceDensePart()
    batch = 6
    logits = model(
        torch.randn(batch, 2 * D),
        torch.randn(batch, SHORT, 2 * D),
        torch.randn(batch, K, 2 * D),
        torch.rand(batch, SHORT) * 2 - 1,
        torch.rand(batch, K) * 2 - 1,
        torch.randn(batch, 4 * D),
        torch.randn(batch, 3 * D + 3 * (D // 2)),
    )
    loss, score = two_class_loss_and_prob(logits, torch.tensor([1.0, 0.0] * 3), torch.ones(batch))
    loss.backward()
    assert torch.isfinite(loss) and ((score > 0) & (score <= 1)).all()
    no_gradient = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_gradient == []
    assert model.long_attention.tau.grad[1].item() == 0.0
