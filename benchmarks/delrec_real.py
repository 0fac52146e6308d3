"""DELRec with the real LLM on Last.fm (issue #13) and games (issue #31): does stage 2 learn, and does the distilled
soft prompt help?

    .venv/bin/python benchmarks/delrec_real.py                  # every variant, ~2 hours on 2 cores
    .venv/bin/python benchmarks/delrec_real.py --variants popularity,sasrec,zero_shot
    .venv/bin/python benchmarks/delrec_real.py --rows 480       # a bigger stage-2 budget (those variants re-run)
    .venv/bin/python benchmarks/delrec_real.py --dataset games --rows 3840 --variants lora_plain   # one variant

Every step runs the shipped `delrec` commands and configs in a subprocess (log in the work folder),
on LLaRA's Last.fm (../shared/data/lastfm: 122 test users, each with 20 fixed candidates) or, with
`--dataset games`, LLMRank's Amazon Video Games (../shared/data/games: 50,546 users, 20 fixed candidates;
`--test-users` of them, a seeded sample: `delrec rank --max_instances N --sample_seed S`, the same
users for every variant), and the imported Gemma 3 270M (`--llm`; imported once into the work folder
when absent). Variants, all ranked on the same test candidate sets, nothing chosen on test:

- `popularity`, `sasrec`: the SR baselines (configs/sr/sasrec.yaml), scored on the candidates;
- `zero_shot`: the pretrained LLM with the plain template, no training;
- `lora_plain`: stage 2 (configs/delrec/gemma-lastfm-finetune.yaml), no soft prompt, plain template;
- `lora_random`: stage 2 with an untrained random soft prompt of the stage-1 length (lsr template);
- `delrec`: stage 1 (configs/delrec/gemma-lastfm-distill.yaml, `--stage1-rows` per task) then stage 2
  with its soft prompt (lsr template);
- `lora_hybrid`: stage 2 with LLaRA's hybrid prompt, no soft prompt: each history item and candidate
  shown as its title + one token, SASRec's item embedding through a trained projector (`--item_tokens`);
- `sr_hint`: stage 2 with the `sr_hint` template, no soft prompt: the prompt names SASRec's top-3 among the
  instance's candidates as text (`delrec sr predict --user_states`), the hard-prompt baseline of issue #31;
- `user`, `user_trained`: stage 1 with a per-user soft prompt (`--soft_prompt user`: P vectors projected from
  SASRec's state of each history, the same stage-1 budget as `delrec`), then stage 2 with its projector frozen
  (`user`) or co-trained with LoRA (`user_trained`, `--train_soft_prompt true`); ranked with the test states.

The LoRA variants share the data subsample (`--rows`, seeded), steps, seed, learning rate
and objective (`--objective`; listwise by default: benchmarks/RESULTS.md, "Stage-2 objectives");
each keeps the checkpoint with the best valid NDCG@5 (`--valid-users` valid users). Test is
ranked once per variant by `delrec rank` with the score read-out (title log-likelihood, summed),
and for the LLM variants also with the generate read-out (free generation matched to a
candidate: HR@1, ValidRatio and LLaRA's conditional HR@1).

Each variant writes benchmarks/results/delrec_real/<variant>/rankings.jsonl and metrics.json (the
`delrec rank` formats; the SR baselines' rows carry their scores), plus generate/ for the LLM
variants, and the summary benchmarks/results/delrec_real.json with two-standard-error verdicts
(against chance, binomial; between variants, paired over the same users), a learning-curve
plot (delrec_real/curves.png) and the `<!-- delrec_real -->` block of RESULTS.md. A variant whose
finished folder has the same settings is reused, so an interrupted run resumes where it stopped.

A LoRA variant on games outlasts a session whose disk is not kept (~4.5 hours on 2 cores). `--save-resume`
(run while the benchmark is stopped) copies the unfinished work of `--variants` - the folders they build on
(SASRec, stage 1, stage 2, the test ranking's shards), each training stage with only its last and best
checkpoints - into benchmarks/resume/<results name>/<variant>/, to be committed; the next run copies it back
into a work folder that lacks it and goes on from there. A variant deletes its store when its results are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from common import log, machine, rel  # benchmarks/ is on sys.path when a benchmark runs as a script
from results_section import write_section
from delrec.metrics import instance_metrics, metrics_from_ranked_lists
from delrec.metrics import above_chance, paired_difference

ROOT = Path(__file__).resolve().parents[1]
LASTFM = ROOT.parent / "shared" / "data" / "lastfm"
# per dataset: raw data and its format, the domain wording, the stage configs, the default test sample
DATASETS = {
    "lastfm": {"label": "Last.fm", "issue": "#13", "input": LASTFM, "format": "rows", "domain": "artist",
               "distill": "gemma-lastfm-distill.yaml", "finetune": "gemma-lastfm-finetune.yaml", "test_users": None,
               "valid_users": "all", "rows": 240, "stage1_rows": 128, "eval_steps": 15,
               "micro_batch": 8, "listwise_negatives": None},
    "games": {"label": "games", "issue": "#31", "input": ROOT.parent / "shared" / "data" / "games",
              "format": "recbole", "domain": "game", "distill": "gemma-games-distill.yaml",
              "finetune": "gemma-games-finetune.yaml", "test_users": 1000, "valid_users": 400,
              "rows": 3840, "stage1_rows": 1024, "eval_steps": 96, "micro_batch": 2, "listwise_negatives": 7},
}
CONFIGS = ROOT / "configs"
WORK = ROOT / "benchmarks" / "out" / "delrec_real"
RESULTS = ROOT / "benchmarks" / "results" / "delrec_real"
RESUME = ROOT / "benchmarks" / "resume"
SR_VARIANTS = ("popularity", "sasrec")
LORA_VARIANTS = ("lora_plain", "delrec", "lora_random", "lora_hybrid", "sr_hint", "user", "user_trained")
PER_USER = ("user", "user_trained")
VARIANTS = (*SR_VARIANTS, "zero_shot", *LORA_VARIANTS)
LABELS = {"popularity": "Popularity", "sasrec": "SASRec", "zero_shot": "Gemma 3 270M zero-shot",
          "lora_plain": "LoRA, no soft prompt", "lora_random": "LoRA + random soft prompt",
          "delrec": "DELRec (stage-1 soft prompt + LoRA)", "lora_hybrid": "LoRA + hybrid item tokens (LLaRA)",
          "sr_hint": "LoRA + SASRec's top-3 named in the prompt (sr_hint)",
          "user": "per-user soft prompt (frozen) + LoRA", "user_trained": "per-user soft prompt co-trained with LoRA"}
# (variant, reference): the paired comparisons the issue asks about
COMPARISONS = (("lora_plain", "zero_shot"), ("lora_plain", "popularity"), ("lora_plain", "sasrec"),
               ("delrec", "lora_plain"), ("delrec", "lora_random"), ("lora_random", "lora_plain"),
               ("lora_hybrid", "lora_plain"), ("delrec", "sasrec"), ("lora_hybrid", "sasrec"),
               ("sr_hint", "lora_plain"), ("delrec", "sr_hint"), ("sr_hint", "sasrec"), ("user", "delrec"),
               ("user", "sr_hint"), ("user", "lora_plain"), ("user_trained", "user"), ("user_trained", "delrec"),
               ("user_trained", "sr_hint"), ("user", "sasrec"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", choices=sorted(DATASETS), default="lastfm",
                   help="lastfm (122 test users) or games (a seeded sample of --test-users users)")
    p.add_argument("--test-users", dest="test_users", type=int, default=None,
                   help="test users ranked, a seeded sample (default: every one for lastfm, 1000 for games)")
    p.add_argument("--sample-seed", dest="sample_seed", type=int, default=0, help="seed of the test-user sample")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, run in this order: {', '.join(VARIANTS)}")
    p.add_argument("--llm", type=Path, default=None,
                   help="the imported model folder (default: WORK/gemma, imported with `delrec llm import gemma-3-270m`)")
    p.add_argument("--work", type=Path, default=None,
                   help="work folder (kept: finished variants are reused; default benchmarks/out/delrec_real, "
                        "delrec_games for games)")
    p.add_argument("--rows", type=int, default=None,
                   help="stage-2 training instances (seeded subsample), every LoRA variant (default: 240 for lastfm, "
                        "3840 for games)")
    p.add_argument("--stage1-rows", dest="stage1_rows", type=int, default=None,
                   help="stage-1 training instances per task (default: 128 for lastfm, 1024 for games)")
    p.add_argument("--objective", choices=("answer", "listwise"), default="listwise", help="stage-2 loss")
    p.add_argument("--stage1-objective", dest="stage1_objective", choices=("answer", "listwise"), default="listwise",
                   help="stage-1 loss (delrec only; the answer LM loss left RPS and TA at chance: RESULTS.md)")
    p.add_argument("--learning-rate", dest="learning_rate", type=float, default=None,
                   help="stage-2 learning rate (default: the config's)")
    p.add_argument("--batch", type=int, default=8, help="stage-2 training batch (rows per optimizer step)")
    p.add_argument("--micro-batch", dest="micro_batch", type=int, default=None,
                   help="rows per forward pass, the rest by gradient accumulation (default: 8 for lastfm, 2 for games: "
                        "eager attention keeps B x heads x T^2 probabilities per layer for backward, and 8 games "
                        "prompts of ~470 tokens took 21 GB and 9 s per row, 2 of them 4.6 GB and 2.7 s per row)")
    p.add_argument("--listwise-negatives", dest="listwise_negatives", type=int, default=None,
                   help="stage-2 listwise loss over the target and this many of the other candidates, drawn per row "
                        "(default: all for lastfm, 7 of 19 for games: 1.85 s a row against 2.68, chosen on valid: "
                        "RESULTS.md, 'Sampled negatives on games'); 0: all")
    p.add_argument("--eval-steps", dest="eval_steps", type=int, default=None,
                   help="steps between valid evaluations (default: 15 for lastfm, 60 for games)")
    p.add_argument("--valid-users", dest="valid_users", type=user_count, default=None,
                   help="valid users scored per evaluation, a seeded sample (default: all for lastfm, 400 for games; "
                        "60 of Last.fm's 122 picked checkpoints by noise: RESULTS.md, 'Checkpoints chosen on every "
                        "valid user')")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="skip the generate read-out of the LLM variants")
    p.add_argument("--results", type=Path, default=None,
                   help="results folder (one subfolder per variant); its name also names the JSON summary and the "
                        "RESULTS.md block, so a run at another budget keeps the default run's results (default "
                        "benchmarks/results/delrec_real, delrec_games for games)")
    p.add_argument("--json", type=Path, default=None, help="summary (default: RESULTS_FOLDER.json beside it)")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--save-resume", dest="save_resume", action="store_true",
                   help="copy the unfinished work of --variants into the resume store (benchmarks/resume/<results "
                        "name>/) and exit; run it while the benchmark is stopped, then commit the store")
    args = p.parse_args(argv)
    args.spec = DATASETS[args.dataset]
    suffix = "" if args.dataset == "lastfm" else "_games"
    args.work = args.work or WORK.with_name(f"delrec{suffix or '_real'}")
    args.results = args.results or RESULTS.with_name(f"delrec{suffix or '_real'}")
    args.test_users = args.test_users or args.spec["test_users"]
    for key in ("valid_users", "rows", "stage1_rows", "eval_steps", "micro_batch"):  # the dataset's defaults
        setattr(args, key, getattr(args, key) or args.spec[key])
    if args.listwise_negatives is None:
        args.listwise_negatives = args.spec["listwise_negatives"]
    args.listwise_negatives = args.listwise_negatives or None  # 0: every candidate
    if args.batch % args.micro_batch:
        p.error(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    args.json = args.json or args.results.parent / f"{args.results.name}.json"
    args.resume_store = RESUME / args.results.name
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


# ----------------------------------------------------------------------------- running commands


def delrec(argv: list[str], logfile: Path, threads: int) -> float:
    """Run `python -m delrec ARGV` in a subprocess (output appended to `logfile`); its wall time."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log("$ delrec " + " ".join(argv))
    started = time.perf_counter()
    with logfile.open("a", encoding="utf-8") as out:
        out.write("$ delrec " + " ".join(argv) + "\n")
        out.flush()
        code = subprocess.run([sys.executable, "-m", "delrec", *argv], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, env=env).returncode
    if code:
        raise SystemExit(f"delrec {' '.join(argv[:2])} failed with exit code {code}; see {rel(logfile)}")
    return time.perf_counter() - started


