"""Several teachers: per-instance weights by confidence and consistency, and the fused top-K."""

import math

import pytest
import torch

from delrec.data.dataset import PreparedDataset
from delrec.distill import Teacher, combine_teachers, load_teacher, write_teacher
from delrec.distill.teacher_folder import teacher_info
from delrec.errors import DelrecError

N = 12


def make(items, scores, kind="score", fingerprint="abc", embeddings=None, folder=None):
    items, scores = torch.tensor(items), torch.tensor(scores, dtype=torch.float32)
    info = teacher_info(fingerprint, N, len(items), items.shape[1], kind,
                        None if embeddings is None else embeddings.shape[1], {"kind": "test"}, None)
    return Teacher(folder, info, torch.arange(len(items)), items, scores, kind, embeddings)


def reference(teachers, k):
    """The module docstring's definition, item by item with Python loops."""
    rows = []
    for r in range(len(teachers[0].items)):
        lists, probs = [], []
        for t in teachers:
            signed = t.scores[r, :k] if t.score_kind == "score" else -t.scores[r, :k]
            lists.append(t.items[r, :k].tolist())
            probs.append(torch.softmax(signed.double(), 0).tolist())
        conf = [1 - (-sum(p * math.log(p) for p in ps) / math.log(k)) for ps in probs]
        cons = [sum(len(set(a) & set(b)) / k for u, b in enumerate(lists) if u != t) / (len(lists) - 1)
                for t, a in enumerate(lists)]
        raw = [c + o + 1e-8 for c, o in zip(conf, cons)]
        weights = [w / sum(raw) for w in raw]
        fused = {}
        for w, items, ps in zip(weights, lists, probs):
            for item, p in zip(items, ps):
                fused[item] = fused.get(item, 0.0) + w * p
        best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
        rows.append((best, [math.log(fused[i]) for i in best], weights))
    return rows


def test_combined_teacher_equals_its_definition():
    generator = torch.Generator().manual_seed(0)
    teachers = []
    for t, kind in enumerate(["score", "distance", "score"]):
        orders = [torch.randperm(N, generator=generator).tolist() for _ in range(6)]
        # rows 0-2 of every teacher start with items 3 and 7: some agreement
        items = torch.tensor([([3, 7] + [i for i in o if i not in (3, 7)] if r < 3 else o)[:5]
                              for r, o in enumerate(orders)])
        values = torch.rand(6, 5, generator=generator).mul(3 * (t + 1)).sort(dim=1, descending=kind == "score").values
        teachers.append(make(items.tolist(), values.tolist(), kind))
    combined = combine_teachers(teachers, topk=4)
    expected = reference(teachers, 4)
    assert combined.topk == 4 and combined.score_kind == "score" and combined.folder is None
    for row, (items, scores, weights) in enumerate(expected):
        assert combined.items[row].tolist() == items
        assert combined.scores[row].tolist() == pytest.approx(scores, abs=1e-5)
    means = [sum(w[t] for _, _, w in expected) / len(expected) for t in range(3)]
    recorded = [t["mean_weight"] for t in combined.info["source"]["teachers"]]
    assert recorded == pytest.approx(means, abs=1e-5) and sum(recorded) == pytest.approx(1.0, abs=1e-5)
    # its confidences are the weighted mixture renormalised over the top-k
    mixture = torch.tensor([[math.exp(s) for s in scores] for _, scores, _ in expected])
    assert torch.allclose(combined.confidences(), (mixture / mixture.sum(1, keepdim=True)).float(), atol=1e-5)


def test_an_unsure_teacher_that_agrees_with_nobody_is_down_weighted():
    agree = [[1, 2, 3, 4], [5, 6, 7, 8]]
    peaked = [[4.0, 2.0, 1.0, 0.0], [5.0, 3.0, 1.0, 0.0]]
    a = make(agree, peaked)
    b = make([[1, 3, 2, 4], [5, 6, 8, 7]], [[3.0, 2.5, 1.0, 0.5], [4.0, 2.0, 1.5, 0.0]])
    loner = make([[9, 10, 11, 0], [9, 10, 11, 0]], [[0.01, 0.005, 0.0, 0.0]] * 2)  # flat, disjoint
    combined = combine_teachers([a, b, loner], topk=4)
    weights = [t["mean_weight"] for t in combined.info["source"]["teachers"]]
    assert weights[2] < 0.01 and weights[0] > weights[1] > 0.4  # a is the more peaked of the two who agree
    stats = combined.info["source"]["teachers"][2]
    assert stats["mean_confidence"] < 0.01 and stats["mean_consistency"] == 0.0
    assert combined.items.sort(1).values.tolist() == agree  # none of the loner's items gets in
    # the same loner, but sure of itself, keeps a real share
    sure = make([[9, 10, 11, 0], [9, 10, 11, 0]], [[9.0, 0.0, -1.0, -2.0]] * 2)
    assert combine_teachers([a, b, sure], topk=4).info["source"]["teachers"][2]["mean_weight"] > 0.2


