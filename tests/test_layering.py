"""The package's layering (docs/architecture.md): each layer imports only the layers below it, the
import graph has no cycle, and the data/SR commands never load the LLM stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "delrec"
LLM_STACK = ("transformers", "peft", "trl", "vllm", "accelerate")

# Bottom to top; a module may import its own layer and the layers listed for it.
BELOW = {
    "base": set(),
    "data": {"base"},
    "sr": {"base", "data"},
    "prompts": {"base", "data"},
    "llm": {"base", "data", "prompts"},
    "ranking": {"base", "data", "prompts", "llm"},
    "distill": {"base", "data", "sr", "prompts", "ranking"},  # an LLM only through delrec.ranking
}
BASE = {"delrec", "delrec.errors", "delrec.io", "delrec.config", "delrec.device", "delrec.metrics", "delrec.headers",
        "delrec.tensors"}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "delrec.predictions":
        return "data"  # the predictions file format is read against a prepared dataset
    group = module.split(".")[1]
    return group if group in BELOW else "top"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every delrec module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "delrec"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "delrec":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if is_module(candidate) else node.module)
    return found


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_the_graph_covers_the_package():
    assert {"delrec.sr.evaluate", "delrec.llm.loading", "delrec.ranking.teacher_signals", "delrec.predictions"} <= GRAPH.keys()
    assert "delrec.sr.evaluate" in GRAPH["delrec.cli.sr"] or "delrec.sr" in GRAPH["delrec.cli.sr"]


def test_each_layer_imports_only_the_layers_below_it():
    wrong = sorted(
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(module) != "top" and layer(target) != layer(module) and layer(target) not in BELOW[layer(module)]
    )
    assert not wrong, "\n".join(wrong)


def test_the_report_reads_only_the_run_folder_names_of_the_pipeline():
    assert {t for t in GRAPH["delrec.report"] if t.startswith("delrec.pipeline")} <= {"delrec.pipeline.layout"}


def test_no_import_cycle():
    """A package importing its own submodules (`__init__` re-exports) is not a cycle; anything else is."""
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if module.startswith(target + "."):
                continue  # a submodule importing its package's __init__: Python initialises the package first
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def _loaded_modules(tmp_path: Path, argv: list[str]) -> list[str]:
    script = (
        "import json, sys\nfrom delrec.cli import main\n"
        f"code = main({argv!r})\n"
        f"print(json.dumps({{'code': code, 'loaded': [m for m in {LLM_STACK!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    return result["loaded"]


@pytest.mark.parametrize("command", ["data", "sr"])
def test_data_and_sr_commands_never_import_the_llm_stack(tmp_path, command):
    data, model = str(tmp_path / "data"), str(tmp_path / "model")
    prepare = ["data", "prepare", "--format", "synthetic", "--out", data, "--synthetic-users", "60",
               "--synthetic-items", "80"]
    assert _loaded_modules(tmp_path, prepare) == []
    if command == "sr":
        train = ["sr", "train", "--data", data, "--model", "sasrec", "--out", model, "--epochs", "1",
                 "--hidden_size", "8", "--num_layers", "1", "--num_heads", "1", "--inner_size", "8", "--no_progress"]
        assert _loaded_modules(tmp_path, train) == []
        predict = ["sr", "predict", "--data", data, "--model", model, "--split", "valid", "--topk", "5",
                   "--out", str(tmp_path / "valid.jsonl")]
        assert _loaded_modules(tmp_path, predict) == []
        assert (tmp_path / "valid.jsonl").is_file()
