"""DELRec stage 2: LoRA fine-tuning on LLM sequential recommendation (LSR) with the soft prompt frozen.

The base model gets the stage-1 soft prompt (its rows loaded and frozen), or for the ablations a
random soft prompt (`soft_prompt: random`) or none with the `plain` template (`soft_prompt: none`).
TRL's `SFTTrainer` puts a PEFT LoRA adapter on it (`LoraSettings`: PEFT's r, lora_alpha,
lora_dropout, target modules and any other LoraConfig field from the config; a 4-bit base gives
QLoRA) and trains on pre-tokenized LSR instances with the loss on
the answer only. Evaluation ranks the FIXED valid candidates by log-likelihood (HR@1, HR@5,
NDCG@5); the checkpoint with the best valid metric is loaded at the end and scored on test.

With `item_tokens` (LLaRA's hybrid prompt, `delrec.llm.hybrid`), each history and candidate title is
followed by an item token embedded by a projector of the SR model's item embeddings; the projector
trains with LoRA and is saved in the adapter (PEFT `modules_to_save`).

With a per-user soft prompt from stage 1 (`delrec.llm.user_prompt`), each instance carries the SR
model's state of its history (the three predictions files, written with `--user_states`); the
projector stays frozen, or co-trains with LoRA (`train_soft_prompt`, PEFT `modules_to_save`), and
`user_prompt.safetensors` takes the place of `soft_prompt.safetensors`.

Saving: PEFT would write the whole resized embedding matrix (and LM head) into the adapter
(`save_embedding_layers="auto"` sees the grown vocabulary); the adapter here holds the LoRA
matrices only and the soft rows are written once, in `soft_prompt.safetensors`, beside it.

Output folder (`delrec.llm.stage_folder`): adapter_config.json + adapter_model.safetensors,
soft_prompt.safetensors, tokenizer, delrec.json, metrics.json (valid and test candidate metrics),
checkpoints/ and cache/. `load_delrec_model(OUT)` rebuilds base + soft rows + adapter.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from delrec.config import SOFT_PROMPT_TOKENS, WIDTH, at_least
from delrec.device import launch_position
from delrec.errors import DelrecError
from delrec.llm.files import SOFT_PROMPT_FILE, USER_PROMPT_FILE
from delrec.llm.listwise import LISTWISE_COLUMNS, ListwiseCollator, listwise_loss
from delrec.llm.loading import LoraSettings
from delrec.llm.run_folder import StageResult
from delrec.llm.stage import TrainingStage
from delrec.llm.stage_folder import local_or_hub, same_base_model
from delrec.llm.trainer import (
    AnswerCollator,
    CandidateEvaluator,
    DelrecTrainer,
    RankCounts,
    TrainingSettings,
    compiles_layers,
)
from delrec.metrics import CANDIDATE_KEYS
from delrec.prompts import DEFAULT_SR_TOP
from delrec.prompts.options import PromptsFolder

STAGE = "finetune"
DEFAULT_LEARNING_RATE = 2e-4


@dataclass
class FinetuneArguments(PromptsFolder):
    """Stage-2 inputs and options (model: `ModelConfig`; adapter: `LoraSettings`; trainer: `TrainingSettings`)."""

    data: str = field(metadata={"help": "A prepared dataset folder with fixed valid/test candidate sets."})
    out: str = field(metadata={"help": "Output folder: adapter, soft prompt, tokenizer, delrec.json, metrics.json."})
    soft_prompt: Literal["stage1", "random", "none"] = field(
        default="stage1",
        metadata={"help": "stage1: the soft prompt of `stage1`; random: an untrained one (ablation); none: no soft "
                  "prompt, with the plain template (ablation)."},
    )
    stage1: str | None = field(
        default=None, metadata={"help": "The output folder of `delrec llm distill-pattern` (soft_prompt: stage1)."}
    )
    template: str | None = field(
        default=None, metadata={"help": "Prompt template (default: lsr with a soft prompt, plain without)."}
    )
    soft_prompt_tokens: int = field(
        default=100, metadata={"help": "soft_prompt: random: P, its number of vectors.", "range": SOFT_PROMPT_TOKENS}
    )
    soft_prompt_name: str = field(
        default="sasrec", metadata={"help": "soft_prompt: random: the SR model it stands for (token names, prompt)."}
    )
    sr_display_name: str | None = field(
        default=None, metadata={"help": "How the template names the SR model (default: from the stage-1 folder)."}
    )
    domain: str | None = field(
        default=None, metadata={"help": "Wording of domains.yaml in the template folder (default: the stage-1 run's, else item)."}
    )
    num_candidates: int | None = field(
        default=None, metadata={"help": "Candidates drawn per TRAINING instance (default: the dataset's C).",
                                "range": at_least(2)}
    )
    max_train_instances: int | None = field(
        default=None, metadata={"help": "A seeded subsample of this many training instances (default: all).",
                                "range": at_least(1)}
    )
    eval_max_instances: int | None = field(
        default=200, metadata={"help": "Valid instances scored at each evaluation (default 200; none: all).",
                               "range": at_least(1)}
    )
    test_max_instances: int | None = field(
        default=None, metadata={"help": "Test instances scored at the end (default: all).", "range": at_least(1)}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Longest instance in tokens (prompt + longest candidate).", "range": at_least(1)}
    )
    allow_truncation: bool = field(
        default=False, metadata={"help": "Drop the oldest history items of longer instances instead of refusing."}
    )
    optim: str = field(
        default="adamw_torch",
        metadata={"help": "Optimizer name of transformers' TrainingArguments (e.g. paged_adamw_8bit for QLoRA)."},
    )
    train_predictions: str | None = field(
        default=None,
        metadata={"help": "template sr_hint, or a per-user soft prompt: SR predictions of the train split written "
                  "with `delrec sr predict --user_states` (the SR model's order of each instance's candidates, or "
                  "the state its soft prompt is projected from)."},
    )
    valid_predictions: str | None = field(
        default=None, metadata={"help": "The same for the valid split (same SR model)."}
    )
    test_predictions: str | None = field(
        default=None, metadata={"help": "The same for the test split (same SR model)."}
    )
    train_soft_prompt: bool = field(
        default=False,
        metadata={"help": "A per-user soft prompt from stage 1: co-train its projector with LoRA (default: frozen, "
                  "as DELRec freezes its soft prompt). A global soft prompt always stays frozen."},
    )
    sr_top: int = field(
        default=DEFAULT_SR_TOP, metadata={"help": "template sr_hint: how many of the SR model's top candidates the "
                                          "prompt names, best first.", "range": at_least(1)}
    )
    item_tokens: str | None = field(
        default=None,
        metadata={"help": "An SR model folder whose item embeddings are projected into the LLM's input space as one "
                  "token after each history and candidate title (LLaRA's hybrid prompt); default: titles only."},
    )
    item_projector_hidden: int = field(
        default=256, metadata={"help": "item_tokens: hidden size of the projector MLP (SR dim -> this -> LLM dim).",
                               "range": WIDTH}
    )
    objective: Literal["answer", "listwise"] = field(
        default="answer",
        metadata={"help": "answer: LM loss on the answer title (DELRec/LLaRA); listwise: softmax cross-entropy over "
                  "the candidates' title log-likelihoods, the quantity the read-out ranks by (one prompt pass "
                  "per instance scores all candidates)."},
    )
    listwise_negatives: int | None = field(
        default=None,
        metadata={"help": "objective: listwise: score the target and this many other candidates per row, drawn anew "
                  "for each row (a sampled softmax; the prompt still shows them all): fewer title passes per step. "
                  "Default: every candidate.", "range": at_least(1)},
    )

    def __post_init__(self):
        if self.soft_prompt_tokens < 1:
            raise ValueError(f"soft_prompt_tokens must be at least 1, got {self.soft_prompt_tokens}")
        if self.item_projector_hidden < 1:
            raise ValueError(f"item_projector_hidden must be at least 1, got {self.item_projector_hidden}")


class LoraTrainer(DelrecTrainer):
    """Saves the LoRA matrices only (no embedding layers) and a copy of the frozen soft-prompt file; with the
    listwise objective, batches come from `ListwiseCollator` and the loss is `listwise_loss`."""

    def __init__(self, *args, soft_prompt_file: Path | None, trained_prompt=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft_prompt_file = soft_prompt_file
        self.trained_prompt = trained_prompt  # a per-user prompt whose projector co-trains with LoRA

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "candidates" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.reading_states(model, inputs):
            loss = listwise_loss(model, **inputs, batch_size=self.evaluator.batch_size,
                                 length_normalized=self.evaluator.length_normalized)
        return (loss, None) if return_outputs else loss

    def save_weights(self, output_dir: Path, state_dict) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(str(output_dir), state_dict=state_dict,
                                                                  save_embedding_layers=False)

    def save_soft_prompt(self, output_dir: Path) -> None:
        """The frozen soft prompt's file, copied; a co-trained per-user prompt as it is now (the adapter holds it too,
        which is what reloads it with the best checkpoint and on resume)."""
        if self.trained_prompt is not None:
            self.trained_prompt.save(output_dir, self.accelerator.unwrap_model(self.model))
        elif self.soft_prompt_file is not None:  # `output_dir` is a staging folder (`save_model`), not the source's
            shutil.copyfile(self.soft_prompt_file, output_dir / self.soft_prompt_file.name)


def stage2_metrics(counts: dict[str, RankCounts]) -> dict[str, float]:
    (entry,) = counts.values()
    values = entry.metrics()
    return {**{key: values[key] for key in CANDIDATE_KEYS}, "chance@1": values["chance@1"]}


class LoraFinetuning(TrainingStage):
    """Stage 2 for `TrainingStage.run`: LoRA on LSR, reading the frozen soft prompt (or an ablation of it)."""

    name = STAGE
    default_learning_rate = DEFAULT_LEARNING_RATE
    default_metric = "ndcg@5"

    def __init__(self, args: FinetuneArguments, model_config, lora: LoraSettings, settings: TrainingSettings):
        super().__init__(args, model_config, settings, lora)
        self.lora = lora

    def summarize(self, counts: dict[str, RankCounts]) -> dict[str, float]:
        return stage2_metrics(counts)

    def tasks(self) -> list[str]:
        return ["lsr"]

    def prepare(self, dataset) -> None:
        from delrec.llm import hybrid
        from delrec.predictions import display_name
        from delrec.prompts import get_template

        args = self.args
        self.stage1 = stage1 = _stage1_info(args, dataset, self.model_config)
        self.item_table = hybrid.read_item_table(args.item_tokens, dataset) if args.item_tokens else None
        self.template = get_template(args.template or ("plain" if args.soft_prompt == "none" else "lsr"),
                                     args.prompts_dir)
        _check_template(self.template, args.soft_prompt)
        self.domain = args.domain or (stage1 or {}).get("domain", "item")
        self.sr_name = stage1["soft_prompt"]["name"] if stage1 else args.soft_prompt_name
        self.sr_hint = _sr_hint(args, self.template, dataset)
        self.per_user = _per_user(args, stage1, dataset, self.item_table is not None)
        if self.sr_hint is not None and not stage1 and not args.sr_display_name:
            self.sr_name = self.sr_hint["model_type"]  # the hints name the SR model that made them
        self.sr_display = args.sr_display_name or ((stage1 or {}).get("sr_model") or {}).get("display_name") \
            or display_name(self.sr_name)

    def attach(self, model, tokenizer) -> None:
        from delrec.llm import hybrid
        from delrec.llm.loading import check_target_modules
        from delrec.llm.soft_prompt import SoftPrompt
        from delrec.llm.user_prompt import UserPrompt

        args = self.args
        check_target_modules(model, self.lora.target_modules)  # PEFT would fail deep in the Trainer's setup
        self.soft = None
        if self.per_user:
            self.soft = UserPrompt.load(args.stage1, model, tokenizer)
        elif args.soft_prompt == "stage1":
            self.soft = SoftPrompt.load(args.stage1, model, tokenizer,
                                        num_tokens=self.stage1["soft_prompt"]["num_tokens"])
        elif args.soft_prompt == "random":
            self.soft = SoftPrompt(self.sr_name, args.soft_prompt_tokens).add_to(model, tokenizer, init="random",
                                                                                 seed=self.settings.seed)
        self.soft_file = None
        if self.soft is not None:
            self.soft_file = self.out / (USER_PROMPT_FILE if self.per_user else SOFT_PROMPT_FILE)
            if launch_position().main:
                self.soft.save(self.out, model)  # the rows (projector) it starts from, written once (not in the adapter)
        self.item_tokens = None
        if self.item_table is not None:  # after the soft prompt: item tokens come after all of the tokenizer's tokens
            table = self.item_table
            first = hybrid.attach(model, tokenizer, table, args.item_projector_hidden, seed=self.settings.seed)
            self.item_tokens = {"sr_model": local_or_hub(args.item_tokens), "num_items": table.shape[0],
                                "sr_dim": table.shape[1], "hidden": args.item_projector_hidden, "first_token_id": first}

    def instances(self, dataset, tokenizer, model) -> dict:
        from delrec.llm.instances import InstanceOptions, build_instances
        from delrec.llm.loading import max_positions

        args, soft = self.args, self.soft

        def options(split: str, limit: int | None) -> InstanceOptions:
            return InstanceOptions(
                split=split, soft_prompt=soft.placeholder_text() if soft else None, sr_model=self.sr_display,
                domain=self.domain, num_candidates=args.num_candidates, max_instances=limit, seed=self.settings.seed,
                max_length=args.max_length, allow_truncation=args.allow_truncation,
                item_tokens=self.item_tokens is not None, model_positions=max_positions(model), sr_top=args.sr_top,
                user_states=self.per_user,
            )

        predictions = {"train": args.train_predictions, "valid": args.valid_predictions, "test": args.test_predictions}
        return {split: build_instances(dataset, self.template, options(split, limit), tokenizer, predictions[split],
                                       cache_dir=self.cache_dir)
                for split, limit in (("train", args.max_train_instances), ("valid", args.eval_max_instances),
                                     ("test", args.test_max_instances))}

    def evaluator(self, rows, tokenizer) -> CandidateEvaluator:
        return CandidateEvaluator(rows, tokenizer, stage2_metrics, self.settings.eval_batch_size,
                                  self.settings.length_normalized)

    def sft_overrides(self) -> dict:
        return {"optim": self.args.optim}

    def trainer(self, model, tokenizer, sets, config, run) -> LoraTrainer:
        from delrec.llm import hybrid
        from delrec.llm.soft_prompt import SoftPrompt
        from delrec.llm.user_prompt import PROJECTOR

        args = self.args
        tokens_only = ["input_ids", "completion_mask"]
        train_columns = tokens_only if args.objective == "answer" else LISTWISE_COLUMNS
        if self.per_user:
            train_columns = [*train_columns, "user_state"]
        # PEFT trains a projector, saves it (an item projector with its SR table) in every adapter file and reloads
        # it with the best checkpoint and on resume
        projector = [hybrid.PROJECTOR] if self.item_tokens else [PROJECTOR] if args.train_soft_prompt else None
        trainer = LoraTrainer(
            model=model,
            args=config,
            train_dataset=sets["train"].rows.select_columns(train_columns),
            eval_dataset=sets["valid"].rows.select_columns(tokens_only),
            processing_class=tokenizer,
            data_collator=(AnswerCollator(tokenizer.pad_token_id) if args.objective == "answer"
                           else ListwiseCollator(tokenizer, negatives=args.listwise_negatives, seed=self.settings.seed)),
            peft_config=self.lora.peft_config(modules_to_save=projector),
            evaluator=self.evaluator(sets["valid"].rows, tokenizer),
            run_identity=run.identity,
            torch_compile=compiles_layers(self.settings, model),
            soft_prompt_file=self.soft_file,
            trained_prompt=self.soft if args.train_soft_prompt else None,
        )
        if isinstance(self.soft, SoftPrompt):
            self.soft.freeze(trainer.model)  # refuses a LoRA on the embedding layer: the soft rows must not move
        return trainer

    def after_training(self, trainer, sets) -> dict:
        """The test split, scored with the best checkpoint's adapter (loaded at the end of training)."""
        started = time.perf_counter()
        test = self.evaluator(sets["test"].rows, trainer.processing_class)(trainer.model)
        return {"num_candidates": self.dataset.num_candidates, "test": test,
                "test_seconds": round(time.perf_counter() - started, 2)}

    def info(self, sets) -> dict:
        args, soft = self.args, self.soft
        return {
            "sr_model": {"name": self.sr_name, "display_name": self.sr_display},
            "soft_prompt": None if soft is None else {
                "name": soft.name, "num_tokens": soft.num_tokens, "source": args.soft_prompt,
                "stage1": local_or_hub(args.stage1) if args.stage1 else None,
                **({"kind": "user", "item_table_sha256": soft.item_table_sha256, "trained": args.train_soft_prompt}
                   if self.per_user else {}),
            },
            "template": {"name": self.template.name, "fingerprint": self.template.fingerprint},
            "domain": self.domain,
            "lora": dataclasses.asdict(self.lora),
            "item_tokens": self.item_tokens,
            "sr_hint": self.sr_hint,
        }


