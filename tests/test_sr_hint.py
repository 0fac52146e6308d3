"""The `sr_hint` template (the hard-prompt baseline a distilled soft prompt must beat): each stage-2 instance names
the SR model's top-h among ITS candidates, ordered by the SR model's scores read from the user-states file."""

import pytest
import torch

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.llm.instances import InstanceOptions, build_instances
from delrec.predictions import read_user_states
from delrec.prompts import get_template
from delrec.sr import load_model
from delrec.sr.evaluate import write_predictions
from delrec.llm.loading import LoraSettings, ModelConfig
from delrec.llm.stage2 import FinetuneArguments, finetune
from delrec.llm.trainer import TrainingSettings
from delrec.ranking.hf import Options
from delrec.ranking.base import ReadoutConfig
from delrec.ranking.runner import RankArguments, rank
from llm_fixtures import load_tiny
from test_delrec_training import FAST


@pytest.fixture(scope="module")
def states_files(sr_model, tiny_llm_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    dataset, model = PreparedDataset.load(tiny_llm_data), load_model(sr_model, "cpu")
    for split in ("train", "valid", "test"):
        write_predictions(folder / f"{split}.jsonl", model, dataset, split, 5, user_states=True)
    return folder


@pytest.fixture(scope="module")
def hinted(states_files, tiny_llm_data, tiny_llama, tmp_path_factory):
    """A stage-2 folder trained with the sr_hint template (four steps)."""
    out = tmp_path_factory.mktemp("hinted") / "stage2"
    args = FinetuneArguments(data=str(tiny_llm_data), out=str(out), soft_prompt="none", template="sr_hint",
                             **{f"{split}_predictions": str(states_files / f"{split}.jsonl")
                                for split in ("train", "valid", "test")},
                             sr_top=2, max_train_instances=16, eval_max_instances=4, test_max_instances=4,
                             max_length=512)
    finetune(args, ModelConfig(str(tiny_llama), dtype="float32", device="cpu"), LoraSettings(r=2, lora_alpha=4, lora_dropout=0.0),
             TrainingSettings(**FAST))
    return out


@pytest.mark.parametrize("split", ["train", "valid"])
def test_instances_name_the_sr_models_top_candidates_best_first(split, states_files, tiny_llm_data, tiny_llm):
    _, tokenizer = load_tiny(tiny_llm)
    dataset = PreparedDataset.load(tiny_llm_data)
    built = build_instances(dataset, get_template("sr_hint"), InstanceOptions(split=split, sr_top=3, max_length=512),
                            tokenizer, states_files / f"{split}.jsonl")
    states = read_user_states(states_files / f"{split}.jsonl", dataset, split)
    assert len(built.rows) > 0
    assert len(set(dataset.titles)) == len(dataset.titles)  # titles name items one to one here
    ids = {title: item for item, title in enumerate(dataset.titles)}
    index_of = {inst.id: i for i, inst in enumerate(dataset.instances(split))}
    for row in built.rows.select(range(min(5, len(built.rows)))):
        candidates = [ids[title] for title in row["candidates"]]
        scores = states.scores([index_of[row["id"]]], [candidates])[0].tolist()
        best = sorted(range(len(candidates)), key=lambda j: (-scores[j], j))[:3]
        hint = row["prompt"].split("ranks these candidates highest for this user, best first:")[1].split("Choose")[0]
        named = [line.split(". ", 1)[1] for line in hint.strip().splitlines()]
        assert named == [row["candidates"][j] for j in best]


def test_without_user_states_the_build_says_how_to_write_them(tiny_llm_data, tiny_llm, tmp_path):
    _, tokenizer = load_tiny(tiny_llm)
    with pytest.raises(DelrecError, match=r"sr_hint.jinja names the SR model's top candidates.*`delrec sr predict "
                                          r"--split valid --user_states`"):
        build_instances(PreparedDataset.load(tiny_llm_data), get_template("sr_hint"), InstanceOptions(split="valid"),
                        tokenizer, None)


def rank_hinted(model, data, out, **options):
    args = RankArguments(model=str(model), data=str(data), out=str(out), max_instances=4, progress=False, **options)
    return rank(args, ReadoutConfig(), Options(device="cpu", batch_size=4))


def test_a_hinted_model_records_its_sr_model_and_ranks_with_the_same_ones_hints(hinted, states_files, tiny_llm_data,
                                                                                tmp_path):
    from delrec.llm.stage_folder import read_info

    recorded = read_info(hinted)["sr_hint"]
    dataset = PreparedDataset.load(tiny_llm_data)
    states = read_user_states(states_files / "test.jsonl", dataset, "test")
    assert recorded == {"sr_top": 2, "model_type": "sasrec", "item_table_sha256": states.item_table_digest()}
    metrics = rank_hinted(hinted, tiny_llm_data, tmp_path / "ranked", predictions=str(states_files / "test.jsonl"))
    assert metrics["model"]["template"] == "sr_hint" and 0 <= metrics["test"]["hr@1"] <= 1


def test_the_rank_prompt_names_the_sr_models_top_candidates(hinted, states_files, tiny_llm_data, tiny_llm):
    from delrec.ranking.models import describe_model, ranking_template
    from delrec.ranking.requests import build_requests

    _, tokenizer = load_tiny(tiny_llm)
    dataset = PreparedDataset.load(tiny_llm_data)
    spec = describe_model(str(hinted))
    states = read_user_states(states_files / "test.jsonl", dataset, "test")
    requests = build_requests(dataset, "test", spec, ranking_template(spec), tokenizer, 512, lambda titles: 16, 3,
                              states=states)
    for index, request in enumerate(requests):
        scores = states.scores([index], [list(request.candidates)])[0].tolist()
        best = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:2]
        hint = request.prompt.split("best first:")[1].split("Choose")[0]
        assert [line.split(". ", 1)[1] for line in hint.strip().splitlines()] == [request.titles[j] for j in best]


