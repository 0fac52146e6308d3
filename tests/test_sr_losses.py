"""CE / BCE / gBCE equal their formulas computed by hand on a tiny batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from delrec.sr.losses import (
    bce_loss,
    cross_entropy_loss,
    gbce_beta,
    gbce_loss,
    next_item_loss,
    sample_negatives,
)

# Two positions, d = 2, N = 4 items: scores are small integers, easy to follow.
STATES = torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=torch.float64)
TABLE = torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5], [2.0, -1.0]], dtype=torch.float64)
TARGETS = torch.tensor([0, 3])
NEGATIVES = torch.tensor([[1, 2], [0, 2]])


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def score(p, i):
    return sum(a * b for a, b in zip(STATES[p].tolist(), TABLE[i].tolist()))


def test_cross_entropy_equals_minus_log_softmax_of_the_target():
    by_hand = 0.0
    for p, target in enumerate(TARGETS.tolist()):
        logits = [score(p, i) for i in range(4)]
        by_hand += -logits[target] + math.log(sum(math.exp(s) for s in logits))
    by_hand /= 2
    assert cross_entropy_loss(STATES, TARGETS, TABLE).item() == pytest.approx(by_hand, abs=1e-12)


@pytest.mark.parametrize("block", [1, 2, 3, 100])
def test_blocked_cross_entropy_matches_torch_in_value_and_gradient(block):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    table = torch.randn(9, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 9, (11,), generator=generator)
    ours = cross_entropy_loss(states, targets, table, block)
    reference = F.cross_entropy(states @ table.T, targets)
    grads = torch.autograd.grad(2.5 * ours, (states, table))
    expected = torch.autograd.grad(2.5 * reference, (states, table))
    torch.testing.assert_close(ours, reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_bce_with_sampled_negatives_equals_its_formula():
    by_hand = 0.0
    for p, target in enumerate(TARGETS.tolist()):
        by_hand += -math.log(sigmoid(score(p, target)))
        by_hand += sum(-math.log(1.0 - sigmoid(score(p, n))) for n in NEGATIVES[p].tolist())
    by_hand /= 2
    assert bce_loss(STATES, TARGETS, TABLE, NEGATIVES).item() == pytest.approx(by_hand, abs=1e-12)


def test_gbce_beta_and_loss_equal_the_paper():
    # alpha = k / (N - 1) = 4 / 100; beta = alpha * (t * (1 - 1/alpha) + 1/alpha) = 0.04 * (0.75 * -24 + 25) = 0.28
    assert gbce_beta(4, 101, 0.75) == pytest.approx(0.28)
    assert gbce_beta(4, 101, 0.0) == pytest.approx(1.0)  # t = 0: plain BCE
    assert gbce_beta(4, 101, 1.0) == pytest.approx(0.04)  # t = 1: beta = alpha
    beta = gbce_beta(2, 4, 0.75)  # the loss below: k = 2 negatives, N = 4 items
    by_hand = 0.0
    for p, target in enumerate(TARGETS.tolist()):
        by_hand += -math.log(sigmoid(score(p, target)) ** beta)
        by_hand += sum(-math.log(1.0 - sigmoid(score(p, n))) for n in NEGATIVES[p].tolist())
    by_hand /= 2
    assert gbce_loss(STATES, TARGETS, TABLE, NEGATIVES, beta).item() == pytest.approx(by_hand, abs=1e-12)
    torch.manual_seed(0)
    dispatched = next_item_loss("gbce", STATES, TARGETS, TABLE, num_negatives=2, gbce_t=0.75)
    torch.manual_seed(0)
    negatives = sample_negatives(TARGETS, 4, 2)
    assert dispatched.item() == pytest.approx(gbce_loss(STATES, TARGETS, TABLE, negatives, beta).item())


def test_negatives_are_uniform_over_the_other_items():
    targets = torch.full((20000,), 3)
    negatives = sample_negatives(targets, 6, 2, torch.Generator().manual_seed(0))
    counts = torch.bincount(negatives.flatten(), minlength=6).double()
    assert counts[3] == 0
    share = counts[[0, 1, 2, 4, 5]] / counts.sum()
    assert torch.all((share - 0.2).abs() < 0.01), share


def test_no_positions_give_a_zero_loss_with_gradient():
    states = torch.zeros(0, 2, requires_grad=True)
    table = torch.randn(4, 2, requires_grad=True)
    loss = cross_entropy_loss(states, torch.zeros(0, dtype=torch.long), table)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(table.grad == 0)
    with pytest.raises(ValueError, match="unknown loss"):
        next_item_loss("mse", STATES, TARGETS, TABLE)
