"""`delrec sr compile`: the AOTInductor package ranks exactly as the eager model, and a stale one is refused.

Each compilation takes 10-30 s on 2 cores, so these tests are marked slow (CI runs them); the
fixture compiles the trained tiny SASRec once, through the command line, for the tests that share it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from delrec.cli import main
from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.sr import CaserConfig, GRU4RecConfig, SASRecConfig, build_model, load_model
from delrec.sr import compiled as compiled_module
from delrec.sr.compiled import CompiledTopK, compile_top_k, package_path
from delrec.sr.evaluate import top_items

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="AOTInductor packages are built and tested on Linux/macOS"),
    pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c),
                       reason="compiling needs a C++ compiler (g++, c++ or clang++ on PATH, or CXX)"),
]


def mixed_histories(num_items: int, context: int, seed: int = 0) -> list[list[int]]:
    """Empty, short, and longer than the context (their old items must be excluded too)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [0, 1, 2, context - 1, context, context + 4, *torch.randint(1, context + 8, (10,), generator=generator)]
    return [torch.randint(0, num_items, (int(n),), generator=generator).tolist() for n in lengths]


def assert_same_rankings(fast, eager):
    assert len(fast) == len(eager)
    for got, expected in zip(fast, eager):
        assert [item for item, _ in got] == [item for item, _ in expected]
        assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-5)


@pytest.fixture(scope="module")
def compiled_model(sr_model, tmp_path_factory) -> Path:
    """A copy of the trained tiny SASRec with its top-5 compiled by `delrec sr compile`."""
    folder = tmp_path_factory.mktemp("compiled") / "sasrec"
    shutil.copytree(sr_model, folder)
    assert main(["sr", "compile", "--model", str(folder), "--topk", "5"]) == 0
    return folder


@pytest.mark.parametrize("config, num_items, exclude_history", [(GRU4RecConfig(hidden_size=16), 3000, True),
                                                                (CaserConfig(hidden_size=16, window=4), 97, True),
                                                                (SASRecConfig(hidden_size=16, max_length=12), 97, False)],
                         ids=["gru4rec-two-level-top-k", "caser", "sasrec-keep-history"])
def test_the_compiled_top_k_ranks_as_the_eager_model(config, num_items, exclude_history, tmp_path):
    torch.manual_seed(0)
    model = build_model(config, num_items=num_items)
    model.save_pretrained(tmp_path / "model")
    compile_top_k(tmp_path / "model", topk=7, exclude_history=exclude_history)
    fast = CompiledTopK.load(tmp_path / "model", topk=7, exclude_history=exclude_history)
    histories = mixed_histories(num_items, model.context_length)
    assert_same_rankings(fast.top_items(histories), top_items(model, histories, 7, exclude_history, len(histories)))
    for history in histories[:4]:  # one user per call, as served
        assert_same_rankings(fast.top_items([history]), top_items(model, [history], 7, exclude_history, 1))


def test_a_history_that_leaves_fewer_than_k_items_gets_the_rest_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(SASRecConfig(hidden_size=16, max_length=12), num_items=9)
    model.save_pretrained(tmp_path / "model")
    compile_top_k(tmp_path / "model", topk=5)
    history = [0, 1, 2, 3, 4, 5, 6]  # 2 of the 9 items left
    (answer,) = CompiledTopK.load(tmp_path / "model", topk=5).top_items([history])
    assert_same_rankings([answer], top_items(model, [history], 5, True, 1))
    assert sorted(item for item, _ in answer) == [7, 8]


def test_the_compiled_trained_model_ranks_as_it_and_excludes_the_whole_history(compiled_model, tiny_llm_data):
    model = load_model(compiled_model)
    fast = CompiledTopK.load(compiled_model, topk=5)
    histories = [inst.history for inst in PreparedDataset.load(tiny_llm_data).instances("test")]
    histories += mixed_histories(model.num_items, model.context_length, seed=1)
    ranked = fast.top_items(histories)
    assert_same_rankings(ranked, top_items(model, histories, 5, True, len(histories)))
    for history, answer in zip(histories, ranked):
        assert not {item for item, _ in answer} & set(history)
    description = json.loads(package_path(compiled_model, 5).with_suffix(".json").read_text())
    assert description["kind"] == "delrec-compiled-top-k" and description["topk"] == 5