def finetune(args: FinetuneArguments, model_config, lora: LoraSettings, settings: TrainingSettings) -> StageResult:
    """Run stage 2: the summary printed and written to metrics.json, and the trainer (the trained model)."""
    return LoraFinetuning(args, model_config, lora, settings).run()


def _stage1_info(args: FinetuneArguments, dataset, model_config) -> dict | None:
    """The stage-1 folder's delrec.json, checked against this run (soft_prompt: stage1), else None."""
    from delrec.llm.stage_folder import INFO_FILE, read_info

    if args.soft_prompt != "stage1":
        return None
    fix = ("run `delrec llm distill-pattern` first and set stage1 to its output folder, or set soft_prompt: random "
           "or soft_prompt: none (ablations)")
    if args.stage1 is None:
        raise DelrecError(f"soft_prompt: stage1 needs the stage-1 folder (stage1: FOLDER); {fix}")
    folder = Path(args.stage1)
    if not (folder / INFO_FILE).is_file() or not any((folder / f).is_file() for f in (SOFT_PROMPT_FILE,
                                                                                     USER_PROMPT_FILE)):
        raise DelrecError(f"{folder}: no stage-1 soft prompt ({SOFT_PROMPT_FILE} or {USER_PROMPT_FILE}, and "
                          f"{INFO_FILE}); {fix}")
    info = read_info(folder)
    if info.get("stage") != "distill-pattern" or not info.get("soft_prompt"):
        raise DelrecError(f"{folder}: a {info.get('stage')} folder, not a stage-1 soft prompt; {fix}")
    fingerprint = (info.get("dataset") or {}).get("fingerprint")
    if fingerprint != dataset.fingerprint:
        raise DelrecError(
            f"{folder}: its soft prompt was distilled on dataset {fingerprint}, not on {dataset.path} (fingerprint "
            f"{dataset.fingerprint}); run stage 1 on this dataset"
        )
    if not same_base_model(info["base_model"], model_config.model_name_or_path):
        raise DelrecError(
            f"{folder}: its soft prompt lives in the embedding space of {info['base_model']['model_name_or_path']}, "
            f"not of {model_config.model_name_or_path} (its files are not those stage 1 recorded); set "
            "model_name_or_path to the stage-1 base model"
        )
    return info