def test_one_teacher_combines_to_itself_and_embeddings_concatenate():
    z1, z2 = torch.randn(N, 3), torch.randn(N, 5)
    teacher = make([[1, 2, 3], [4, 5, 6]], [[3.0, 1.0, 0.5], [2.0, 2.0, 1.0]], embeddings=z1)
    alone = combine_teachers([teacher], topk=3)
    assert torch.equal(alone.items, teacher.items)
    assert torch.allclose(alone.confidences(), teacher.confidences(), atol=1e-6)
    other = make([[1, 2, 3], [4, 5, 6]], [[0.1, 0.2, 0.3], [0.0, 0.5, 1.0]], kind="distance", embeddings=z2)
    both = combine_teachers([teacher, other], topk=2)
    assert torch.equal(both.embeddings, torch.cat([z1, z2], 1)) and both.info["embedding_dim"] == 8
    assert combine_teachers([make([[1, 2]], [[1.0, 0.0]])], topk=1).items.tolist() == [[1]]


def test_teachers_of_subsets_combine_over_the_union_where_they_have_rows():
    a = make([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[3.0, 1.0, 0.5], [2.0, 1.5, 1.0], [1.0, 0.5, 0.0]])
    part = make([[2, 1, 0]], [[5.0, 4.0, 0.0]])
    part.instance_ids = torch.tensor([1])  # a teacher of instance 1 only
    combined = combine_teachers([a, part], topk=3)
    assert combined.instance_ids.tolist() == [0, 1, 2]
    for row in (0, 2):  # a alone: its own list and distribution
        assert combined.items[row].tolist() == a.items[row].tolist()
        assert torch.allclose(combined.confidences()[row], a.confidences()[row], atol=1e-6)
    assert set(combined.items[1].tolist()) <= {0, 1, 2, 4, 5, 6} and combined.items[1, 0].item() in (1, 2)
    stats = combined.info["source"]["teachers"]
    assert [t["instances"] for t in stats] == [3, 1] and stats[1]["mean_consistency"] == 0.0
    embeddings_only = Teacher(None, teacher_info("abc", N, 0, None, None, 4, {"kind": "emb"}, None), None, None,
                              None, None, torch.randn(N, 4))
    with_embeddings = combine_teachers([a, embeddings_only], topk=3)
    assert torch.equal(with_embeddings.items, a.items) and with_embeddings.embeddings.shape == (N, 4)
    other_embeddings = Teacher(None, teacher_info("abc", N, 0, None, None, 6, {"kind": "emb"}, None), None, None,
                               None, None, torch.randn(N, 6))
    side_by_side = combine_teachers([embeddings_only, a, other_embeddings], topk=3)
    assert side_by_side.embeddings.shape == (N, 10) and side_by_side.embedding_blocks == (4, 6)
    alone = combine_teachers([embeddings_only], topk=3)
    assert not alone.has_rankings and alone.embeddings.shape == (N, 4)


def test_teachers_of_other_datasets_or_too_short_lists_are_refused():
    a = make([[1, 2, 3]], [[3.0, 2.0, 1.0]])
    with pytest.raises(DelrecError, match="dataset_fingerprint 'xyz' differs"):
        combine_teachers([a, make([[1, 2, 3]], [[3.0, 2.0, 1.0]], fingerprint="xyz")], topk=3)
    with pytest.raises(DelrecError, match="the loss needs K=4, the teacher has 3; re-export with --topk 4"):
        combine_teachers([a], topk=4)
    with pytest.raises(DelrecError, match="at least one teacher"):
        combine_teachers([], topk=3)


def test_combined_real_teachers_write_and_load(sr_teacher, tiny_llm_data, tmp_path):
    dataset = PreparedDataset.load(tiny_llm_data)
    sr = load_teacher(sr_teacher, dataset)
    reversed_scores = write_teacher(tmp_path / "distance", dataset, sr.instance_ids, sr.items, -sr.scores, "distance")
    combined = combine_teachers([sr, load_teacher(reversed_scores, dataset)], topk=5)
    assert torch.equal(combined.items, sr.items[:, :5])  # two identical rankings fuse to the same ranking
    out = write_teacher(tmp_path / "ensemble", dataset, combined.instance_ids, combined.items, combined.scores,
                        combined.score_kind, combined.embeddings, combined.info["source"], combined.info["seconds"])
    loaded = load_teacher(out, dataset)
    assert torch.equal(loaded.items, combined.items) and torch.equal(loaded.scores, combined.scores)
    assert [t["folder"] for t in loaded.info["source"]["teachers"]] == [str(sr_teacher), str(reversed_scores)]
    assert loaded.info["source"]["kind"] == "ensemble"
