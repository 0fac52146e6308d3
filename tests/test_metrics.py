import itertools
import math

import pytest
import torch

from delrec.metrics import (
    RankingMetrics,
    above_chance,
    candidate_metrics,
    exclude_history_,
    full_ranking_metrics,
    generation_metrics,
    history_mask,
    instance_metrics,
    metrics_from_ranked_lists,
    paired_difference,
    target_rank_counts,
)

LOG2_3 = math.log2(3)


def test_single_instance_by_hand():
    # Target item 2 (0.5) is beaten only by item 1 (0.9): rank 2.
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    got = full_ranking_metrics(scores, [2], ks=(1, 2, 5))
    assert got == pytest.approx({
        "hr@1": 0.0, "hr@2": 1.0, "hr@5": 1.0,
        "ndcg@1": 0.0, "ndcg@2": 1 / LOG2_3, "ndcg@5": 1 / LOG2_3,
        "mrr@1": 0.0, "mrr@2": 0.5, "mrr@5": 0.5,
    })


def test_batch_means_by_hand():
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    got = full_ranking_metrics(scores, [0, 1, 2], ks=(1, 3))  # ranks 1, 2, 3
    assert got["hr@1"] == pytest.approx(1 / 3)
    assert got["hr@3"] == pytest.approx(1.0)
    assert got["ndcg@3"] == pytest.approx((1 + 1 / LOG2_3 + 1 / 2) / 3)
    assert got["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_constant_scorer_is_chance_level():
    n = 7
    got = full_ranking_metrics(torch.zeros(1, n), [3], ks=(1, 5, 20))
    assert got["hr@1"] == 1 / n
    assert got["hr@5"] == pytest.approx(5 / n)
    assert got["hr@20"] == pytest.approx(1.0)
    assert got["mrr@20"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    assert got["ndcg@5"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 6)) / n)


def test_two_way_tie_at_the_top():
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    got = full_ranking_metrics(scores, [0], ks=(1, 5))
    assert got["hr@1"] == 0.5
    assert got["ndcg@5"] == pytest.approx((1 + 1 / LOG2_3) / 2)
    assert got["ndcg@1"] == pytest.approx(0.5)
    assert got["mrr@5"] == pytest.approx((1 + 1 / 2) / 2)
    assert got["hr@5"] == 1.0


def test_tie_straddling_the_cutoff():
    # One item above, target tied with two others: ranks 2, 3, 4 equally likely.
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0]])
    got = full_ranking_metrics(scores, [2], ks=(1, 3))
    assert got["hr@1"] == 0.0
    assert got["hr@3"] == pytest.approx(2 / 3)
    assert got["ndcg@3"] == pytest.approx((1 / LOG2_3 + 1 / 2) / 3)
    assert got["mrr@3"] == pytest.approx((1 / 2 + 1 / 3) / 3)


def test_expected_value_matches_enumerating_every_tie_break():
    scores = torch.tensor([[2.0, 1.0, 2.0, 1.0, 1.0, 0.0]])
    ks = (1, 2, 3, 4)
    for target in range(scores.shape[1]):
        got = full_ranking_metrics(scores, [target], ks=ks)
        perms = list(itertools.permutations(range(scores.shape[1])))
        totals = dict.fromkeys(got, 0.0)
        for perm in perms:  # a tie-break order: stable sort by score after shuffling by perm
            order = sorted(perm, key=lambda i: -float(scores[0, i]))
            rank = order.index(target) + 1
            for k in ks:
                totals[f"hr@{k}"] += rank <= k
                totals[f"ndcg@{k}"] += (rank <= k) / math.log2(rank + 1)
                totals[f"mrr@{k}"] += (rank <= k) / rank
        assert got == pytest.approx({key: value / len(perms) for key, value in totals.items()})


def test_k_larger_than_catalogue():
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    got = full_ranking_metrics(scores, [2], ks=(1, 5, 10, 20))  # rank 3 of 3
    assert got["hr@1"] == 0.0
    assert got["hr@5"] == got["hr@20"] == 1.0
    assert got["ndcg@20"] == pytest.approx(0.5)
    assert got["mrr@20"] == pytest.approx(1 / 3)
    assert candidate_metrics(torch.zeros(1, 2), [0], ks=(1, 5)) == pytest.approx(
        {"hr@1": 0.5, "hr@5": 1.0, "ndcg@1": 0.5, "ndcg@5": (1 + 1 / LOG2_3) / 2, "mrr@1": 0.5, "mrr@5": 0.75}
    )


def test_target_rank_counts():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    greater, ties = target_rank_counts(scores, torch.tensor([0, 4]))
    assert greater.tolist() == [1, 0]
    assert ties.tolist() == [2, 4]
    assert greater.dtype == ties.dtype == torch.long


