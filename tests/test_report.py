"""The report's verdicts: a rate counts as above chance, or a difference as real, only beyond two
standard errors of the number of instances behind it. Expected values are computed here by hand."""

import json
import math

import pytest

from delrec.report import Results, Row, _verdicts, above_chance


def test_above_chance_uses_two_binomial_standard_errors_at_the_chance_level():
    above, margin = above_chance(0.3, 0.05, 100)
    assert margin == pytest.approx(2 * math.sqrt(0.05 * 0.95 / 100)) == pytest.approx(0.0435889894)
    assert above
    assert above_chance(0.05 + 0.0436, 0.05, 100)[0]  # just beyond the margin
    assert not above_chance(0.05 + 0.0435, 0.05, 100)[0]  # just within it
    assert not above_chance(0.05, 0.05, 100)[0]
    assert above_chance(0.5, 0.25, 400)[1] == pytest.approx(2 * math.sqrt(0.25 * 0.75 / 400))  # 0.0433


def llm_results(tmp_path, hr1: float, instances: int) -> Results:
    """20 candidates per user: chance HR@1 = 1/20."""
    return Results(tmp_path, 10, {}, rows=[Row("LLM", "llm", {"hr@1": hr1}, instances=instances)], candidates=20)


@pytest.mark.parametrize("hr1, verdict", [(0.0936, "above chance"), (0.0935, "NOT distinguishable from chance")])
def test_the_llm_verdict_compares_hr1_with_chance_over_its_instances(tmp_path, hr1, verdict):
    [line] = _verdicts(llm_results(tmp_path, hr1, 100))
    assert line == (f"LLM: HR@1 {hr1:.3f} vs chance 0.050 over 100 instances: {verdict} "
                    "(2 standard errors = 0.044).")


def student_results(tmp_path, alone_hr: float, distilled_hr: float, users: int) -> Results:
    rows = [Row("student SASRec alone", "student", full={"hr@10": alone_hr, "ndcg@10": 0.1}),
            Row("student SASRec + DLLM2Rec", "student", full={"hr@10": distilled_hr, "ndcg@10": 0.12})]
    return Results(tmp_path, 10, {}, rows=rows, users=users)


@pytest.mark.parametrize("distilled, noise", [(0.32, "within"), (0.33, "beyond")])
def test_a_students_gain_counts_only_beyond_two_standard_errors_of_the_difference(tmp_path, distilled, noise):
    # se = sqrt((p1 (1 - p1) + p2 (1 - p2)) / users): 0.32 -> 2 se = 0.1229 > 0.12; 0.33 -> 2 se = 0.1235 < 0.13
    two_se = 2 * math.sqrt((0.2 * 0.8 + distilled * (1 - distilled)) / 100)
    assert two_se == pytest.approx({0.32: 0.122898, 0.33: 0.123467}[distilled], abs=1e-6)
    [line] = _verdicts(student_results(tmp_path, 0.2, distilled, 100))
    assert line == (f"student SASRec + DLLM2Rec: NDCG@10 0.1200 vs 0.1000 alone (+20.0%); HR@10 difference "
                    f"{distilled - 0.2:+.3f} is {noise} the noise of 100 test users (2 standard errors {two_se:.3f}).")


def write_rankings(path, hits: list[bool]) -> None:
    """A rankings.jsonl whose target is first (NDCG@5 = 1) where `hits`, else absent (NDCG@5 = 0)."""
    path.mkdir(parents=True)
    rows = [{"target": 7, "items": [7, 1, 2] if hit else [1, 2, 3]} for hit in hits]
    (path / "rankings.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("wins, sign, verdict", [(4, 1, "helped"), (3, 1, "made no measurable difference"),
                                                  (4, -1, "hurt")])
def test_the_soft_prompt_verdict_is_a_paired_test_over_the_same_instances(tmp_path, wins, sign, verdict):
    # 10 paired differences, `wins` of them +-1 and the rest 0: mean p = wins / 10, sample standard deviation
    # sqrt(10 / 9 p (1 - p)), so se = sqrt(p (1 - p) / 9); 4 wins: 2 se = 0.327 < 0.4; 3 wins: 2 se = 0.306 > 0.3
    p = wins / 10
    two_se = 2 * math.sqrt(p * (1 - p) / 9)
    assert two_se == pytest.approx({4: 0.326599, 3: 0.305505}[wins], abs=1e-6)
    better = [i < wins for i in range(10)]
    write_rankings(tmp_path / "with", better if sign > 0 else [False] * 10)
    write_rankings(tmp_path / "without", [False] * 10 if sign > 0 else better)
    records = {"rank": {"outputs": {"runs": {"stage1/hf": {"folder": "with"}, "none/hf": {"folder": "without"}}}}}
    [line] = _verdicts(Results(tmp_path, 10, records))
    assert line == (f"Distilled soft prompt vs none (same LLM, same stage-2 budget): it {verdict} (paired NDCG@5 "
                    f"difference {sign * p:+.3f}, 2 standard errors {two_se:.3f}, 10 instances).")
