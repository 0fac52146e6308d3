"""Trust boundaries (docs/security.md): code shipped in a model folder runs only when the user asks.

A booby-trapped stage-2 folder: its delrec.json says `trust_remote_code: true` and its tokenizer
files name a module of its own (`auto_map`), whose import writes a marker file. Every command that
loads LLM folders (rank, export, teacher export) must refuse it in one line naming delrec.json and
the flag, without importing the module; a folder whose auto_map is there but whose delrec.json
says nothing loads with transformers' own classes, code untouched; and the user's own
`--trust_remote_code true` is what lets the code run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from delrec.cli import main

REFUSAL = "delrec.json: this model was trained with trust_remote_code"


def plant_code(folder: Path, marker: Path, claims_trust: bool) -> Path:
    """Make `folder` (a copy) name a module of its own in its tokenizer files; importing it writes `marker`."""
    (folder / "planted_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        # a class of its own: transformers marks a remote class for auto-saving, which must not touch the real one
        "class PlantedTokenizer(PreTrainedTokenizerFast):\n    pass\n", encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "planted_tokenizer.PlantedTokenizer"]}
    config_path.write_text(json.dumps(config))
    if claims_trust:
        info = json.loads((folder / "delrec.json").read_text())
        info["base_model"]["trust_remote_code"] = True
        (folder / "delrec.json").write_text(json.dumps(info))
    return folder


@pytest.fixture()
def trapped(stage2_llama, tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    return plant_code(shutil.copytree(stage2_llama, tmp_path / "trapped"), marker, claims_trust=True), marker


@pytest.mark.parametrize("command", [
    ["rank", "--model", "{model}", "--data", "{data}", "--out", "{tmp}/ranks", "--device", "cpu", "--max_instances",
     "2"],
    ["export", "--model", "{model}", "--out", "{tmp}/merged"],
    ["teacher", "export", "--model", "{model}", "--data", "{data}", "--out", "{tmp}/teacher", "--device", "cpu",
     "--max_instances", "2"],
], ids=["rank", "export", "teacher-export"])
def test_a_folder_that_asks_for_remote_code_is_refused_and_its_code_never_runs(command, trapped, tiny_llm_data,
                                                                               tmp_path, capsys):
    folder, marker = trapped
    argv = [a.format(model=folder, data=tiny_llm_data, tmp=tmp_path) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and REFUSAL in err and "pass --trust_remote_code true only if you trust" in err, err
    assert not marker.exists()
    assert not any((tmp_path / name).exists() for name in ("ranks", "merged", "teacher"))


def test_planted_code_stays_unrun_when_the_folder_does_not_ask(stage2_llama, tiny_llm_data, tmp_path):
    """transformers resolves the tokenizer to its own class; the planted module is never imported."""
    marker = tmp_path / "code-ran"
    folder = plant_code(shutil.copytree(stage2_llama, tmp_path / "quiet"), marker, claims_trust=False)
    assert main(["rank", "--model", str(folder), "--data", str(tiny_llm_data), "--out", str(tmp_path / "ranks"),
                 "--device", "cpu", "--max_instances", "2", "--no_progress"]) == 0
    assert (tmp_path / "ranks" / "metrics.json").is_file()
    assert not marker.exists()


def test_the_users_own_flag_is_what_lets_shipped_code_run(trapped, tiny_llm_data, tmp_path):
    folder, marker = trapped
    main(["rank", "--model", str(folder), "--data", str(tiny_llm_data), "--out", str(tmp_path / "ranks"),
          "--device", "cpu", "--max_instances", "2", "--no_progress", "--trust_remote_code", "true"])
    assert marker.read_text() == "ran"