@pytest.mark.parametrize("case", ["missing", "other_model", "not_a_hint_template"])
def test_rank_refuses_hints_it_cannot_trust_in_one_line(case, hinted, states_files, sr_model, tiny_llm_data,
                                                        tiny_llama, tmp_path):
    if case == "missing":
        target, options, match = hinted, {}, r"names the SR model's top candidates: pass --predictions"
    elif case == "other_model":  # the same SR folder's weights, nudged: another SR model
        other = tmp_path / "other"
        model = load_model(sr_model, "cpu")
        with torch.no_grad():
            model.item_embedding.weight.add_(0.01)
        write_predictions(other, model, PreparedDataset.load(tiny_llm_data), "test", 5, user_states=True)
        target, options, match = hinted, {"predictions": str(other)}, "made by another SR model"
    else:
        target, options, match = tiny_llama, {"predictions": str(states_files / "test.jsonl")}, \
            "does not read SR predictions"
    with pytest.raises(DelrecError, match=match):
        rank_hinted(target, tiny_llm_data, tmp_path / "ranked", **options)


def test_stage2_needs_every_splits_user_states(tiny_llm_data, tiny_llama, states_files, tmp_path):
    args = FinetuneArguments(data=str(tiny_llm_data), out=str(tmp_path / "run"), soft_prompt="none",
                             template="sr_hint", train_predictions=str(states_files / "train.jsonl"))
    with pytest.raises(DelrecError, match="set valid_predictions, test_predictions"):
        finetune(args, ModelConfig(str(tiny_llama), dtype="float32", device="cpu"), LoraSettings(r=2, lora_alpha=4),
                 TrainingSettings(**FAST))


def test_requests_without_the_sr_models_order_are_refused(hinted, tiny_llm_data, tiny_llm):
    """The teacher export ranks candidate sets of its own through `requests_for`, with no user states: an sr_hint
    model is refused there in one line instead of being prompted without its hints."""
    from delrec.ranking.models import describe_model, ranking_template
    from delrec.ranking.requests import requests_for

    _, tokenizer = load_tiny(tiny_llm)
    dataset = PreparedDataset.load(tiny_llm_data)
    spec = describe_model(str(hinted))
    instances = dataset.instances("test")[:2]
    with pytest.raises(DelrecError, match="names the SR model's top candidates, which this command cannot supply"):
        requests_for(instances, [[0, 1, 2]] * 2, dataset.titles, "test", spec, ranking_template(spec), tokenizer, 512,
                     lambda titles: 16)
