"""The trainer of DELRec stage 1 (soft-prompt distillation) and stage 2 (LoRA fine-tuning), and its config.

Both stages run on TRL's `SFTTrainer` (HF Trainer underneath: progress bar, logging, step
checkpoints, resume, accelerate/DDP, mixed precision); `delrec.llm.stage` drives them, and
`delrec.llm.run_folder` keeps their output folders resumable. They share:

- `TrainingSettings`: the trainer options a user sets, TRL's own under their names, turned into an
  `SFTConfig` by `sft_config`, with the device-dependent choices made here once: on CPU `use_cpu`, no bf16
  and no gradient checkpointing (TRL 1.16 defaults both on); on CUDA bf16 when the GPU has it
  and gradient checkpointing. Datasets arrive pre-tokenized (`input_ids` + `completion_mask`
  from `delrec.llm.instances`), so TRL only builds the labels (answer tokens only) and never
  truncates (`max_length=None`: the builders already refused or shortened long instances).
- The loss on the answer only, computed cheaply: `AnswerCollator` left-pads each batch (with
  explicit position ids, so padding changes nothing) so that every answer ends at the last
  position, and `answer_log_probs` asks the model for the logits of the last k positions only
  (`logits_to_keep`), k = the longest answer in the batch. The LM head then runs on a few
  positions instead of the whole prompt (TRL's fused head scores every position off CUDA: 4x
  slower per step on CPU here), through the model's own forward, so DDP, FSDP and PEFT see an
  ordinary call. The loss is a token mean per micro-batch (the Trainer divides by the
  gradient-accumulation steps).
- `CandidateEvaluator`: evaluation is ranking, not loss. Each eval row's candidates are scored
  by log-likelihood (`delrec.llm.scoring`), rows split across processes and gathered.
- `DelrecTrainer`: an `SFTTrainer` whose `evaluate` runs the evaluator and whose saves write
  the soft prompt and the tokenizer with the weights (each stage decides which weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from trl import SFTTrainer

from delrec.config import SEED, THREADS, above, at_least, between
from delrec.errors import DelrecError
from delrec.io import replace_directory, staged_directory, write_json
from delrec.llm.files import explained_write_errors
from delrec.llm.run_folder import RUN_IDENTITY_FILE
from delrec.llm.user_prompt import reading_states, with_user_states
from delrec.metrics import RankingMetrics

# TrainingSettings fields that are not SFTConfig fields, or that delrec turns into SFTConfig values itself
# (gradient_checkpointing and torch_compile take auto/yes/no; learning_rate and metric_for_best_model default per
# stage); every other field is an SFTConfig field of the same name and meaning, passed on as it is.
DELREC_SETTINGS = frozenset({
    "learning_rate", "metric_for_best_model", "eval_batch_size", "length_normalized", "mixed_precision",
    "gradient_checkpointing", "torch_compile", "num_threads", "progress", "resume", "trainer_options",
})
COMPILE_MIN_PARAMETERS = 100_000_000  # below, a step takes milliseconds: the minute of compilation never pays back


@dataclass
class TrainingSettings:
    """Trainer options shared by both DELRec stages: TRL's `SFTConfig` fields under their own names (with delrec's
    defaults), delrec's own (`DELREC_SETTINGS`), and `trainer_options` for any other SFTConfig field."""

    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate (default: 1e-2 for the soft prompt, 2e-4 for LoRA).",
                                "range": above(0)}
    )
    num_train_epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training instances.", "range": above(0)}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps to run; overrides num_train_epochs when > 0 (-1 or 0: off).",
                              "range": at_least(-1)}
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Training instances per device per step.", "range": at_least(1)}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step.", "range": at_least(1)}
    )
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Learning-rate warm-up: steps, or a share of all steps when below 1.",
                                "range": at_least(0)}
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the warm-up."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (0: no clipping).", "range": at_least(0)}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (stage 2 only: the soft prompt must train with 0).",
                               "range": at_least(0)}
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log the training loss every N steps.", "range": at_least(1)}
    )
    eval_steps: int = field(
        default=100,
        metadata={"help": "Evaluate on the valid candidates and save a checkpoint every N steps (and at the end).",
                  "range": at_least(1)},
    )
    save_total_limit: int = field(
        default=2, metadata={"help": "Checkpoints kept in OUT/checkpoints (the best one is always kept).",
                             "range": at_least(1)}
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "Valid metric that picks the checkpoint loaded at the end (default: rps_agreement in "
                  "stage 1, ndcg@5 in stage 2; higher is better)."},
    )
    eval_batch_size: int = field(
        default=16, metadata={"help": "Sequences per forward pass when scoring candidates.", "range": at_least(1)}
    )
    length_normalized: bool = field(
        default=False, metadata={"help": "Rank candidates by mean instead of summed token log-likelihood."}
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of instance sampling, initialisation and data order.", "range": SEED}
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "auto: bf16 on a CUDA GPU that supports it, and on a CPU whose bfloat16 matrix products "
                  "measure at least 1.5x faster than float32 ones (then, with dtype auto, the frozen base weights "
                  "load in bfloat16; what trains keeps float32 copies); none elsewhere."},
    )
    gradient_checkpointing: Literal["auto", "yes", "no"] = field(
        default="auto", metadata={"help": "Recompute activations in the backward pass; auto: on CUDA only."}
    )
    torch_compile: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata={"help": "Compile each decoder layer (torch.compile, dynamic shapes: one compilation the layers "
                  "share) to fuse the elementwise work between matrix products; costs about a minute once. auto: on "
                  "CPU, for models of at least 100M parameters, where a C++ compiler is installed."},
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Data-loading worker processes.", "range": between(0, 1024)}
    )
    num_threads: int = field(
        default=0, metadata={"help": "CPU threads for torch; 0: the process's (OMP_NUM_THREADS, else the `delrec` "
                             "command's one per free core).", "range": THREADS}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    resume: bool = field(
        default=True, metadata={"help": "Resume from the last checkpoint in OUT/checkpoints when there is one."}
    )
    trainer_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Any other field of TRL's SFTConfig (transformers' TrainingArguments) by its name, e.g. "
                  "adam_beta2=0.95 lr_scheduler_kwargs={min_lr: 1.0e-5} (a mapping in YAML); not those delrec "
                  "sets (the evaluation and checkpoint schedule, devices, precision)."},
    )

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps",
                    "save_total_limit", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay, warmup_steps and max_grad_norm must not be negative")