def _per_user(args: FinetuneArguments, stage1: dict | None, dataset, item_tokens: bool) -> bool:
    """Whether the stage-1 soft prompt is a per-user one; its user states are then checked: every split's, from the
    SR model stage 1 read (the digest of its item table)."""
    per_user = bool(stage1) and stage1["soft_prompt"].get("kind") == "user"
    if args.train_soft_prompt and not per_user:
        raise DelrecError("train_soft_prompt co-trains a per-user soft prompt, and this run has none (a global soft "
                          "prompt stays frozen, as in DELRec); set soft_prompt: stage1 with a folder from "
                          "`delrec llm distill-pattern --soft_prompt user`, or leave train_soft_prompt out")
    if not per_user:
        return False
    if item_tokens:
        raise DelrecError("a per-user soft prompt and item_tokens both replace the input-embedding layer; use one")
    states = _states_of_every_split(args, dataset, "its soft prompt is projected from the SR model's user states")
    if states["train"].item_table_digest() != stage1["soft_prompt"].get("item_table_sha256"):
        raise DelrecError(f"{args.train_predictions}: made by another SR model than the one {args.stage1} was "
                          "distilled from (their item tables differ); predict with that model")
    return True


def _states_of_every_split(args: FinetuneArguments, dataset, why: str) -> dict:
    """The train, valid and test user states (`delrec.predictions.UserStates`), checked to come from one SR model."""
    from delrec.predictions import read_user_states

    paths = {"train": args.train_predictions, "valid": args.valid_predictions, "test": args.test_predictions}
    missing = [split for split, path in paths.items() if path is None]
    if missing:
        raise DelrecError(f"{why}, which needs them for every split: set "
                          f"{', '.join(f'{s}_predictions' for s in missing)} (`delrec sr predict --split SPLIT "
                          "--user_states`)")
    states = {split: read_user_states(path, dataset, split) for split, path in paths.items()}
    if len({states[split].item_table_digest() for split in paths}) > 1:
        raise DelrecError(f"{args.train_predictions}, {args.valid_predictions} and {args.test_predictions} come from "
                          "different SR models (their item tables differ); predict every split with the same model")
    return states


