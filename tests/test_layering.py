"""The package's layering (docs/architecture.md): each layer imports only the layers below it (the top
ones too: serving reaches no LLM, library code never imports the CLI), the import graph has no cycle,
and the data, SR and student commands and the student server never load the LLM stack."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.distill.teacher_export import TeacherExportConfig, export_teacher
from delrec.sr import SASRecConfig, TrainConfig, train_sr

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
    "serving": {"base", "data", "sr"},  # a student server: torch alone
    "pipeline": {"base", "data", "sr", "prompts", "llm", "ranking", "distill"},  # with its report
    "cli": {"base", "data", "sr", "prompts", "llm", "ranking", "distill", "serving", "pipeline"},
}
BASE = {"delrec", "delrec.errors", "delrec.io", "delrec.config", "delrec.device", "delrec.metrics", "delrec.headers",
        "delrec.tensors"}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "delrec.predictions":
        return "data"  # the predictions file format is read against a prepared dataset
    if module == "delrec.__main__":
        return "cli"  # `python -m delrec` is the command line
    return module.split(".")[1]


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
    assert {"delrec.sr.evaluate", "delrec.llm.loading", "delrec.ranking.teacher_signals", "delrec.predictions",
            "delrec.serving", "delrec.pipeline.report.markdown", "delrec.__main__"} <= GRAPH.keys()
    assert "delrec.sr.evaluate" in GRAPH["delrec.cli.sr"] or "delrec.sr" in GRAPH["delrec.cli.sr"]
    unplaced = sorted(module for module in GRAPH if layer(module) not in BELOW)
    assert not unplaced, f"modules in no layer (add them to BELOW and docs/architecture.md): {unplaced}"


def test_each_layer_imports_only_the_layers_below_it():
    """Every layer, the top ones included: no layer lists `cli`, so library code never imports it."""
    wrong = sorted(
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) != layer(module) and layer(target) not in BELOW[layer(module)]
    )
    assert not wrong, "\n".join(wrong)


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


def _loaded_modules(cwd: Path, argv: list[str], setup: str = "") -> list[str]:
    """The LLM-stack packages a fresh interpreter holds after `delrec ARGV` (run after `setup`) succeeds."""
    script = (
        f"import json, sys\n{setup}from delrec.cli import main\n"
        f"code = main({argv!r})\n"
        f"print(json.dumps({{'code': code, 'loaded': [m for m in {LLM_STACK!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    return result["loaded"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """What the commands read, built here: a prepared dataset, a tiny SASRec and its teacher folder."""
    root = tmp_path_factory.mktemp("torch-alone")
    dataset = prepare_dataset(make_synthetic(num_users=60, num_items=80), PreprocessConfig(), root / "data")
    model = SASRecConfig(hidden_size=8, num_layers=1, num_heads=1, inner_size=8)
    train_sr(dataset, model, TrainConfig(epochs=1, progress=False, device="cpu"), root / "model")
    export_teacher(TeacherExportConfig(model=str(root / "model"), data=str(dataset.path), out=str(root / "teacher"),
                                       topk=10, progress=False))
    return {"data": str(dataset.path), "model": str(root / "model"), "teacher": str(root / "teacher")}


TINY = ["--model", "sasrec", "--epochs", "1", "--hidden_size", "8", "--num_layers", "1", "--num_heads", "1",
        "--inner_size", "8", "--no_progress"]


def test_data_prepare_never_imports_the_llm_stack(tmp_path):
    prepare = ["data", "prepare", "--format", "synthetic", "--out", str(tmp_path / "data"), "--synthetic-users", "60",
               "--synthetic-items", "80"]
    assert _loaded_modules(tmp_path, prepare) == []
    assert (tmp_path / "data" / "meta.json").is_file()


def test_sr_train_and_predict_never_import_the_llm_stack(tmp_path, folders):
    train = ["sr", "train", "--data", folders["data"], *TINY, "--out", str(tmp_path / "model")]
    assert _loaded_modules(tmp_path, train) == []
    predict = ["sr", "predict", "--data", folders["data"], "--model", folders["model"], "--split", "valid", "--topk",
               "5", "--out", str(tmp_path / "valid.jsonl")]
    assert _loaded_modules(tmp_path, predict) == []
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "valid.jsonl").is_file()


def test_a_student_trains_from_a_teacher_folder_without_the_llm_stack(tmp_path, folders):
    train = ["student", "train", "--data", folders["data"], "--teacher", folders["teacher"], "--method", "dllm2rec",
             *TINY, "--weight_search", "1", "--out", str(tmp_path / "student")]
    assert _loaded_modules(tmp_path, train) == []
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_serve_starts_a_student_server_without_the_llm_stack(tmp_path, folders):
    """Everything `delrec serve` does up to uvicorn's serving loop, which is replaced by one that returns."""
    pytest.importorskip("fastapi", reason="delrec serve needs the [serve] extra (FastAPI + uvicorn)")
    pytest.importorskip("uvicorn", reason="delrec serve needs the [serve] extra (FastAPI + uvicorn)")
    with socket.socket() as probe:  # a free port: serve binds it once to check it before uvicorn starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    setup = ("import pathlib, uvicorn\n"
             "uvicorn.Server.run = lambda server, sockets=None: "
             "pathlib.Path('served').write_text(str(server.config.port))\n")
    serve = ["serve", "--model", folders["model"], "--data", folders["data"], "--port", str(port)]
    assert _loaded_modules(tmp_path, serve, setup) == []
    assert (tmp_path / "served").read_text() == str(port)