@contextlib.contextmanager
def stage_runtime(settings: TrainingSettings):
    """While a stage runs: its CPU threads and, without `progress`, no progress bars from datasets and transformers
    either; both as they were afterwards, for in-process callers (the pipeline, tests)."""
    from delrec.device import torch_threads
    from delrec.llm.loading import progress_bars

    with torch_threads(settings.num_threads), progress_bars(settings.progress):
        yield


def training_precision(settings: TrainingSettings, device: str) -> Literal["bf16", "fp16", "no"]:
    """The Trainer's mixed precision on `device`: `mixed_precision`, with auto resolved to bf16 on a CUDA GPU that
    supports it and on a CPU whose bfloat16 GEMMs measure faster than float32 ones (`delrec.device`), else none."""
    from delrec.device import cpu_prefers_bfloat16, resolve_device

    if settings.mixed_precision != "auto":
        return settings.mixed_precision
    if resolve_device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_prefers_bfloat16() else "no"


def training_model_config(model_config, precision: str):
    """The base model as a stage loads it: on CPU with bf16 compute and `dtype: auto`, its weights in bfloat16.

    Those weights are frozen, so they need no float32 master copy: autocast would cast them on every pass. What
    trains keeps float32 copies (PEFT's LoRA matrices, the soft prompt's rows) and the losses are computed in
    float32. On CUDA the checkpoint's dtype is kept, as before."""
    from delrec.device import resolve_device

    if (precision == "bf16" and model_config.dtype == "auto" and resolve_device(model_config.device).type == "cpu"
            and not (model_config.load_in_4bit or model_config.load_in_8bit)):
        return dataclasses.replace(model_config, dtype="bfloat16")
    return model_config


def compiles_layers(settings: TrainingSettings, model) -> bool:
    """Whether a stage compiles the model's decoder layers: `torch_compile`, with auto resolved to yes on CPU for a
    model of at least `COMPILE_MIN_PARAMETERS` where a C++ compiler is installed (inductor's CPU backend needs one).
    Gemma 3 270M on 2 cores, bfloat16: +14% examples/s for stage 1, +25% for stage 2 with LoRA (the adapters'
    small products fuse too), after about a minute of compilation (benchmarks/RESULTS.md, "The real LLM at its
    FLOP floor"). GPUs keep eager execution unless asked."""
    if settings.torch_compile != "auto":
        return settings.torch_compile == "yes"
    return (on_cpu(model) and sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMETERS
            and any(shutil.which(name) for name in (os.environ.get("CXX") or "g++", "clang++", "c++")))