def test_excluded_items_never_count():
    scores = torch.tensor([[0.2, 100.0, 0.5, 0.2, 0.1]])
    exclude = torch.tensor([[False, True, False, True, False]])
    greater, ties = target_rank_counts(scores, [0], exclude)
    assert (greater.item(), ties.item()) == (1, 0)  # item 1 (huge) and the tied item 3 are out
    without = full_ranking_metrics(torch.tensor([[0.2, 0.5, 0.1]]), [0])
    assert full_ranking_metrics(scores, [0], histories=[[1, 3]]) == pytest.approx(without)


def test_excluding_the_target_does_not_exclude_it():
    scores = torch.tensor([[0.2, 0.9, 0.5, 0.1]])
    plain = target_rank_counts(scores, [2], torch.tensor([[False, False, False, True]]))
    marked = target_rank_counts(scores, [2], torch.tensor([[False, False, True, True]]))
    assert [t.tolist() for t in plain] == [t.tolist() for t in marked] == [[1], [0]]
    got = full_ranking_metrics(scores, [2], histories=[[2, 3]], ks=(1, 2))
    assert got["hr@2"] == 1.0 and got["mrr@2"] == 0.5


def test_minus_infinity_ranks_lowest():
    inf = float("inf")
    scores = torch.tensor([[0.0, -inf, -inf, 1.0], [-inf, 2.0, -3.0, -inf]])
    greater, ties = target_rank_counts(scores, [1, 2])
    assert greater.tolist() == [2, 1]
    assert ties.tolist() == [1, 0]
    got = full_ranking_metrics(scores[:1], [1], ks=(3, 4))
    assert got["hr@3"] == 0.5 and got["hr@4"] == 1.0


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        full_ranking_metrics(torch.tensor([[0.1, float("nan"), 0.3]]), [0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="targets"):
        target_rank_counts(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError, match="shape"):
        target_rank_counts(torch.zeros(2, 3), [0])
    with pytest.raises(ValueError, match="exclude"):
        target_rank_counts(torch.zeros(1, 3), [0], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="positive"):
        RankingMetrics(ks=(0, 5))
    with pytest.raises(ValueError, match="subset"):
        RankingMetrics(metrics=("recall",))
    with pytest.raises(ValueError, match="history item"):
        history_mask([[0, 5]], 5)


def test_empty_input_raises():
    metrics = RankingMetrics()
    assert metrics.count == 0
    with pytest.raises(ValueError, match="no instances"):
        metrics.compute()
    metrics.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert metrics.count == 0
    with pytest.raises(ValueError, match="no instances"):
        metrics.compute()
    with pytest.raises(ValueError, match="no instances"):
        metrics_from_ranked_lists([], [])
    with pytest.raises(ValueError, match="no outputs"):
        generation_metrics([], [])


def test_history_mask():
    mask = history_mask([[0, 2], [], [3, 3]], 4)
    assert mask.tolist() == [[True, False, True, False], [False] * 4, [False, False, False, True]]
    assert history_mask([], 3).shape == (0, 3)


def test_exclude_history_in_place_equals_the_mask():
    scores = torch.arange(12, dtype=torch.float).view(3, 4)
    expected = scores.masked_fill(history_mask([[0, 2], [], [3, 3]], 4), float("-inf"))
    assert exclude_history_(scores, [[0, 2], [], [3, 3]]) is scores
    assert torch.equal(scores, expected) and scores[0].tolist() == [float("-inf"), 1.0, float("-inf"), 3.0]
    with pytest.raises(ValueError, match=r"0\.\.3"):
        exclude_history_(scores, [[4]])


def test_accumulating_batches_equals_one_pass():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (37, 50), generator=gen).float()  # many ties on purpose
    targets = torch.randint(0, 50, (37,), generator=gen)
    exclude = torch.rand(37, 50, generator=gen) < 0.2
    whole = RankingMetrics()
    whole.update(scores, targets, exclude)
    parts = RankingMetrics()
    for start in range(0, 37, 8):
        parts.update(scores[start:start + 8], targets[start:start + 8], exclude[start:start + 8])
    assert parts.count == whole.count == 37
    assert parts.compute() == pytest.approx(whole.compute(), rel=1e-12)


def test_update_counts_matches_update():
    scores = torch.tensor([[0.4, 0.4, 0.9], [0.1, 0.2, 0.3]])
    direct = RankingMetrics(ks=(1, 2))
    direct.update(scores, [0, 2])
    counted = RankingMetrics(ks=(1, 2))
    counted.update_counts([1, 0], [1, 0])
    assert counted.compute() == pytest.approx(direct.compute())
    per_instance = instance_metrics([1, 0], [1, 0], ks=(2,), metrics=("hr",))
    assert per_instance["hr@2"].tolist() == [0.5, 1.0]


def test_ranked_lists_by_hand():
    ranked = [[5, 7, 9], [7, 9], [1, 2, 3]]
    got = metrics_from_ranked_lists(ranked, [7, 7, 4], ks=(1, 2, 10))  # ranks 2, 1, absent
    assert got["hr@1"] == pytest.approx(1 / 3)
    assert got["hr@10"] == pytest.approx(2 / 3)
    assert got["ndcg@2"] == pytest.approx((1 / LOG2_3 + 1) / 3)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1) / 3)


