"""Forward-distillation losses equal their formulas (docs/methods.md#forward-distillation-llm-to-sr) on hand-made batches; the embedding seam."""

import math

import pytest
import torch

from delrec.distill.dllm2rec import (
    DLLM2RecConfig,
    consistency_weights,
    dllm2rec_loss,
    dllm2rec_weights,
    paper_confidence,
)
from delrec.distill.embedding import CollaborativeEmbedding, install_collaborative_embedding, standardized
from delrec.distill.rd import RDConfig, items_mask, position_weights, rd_loss, rd_weights, student_ranks
from delrec.distill.rrd import rrd_loss, sample_uninteresting
from delrec.sr import SASRecConfig, build_model, load_model, pad_histories

# Two instances, N = 6 items, K = 3. Scores are small numbers, easy to follow by hand.
SCORES = torch.tensor([
    [2.0, 1.0, 0.5, -1.0, 3.0, 0.0],
    [0.0, -0.5, 1.5, 2.5, 1.0, -2.0],
], dtype=torch.float64)
TEACHER = torch.tensor([[1, 3, 2], [2, 0, 5]])  # best first
DISTANCES = torch.tensor([[0.5, 1.0, 2.0], [0.2, 0.4, 1.4]], dtype=torch.float64)
CONFIDENCES = torch.softmax(-DISTANCES, dim=1)  # Teacher.confidences() of a distance teacher
HISTORY = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # item 4 seen by instance 0
TARGETS = torch.tensor([3, 4])  # instance 0's target is listed (2nd), instance 1's is not


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def wp(k, beta=1.0):
    raw = [math.exp(-i / beta) for i in range(1, k + 1)]
    return [r / sum(raw) for r in raw]


def test_position_weights_are_exp_minus_k_over_beta_normalised():
    for beta in (1.0, 2.5):
        got = position_weights(4, beta, dtype=torch.float64)
        assert got.tolist() == pytest.approx(wp(4, beta), abs=1e-12)
        assert got.sum().item() == pytest.approx(1.0)


def test_consistency_is_one_for_teacher_items_in_the_students_current_top_k():
    # instance 0: item 4 is history, so the student's top-3 is {0, 1, 2}; instance 1: {3, 2, 4}
    got = consistency_weights(SCORES, TEACHER, HISTORY)
    assert got.tolist() == [[1.0, 1e-8, 1.0], [1.0, 1e-8, 1e-8]]
    # recomputed from the current scores: raise item 3 of instance 0 into its top-3
    moved = SCORES.clone()
    moved[0, 3] = 10.0
    assert consistency_weights(moved, TEACHER, HISTORY)[0].tolist() == [1.0, 1.0, 1e-8]


def by_hand_weights(confidence_rows, consistency_rows, config):
    out = []
    for conf, cons in zip(confidence_rows, consistency_rows):
        raw = [config.gamma_position * p + config.gamma_confidence * c + config.gamma_consistency * o
               for p, c, o in zip(wp(3, config.beta), conf, cons)]
        out.append([r / sum(raw) for r in raw])
    return out


def test_dllm2rec_code_weights_and_loss_equal_the_formula():
    config = DLLM2RecConfig(topk=3)
    weights = dllm2rec_weights(SCORES, TEACHER, CONFIDENCES, config, TARGETS, HISTORY)
    conf = [[math.exp(-d) / sum(math.exp(-x) for x in row) for d in row] for row in DISTANCES.tolist()]
    expected = by_hand_weights(conf, [[1, 1e-8, 1], [1, 1e-8, 1e-8]], config)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=torch.float64))
    loss = dllm2rec_loss(SCORES.gather(1, TEACHER), weights)
    by_hand = sum(-w * math.log(sigmoid(SCORES[s, i].item()))
                  for s in range(2) for w, i in zip(expected[s], TEACHER[s].tolist())) / 2
    assert loss.item() == pytest.approx(by_hand, abs=1e-12)


def test_dllm2rec_paper_confidence_uses_the_ground_truth_distance():
    # instance 0: target 3 is listed at distance 1.0, the best is 0.5 -> c = exp(-0.5);
    # instance 1: target 4 is not listed -> the largest distance 1.4 stands in -> c = exp(-1.2)
    c = paper_confidence(CONFIDENCES, TEACHER, TARGETS)
    assert c.tolist() == pytest.approx([math.exp(-0.5), math.exp(-1.2)], abs=1e-12)
    config = DLLM2RecConfig(topk=3, confidence="paper")
    weights = dllm2rec_weights(SCORES, TEACHER, CONFIDENCES, config, TARGETS, HISTORY)
    conf = [[c[0].item() / 3] * 3, [c[1].item() / 3] * 3]
    expected = by_hand_weights(conf, [[1, 1e-8, 1], [1, 1e-8, 1e-8]], config)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=torch.float64))
    # a surer teacher (target = its closest item) spreads the weight more evenly over the list
    sure = dllm2rec_weights(SCORES, TEACHER, CONFIDENCES, config, torch.tensor([1, 2]), HISTORY)
    assert sure[0, 0] < weights[0, 0] and sure[0, 1] > weights[0, 1]