def compile_layers(model) -> int:
    """Compile, in place, every repeated block of `model` (the classes its `_no_split_modules` names: the decoder
    layers), with dynamic shapes so that batches of any length share one compilation; returns how many.

    Regional rather than whole-model compilation (PyTorch's recipe): the blocks are one class, so they share one
    compiled graph, and what runs around them (the soft prompt's embedding hooks, the candidate KV-cache reuse of the
    listwise loss, the valid scoring) stays eager Python. State-dict keys do not change (`Module.compile`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [module for module in base.modules() if type(module).__name__ in names]
    if not blocks:
        raise DelrecError(f"{type(base).__name__} declares no repeated blocks (_no_split_modules) to compile; set "
                          "torch_compile: no")
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


def sft_config(
    settings: TrainingSettings,
    output_dir: Path,
    on_cpu: bool,
    precision: str,
    *,
    learning_rate: float,
    metric_for_best_model: str,
    resuming: bool,
    **overrides: Any,
):
    """The `SFTConfig` of a DELRec stage: evaluation before training (step 0) and every `eval_steps` with a
    checkpoint, the best checkpoint by a valid metric loaded at the end; `precision` from `training_precision`
    (bf16: the Trainer's autocast, on CPU too)."""
    from trl import SFTConfig

    checkpointing = settings.gradient_checkpointing == "yes" or (
        settings.gradient_checkpointing == "auto" and not on_cpu
    )
    owned = dict(  # what every stage decides: the evaluation/checkpoint schedule, devices, pre-tokenized data
        output_dir=str(output_dir),
        use_cpu=on_cpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=checkpointing,
        learning_rate=settings.learning_rate or learning_rate,
        eval_strategy="steps",
        eval_on_start=not resuming,
        save_strategy="steps",
        save_steps=settings.eval_steps,
        load_best_model_at_end=True,
        metric_for_best_model=settings.metric_for_best_model or metric_for_best_model,
        greater_is_better=True,
        data_seed=settings.seed,
        disable_tqdm=not settings.progress,
        report_to="none",
        completion_only_loss=True,
        max_length=None,
        packing=False,
        remove_unused_columns=False,
    )
    by_name = {name: value for name, value in dataclasses.asdict(settings).items() if name not in DELREC_SETTINGS}
    extra = dict(settings.trainer_options or {})
    known = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    for name in extra:
        if name in by_name or name in DELREC_SETTINGS:
            raise DelrecError(f"trainer_options: {name} is an option of its own; set {name} directly")
        if name in owned or name in overrides or name not in known:
            why = "is set by delrec" if name in known else "is not a field of TRL's SFTConfig"
            close = difflib.get_close_matches(name, sorted(known - set(owned) - set(by_name)), n=3)
            raise DelrecError(f"trainer_options: {name} {why}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                   else ""))
    return SFTConfig(**{**by_name, **extra, **owned, **overrides})


# --- the loss on the answer tokens ---------------------------------------------------------------


class AnswerCollator:
    """Left-pads `input_ids`/`labels` (labels: -100 outside the answer) so that all answers end at the last position.

    Adds `attention_mask` and `position_ids` (0 at each row's first real token), and with `tasks`
    the index of each example's `task` column.
    """

    def __init__(self, pad_token_id: int, tasks: list[str] | None = None):
        self.pad_token_id = pad_token_id
        self.tasks = tasks

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            ids[row, width - size:] = torch.tensor(example["input_ids"])
            labels[row, width - size:] = torch.tensor(example["labels"])
            mask[row, width - size:] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                 "labels": labels}
        if self.tasks is not None:
            batch["task"] = torch.tensor([self.tasks.index(e["task"]) for e in examples], dtype=torch.long)
        return with_user_states(batch, examples)


def answer_log_probs(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, k] of the answer tokens of a left-padded batch (0 where there is none) and their mask.

    Only the last k + 1 positions get logits: position t predicts token t + 1, and the answers
    (k tokens at most) end the rows.
    """
    labels = inputs["labels"]
    k = int((labels[:, 1:] != -100).sum(1).max())
    width = labels.shape[1]
    # positions as an index tensor, not the int k + 1: the model then gathers them into a contiguous [B, k + 1, d]
    # block, which the LM head multiplies as one matrix; an int slices a strided view that needs a gradient, which
    # torch's matmul does not fold: it copies the whole head weight per row instead (bfloat16 on CPU: half the
    # step's time, benchmarks/RESULTS.md "The real LLM at its FLOP floor")
    keep_positions = torch.arange(width - k - 1, width, device=labels.device)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"], logits_to_keep=keep_positions, use_cache=False)
    targets = labels[:, -k:]
    keep = targets != -100
    logits = out.logits[:, :-1].float()
    token_log_probs = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return token_log_probs * keep, keep


# --- evaluation by candidate ranking ---------------------------------------------------------------


@dataclass
class RankCounts:
    """Per eval row: how many candidates scored above the answer, how many tied with it, and how many there were."""

    greater: list[int] = field(default_factory=list)
    ties: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def metrics(self, ks=(1, 5)) -> dict[str, float]:
        """HR/NDCG at `ks` (ties at their expected value, `delrec.metrics`) and the chance level of HR@1."""
        ranking = RankingMetrics(ks, ("hr", "ndcg"))
        ranking.update_counts(torch.tensor(self.greater), torch.tensor(self.ties))
        return {**ranking.compute(), "chance@1": sum(1 / n for n in self.sizes) / len(self.sizes)}


def best_metric(settings: TrainingSettings, summarize: Callable[[dict[str, RankCounts]], dict[str, float]],
                tasks, default: str) -> str:
    """The valid metric that picks the best checkpoint, checked against the names `summarize` (what the stage's
    evaluation reports) gives for `tasks`, before anything loads: the Trainer looks it up only after training."""
    chosen = settings.metric_for_best_model or default
    reported = list(summarize({task: RankCounts([0], [0], [1]) for task in tasks}))
    if chosen not in reported:
        raise DelrecError(f"--metric_for_best_model {chosen!r} is not a metric this stage reports; "
                          f"valid: {', '.join(reported)}")
    return chosen


class CandidateEvaluator:
    """Ranks the candidates of eval rows (`prompt`, `candidates`, `answer`, `task` columns) by log-likelihood.

    `summarize` turns the per-task `RankCounts` into the named metrics of a stage. With several
    processes each scores an equal share (padded by repeating a row, so every process runs the
    same number of forward passes) and the counts are gathered.
    """

    def __init__(self, rows, tokenizer, summarize: Callable[[dict[str, RankCounts]], dict[str, float]],
                 batch_size: int = 16, length_normalized: bool = False):
        self.prompts = list(rows["prompt"])
        self.candidates = list(rows["candidates"])
        self.answers = list(rows["answer"])
        self.tasks = list(rows["task"])
        # a per-user soft prompt reads each row's SR state
        self.states = torch.tensor(rows["user_state"]) if "user_state" in rows.column_names else None
        self.tokenizer = tokenizer
        self.summarize = summarize
        self.batch_size = batch_size
        self.length_normalized = length_normalized

    def __call__(self, model) -> dict[str, float]:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        from delrec.llm.scoring import score_candidates

        state = PartialState()
        total = len(self.prompts)
        share = math.ceil(total / state.num_processes)
        mine = list(range(state.process_index, total, state.num_processes))
        padded = mine + [mine[-1] if mine else 0] * (share - len(mine))
        scores = score_candidates(
            model, self.tokenizer, [self.prompts[i] for i in padded], [self.candidates[i] for i in padded],
            batch_size=self.batch_size, states=None if self.states is None else self.states[padded],
        )
        local = []
        for index, score in zip(mine, scores):
            values = score.normalized if self.length_normalized else score.logprob
            target = values[self.answers[index]]
            greater = sum(v > target for v in values)
            local.append((index, greater, sum(v == target for v in values) - 1))
        counts: dict[str, RankCounts] = {}
        for index, greater, ties in sorted(gather_object(local) if state.num_processes > 1 else local):
            entry = counts.setdefault(self.tasks[index], RankCounts())
            entry.greater.append(greater)
            entry.ties.append(ties)
            entry.sizes.append(len(self.candidates[index]))
        return self.summarize(counts)


# --- the trainer -------------------------------------------------------------------------------------


class DelrecTrainer(SFTTrainer):
    """`SFTTrainer` + ranking evaluation + saves that write the soft prompt and the tokenizer.

    Subclasses say which weights a save writes (`save_weights`); the soft-prompt file is written
    by `save_soft_prompt` (stage 1: the live rows; stage 2: a copy of the frozen rows' file).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; the Trainer divides by accumulation

    def __init__(self, *args, evaluator: CandidateEvaluator, run_identity: dict[str, Any],
                 torch_compile: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluator = evaluator
        self.run_identity = run_identity
        if torch_compile:  # after the Trainer's setup: with LoRA, the adapted layers are compiled
            compile_layers(self.model)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Train, or, resumed from a checkpoint that already reached the last step (a run stopped after saving it),
        only restore that checkpoint and its best one: the Trainer would train one step more before it checks
        (transformers 5.19), and the re-run would not end as the uninterrupted run did."""
        from transformers import TrainerState
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import TrainOutput

        if resume_from_checkpoint is None:
            return super().train(**kwargs)
        state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE_NAME))
        last_step = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        if state.global_step < last_step:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._load_from_checkpoint(resume_from_checkpoint)
        self.state = state
        if state.best_model_checkpoint is not None and not Path(state.best_model_checkpoint).is_dir():
            state.best_model_checkpoint = None  # as the Trainer does on resume: a best checkpoint deleted since
        if self.args.load_best_model_at_end and state.best_model_checkpoint is not None:
            self._load_best_model()
        return TrainOutput(state.global_step, 0.0, {})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean negative log-likelihood of the answer tokens of the batch."""
        with self.reading_states(model, inputs):
            log_probs, keep = answer_log_probs(model, inputs)
        loss = -log_probs.sum() / keep.sum().clamp(min=1)
        return (loss, None) if return_outputs else loss

    def reading_states(self, model, inputs: dict):
        """The batch's SR user states (popped from `inputs`), handed to a per-user soft prompt for the passes inside
        (`delrec.llm.user_prompt`); nothing to do for a batch without them."""
        return reading_states(self.accelerator.unwrap_model(model), inputs.pop("user_states", None))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Rank the valid candidates (not the LM loss): the metric that picks the best checkpoint.

        The Trainer wants an `eval_dataset` for step-wise evaluation; the stages pass the valid
        instances, and the evaluator ranks their candidates.
        """
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()  # also makes SFTTrainer.log file these under eval
        try:
            with self.accelerator.autocast():  # scored with the precision training runs in
                values = self.evaluator(self.model)
            metrics = {f"{metric_key_prefix}_{key}": value for key, value in values.items()}
            metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 3)
            self.log(dict(metrics))  # a copy: Trainer.log adds the epoch to what it is given
        finally:
            self.model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the stage's weights (`save_weights`), the soft prompt and the tokenizer from the main process.

        Replaces the Trainer's save, which would write the whole model in stage 1 and the resized embedding
        matrices into the stage-2 adapter. A checkpoint's files are written here, before the Trainer writes its
        trainer_state.json, which marks the checkpoint complete (`last_complete_checkpoint`). Under FSDP every
        process takes part in gathering the full state dict. The files are written beside `output_dir` first and
        moved in once all are written: a save that fails (a full disk) leaves the folder's earlier files as they
        were, never some of them half-written.
        """
        output_dir = Path(output_dir or self.args.output_dir)
        state_dict = self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else None
        if self.args.should_save:
            output_dir.mkdir(parents=True, exist_ok=True)
            with staged_directory(output_dir) as staged, explained_write_errors(output_dir):
                self.save_weights(staged, state_dict)
                self.save_soft_prompt(staged)
                self.processing_class.save_pretrained(staged)
                for written in staged.iterdir():
                    if written.is_dir():
                        replace_directory(written, output_dir / written.name)
                    else:
                        os.replace(written, output_dir / written.name)

    # Private Trainer hook, kept: the one place that knows which checkpoint folder a save is writing.
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint save; one that fails (a full disk, an interrupt) removes the folder it was
        writing, so that no partial checkpoint is left for the re-run to resume from: it resumes from the last
        complete one."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            with explained_write_errors(folder):
                if self.args.should_save:  # before the trainer state, which marks the checkpoint complete
                    folder.mkdir(parents=True, exist_ok=True)
                    write_json(folder / RUN_IDENTITY_FILE, self.run_identity)
                super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def logged_metrics(self, step: int | None = None, prefix: str = "eval") -> dict[str, float] | None:
        """The last evaluation logged at `step` (default: the best checkpoint's step), without the prefix."""
        step = self.state.best_global_step if step is None else step
        key = f"{prefix}_{self.args.metric_for_best_model}"
        logged = [e for e in self.state.log_history if e.get("step") == step and key in e]
        return strip_prefix(logged[-1], prefix) if logged else None

    def save_weights(self, output_dir: Path, state_dict) -> None:
        raise NotImplementedError

    def save_soft_prompt(self, output_dir: Path) -> None:
        raise NotImplementedError


def strip_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """`{"eval_hr@1": x, "eval_runtime": t, "epoch": e}` -> `{"hr@1": x}`."""
    start = f"{prefix}_"
    return {k[len(start):]: v for k, v in metrics.items() if k.startswith(start) and k != f"{start}runtime"}


def on_cpu(model) -> bool:
    return model.get_input_embeddings().weight.device.type == "cpu"