class Step:
    """A work folder reused when its settings.json equals this run's settings and `done_file` exists."""

    def __init__(self, folder: Path, settings: dict, done_file: str = "metrics.json"):
        self.folder, self.settings, self.done_file = folder, settings, done_file

    def done(self) -> bool:
        saved = self.folder / "settings.json"
        return ((self.folder / self.done_file).is_file() and saved.is_file()
                and json.loads(saved.read_text()) == self.settings)

    def start(self, resumable: bool = False) -> None:
        """Start afresh; a `resumable` step (a training stage, which resumes from its last checkpoint) keeps the
        folder a run with the same settings started (`FOLDER.started.json` beside it), so an interrupted run goes on
        where it stopped."""
        started = self.folder.with_name(f"{self.folder.name}.started.json")
        if not (resumable and started.is_file() and json.loads(started.read_text()) == self.settings):
            shutil.rmtree(self.folder, ignore_errors=True)
        if resumable:
            started.parent.mkdir(parents=True, exist_ok=True)
            started.write_text(json.dumps(self.settings, indent=2) + "\n")

    def finish(self) -> None:
        (self.folder / "settings.json").write_text(json.dumps(self.settings, indent=2) + "\n")


# ----------------------------------------------------------------------------- work carried between sessions


def built_on(args, name: str) -> list[Path]:
    """The work folders a LoRA variant builds on, in the order it builds them."""
    folders = [args.work / "sasrec-model"] if name in ("delrec", "lora_hybrid", "sr_hint", *PER_USER) else []
    if name == "delrec" or name in PER_USER:
        folders.append(args.work / ("stage1-user" if name in PER_USER else "stage1"))
    return [*folders, args.work / name / "stage2", args.work / name / "rank-score"]


