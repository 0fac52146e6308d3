"""`delrec run CONFIG.yaml` (the whole loop from one config) and `delrec demo` (the same on the built-in config).

The config is a YAML file of sections, one per stage (see `delrec.pipeline` and `delrec run --help`),
so the command line only says where to run and which stages: `--out`, `--only`, `--from`, `--dry-run`.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from delrec.config import CommandParser

DEMO_OUT = "runs/demo"


def _parser(prog: str, description: str, config: bool) -> argparse.ArgumentParser:
    from delrec.pipeline import STAGES, help_text
    from delrec.pipeline.schema import DEMO_CONFIGS

    parser = CommandParser(prog=prog, description=description, epilog=help_text() if config else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    if config:
        parser.add_argument("config", metavar="CONFIG.yaml",
                            help="The pipeline config (e.g. configs/pipeline/lastfm.yaml).")
    parser.add_argument("--out", metavar="RUN", default=None,
                        help="Run folder (default: the config's `out`, else runs/<config name>)." if config
                        else f"Run folder (default: {DEMO_OUT}).")
    if not config:
        parser.add_argument("--llm", default="tiny", choices=tuple(DEMO_CONFIGS),
                            help="tiny: build a tiny LLM on the data (a few minutes); gemma-3-270m: the real pretrained "
                            "Gemma 3 270M from the [gemma] extra (sized for about 30 minutes on 2 CPU cores).")
    parser.add_argument("--only", metavar="STAGE", default=None,
                        help=f"Run this stage alone, even if unchanged (one of: {', '.join(STAGES)}).")
    parser.add_argument("--from", dest="start", metavar="STAGE", default=None,
                        help="Run this stage, even if unchanged, and every stage after it.")
    parser.add_argument("--dry-run", action="store_true", help="Print the plan (each stage: run, resume or skip, and "
                        "why) and stop; it writes nothing but, in an existing run folder, the cache of file digests.")
    parser.add_argument("--verbose", action="store_true", help="Show each stage's own output here instead of writing "
                        "it to RUN/<stage>/stage.log.")
    return parser


def parse_run(argv, prog: str, description: str, config: bool):
    """`(args, pipeline config, run folder)` of `delrec run` (config=True) or `delrec demo`: the one place that
    chooses the run folder, which the dispatcher also locks."""
    from delrec.pipeline import builtin_demo_config, load_config

    args = _parser(prog, description, config=config).parse_args(list(argv))
    if config:
        pipeline = load_config(args.config)
        return args, pipeline, args.out or pipeline.run.out or str(Path("runs") / Path(args.config).stem)
    with resources.as_file(builtin_demo_config(args.llm)) as path:
        pipeline = load_config(path)
    return args, pipeline, args.out or pipeline.run.out or DEMO_OUT


def run(argv, prog: str, description: str) -> int:
    args, config, out = parse_run(argv, prog, description, config=True)
    return _run(config, out, args, print_table=False)


def demo(argv, prog: str, description: str) -> int:
    args, config, out = parse_run(argv, prog, description, config=False)
    return _run(config, out, args, print_table=True)


def _run(config, out: str, args, print_table: bool) -> int:
    from delrec.pipeline import REPORT_FILE, run_pipeline
    from delrec.pipeline.report import PLOTS_DIR, TABLE_FILE

    summary = run_pipeline(config, out, only=args.only, start=args.start, dry_run=args.dry_run, verbose=args.verbose)
    if args.dry_run:
        return 0
    print(f"finished in {summary['seconds']:.0f} s{_report_note(summary, Path(out) / REPORT_FILE)}")
    table = Path(out) / PLOTS_DIR / TABLE_FILE
    if print_table and table.is_file():
        print()
        print(table.read_text(encoding="utf-8"), end="")
    return 0


def _report_note(summary: dict, report: Path) -> str:
    """Where the report is, said only when there is one and saying whether it is this run's: `--only sr` writes
    none, and leaves one of an earlier run that does not show what the stages run now produced."""
    if not report.is_file():
        return ""
    ran = [stage for stage, entry in summary["stages"].items() if entry["action"] != "skip"]
    if "report" in ran or not ran:
        return f"; report: {report}"
    return (f"; {report} is an earlier run's report, without what {', '.join(ran)} produced now (a run without "
            "--only updates it)")
