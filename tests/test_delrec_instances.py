"""DELRec instance builders (TA, RPS, LSR) and the SR prefix predictions they read."""

import json

import pytest

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.llm.instances import InstanceOptions, build_instances
from delrec.llm.loading import load_tokenizer
from delrec.llm.tokenization import encode_prompt
from delrec.prompts import get_template
from delrec.predictions import read_predictions
from delrec.sr import load_model, write_predictions
from delrec.sr.evaluate import predict

SOFT = "<|sp:pop:0|><|sp:pop:1|>"


@pytest.fixture(scope="module")
def plain(tiny_llm_data, tiny_pop, tmp_path_factory):
    """The same model's train predictions without prefix predictions."""
    path = tmp_path_factory.mktemp("pop-plain") / "plain.jsonl"
    write_predictions(path, load_model(tiny_pop / "model", "cpu"), PreparedDataset.load(tiny_llm_data), "train", 10)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama))


def build(data, name, split, tokenizer, predictions=None, cache=None, **options):
    dataset = PreparedDataset.load(data)
    soft = SOFT if get_template(name).requires_soft_prompt else None
    return build_instances(dataset, get_template(name), InstanceOptions(split=split, soft_prompt=soft, **options),
                           tokenizer, predictions, cache)


def test_prefix_predictions_are_the_top_k_of_the_first_half(tiny_llm_data, tiny_pop, plain):
    dataset = PreparedDataset.load(tiny_llm_data)
    predictions = read_predictions(tiny_pop / "train.jsonl", dataset, "train")
    model = load_model(tiny_pop / "model", "cpu")
    instances = dataset.instances("train")
    assert predictions.meta["prefix_predictions"] and len(predictions.prefix_items) == len(instances)
    # the prefix rows equal ordinary predictions for a dataset whose histories are the prefixes
    halves = [inst.history[: len(inst.history) // 2] for inst in instances]
    rows = json.loads((tiny_pop / "train.jsonl").read_text().splitlines()[3])
    assert rows["prefix_length"] == len(halves[3])
    assert rows["prefix_items"] == predictions.prefix_items[3]
    assert not set(predictions.prefix_items[3]) & set(halves[3])
    assert read_predictions(plain, dataset, "train").prefix_items is None
    full = next(row for row in predict(model, dataset, "train", 10) if row["id"] == 3)
    assert full["items"] == predictions.items[3] and "prefix_items" not in full


def test_builders_are_deterministic_and_cached(tiny_llm_data, tiny_pop, tokenizer, tmp_path):
    first = {}
    pop_train = tiny_pop / "train.jsonl"
    for name, split, predictions in [("ta", "train", pop_train), ("rps", "train", pop_train), ("lsr", "train", None),
                                     ("lsr", "valid", None), ("plain", "valid", None)]:
        a = build(tiny_llm_data, name, split, tokenizer, predictions, tmp_path / "a", seed=3, max_instances=20)
        b = build(tiny_llm_data, name, split, tokenizer, predictions, tmp_path / "b", seed=3, max_instances=20)
        again = build(tiny_llm_data, name, split, tokenizer, predictions, tmp_path / "a", seed=3, max_instances=20)
        assert a.rows.to_list() == b.rows.to_list() == again.rows.to_list(), name
        assert a.stats == again.stats and a.stats["instances"] == 20
        first[(name, split)] = a.rows.to_list()
        other = build(tiny_llm_data, name, split, tokenizer, predictions, None, seed=4, max_instances=20)
        if split == "train":
            assert other.rows.to_list() != a.rows.to_list(), f"{name}: the seed should matter"
    assert len(list((tmp_path / "a").iterdir())) == 5  # one cache folder per build, reused by `again`

    dataset = PreparedDataset.load(tiny_llm_data)
    titles = dataset.titles
    train = dataset.instances("train")
    predictions = read_predictions(tiny_pop / "train.jsonl", dataset, "train")
    for row in first[("rps", "train")]:
        inst, ranked = train[row["id"]], predictions.items[row["id"]]
        assert row["completion"] == titles[ranked[0]] == row["candidates"][row["answer"]]
        assert set(titles[i] for i in ranked[:3]) <= set(row["candidates"])
        assert len(row["candidates"]) == dataset.num_candidates
        assert not set(row["candidates"]) & {titles[i] for i in inst.history if i not in ranked[:3]}
    for row in first[("ta", "train")]:
        inst = train[row["id"]]
        assert row["completion"] == titles[inst.history[-1]] == row["candidates"][row["answer"]]
        assert sorted(row["candidates"]) == sorted({titles[i] for i in inst.history})
        assert titles[predictions.prefix_items[row["id"]][0]] in row["prompt"]
    for row in first[("lsr", "train")]:
        inst = train[row["id"]]
        assert row["candidates"][row["answer"]] == titles[inst.target] and len(row["candidates"]) == 8
        assert not set(row["candidates"]) & ({titles[i] for i in inst.history} - {titles[inst.target]})
    fixed = dataset.candidates("valid")
    for row in first[("lsr", "valid")]:
        assert row["candidates"] == [titles[i] for i in fixed[row["id"]]]
        assert SOFT in row["prompt"]
    assert all(SOFT not in row["prompt"] for row in first[("plain", "valid")])
    for rows in first.values():  # the training tokenization: prompt ids, then the answer + EOS under the mask
        row = rows[0]
        prompt_ids = encode_prompt(tokenizer, row["prompt"])
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert row["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(row["input_ids"]) - len(prompt_ids))
        assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_too_long_instances_are_refused_or_truncated_from_the_oldest_side(tiny_llm_data, tiny_pop, tokenizer):
    full = build(tiny_llm_data, "lsr", "valid", tokenizer)
    longest = full.stats["longest_tokens"]
    limit = longest - 10
    with pytest.raises(DelrecError, match=r"of \d+ lsr instances \(valid\) are longer than max_length "
                                          rf"{limit} tokens \(the longest needs {longest}\).*allow_truncation"):
        build(tiny_llm_data, "lsr", "valid", tokenizer, max_length=limit)
    cut = build(tiny_llm_data, "lsr", "valid", tokenizer, max_length=limit, allow_truncation=True)
    assert cut.stats["truncated"] > 0 and len(cut.rows) == len(full.rows)
    dataset = PreparedDataset.load(tiny_llm_data)
    for before, after in zip(full.rows, cut.rows):
        if after["history_shown"] < before["history_shown"]:
            history = [dataset.titles[i] for i in dataset.instances("valid")[after["id"]].history]
            kept = history[len(history) - after["history_shown"]:]
            assert "\n".join(f"{j}. {t}" for j, t in enumerate(kept, 1)) in after["prompt"]  # the newest items stay
            assert f". {history[0]}\n" not in after["prompt"].split("Candidate")[0]
    with pytest.raises(DelrecError, match="too short for ta prompts even with no history shown"):
        build(tiny_llm_data, "ta", "train", tokenizer, tiny_pop / "train.jsonl", max_length=20, allow_truncation=True)


def test_bad_predictions_are_refused(tiny_llm_data, tiny_pop, plain, tokenizer, tmp_path):
    with pytest.raises(DelrecError, match="has no prefix predictions.*--prefix_predictions"):
        build(tiny_llm_data, "ta", "train", tokenizer, plain)
    with pytest.raises(DelrecError, match="holds predictions for split 'train', expected 'valid'"):
        build(tiny_llm_data, "rps", "valid", tokenizer, tiny_pop / "train.jsonl")
    with pytest.raises(DelrecError, match="need the SR model's predictions for the train split"):
        build(tiny_llm_data, "rps", "train", tokenizer)
    other = tmp_path / "other.jsonl"
    other.write_text((tiny_pop / "train.jsonl").read_text())
    meta = json.loads((tiny_pop / "train.jsonl.meta.json").read_text())
    (tmp_path / "other.jsonl.meta.json").write_text(json.dumps({**meta, "dataset_fingerprint": "f" * 16}))
    with pytest.raises(DelrecError, match="predictions were made on dataset ffff"):
        build(tiny_llm_data, "rps", "train", tokenizer, other)
    with pytest.raises(DelrecError, match="has a soft-prompt slot but no soft prompt"):
        build_instances(PreparedDataset.load(tiny_llm_data), get_template("lsr"), InstanceOptions(split="valid"),
                        tokenizer)


def test_missing_candidate_sets_are_refused(tiny_llm_data, tokenizer, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_llm_data, copy)
    (copy / "candidates" / "valid.jsonl").unlink()
    for split in ("valid", "train"):  # an incomplete folder is refused whole, even for train (draws its own)
        with pytest.raises(DelrecError, match=r"missing candidates/valid.jsonl; re-run `delrec data prepare`"):
            build(copy, "lsr", split, tokenizer)