def test_dllm2rec_negative_term_is_minus_log_sigmoid_of_one_minus_the_score():
    weights = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    negatives = torch.tensor([5, 1])
    listed = SCORES.gather(1, TEACHER)
    got = dllm2rec_loss(listed, weights, SCORES.gather(1, negatives[:, None])[:, 0]) - dllm2rec_loss(listed, weights)
    by_hand = (-math.log(sigmoid(1 - SCORES[0, 5].item())) - math.log(sigmoid(1 - SCORES[1, 1].item()))) / 2
    assert got.item() == pytest.approx(by_hand, abs=1e-12)


def test_dllm2rec_weights_carry_no_gradient():
    scores = SCORES.clone().requires_grad_(True)
    config = DLLM2RecConfig(topk=3)
    weights = dllm2rec_weights(scores, TEACHER, CONFIDENCES, config, TARGETS, HISTORY)
    assert not weights.requires_grad
    loss = dllm2rec_loss(scores.gather(1, TEACHER), weights)
    (grad,) = torch.autograd.grad(loss, scores)
    # d/dy of -w log sigma(y) is -w (1 - sigma(y)), only at the teacher's items, / B
    expected = torch.zeros_like(SCORES)
    for s in range(2):
        for w, i in zip(weights[s].tolist(), TEACHER[s].tolist()):
            expected[s, i] = -w * (1 - sigmoid(SCORES[s, i].item())) / 2
    torch.testing.assert_close(grad, expected)


def test_rd_static_loss_and_negatives_equal_the_formula():
    config = RDConfig(topk=3, beta=2.0)
    weights = rd_weights(TEACHER, config, dtype=torch.float64)
    assert weights.tolist() == [pytest.approx(wp(3, 2.0))] * 2
    negatives = torch.tensor([[0, 4], [1, 1]])
    loss = rd_loss(SCORES.gather(1, TEACHER), weights, SCORES.gather(1, negatives))
    by_hand = 0.0
    for s in range(2):
        by_hand += sum(-w * math.log(sigmoid(SCORES[s, i].item())) for w, i in zip(wp(3, 2.0), TEACHER[s].tolist()))
        by_hand += sum(-math.log(1 - sigmoid(SCORES[s, j].item())) for j in negatives[s].tolist()) / 2
    assert loss.item() == pytest.approx(by_hand / 2, abs=1e-12)


def test_rd_dynamic_weight_favours_teacher_items_the_student_ranks_too_low():
    # ranks without the history item 4: instance 0 scores 0:2, 1:1, 2:.5, 5:0, 3:-1 -> item 1 rank 2,
    # item 3 rank 5, item 2 rank 3; instance 1: 3,2,4,0,1,5 -> item 2 rank 2, 0 rank 4, 5 rank 6
    ranks = student_ranks(SCORES, TEACHER, HISTORY)
    assert ranks.tolist() == [[2, 5, 3], [2, 4, 6]]
    config = RDConfig(topk=3, dynamic_weight=True, dynamic_mu=0.5)
    weights = rd_weights(TEACHER, config, SCORES, HISTORY, torch.float64)
    expected = []
    for row in ranks.tolist():
        raw = [p * math.tanh(max(0.5 * (r - k), 0.0)) for k, (p, r) in enumerate(zip(wp(3), row), start=1)]
        expected.append([x / sum(raw) for x in raw])
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(weights.sum(1), torch.ones(2, dtype=torch.float64))


def test_rrd_equals_the_plackett_luce_formula():
    uninteresting = torch.tensor([[0, 5], [4, 1]])
    loss = rrd_loss(SCORES.gather(1, TEACHER), SCORES.gather(1, uninteresting))
    by_hand = 0.0
    for s in range(2):
        listed = [SCORES[s, i].item() for i in TEACHER[s].tolist()]
        rest = sum(math.exp(SCORES[s, j].item()) for j in uninteresting[s].tolist())
        for k in range(3):
            by_hand -= math.log(math.exp(listed[k]) / (sum(math.exp(x) for x in listed[k:]) + rest))
    assert loss.item() == pytest.approx(by_hand / 2, abs=1e-12)


