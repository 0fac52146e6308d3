"""The `sr_hint` template (the hard-prompt baseline a distilled soft prompt must beat): each stage-2 instance names
the SR model's top-h among ITS candidates, ordered by the SR model's scores read from the user-states file."""

import pytest

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.llm.instances import InstanceOptions, build_instances
from delrec.predictions import read_user_states
from delrec.prompts import get_template
from delrec.sr import load_model
from delrec.sr.evaluate import write_predictions
from distill_fixtures import sr_model  # noqa: F401 (fixture)
from llm_fixtures import load_tiny, tiny_llm, tiny_llm_data  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def states_files(sr_model, tiny_llm_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("states")
    dataset, model = PreparedDataset.load(tiny_llm_data), load_model(sr_model, "cpu")
    for split in ("train", "valid"):
        write_predictions(folder / f"{split}.jsonl", model, dataset, split, 5, user_states=True)
    return folder


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