def test_ranked_lists_agree_with_scores_without_ties():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(25, 40, generator=gen)
    targets = torch.randint(0, 40, (25,), generator=gen)
    histories = [[(t + 1) % 40, (t + 7) % 40] for t in targets.tolist()]
    ks = (1, 5, 10, 20)
    from_scores = full_ranking_metrics(scores, targets, histories, ks=ks)
    masked = scores.masked_fill(history_mask(histories, 40), float("-inf"))
    ranked = masked.topk(20, dim=1).indices.tolist()
    assert metrics_from_ranked_lists(ranked, targets.tolist(), ks=ks) == pytest.approx(from_scores, rel=1e-12)


def test_candidate_metrics():
    scores = torch.tensor([[0.1, 0.7, 0.3], [0.9, 0.2, 0.4]])
    got = candidate_metrics(scores, torch.tensor([2, 0]))  # ranks 2 and 1
    assert got["hr@1"] == 0.5
    assert got["hr@5"] == 1.0
    assert got["ndcg@5"] == pytest.approx((1 / LOG2_3 + 1) / 2)
    assert set(got) == {"hr@1", "hr@5", "ndcg@1", "ndcg@5", "mrr@1", "mrr@5"}


def test_generation_metrics():
    got = generation_metrics([3, None, 5, 7], [3, 4, 6, 7])
    assert got == {"hr@1": 0.5, "valid_ratio": 0.75, "hr@1_given_valid": 2 / 3}
    assert generation_metrics([None], [1]) == {"hr@1": 0.0, "valid_ratio": 0.0, "hr@1_given_valid": None}
    with pytest.raises(ValueError):
        generation_metrics([1], [1, 2])


def test_per_instance_full_ranking_averages_to_evaluate_full(tmp_path):
    """The per-user values paired tests are built on are the ones `evaluate_full` averages, user by user."""
    from delrec.data.prepare import prepare_dataset
    from delrec.data.preprocess import PreprocessConfig
    from delrec.data.synthetic import make_synthetic
    from delrec.sr import SASRecConfig, TrainConfig, train_sr
    from delrec.sr.evaluate import evaluate_full, per_instance_full

    dataset = prepare_dataset(make_synthetic(num_users=80, num_items=30, min_length=5, max_length=10, seed=1),
                              PreprocessConfig(num_candidates=5), tmp_path / "data")
    model = train_sr(dataset, SASRecConfig(hidden_size=8, num_layers=1, num_heads=1, inner_size=16, max_length=10),
                     TrainConfig(epochs=1, progress=False), tmp_path / "m").model
    instances = dataset.instances("test")
    values = per_instance_full(model, instances, 10, batch_size=7)  # several length-sorted batches, reordered back
    assert values["ndcg@10"].shape == (len(instances),)
    expected = evaluate_full(model, instances, ks=(10,))
    assert float(values["ndcg@10"].mean()) == pytest.approx(expected["ndcg@10"], abs=1e-12)
    assert float(values["hr@10"].mean()) == pytest.approx(expected["hr@10"], abs=1e-12)
    one = per_instance_full(model, instances[3:4], 10)["ndcg@10"]
    assert float(one[0]) == pytest.approx(float(values["ndcg@10"][3]), abs=1e-12)


def test_above_chance_uses_two_binomial_standard_errors_at_the_chance_level():
    above, margin = above_chance(0.3, 0.05, 100)
    assert margin == pytest.approx(2 * math.sqrt(0.05 * 0.95 / 100)) == pytest.approx(0.0435889894)
    assert above
    assert above_chance(0.05 + 0.0436, 0.05, 100)[0]  # just beyond the margin
    assert not above_chance(0.05 + 0.0435, 0.05, 100)[0]  # just within it
    assert not above_chance(0.05, 0.05, 100)[0]
    assert above_chance(0.5, 0.25, 400)[1] == pytest.approx(2 * math.sqrt(0.25 * 0.75 / 400))  # 0.0433


def test_paired_difference_is_the_mean_difference_against_two_standard_errors():
    small = paired_difference([1, 0, 1, 1], [0, 0, 1, 0])  # diffs 1, 0, 0, 1: sd sqrt(1/3), se sqrt(1/3) / 2
    assert small.difference == 0.5 and small.n == 4
    assert small.margin == pytest.approx(2 * math.sqrt(1 / 3) / 2) and small.verdict == "within noise"
    large = paired_difference([1, 0, 1, 1] * 25, [0, 0, 1, 0] * 25)
    assert large.margin == pytest.approx(2 * math.sqrt(25 / 99) / 10) and large.verdict == "better"
    assert paired_difference([0, 0, 1, 0] * 25, [1, 0, 1, 1] * 25).verdict == "worse"
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])