def test_uninteresting_items_are_uniform_over_the_items_outside_the_teachers_list():
    torch.manual_seed(0)
    drawn = sample_uninteresting(TEACHER, 6, 3000)
    for s in range(2):
        counts = torch.bincount(drawn[s], minlength=6)
        assert counts[TEACHER[s]].sum() == 0
        outside = [i for i in range(6) if i not in TEACHER[s].tolist()]
        assert counts[outside].min() > 850  # 1000 expected each
    assert items_mask(torch.tensor([[1, 6]]), 6).tolist() == [[False, True, False, False, False, False]]


# --- collaborative embedding distillation: the item-embedding seam ---------------------------------

SMALL = SASRecConfig(hidden_size=8, num_layers=1, num_heads=1, inner_size=16, dropout=0.0, max_length=6)


def wrapped_model(num_items=7, dim=5, alpha=0.3):
    torch.manual_seed(0)
    model = build_model(SMALL, num_items)
    teacher = torch.randn(num_items, dim) * 40.0 + 3.0  # an LLM-like scale; standardised per feature
    teacher[:, 0] *= 100.0  # a "massive" dimension: standardising brings it to the others' scale
    install_collaborative_embedding(model, teacher, alpha)
    return model.eval(), teacher


def test_collaborative_embedding_equals_its_formula_and_its_table_with_a_zero_pad_row():
    model, teacher = wrapped_model()
    module = model.item_embedding
    assert isinstance(module, CollaborativeEmbedding)
    z = (teacher - teacher.mean(0)) / teacher.std(0, unbiased=False)
    torch.testing.assert_close(z.pow(2).mean(0), torch.ones(z.shape[1]))
    expected = module.base.weight[:-1] + 0.3 * (z @ module.projector.weight.T + module.projector.bias)
    torch.testing.assert_close(module.table(), expected)
    ids = torch.tensor([[7, 0, 3], [6, 6, 7]])  # 7 = pad
    looked_up = module(ids)
    torch.testing.assert_close(looked_up[ids != 7], module.table()[ids[ids != 7]])
    assert looked_up[ids == 7].abs().max().item() == 0.0
    assert not module.teacher.requires_grad and "teacher" not in module.state_dict()
    trainable = {name for name, p in module.named_parameters()}
    assert trainable == {"base.weight", "projector.weight", "projector.bias"}


def test_several_teachers_blocks_carry_equal_variance_whatever_their_width():
    torch.manual_seed(0)
    narrow, wide = torch.randn(50, 2) * 0.01, torch.randn(50, 8) * 300.0  # an SR table beside an LLM state
    z = standardized(torch.cat([narrow, wide], dim=1), blocks=(2, 8))
    per_item = z.pow(2).mean(0)  # each column's variance over the items
    torch.testing.assert_close(per_item[:2].sum(), torch.tensor(5.0))  # D / T = 10 / 2 for each teacher
    torch.testing.assert_close(per_item[2:].sum(), torch.tensor(5.0))
    torch.testing.assert_close(z[:, :2] / math.sqrt(2.5), standardized(narrow))  # sqrt(10 / (2 * 2))
    torch.testing.assert_close(standardized(wide, blocks=(8,)), standardized(wide))  # one teacher: unchanged
    with pytest.raises(ValueError, match=r"blocks \[2, 7\] do not split 10 columns"):
        standardized(torch.cat([narrow, wide], dim=1), blocks=(2, 7))
    model = build_model(SMALL, 50)
    install_collaborative_embedding(model, torch.cat([narrow, wide], dim=1), 0.2, blocks=(2, 8))
    torch.testing.assert_close(model.item_embedding.teacher, z)


def test_bake_then_save_and_load_give_identical_scores(tmp_path):
    model, _ = wrapped_model()
    histories = pad_histories([[0, 1, 2], [5], [3, 3, 4, 6]], model.pad_id)
    with torch.no_grad():
        before = model.score_all(histories)
        model.bake_item_embedding()
        after = model.score_all(histories)
    torch.testing.assert_close(after, before)
    model.save_pretrained(tmp_path / "student")
    with torch.no_grad():
        reloaded = load_model(tmp_path / "student").score_all(histories)
    assert torch.equal(reloaded, after)


def test_collaborative_embedding_refuses_a_matrix_with_the_wrong_number_of_items():
    model = build_model(SMALL, 7)
    with pytest.raises(ValueError, match=r"\[7, D\]"):
        install_collaborative_embedding(model, torch.randn(8, 4), 0.2)