def carried(folder: Path):
    """`shutil.copytree`'s `ignore` for a work folder: of a training stage's checkpoints only the last complete one
    and the best one it names, each with only what a resumed Trainer reads (not the 33 MB tokenizer); no lock, no
    tokenized-data cache, no SR predictions (all rebuilt in seconds)."""
    from fnmatch import fnmatch

    from delrec.llm.run_folder import (CACHE_DIR, CHECKPOINTS_DIR, RESUME_STATES, RESUME_WEIGHTS, RUN_IDENTITY_FILE,
                                       last_complete_checkpoint)

    read_to_resume = (*RESUME_WEIGHTS, *RESUME_STATES, RUN_IDENTITY_FILE, "trainer_state.json")

    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n.endswith(".lock")}
        if Path(directory) == folder:
            skipped |= {n for n in names if n == CACHE_DIR or (folder.name == "sasrec-model" and n.endswith(".jsonl"))}
        if Path(directory).parent.name == CHECKPOINTS_DIR:
            skipped |= {n for n in names if not any(fnmatch(n, pattern) for pattern in read_to_resume)}
        if Path(directory).name == CHECKPOINTS_DIR:
            last = last_complete_checkpoint(Path(directory))
            kept = set()
            if last is not None:
                best = json.loads((Path(last) / "trainer_state.json").read_text()).get("best_model_checkpoint")
                kept = {Path(last).name, *([Path(best).name] if best else [])}
            skipped |= set(names) - kept
        return skipped
    return ignore


def copy_step(source: Path, target: Path, ignore=None) -> None:
    """Copy a step's folder and the `FOLDER.started.json` beside it (what lets the step resume, `Step.start`)."""
    shutil.copytree(source, target, ignore=ignore)
    started = source.with_name(f"{source.name}.started.json")
    if started.is_file():
        shutil.copyfile(started, target.with_name(started.name))


