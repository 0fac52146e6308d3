"""The report's verdicts: a rate counts as above chance, or a difference as real, only beyond two
standard errors of the number of instances behind it. Expected values are computed here by hand."""

import json
import math

import pytest

from delrec.pipeline.report import Results, Row, arrow_lines, verdict_lines


def llm_results(tmp_path, hr1: float, instances: int) -> Results:
    """20 candidates per user: chance HR@1 = 1/20."""
    return Results(tmp_path, 10, {}, rows=[Row("LLM", "llm", {"hr@1": hr1}, instances=instances)], candidates=20)


@pytest.mark.parametrize("hr1, verdict", [(0.0936, "above chance"), (0.0935, "NOT distinguishable from chance")])
def test_the_llm_verdict_compares_hr1_with_chance_over_its_instances(tmp_path, hr1, verdict):
    [line] = verdict_lines(llm_results(tmp_path, hr1, 100))
    assert line == (f"LLM: HR@1 {hr1:.3f} vs chance 0.050 over 100 instances: {verdict} "
                    "(2 standard errors = 0.044).")


def student_results(tmp_path, wins: int) -> Results:
    """10 users: NDCG@10 0.5 each alone; the distilled student 1.0 on `wins` of them, 0.5 on the others."""
    alone, distilled = [0.5] * 10, [1.0 if i < wins else 0.5 for i in range(10)]
    rows = [Row("student SASRec alone", "student", full={"ndcg@10": 0.5}, per_user=alone),
            Row("student SASRec + DLLM2Rec", "student", full={"ndcg@10": sum(distilled) / 10}, per_user=distilled)]
    return Results(tmp_path, 10, {}, rows=rows, users=10)


@pytest.mark.parametrize("wins, noise", [(4, "beyond"), (3, "within")])
def test_a_students_gain_counts_only_beyond_two_standard_errors_of_the_paired_difference(tmp_path, wins, noise):
    # differences 0.5 on `wins` users, 0 elsewhere: mean 0.05 wins, sd 0.5 sqrt(10 / 9 p (1 - p)) with p = wins / 10,
    # so 2 se = sqrt(p (1 - p) / 9): 4 wins -> 0.1633 < 0.2; 3 wins -> 0.1528 > 0.15
    p = wins / 10
    two_se = math.sqrt(p * (1 - p) / 9)
    assert two_se == pytest.approx({4: 0.163299, 3: 0.152753}[wins], abs=1e-6)
    [line] = verdict_lines(student_results(tmp_path, wins))
    assert line == (f"student SASRec + DLLM2Rec: NDCG@10 {0.5 + p / 2:.4f} vs 0.5000 alone ({p * 100:+.1f}%); paired "
                    f"per-user difference {p / 2:+.4f} is {noise} the noise of 10 test users (2 standard errors "
                    f"{two_se:.4f}).")


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
    [line] = arrow_lines(Results(tmp_path, 10, records))
    assert line == (f"Soft prompt -> LLM (stage 2): the distilled soft prompt, against none (same LLM, same stage-2 "
                    f"budget), {verdict}: paired NDCG@5 difference {sign * p:+.3f}, 2 standard errors {two_se:.3f}, "
                    "10 test instances.")


def test_the_first_arrow_is_stage1s_rps_agreement_against_chance(tmp_path):
    """0.2 agreement over 100 valid instances, chance 0.05: 2 se = 2 sqrt(0.05 0.95 / 100) = 0.0436 < 0.15."""
    folder = tmp_path / "stage1" / "soft-prompt"
    folder.mkdir(parents=True)
    metrics = {"valid": {"rps_agreement": 0.2, "rps_chance": 0.05},
               "valid_before_training": {"rps_agreement": 0.06, "rps_chance": 0.05},
               "instances": {"valid": [{"task": "ta", "instances": 100}, {"task": "rps", "instances": 100}]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    records = {"stage1": {"outputs": {"folder": "stage1/soft-prompt"}}}
    [line] = arrow_lines(Results(tmp_path, 10, records))
    assert line == ("SR -> soft prompt (stage 1): the LLM reading the soft prompt agrees with the SR model's top-1 on "
                    "0.200 of 100 valid instances (before training 0.060, chance 0.050): the pattern reached the soft "
                    "prompt (2 standard errors = 0.044).")
    metrics["valid"]["rps_agreement"] = 0.09
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert "NOT distinguishable from chance" in arrow_lines(Results(tmp_path, 10, records))[0]
