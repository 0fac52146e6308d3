"""RUN/report.md: what a pipeline run did and what came of it, read back from the files its stages wrote.

Written by the pipeline's last stage (`stages.stage_report`); it reads only the run folder: each
RUN/<stage>/stage.json (status, seconds, outputs) and the files the outputs point at (metrics.json,
log.jsonl, trainer_log.jsonl, rankings.jsonl, teacher.json, latency.json) plus RUN/config.yaml.
It writes RUN/report.md, RUN/report/table.md (the final table alone, which `delrec demo` prints)
and PNG plots under RUN/report/ (matplotlib, Agg backend: no display needed):

- training curves per stage: SR models and students (loss, valid NDCG@10 per epoch), stage 1
  (task losses, RPS agreement and TA accuracy per step), stage 2 (loss, valid NDCG@5 per step);
- metric bars per model: the candidate protocol, and full ranking;
- latency bars: top-K over the whole catalogue per user, student vs LLM (log scale).

Honesty rules: every metric is shown next to its chance level, and the verdicts (LLM above chance,
soft prompt helped, distillation helped) are decided against the noise of the number of test
instances, so a tiny model at chance level is reported as such.

collect.py reads the run folder into rows, verdicts.py judges them, plots.py draws them and markdown.py writes
the files.
"""

from delrec.pipeline.report.collect import Results, Row, collect
from delrec.pipeline.report.markdown import TABLE_FILE, write_report
from delrec.pipeline.report.plots import PLOTS_DIR
from delrec.pipeline.report.verdicts import arrow_lines, verdict_lines

__all__ = ["PLOTS_DIR", "TABLE_FILE", "Results", "Row", "arrow_lines", "collect", "verdict_lines", "write_report"]