def save_resume(args) -> None:
    """Copy each chosen LoRA variant's unfinished work into its resume store (replaced whole, never half-written)."""
    for name in args.variants:
        done = (args.results / name / "metrics.json").is_file() and (args.results / name / "settings.json").is_file()
        if name not in LORA_VARIANTS or done:
            continue
        store = args.resume_store / name
        partial = store.with_name(f"{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        for folder in (f for f in built_on(args, name) if f.is_dir()):
            copy_step(folder, partial / folder.relative_to(args.work), ignore=carried(folder))
        if partial.is_dir():
            shutil.rmtree(store, ignore_errors=True)
            partial.rename(store)
            size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
            log(f"{name}: saved {size / 1e6:.1f} MB of unfinished work in {rel(store)}")


def restore(args, name: str) -> None:
    """Copy a variant's saved work back into a work folder that lacks it (a new session's)."""
    store = args.resume_store / name
    for folder in built_on(args, name):
        saved = store / folder.relative_to(args.work)
        if saved.is_dir() and not folder.exists():
            copy_step(saved, folder)
            log(f"{name}: resumed {rel(folder)} from {rel(saved)}")


# ----------------------------------------------------------------------------- the steps


def ensure_llm(args) -> Path:
    folder = args.llm or args.work / "gemma"
    if not (folder / "config.json").is_file():
        delrec(["llm", "import", "gemma-3-270m", "--out", str(folder)], args.work / "log.txt", args.threads)
    return folder


def ensure_data(args) -> Path:
    folder, source = args.work / "data", args.spec["input"]
    if not (folder / "meta.json").is_file():
        if not source.is_dir():
            raise SystemExit(f"{args.spec['label']} data not found at {source}")
        delrec(["data", "prepare", "--format", args.spec["format"], "--input", str(source), "--out", str(folder)],
               args.work / "log.txt", args.threads)
    return folder


def sr_model(args, data: Path, name: str) -> Path:
    step = Step(args.work / f"{name}-model", {"seed": args.seed})
    if not step.done():
        step.start(resumable=True)  # `delrec sr train` resumes from its last epoch
        extra = (["--config", str(CONFIGS / "sr" / "sasrec.yaml"), "--num_threads", str(args.threads)]
                 if name == "sasrec" else ["--model", "pop"])
        delrec(["sr", "train", *extra, "--data", str(data), "--out", str(step.folder), "--seed", str(args.seed),
                "--no_progress"], args.work / "log.txt", args.threads)
        step.finish()
    return step.folder


def marks(results: Path) -> tuple[str, str]:
    """The RESULTS.md block a results folder owns: `<!-- delrec_real -->` for the default one."""
    return f"<!-- {results.name} -->", f"<!-- /{results.name} -->"


def sr_variant(args, data: Path, name: str) -> dict:
    """Rank each test candidate set by the SR model's scores (ties: lower candidate index first, as `delrec rank`)."""
    import torch

    from delrec.data.dataset import PreparedDataset, sampled_indices
    from delrec.io import atomic_write, write_json
    from delrec.sr import load_model

    folder = sr_model(args, data, name)
    dataset = PreparedDataset.load(data)
    model = load_model(folder)
    model.eval()
    instances, candidates = dataset.instances("test"), dataset.candidates("test")
    chosen = sampled_indices(len(instances), args.test_users, args.sample_seed)
    instances, candidates = [instances[i] for i in chosen], [candidates[i] for i in chosen]
    rows = []
    with torch.inference_mode():
        for inst, cands in zip(instances, candidates):
            history = torch.tensor([list(inst.history)[-model.context_length:]], dtype=torch.long)
            scores = model.score_items(history, torch.tensor([cands], dtype=torch.long))[0].tolist()
            order = sorted(range(len(cands)), key=lambda j: (-scores[j], j))
            rows.append({"id": inst.id, "target": inst.target, "items": [cands[j] for j in order],
                         "scores": [scores[j] for j in order]})
    out = args.results / name
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "rankings.jsonl") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    metrics = {"protocol": "candidates", "test": candidate_metrics(rows), "instances": len(rows),
               "tied_first_place": sum(len(r["scores"]) > 1 and r["scores"][0] == r["scores"][1] for r in rows),
               "model": rel(folder), "sr_train_metrics": json.loads((folder / "metrics.json").read_text())
               .get("candidates", {}).get("test")}
    write_json(out / "metrics.json", metrics)
    return metrics


def user_count(text: str) -> str | int:
    """`--valid-users`: a positive count, or "all"."""
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of users or 'all', got {text!r}")
    return int(text)


def eval_limit(args) -> str:
    """`--eval_max_instances` for the delrec stages: "none" scores every valid user."""
    return "none" if args.valid_users == "all" else str(args.valid_users)


def rank_variant(args, model: Path, data: Path, name: str, extra: list[str]) -> dict:
    """`delrec rank` on test (score, and generate unless --no-generate) into RESULTS/<name>."""
    out = args.results / name
    readouts = ["score", "generate"] if args.generate else ["score"]
    for readout in readouts:
        target = out if readout == "score" else out / "generate"
        work = args.work / name / f"rank-{readout}"
        argv = ["rank", "--model", str(model), "--data", str(data), "--split", "test", "--readout", readout,
                "--dtype", "float32", "--device", "cpu", "--out", str(work), "--no_progress", *sample(args), *extra]
        Step(work, {"argv": argv}).start(resumable=True)  # the same command resumes from its shards
        delrec(argv, args.work / name / "log.txt", args.threads)
        target.mkdir(parents=True, exist_ok=True)
        for file in ("rankings.jsonl", "metrics.json"):
            shutil.copyfile(work / file, target / file)
    if not args.generate:
        shutil.rmtree(out / "generate", ignore_errors=True)
    return json.loads((out / "metrics.json").read_text())