def test_a_missing_stale_or_foreign_package_is_refused_with_the_command_that_remakes_it(compiled_model, tmp_path):
    with pytest.raises(DelrecError, match=r"no compiled top-20 graph .*`delrec sr compile --model .* --topk 20`"):
        CompiledTopK.load(compiled_model, topk=20)
    with pytest.raises(DelrecError, match=r"history item ids must be in 0\.\.\d+, found 0\.\.100000"):
        CompiledTopK.load(compiled_model, topk=5).top_items([[0, 100000]])

    foreign = tmp_path / "foreign"
    shutil.copytree(compiled_model, foreign)
    description_path = package_path(foreign, 5).with_suffix(".json")
    description = json.loads(description_path.read_text())
    description_path.write_text(json.dumps({**description, "torch_version": "1.0.0"}))
    with pytest.raises(DelrecError, match=r"compiled with torch 1\.0\.0, this is torch .*delrec sr compile"):
        CompiledTopK.load(foreign, topk=5)
    description_path.write_text(json.dumps({**description, "kind": "something-else"}))
    with pytest.raises(DelrecError, match="not a delrec compiled top-K description"):
        CompiledTopK.load(foreign, topk=5)

    description_path.write_text(json.dumps(description))
    model = load_model(foreign)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    model.save_pretrained(foreign)  # retrained after compiling
    with pytest.raises(DelrecError, match=r"compiled from other weights .*the model changed since.*delrec sr compile"):
        CompiledTopK.load(foreign, topk=5)


def test_a_package_swapped_after_compiling_is_not_loaded(compiled_model, tmp_path, monkeypatch):
    """A package is native code: bytes other than those recorded at compile time never reach the loader."""
    loaded = []
    monkeypatch.setattr(compiled_module, "_inductor", lambda: loaded.append(1))
    swapped = shutil.copytree(compiled_model, tmp_path / "swapped")
    package = package_path(swapped, 5)
    package.write_bytes(package.read_bytes() + b"\0")
    with pytest.raises(DelrecError, match=r"top5\.pt2: not the package top5\.json records \(its SHA-256 differs\); "
                                          r"a package is native code, so it was not loaded; run `delrec sr compile"):
        CompiledTopK.load(swapped, topk=5)
    unrecorded = shutil.copytree(compiled_model, tmp_path / "unrecorded")
    description_path = package_path(unrecorded, 5).with_suffix(".json")
    description = json.loads(description_path.read_text())
    del description["package_sha256"]
    description_path.write_text(json.dumps(description))
    with pytest.raises(DelrecError, match="field 'package_sha256' must be a hex digest, got None"):
        CompiledTopK.load(unrecorded, topk=5)
    assert loaded == []


def test_the_server_answers_with_the_compiled_graph_where_it_can(compiled_model, tiny_llm_data):
    from delrec.serving import Query, Recommender

    dataset = PreparedDataset.load(tiny_llm_data)
    model = load_model(compiled_model)
    eager = Recommender(model, dataset, default_k=5)
    fast = Recommender(model, dataset, default_k=5, compiled=CompiledTopK.load(compiled_model, topk=5))
    queries = [Query(tuple(inst.history), k, keep) for inst in dataset.instances("test")[:6]
               for k, keep in ((5, False), (3, False), (8, False), (5, True))]
    for got, expected in zip(fast.answer(queries), eager.answer(queries)):
        assert [item["id"] for item in got["items"]] == [item["id"] for item in expected["items"]]
        assert [item["score"] for item in got["items"]] == pytest.approx([item["score"] for item in expected["items"]],
                                                                        abs=1e-5)
    calls = []
    fast.compiled.top_items = lambda histories: calls.append(len(histories)) or eager_top(model, histories)
    fast.answer(queries)
    assert calls == [6 * 2]  # k 5 and k 3 without history; k 8 and keep_history go to the eager model


def eager_top(model, histories):
    return top_items(model, histories, 5, True, len(histories))


def test_compile_rejects_a_topk_beyond_the_catalogue_before_compiling(compiled_model, capsys):
    assert main(["sr", "compile", "--model", str(compiled_model), "--topk", "0"]) == 2
    assert "--topk 0 must be between 1 and the catalogue size" in capsys.readouterr().err