def _sr_hint(args: FinetuneArguments, template, dataset) -> dict | None:
    """An sr_hint template's settings for delrec.json (sr_top, the SR model, a digest of its item table, which
    `delrec rank` checks its own predictions against), from the three predictions files; None for other templates."""
    if template.task != "sr_hint":
        return None
    states = _states_of_every_split(args, dataset, f"template '{template.name}' names the SR model's top "
                                                   "candidates from its user states")
    return {"sr_top": args.sr_top, "model_type": states["train"].model_type,
            "item_table_sha256": states["train"].item_table_digest()}


def _check_template(template, soft_prompt: str) -> None:
    if template.task not in ("lsr", "plain", "sr_hint"):
        raise DelrecError(f"template '{template.name}' is for task '{template.task}'; stage 2 uses an lsr, plain or "
                          "sr_hint template")
    if template.requires_soft_prompt and soft_prompt == "none":
        raise DelrecError(f"template '{template.name}' has a soft-prompt slot but soft_prompt is none; use "
                          "template: plain, or soft_prompt: stage1 / random")
    if template.task == "sr_hint" and soft_prompt != "none":
        raise DelrecError(f"template '{template.name}' names the SR model's top candidates as text, with no soft "
                          "prompt; set soft_prompt: none")
    if not template.requires_soft_prompt and soft_prompt != "none":
        raise DelrecError(f"template '{template.name}' has no soft-prompt slot, so the {soft_prompt} soft prompt "
                          "would be unused; use template: lsr, or soft_prompt: none")