def test_sample(args) -> dict:
    """The test users' sample in a step's settings (none for every user: the settings of earlier runs)."""
    return {} if args.test_users is None else {"test_users": args.test_users, "sample_seed": args.sample_seed}


def user_states(args, data: Path, sasrec: Path) -> dict[str, Path]:
    """SASRec's predictions with user states (and prefix predictions, which stage 1's TA reads) for each split
    (`delrec sr predict --user_states --prefix_predictions`), written once."""
    files = {}
    for split in ("train", "valid", "test"):
        files[split] = sasrec / f"{split}-states.jsonl"
        if not files[split].is_file():
            delrec(["sr", "predict", "--model", str(sasrec), "--data", str(data), "--split", split, "--user_states",
                    "--prefix_predictions", "--device", "cpu", "--out", str(files[split])], args.work / "log.txt",
                   args.threads)
    return files


def sample(args) -> list[str]:
    """`delrec rank` options that rank the benchmark's test users (all of them without --test-users)."""
    if args.test_users is None:
        return []
    return ["--max_instances", str(args.test_users), "--sample_seed", str(args.sample_seed)]


def stage1(args, data: Path, llm: Path, sasrec: Path, per_user: bool = False) -> Path:
    """The stage-1 soft prompt: DELRec's global one, or a per-user one (`per_user`, from SASRec's user states)."""
    if per_user:
        predictions = user_states(args, data, sasrec)
    else:
        predictions = {split: sasrec / f"{split}.jsonl" for split in ("train", "valid")}
        for split, path in predictions.items():
            if not path.is_file():
                delrec(["sr", "predict", "--model", str(sasrec), "--data", str(data), "--split", split,
                        "--prefix_predictions", "--out", str(path)], args.work / "log.txt", args.threads)
    step = Step(args.work / ("stage1-user" if per_user else "stage1"),
                {"rows": args.stage1_rows, "objective": args.stage1_objective, "seed": args.seed,
                 "valid_users": args.valid_users})
    if not step.done():
        step.start(resumable=True)
        delrec(["llm", "distill-pattern", "--config", str(CONFIGS / "delrec" / args.spec["distill"]),
                "--data", str(data), "--train_predictions", str(predictions["train"]),
                "--valid_predictions", str(predictions["valid"]), "--out", str(step.folder),
                "--model_name_or_path", str(llm), "--max_train_instances", str(args.stage1_rows),
                "--objective", args.stage1_objective, "--soft_prompt", "user" if per_user else "global",
                "--eval_max_instances", eval_limit(args), "--seed", str(args.seed),
                "--num_threads", str(args.threads), "--progress", "false"],
               step.folder.parent / f"{step.folder.name}.log", args.threads)
        step.finish()
    return step.folder


