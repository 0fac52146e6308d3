"""A plain `pip install` works: the built wheel, installed without -e into a fresh virtualenv and run from outside
the checkout, carries the prompt templates and runs stage 1, stage 2 and ranking on the synthetic data.

The virtualenv borrows the checkout environment's dependencies (a .pth file: torch and the rest are not downloaded
again), never its delrec: the wheel's copy is the one imported, which the test checks."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("delrec-*.whl")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = subprocess.check_output([str(env / "bin" / "python"), "-c",
                                       "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    Path(purelib, "_checkout_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True)
    return env


def run(env: Path, *args: str, cwd: Path) -> str:
    """Run the venv's `delrec` from `cwd` (outside the checkout); its output, or the failure with its stderr."""
    clean = {k: v for k, v in os.environ.items() if k not in ("DELREC_PROMPTS_DIR", "PYTHONPATH")}
    done = subprocess.run([str(env / "bin" / "delrec"), *args], cwd=cwd, env=clean, capture_output=True, text=True)
    assert done.returncode == 0, f"delrec {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_installed_wheel_carries_the_templates(venv, tiny_llm_data, tmp_path):
    where = subprocess.check_output([str(venv / "bin" / "python"), "-c", "import delrec; print(delrec.__file__)"],
                                    cwd=tmp_path, text=True).strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(REPO)
    listed = run(venv, "prompts", "list", cwd=tmp_path)
    assert f"templates in {Path(where).parent / 'prompts' / 'templates'}" in listed and "lsr.jinja" in listed
    rendered = run(venv, "prompts", "render", "plain", "--data", str(tiny_llm_data), cwd=tmp_path)
    assert "tokens" in rendered
    run(venv, "prompts", "copy", str(tmp_path / "mine"), cwd=tmp_path)
    assert (tmp_path / "mine" / "lsr.jinja").is_file()


def test_stage1_stage2_and_rank_run_from_the_installed_wheel(venv, tiny_llm_data, tiny_llama, tmp_path):
    pop = tmp_path / "pop"
    run(venv, "sr", "train", "--model", "pop", "--data", str(tiny_llm_data), "--out", str(pop), "--no_progress",
        cwd=tmp_path)
    for split in ("train", "valid"):
        run(venv, "sr", "predict", "--model", str(pop), "--data", str(tiny_llm_data), "--split", split,
            "--prefix_predictions", "--out", str(pop / f"{split}.jsonl"), cwd=tmp_path)
    fast = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_steps", "2", "--max_length", "512",
            "--eval_max_instances", "4", "--max_train_instances", "8", "--progress", "false", "--dtype", "float32",
            "--device", "cpu"]
    run(venv, "llm", "distill-pattern", "--data", str(tiny_llm_data), "--model_name_or_path", str(tiny_llama),
        "--train_predictions", str(pop / "train.jsonl"), "--valid_predictions", str(pop / "valid.jsonl"),
        "--soft_prompt_tokens", "4", "--out", str(tmp_path / "stage1"), *fast, cwd=tmp_path)
    run(venv, "llm", "finetune", "--data", str(tiny_llm_data), "--model_name_or_path", str(tiny_llama),
        "--stage1", str(tmp_path / "stage1"), "--test_max_instances", "4", "--out", str(tmp_path / "stage2"), *fast,
        cwd=tmp_path)
    run(venv, "rank", "--model", str(tmp_path / "stage2"), "--data", str(tiny_llm_data), "--max_instances", "4",
        "--device", "cpu", "--out", str(tmp_path / "ranked"), cwd=tmp_path)
    metrics = json.loads((tmp_path / "ranked" / "metrics.json").read_text())
    assert metrics["model"]["template"] == "lsr" and 0 <= metrics["test"]["hr@1"] <= 1
