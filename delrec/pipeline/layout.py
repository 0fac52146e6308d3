"""The run folder: the stage order, the names of the files a run writes, and where each stage writes.

It imports nothing else of the pipeline, so every module that reads run folders (the report,
`pipeline/report/`; the plan; the stages) can use these names.
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("data", "sr", "predictions", "llm", "stage1", "stage2", "rank", "teacher", "students", "latency", "report")
STAGE_FILE = "stage.json"
STAGE_LOG = "stage.log"
RUN_FILE = "run.json"
DIGESTS_FILE = "digests.json"  # the stat cache of file digests (`delrec.pipeline.digests`)
CONFIG_COPY = "config.yaml"
REPORT_FILE = "report.md"
TRAINER_LOG = "trainer_log.jsonl"
SPLITS = ("train", "valid", "test")
VARIANT_FOLDERS = {"stage1": "soft-prompt", "none": "no-soft-prompt", "random": "random-soft-prompt"}
VARIANTS = tuple(VARIANT_FOLDERS)  # stage 2's runs: the distilled soft prompt, none (the ablation), random


class Layout:
    """Where each stage writes inside the run folder (paths relative to it are recorded in stage.json)."""

    def __init__(self, run: Path):
        self.run = run

    def stage(self, name: str) -> Path:
        return self.run / name

    @property
    def dataset(self) -> Path:
        return self.run / "data" / "dataset"

    def sr_model(self, name: str) -> Path:
        return self.run / "sr" / name

    def predictions(self, split: str) -> Path:
        return self.run / "predictions" / f"{split}.jsonl"

    @property
    def llm_model(self) -> Path:
        """The llm stage's model folder: the tiny LLM it built, or the packaged model it imported."""
        return self.run / "llm" / "model"

    @property
    def stage1(self) -> Path:
        return self.run / "stage1" / "soft-prompt"

    def stage2(self, variant: str) -> Path:
        return self.run / "stage2" / VARIANT_FOLDERS[variant]

    def rank(self, variant: str, backend: str) -> Path:
        return self.run / "rank" / f"{VARIANT_FOLDERS[variant]}-{backend}"

    def export(self, variant: str) -> Path:
        return self.run / "rank" / f"{VARIANT_FOLDERS[variant]}-export"

    def teacher(self, name: str) -> Path:
        return self.run / "teacher" / name

    def student(self, name: str) -> Path:
        return self.run / "students" / name

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run))

    def outputs(self, name: str) -> list[Path]:
        """The files stage `name` wrote: its folder but for its own record and log (and RUN/report.md for the
        report stage), sorted."""
        folder = self.stage(name)
        own = (folder / STAGE_FILE, folder / STAGE_LOG)
        files = [p for p in folder.rglob("*") if p.is_file() and p not in own]
        if name == "report" and (self.run / REPORT_FILE).is_file():
            files.append(self.run / REPORT_FILE)
        return sorted(files)