def stage2(args, data: Path, llm: Path, name: str, soft: list[str]) -> Path:
    settings = {"rows": args.rows, "objective": args.objective, "learning_rate": args.learning_rate,
                "batch": args.batch, "micro_batch": args.micro_batch, "eval_steps": args.eval_steps,
                "valid_users": args.valid_users,
                "seed": args.seed, "soft": soft,
                **({"listwise_negatives": args.listwise_negatives} if args.listwise_negatives else {}),
                **({"stage1_rows": args.stage1_rows, "stage1_objective": args.stage1_objective}
                   if name in ("delrec", *PER_USER) else {})}
    step = Step(args.work / name / "stage2", settings)
    if not step.done():
        step.start(resumable=True)
        lr = ["--learning_rate", str(args.learning_rate)] if args.learning_rate else []
        negatives = ["--listwise_negatives", str(args.listwise_negatives)] if args.listwise_negatives else []
        # test is ranked afterwards by `delrec rank` (it writes the rankings), so the stage scores one test user
        delrec(["llm", "finetune", "--config", str(CONFIGS / "delrec" / args.spec["finetune"]),
                "--data", str(data), "--model_name_or_path", str(llm), "--out", str(step.folder), *soft,
                "--objective", args.objective, "--max_train_instances", str(args.rows),
                "--per_device_train_batch_size", str(args.micro_batch),
                "--gradient_accumulation_steps", str(args.batch // args.micro_batch), "--eval_steps", str(args.eval_steps),
                "--eval_max_instances", eval_limit(args), "--test_max_instances", "1",
                "--logging_steps", "5", "--seed", str(args.seed), "--num_threads", str(args.threads),
                "--progress", "false", *lr, *negatives], args.work / name / "log.txt", args.threads)
        step.finish()
    return step.folder


def run_variant(args, name: str, data: Path) -> dict:
    """Run (or reuse) one variant; its summary: test metrics, and what training logged."""
    if name in SR_VARIANTS:
        return {"metrics": sr_variant(args, data, name)}
    llm = ensure_llm(args)
    if name in LORA_VARIANTS:
        restore(args, name)
    result_settings = {"rows": args.rows, "objective": args.objective, "learning_rate": args.learning_rate,
                       "stage1_rows": args.stage1_rows, "stage1_objective": args.stage1_objective, "seed": args.seed,
                       "generate": args.generate,
                       "valid_users": args.valid_users, "batch": args.batch, "eval_steps": args.eval_steps,
                       **({"listwise_negatives": args.listwise_negatives} if args.listwise_negatives else {}),
                       **test_sample(args)}
    ranked = Step(args.results / name, result_settings if name != "zero_shot"
                  else {"generate": args.generate, **test_sample(args)})
    summary: dict = {}
    if name == "zero_shot":
        model = llm
        extra = ["--template", "plain", "--domain", args.spec["domain"]]
    else:
        soft = {"lora_plain": ["--soft_prompt", "none", "--template", "plain"],
                "lora_random": ["--soft_prompt", "random", "--soft_prompt_tokens", "20", "--template", "lsr"],
                "delrec": ["--soft_prompt", "stage1", "--template", "lsr"],
                "lora_hybrid": ["--soft_prompt", "none", "--template", "plain"],
                "sr_hint": ["--soft_prompt", "none", "--template", "sr_hint"],
                "user": ["--soft_prompt", "stage1", "--template", "lsr"],
                "user_trained": ["--soft_prompt", "stage1", "--template", "lsr", "--train_soft_prompt", "true"]}[name]
        if name == "lora_hybrid":
            soft = [*soft, "--item_tokens", str(sr_model(args, data, "sasrec"))]
        if name in ("sr_hint", *PER_USER):
            states = user_states(args, data, sr_model(args, data, "sasrec"))
            soft = [*soft, *(f for split in ("train", "valid", "test")
                             for f in (f"--{split}_predictions", str(states[split])))]
        if name in ("delrec", *PER_USER):
            first = stage1(args, data, llm, sr_model(args, data, "sasrec"), per_user=name in PER_USER)
            soft = [*soft, "--stage1", str(first)]
            summary["stage1"] = stage1_summary(first)
        model = stage2(args, data, llm, name, soft)
        summary["stage2"] = stage2_summary(model)
        extra = ["--predictions", soft[soft.index("--test_predictions") + 1]] if name in ("sr_hint", *PER_USER) else []
    if not ranked.done():
        rank_variant(args, model, data, name, extra)
        ranked.finish()
        shutil.rmtree(args.resume_store / name, ignore_errors=True)
    summary["metrics"] = json.loads((args.results / name / "metrics.json").read_text())
    generated = args.results / name / "generate" / "metrics.json"
    if generated.is_file():
        summary["generate"] = json.loads(generated.read_text())
    return summary


def contains_metrics(rankings: Path, data: Path) -> dict:
    """The generate read-out's saved texts matched by LLaRA's rule (`delrec rank --match contains`): a candidate
    counts when its title appears anywhere in the text, so a numbered list item "1. X" names X."""
    from delrec.data.dataset import PreparedDataset
    from delrec.metrics import generation_metrics
    from delrec.ranking import match_title

    dataset = PreparedDataset.load(data)
    candidates = {inst.id: cands for inst, cands in zip(dataset.instances("test"), dataset.candidates("test"))}
    matched, targets = [], []
    for line in rankings.read_text().splitlines():
        row = json.loads(line)
        hits = match_title(row["text"], [dataset.titles[i] for i in candidates[row["id"]]], "contains")
        matched.append(candidates[row["id"]][hits[0]] if len(hits) == 1 else None)
        targets.append(row["target"])
    return generation_metrics(matched, targets)


def stage1_summary(folder: Path) -> dict:
    """What stage 1 logged, with issue #31's goal (a): valid RPS agreement above chance by two standard errors."""
    m = json.loads((folder / "metrics.json").read_text())
    summary = {key: m.get(key) for key in ("valid", "valid_before_training", "global_step", "train_seconds")}
    summary["curve"] = {"valid_rps_agreement": [[h["step"], h["eval_rps_agreement"]] for h in history(folder)
                                                if "eval_rps_agreement" in h]}
    valid = m.get("valid") or {}
    rps = [stats["instances"] for stats in (m.get("instances") or {}).get("valid", []) if stats.get("task") == "rps"]
    if rps and "rps_agreement" in valid:
        above, margin = above_chance(valid["rps_agreement"], valid["rps_chance"], rps[0])
        summary["rps_verdict"] = {"n": rps[0], "margin": margin, "above": above}
    return summary


def stage2_summary(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    return {"valid": m["valid"], "valid_before_training": m["valid_before_training"],
            "global_step": m["global_step"], "train_seconds": m["train_seconds"], "curve": learning_curve(folder)}


def history(folder: Path) -> list[dict]:
    """The log history of a stage's last checkpoint (trainer_state.json); empty without one."""
    states = sorted((folder / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    return json.loads(states[-1].read_text())["log_history"] if states else []


def learning_curve(folder: Path) -> dict:
    """Training loss and valid NDCG@5 by step."""
    logged = history(folder)
    if not logged:
        return {}
    return {"loss": [[h["step"], h["loss"]] for h in logged if "loss" in h],
            "valid_ndcg@5": [[h["step"], h["eval_ndcg@5"]] for h in logged if "eval_ndcg@5" in h]}


# ----------------------------------------------------------------------------- statistics


def positions(path: Path) -> dict[int, int]:
    """Per instance id: the target's 0-based position in the ranked list (a miss = the list's length)."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        items = row.get("items") or []
        out[row["id"]] = items.index(row["target"]) if row["target"] in items else max(len(items), 20)
    return out


def per_instance(position: int) -> dict[str, float]:
    """HR@1, HR@5 and NDCG@5 of one instance whose target sits at 0-based `position` (delrec.metrics, no ties)."""
    values = instance_metrics([position], [0], ks=(1, 5), metrics=("hr", "ndcg"))
    return {key: float(values[key][0]) for key in ("hr@1", "hr@5", "ndcg@5")}


def candidate_metrics(rows: list[dict]) -> dict[str, float]:
    values = metrics_from_ranked_lists([r["items"] for r in rows], [r["target"] for r in rows], ks=(1, 5))
    return {key: values[key] for key in ("hr@1", "hr@5", "ndcg@5")}


def chance(num_candidates: int) -> dict[str, float]:
    return {"hr@1": 1 / num_candidates, "hr@5": min(5, num_candidates) / num_candidates,
            "ndcg@5": sum(1 / math.log2(r + 2) for r in range(min(5, num_candidates))) / num_candidates}


def against_chance(metrics: dict, base: dict, n: int) -> dict:
    """HR@1 against chance: the binomial margin of NOISE_SE standard errors at the chance rate (delrec.metrics)."""
    above, margin = above_chance(metrics["hr@1"], base["hr@1"], n)
    return {"hr@1": metrics["hr@1"], "chance": base["hr@1"], "margin": margin, "above": above}


def paired(a: dict[int, int], b: dict[int, int], key: str) -> dict:
    """Mean per-instance difference a - b over the shared instances, and NOISE_SE standard errors of it."""
    ids = sorted(set(a) & set(b))
    result = paired_difference([per_instance(a[i])[key] for i in ids], [per_instance(b[i])[key] for i in ids])
    return {"difference": result.difference, "margin": result.margin, "n": result.n, "verdict": result.verdict}


def verdicts(report: dict, num_candidates: int, results: Path) -> dict:
    base = chance(num_candidates)
    done = report["variants"]
    pos = {name: positions(results / name / "rankings.jsonl") for name in done}
    return {
        "chance": base,
        "against_chance": {name: against_chance(v["metrics"]["test"], base, v["metrics"]["instances"])
                           for name, v in done.items()},
        "paired": {f"{a} vs {b}": {key: paired(pos[a], pos[b], key) for key in ("hr@1", "ndcg@5")}
                   for a, b in COMPARISONS if a in pos and b in pos},
    }


# ----------------------------------------------------------------------------- report


def plot_curves(report: dict, path: Path) -> Path | None:
    curves = {name: v["stage2"]["curve"] for name, v in report["variants"].items() if v.get("stage2", {}).get("curve")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, valid_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        if curve["loss"]:
            loss_ax.plot(*zip(*curve["loss"]), label=LABELS[name])
        if curve["valid_ndcg@5"]:
            valid_ax.plot(*zip(*curve["valid_ndcg@5"]), marker="o", label=LABELS[name])
    if report["objective"] == "listwise":
        loss_ax.axhline(math.log(report["num_candidates"]), color="grey", ls="--", label="ln C (uniform)")
    valid_ax.axhline(report["verdicts"]["chance"]["ndcg@5"], color="grey", ls="--", label="chance")
    loss_ax.set(title=f"stage-2 training loss ({report['objective']})", xlabel="step", ylabel="loss")
    valid_ax.set(title=f"valid NDCG@5 ({report['settings']['valid_users']} users)", xlabel="step", ylabel="NDCG@5")
    for ax in (loss_ax, valid_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def rps_verdict(verdict: dict | None) -> str:
    if not verdict:
        return ""
    return (f" RPS agreement {'above' if verdict['above'] else 'NOT above'} chance by two standard errors "
            f"(margin {verdict['margin']:.3f}, {verdict['n']} valid users).")


def section(report: dict, results: Path) -> str:
    v, s = report["verdicts"], report["settings"]
    spec = DATASETS[s.get("dataset", "lastfm")]
    tested = next(iter(report["variants"].values()))["metrics"]["instances"] if report["variants"] else 0
    sampled = f" (a seeded sample, seed {s['sample_seed']})" if s.get("test_users") else ""
    begin, end = marks(results)
    lines = [
        begin,
        f"## DELRec with the real LLM on {spec['label']} (issue {spec['issue']})"
        + ("" if results.name in ("delrec_real", "delrec_games") else f": {s['rows']} stage-2 rows"),
        "",
        "Command: " + "; then ".join(f"`{c}`" for c in report.get("commands", [report["command"]])) + "  ",
        f"Date: {report['finished']} (UTC). Machine: {report['machine']['nproc']} CPUs ({report['machine']['cpu_model']}), "
        f"{s['threads']} torch threads, torch {report['machine']['torch']}.  ",
        "LLM: Gemma 3 270M (imported GGUF, float32). " + (
            f"Stage 2: LoRA r 8 all-linear (configs/delrec/{spec['finetune']}), {s['rows']} training rows (seeded), "
            f"batch {s['batch']}, {s['objective']} objective"
            + (f" (the target and {s['listwise_negatives']} sampled other candidates a row)"
               if s.get("listwise_negatives") else "") + f", checkpoint chosen on valid NDCG@5 ({s['valid_users']} "
            f"valid users, every {s['eval_steps']} steps); stage 1 (delrec only): {s['stage1_rows']} TA + "
            f"{s['stage1_rows']} RPS rows, {s.get('stage1_objective', 'answer')} objective "
            f"(configs/delrec/{spec['distill']}). " if set(LORA_VARIANTS) & set(report["variants"]) else "")
        + f"Test: {tested} users{sampled}, {report['num_candidates']} fixed candidates, score read-out.",
        "",
        "| variant | HR@1 | HR@5 | NDCG@5 | HR@1 vs chance (2 SE) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, result in report["variants"].items():
        t, c = result["metrics"]["test"], v["against_chance"][name]
        lines.append(f"| {LABELS[name]} | {t['hr@1']:.3f} | {t['hr@5']:.3f} | {t['ndcg@5']:.3f} | "
                     f"{'above' if c['above'] else 'not above'} (margin {c['margin']:.3f}) |")
    base = v["chance"]
    lines += ["", f"Chance: HR@1 {base['hr@1']:.3f}, HR@5 {base['hr@5']:.3f}, NDCG@5 {base['ndcg@5']:.3f}.", ""]
    generated = {name: r for name, r in report["variants"].items() if (r.get("generate") or {}).get("test")}
    if generated:
        lines += ["Generate read-out (greedy), the same test users: HR@1 (correct / all), ValidRatio (exactly one "
                  "candidate named) and LLaRA's conditional HR@1 (correct / valid), with the first line matched to a "
                  "title (`delrec rank --readout generate`) and with LLaRA's rule, a title anywhere in the text "
                  "(`--match contains`, re-matched from the saved texts).", "",
                  "| variant | HR@1, line | ValidRatio, line | HR@1 given valid, line | HR@1, contains | "
                  "ValidRatio, contains | HR@1 given valid, contains |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, result in generated.items():
            cells = []
            for g in (result["generate"]["test"], result.get("generate_contains")):
                cells += ["–"] * 3 if g is None else [f"{g['hr@1']:.3f}", f"{g['valid_ratio']:.3f}",
                                                     "–" if g["hr@1_given_valid"] is None else f"{g['hr@1_given_valid']:.3f}"]
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
        lines.append("")
    if v["paired"]:
        lines += ["Paired differences over the same test users (difference ± two standard errors):", "",
                  "| comparison | HR@1 | NDCG@5 |", "|---|---|---|"]
        for pair, d in v["paired"].items():
            a, b = pair.split(" vs ")
            lines.append(f"| {LABELS[a]} vs {LABELS[b]} | " + " | ".join(
                f"{d[k]['difference']:+.3f} ± {d[k]['margin']:.3f} ({d[k]['verdict']})" for k in ("hr@1", "ndcg@5"))
                + " |")
        lines.append("")
    for name, result in report["variants"].items():
        if "stage1" in result:
            s1 = result["stage1"]
            after, before = s1["valid"] or {}, s1["valid_before_training"] or {}
            lines.append(f"Stage 1 ({LABELS[name]}), valid: RPS agreement {after.get('rps_agreement', float('nan')):.3f} "
                         f"(before {before.get('rps_agreement', float('nan')):.3f}, chance "
                         f"{after.get('rps_chance', float('nan')):.3f}), TA accuracy {after.get('ta_accuracy', float('nan')):.3f} "
                         f"(before {before.get('ta_accuracy', float('nan')):.3f}, chance {after.get('ta_chance', float('nan')):.3f}); "
                         f"{s1['global_step']} steps, {s1['train_seconds']:.0f} s." + rps_verdict(s1.get("rps_verdict"))
                         + " Valid RPS agreement by step: " + ", ".join(
                             f"{step}: {value:.3f}" for step, value in s1.get("curve", {}).get("valid_rps_agreement", []))
                         + ".")
        if "stage2" in result:
            s2 = result["stage2"]
            lines.append(f"Stage 2 ({LABELS[name]}), valid NDCG@5 {s2['valid_before_training']['ndcg@5']:.3f} before -> "
                         f"{s2['valid']['ndcg@5']:.3f} at the chosen checkpoint; {s2['global_step']} steps, "
                         f"{s2['train_seconds']:.0f} s.")
    lines += ["", f"Learning curves: `{rel(results / 'curves.png')}`. Wall time (s): "
              + ", ".join(f"{k} {t:.0f}" for k, t in report["seconds"].items()) + ".", end]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.save_resume:
        return save_resume(args)
    args.work.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args)
    from delrec.data.dataset import PreparedDataset

    num_candidates = PreparedDataset.load(data).num_candidates
    report = {"benchmark": "delrec_real", "command": "python benchmarks/delrec_real.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine(), "objective": args.objective, "num_candidates": num_candidates,
              "settings": {k: getattr(args, k) for k in ("dataset", "test_users", "sample_seed", "rows", "stage1_rows",
                                                          "stage1_objective", "objective", "listwise_negatives",
                                                          "learning_rate", "batch", "eval_steps", "valid_users",
                                                          "threads", "seed", "generate")},
              "variants": {}, "seconds": {}}
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name in VARIANTS:  # variants not run now keep their earlier summary, if their results are still there
        if name not in args.variants and name in previous.get("variants", {}) and (args.results / name / "metrics.json").is_file():
            report["variants"][name] = previous["variants"][name]
            report["seconds"][name] = previous.get("seconds", {}).get(name, 0.0)
    if report["variants"]:  # the commands that made the table, oldest first
        report["commands"] = [*previous.get("commands", [previous.get("command")]), report["command"]]
    for name in args.variants:
        started = time.perf_counter()
        log(f"variant {name}")
        report["variants"][name] = run_variant(args, name, data)
        for result_name, result in report["variants"].items():  # earlier runs' variants too, once each
            generated = args.results / result_name / "generate" / "rankings.jsonl"
            if generated.is_file() and (result_name == name or "generate_contains" not in result):
                result["generate_contains"] = contains_metrics(generated, data)
        report["seconds"][name] = round(time.perf_counter() - started, 1)
        report["variants"] = {k: report["variants"][k] for k in VARIANTS if k in report["variants"]}
        report["verdicts"] = verdicts(report, num_candidates, args.results)
        report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
        from delrec.io import write_json

        write_json(args.json, report)
        plot_curves(report, args.results / "curves.png")
        write_section(args.markdown, section(report, args.results), *marks(args.results))
        log(f"{name}: test {json.dumps(report['variants'][name]['metrics']['test'])}")
    print(section(report, args.results))


if __name__ == "__main__":
    main()
