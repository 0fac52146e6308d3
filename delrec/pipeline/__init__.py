"""One YAML config -> the whole loop, each stage in a folder of one run folder, unchanged stages skipped.

    from delrec.pipeline import load_config, run_pipeline
    config = load_config("configs/pipeline/lastfm.yaml")
    run_pipeline(config, "runs/lastfm")                # or: delrec run configs/pipeline/lastfm.yaml

`options` and `schema`: the config; `layout`: the run folder; `stages` (and `latency`): what each stage
runs; `plan`: run, resume or skip each stage, by content hash and by the digests of the files each stage wrote
(`digests`: file digests read again only when a file's stat moved); `execute`: running the plan; `report/`:
RUN/report.md, its table and plots, read back from the run folder.
"""

from delrec.pipeline.execute import run_pipeline
from delrec.pipeline.layout import REPORT_FILE, STAGE_FILE, STAGES
from delrec.pipeline.options import help_text
from delrec.pipeline.plan import format_plan, plan
from delrec.pipeline.schema import PipelineConfig, builtin_demo_config, load_config

__all__ = ["REPORT_FILE", "STAGE_FILE", "STAGES", "PipelineConfig", "builtin_demo_config", "format_plan", "help_text",
           "load_config", "plan", "run_pipeline"]
