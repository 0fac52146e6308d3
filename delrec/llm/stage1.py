"""DELRec stage 1: distil an SR model's recommendation pattern into a soft prompt (METHODS.md, "DELRec").

The LLM is frozen; only one soft prompt (P added tokens named after the SR model, shared by both
tasks; with `soft_prompt: user`, P vectors per user projected from the SR model's state of the
history, `delrec.llm.user_prompt`, of which only the projector trains) trains, on Temporal Analysis (TA) and Recommendation Pattern Simulating (RPS) instances
built from the SR model's predictions (`delrec.llm.instances`). The loss is either DELRec's, the LM
loss on the answer tokens only (`objective: answer`, a token mean), or the title-listwise one
(`objective: listwise`, `delrec.llm.listwise`: a softmax cross-entropy over the candidates'
log-likelihoods, a mean over instances), which trains what the valid metrics (RPS agreement, TA
accuracy) read. The two task losses (each over its own instances in the batch) are combined with

- fixed weights (`task_weights`, normalised over the tasks present in the batch), or
- DELRec's dynamic weights, recomputed every step: w_t ∝ (1 / ||∇_softprompt L_t||)^power
  (power 0.5), normalised to sum 1 (`dynamic_task_weights`). They are computed per forward batch
  (`per_device_train_batch_size` on every process): with gradient accumulation, each micro-batch
  weighs its own tasks, so keep the batch in one pass where the weights matter.

How the dynamic weights cost no extra backward pass: examples of different tasks never interact
in a forward pass, so the gradient reaching the input embeddings of a TA example is the gradient
of L_ta alone (times the coefficient it had in the summed loss). A tensor hook on the output of the
step's first embedding call (the whole batch for the answer loss, the prompt pass for the listwise
one, whose candidate passes read the prompts through the KV cache) therefore reads, in the ONE
backward pass of the equally weighted loss, each task's gradient w.r.t. the soft-prompt vectors
(summed over the positions holding them), computes the weights, and rescales each example's
gradient to its task's weight before it reaches the soft rows. The result equals backpropagating
sum_t w_t L_t (the tests check it against separate backward passes). With tied input/output
embeddings (Qwen2, Gemma) the soft rows also act in the LM head, but train from the input side only
(`delrec.llm.soft_prompt`).

Only the soft rows train: a float32 master copy of the P rows, put into the embedding layer's output
by a forward hook (`SoftPrompt.train_only_soft_prompt`; no gradient of the 262k-row matrix), and
AdamW on that copy alone, so a checkpoint is the soft rows + a few KB of optimizer state, not a
model copy (weight decay 0, DELRec's setting).

Distributed: DDP (accelerate_configs/multi_gpu.yaml). The batch of a step is that of all processes:
the task losses are token means over it, the dynamic weights come from its task gradients, so a
step equals one process holding the whole batch (`SoftPromptTrainer.compute_loss`;
tests/test_distributed.py). Not FSDP: sharding flattens the embedding matrix, so the soft rows have no
rows of it to be written into; the soft prompt is small, so DDP is the right tool.

Output folder: soft_prompt.safetensors, the tokenizer (with the soft tokens), delrec.json,
metrics.json (valid RPS agreement and TA accuracy with their chance levels, before and after),
checkpoints/ (for resuming) and cache/ (built instances).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from delrec.config import SOFT_PROMPT_TOKENS, above, at_least
from delrec.errors import DelrecError
from delrec.llm.listwise import LISTWISE_COLUMNS, ListwiseCollator, listwise_loss
from delrec.llm.run_folder import StageResult
from delrec.llm.stage import TrainingStage
from delrec.llm.trainer import (
    AnswerCollator,
    CandidateEvaluator,
    DelrecTrainer,
    RankCounts,
    TrainingSettings,
    answer_log_probs,
    compiles_layers,
)
from delrec.prompts.options import PromptsFolder

STAGE = "distill-pattern"
TASKS = ("ta", "rps")
DEFAULT_LEARNING_RATE = 1e-2


@dataclass
class DistillArguments(PromptsFolder):
    """Stage-1 inputs and the DELRec options (model: `ModelConfig`; trainer: `TrainingSettings`)."""

    data: str = field(metadata={"help": "A prepared dataset folder (from `delrec data prepare`)."})
    train_predictions: str = field(
        metadata={"help": "SR predictions for the train split (`delrec sr predict --split train --prefix_predictions`)."}
    )
    valid_predictions: str = field(
        metadata={"help": "SR predictions for the valid split, same SR model (with --prefix_predictions for TA)."}
    )
    out: str = field(metadata={"help": "Output folder: soft prompt, tokenizer, delrec.json, metrics.json, checkpoints."})
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS),
        metadata={"help": "Stage-1 tasks: ta and/or rps (one alone is the TA-only / RPS-only ablation)."},
    )
    task_weighting: Literal["dynamic", "fixed"] = field(
        default="dynamic",
        metadata={"help": "dynamic: w_t ∝ (1/||grad_softprompt L_t||)^weight_power per step; fixed: task_weights."},
    )
    task_weights: list[float] = field(
        default_factory=lambda: [1.0, 1.0],
        metadata={"help": "fixed weighting: one weight per task in `tasks` order (normalised to sum 1).",
                  "range": at_least(0)},
    )
    weight_power: float = field(
        default=0.5, metadata={"help": "dynamic weighting: the exponent (DELRec: 0.5).", "range": above(0)}
    )
    soft_prompt: Literal["global", "user"] = field(
        default="global",
        metadata={"help": "global: P vectors shared by every user (DELRec); user: P vectors per user, a trained "
                  "projection of the SR model's state of the user's history (delrec.llm.user_prompt; both "
                  "predictions files written with `delrec sr predict --user_states`)."},
    )
    soft_prompt_tokens: int = field(
        default=100, metadata={"help": "P, the soft prompt's number of vectors.", "range": SOFT_PROMPT_TOKENS}
    )
    soft_prompt_init: Literal["vocab", "random"] = field(
        default="vocab", metadata={"help": "Start from P distinct vocabulary embeddings (DELRec) or at random "
                                   "(global only: a per-user prompt starts from vocabulary rows)."}
    )
    soft_prompt_name: str | None = field(
        default=None, metadata={"help": "Name of the soft prompt's tokens (default: the SR model type, e.g. sasrec)."}
    )
    sr_display_name: str | None = field(
        default=None, metadata={"help": "How the templates name the SR model (default: e.g. SASRec)."}
    )
    ta_template: str = field(default="ta", metadata={"help": "Template of the TA task (NAME.jinja of the template folder)."})
    rps_template: str = field(default="rps", metadata={"help": "Template of the RPS task."})
    domain: str = field(default="item", metadata={"help": "Wording of domains.yaml in the template folder (item, movie, game, artist, ...)."})
    num_candidates: int | None = field(
        default=None, metadata={"help": "RPS candidates per instance, C (default: the dataset's candidate count).",
                                "range": at_least(2)}
    )
    sr_top: int = field(
        default=3, metadata={"help": "RPS: h, how many of the SR model's top items are candidates.",
                             "range": at_least(1)}
    )
    max_train_instances: int | None = field(
        default=None, metadata={"help": "A seeded subsample of this many training instances per task (default: all).",
                                "range": at_least(1)}
    )
    eval_max_instances: int | None = field(
        default=200, metadata={"help": "Valid instances per task scored at each evaluation (default 200; none: all).",
                               "range": at_least(1)}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Longest instance in tokens (prompt + longest candidate).", "range": at_least(1)}
    )
    allow_truncation: bool = field(
        default=False, metadata={"help": "Drop the oldest history items of longer instances instead of refusing."}
    )
    objective: Literal["answer", "listwise"] = field(
        default="answer",
        metadata={"help": "answer: LM loss on the answer title (DELRec); listwise: softmax cross-entropy over the "
                  "candidates' title log-likelihoods, the quantity RPS agreement and TA accuracy rank by (one "
                  "prompt pass per instance scores all candidates)."},
    )

    def __post_init__(self):
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be ta, rps or both, got {self.tasks}")
        if self.task_weighting == "fixed" and (
            len(self.task_weights) != len(self.tasks) or any(w < 0 for w in self.task_weights) or not sum(self.task_weights) > 0
        ):
            raise ValueError(f"task_weights needs one non-negative weight per task ({self.tasks}), not all zero; "
                             f"got {self.task_weights}")
        if self.soft_prompt_tokens < 1:
            raise ValueError(f"soft_prompt_tokens must be at least 1, got {self.soft_prompt_tokens}")
        if not self.weight_power > 0:
            raise ValueError(f"weight_power must be positive, got {self.weight_power}")
        if self.soft_prompt == "user" and self.soft_prompt_init != "vocab":
            raise ValueError("soft_prompt: user starts from vocabulary rows; leave soft_prompt_init at vocab")


def dynamic_task_weights(grad_norms: torch.Tensor, present: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """DELRec's dynamic weights: w_t ∝ (1 / ||grad_t||)^power over the tasks present, normalised to sum 1."""
    inverse = grad_norms.float().clamp_min(1e-12).pow(-power) * present.float()
    return inverse / inverse.sum()


class SoftPromptTrainer(DelrecTrainer):
    """Trains only the soft-prompt rows on TA + RPS with fixed or dynamic task weights.

    Logs each task's loss (`loss_ta`, `loss_rps`: token means over the examples of all processes) and weight
    (`weight_ta`, `weight_rps`), averaged over the steps since the previous log line.
    """

    def __init__(self, *args, soft_prompt, trained_parameters: list[torch.nn.Parameter], tasks: list[str],
                 weighting: str, task_weights: list[float], weight_power: float, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            raise DelrecError("stage 1 (distill-pattern) runs on one device or with DDP (accelerate_configs/"
                              "multi_gpu.yaml), not FSDP: it trains rows of the embedding matrix, which FSDP flattens")
        self.soft_prompt = soft_prompt  # a SoftPrompt or a UserPrompt
        self.trained_parameters = trained_parameters
        self.tasks = tasks
        self.weighting = weighting
        self.fixed_weights = torch.tensor(task_weights, dtype=torch.float32)
        self.weight_power = weight_power
        self.task_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._backward_context: dict | None = None
        if weighting == "dynamic":
            self.model.get_input_embeddings().register_forward_hook(self._attach_reweighting)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                self.trained_parameters, lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon, weight_decay=0.0,
            )
            self.soft_prompt.check_optimizer(self.optimizer, self.model)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """sum_t c_t L_t over the tasks present, L_t the task's mean over the whole batch: over answer tokens
        (answer objective) or over instances (listwise objective).

        With several processes, each holds its part of every L_t (its examples' loss over the units of all
        processes) and multiplies the loss by the process count, which DDP's gradient average undoes: a step
        equals one process holding the whole batch.
        """
        task = inputs.pop("task")
        context = {"task": task}
        if self.weighting == "dynamic" and model.training:
            self._backward_context = context  # the embedding hook picks it up during this forward pass
        with self.reading_states(model, inputs):
            if "candidates" in inputs:
                example_losses = listwise_loss(model, **inputs, batch_size=self.evaluator.batch_size,
                                               length_normalized=self.evaluator.length_normalized, reduction="none")
                units = torch.ones_like(example_losses)
            else:
                log_probs, keep = answer_log_probs(model, inputs)
                example_losses, units = -log_probs.sum(1), keep.sum(1)
        masks = [task == t for t in range(len(self.tasks))]
        loss_sums = torch.stack([example_losses[m].sum() for m in masks])
        counts = torch.stack([torch.stack([units[m].sum(), m.sum()]) for m in masks]).float()  # units, examples
        units, examples = self.accelerator.reduce(counts, "sum").unbind(1)
        present = examples > 0
        losses = loss_sums / units.clamp(min=1)
        if self.weighting == "fixed":
            coefficients = self.fixed_weights.to(losses.device) * present
        else:  # equal weights forward; the embedding hook applies the dynamic ones in the backward pass
            coefficients = present.float()
        coefficients = coefficients / coefficients.sum()
        context.update(present=present, coefficients=coefficients.detach())  # read by the gradient hook in backward
        mode = "train" if model.training else "eval"
        task_losses = self.accelerator.reduce(losses.detach(), "sum")  # the whole batch's L_t, for the log
        for t, name in enumerate(self.tasks):
            if present[t]:
                self.task_metrics[mode][f"loss_{name}"].append(task_losses[t].item())
                if self.weighting == "fixed":
                    self.task_metrics[mode][f"weight_{name}"].append(coefficients[t].item())
        loss = (coefficients * losses).sum() * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _attach_reweighting(self, module, args, output):
        context, self._backward_context = self._backward_context, None
        if context is not None and output.requires_grad:
            context["input_ids"] = args[0]  # the ids this call embeds: row i is the batch's example i
            output.register_hook(lambda grad: self._reweight(grad, context))

    def _reweight(self, grad: torch.Tensor, context: dict) -> torch.Tensor:
        """Per task: the gradient w.r.t. the soft vectors -> dynamic weights -> each example's gradient rescaled."""
        task, input_ids, coefficients, present = (context[k] for k in ("task", "input_ids", "coefficients", "present"))
        soft_ids = torch.tensor(self.soft_prompt.token_ids, device=input_ids.device)
        at_soft = torch.isin(input_ids, soft_ids)
        slot = (input_ids[at_soft][:, None] == soft_ids).long().argmax(1)
        owner = task[:, None].expand_as(input_ids)[at_soft]
        num_tasks, size = len(self.tasks), len(soft_ids)
        per_task = torch.zeros(num_tasks * size, grad.shape[-1], device=grad.device, dtype=torch.float32)
        per_task.index_add_(0, owner * size + slot, grad[at_soft].float())
        # the gradient of L_t itself: undo the coefficient it had in the summed loss, add up the processes' parts
        # and undo the process count the loss was multiplied by
        per_task = per_task.view(num_tasks, -1) / coefficients.clamp_min(1e-12)[:, None]
        per_task = self.accelerator.reduce(per_task, "sum") / self.accelerator.num_processes
        weights = dynamic_task_weights(per_task.norm(dim=1), present, self.weight_power)
        for t, name in enumerate(self.tasks):
            if present[t]:
                self.task_metrics["train"][f"weight_{name}"].append(weights[t].item())
        scale = torch.where(coefficients > 0, weights / coefficients.clamp_min(1e-12), torch.zeros_like(weights))
        return grad * scale[task].to(grad.dtype)[:, None, None]

    def save_weights(self, output_dir: Path, state_dict) -> None:
        """Nothing but the soft prompt changed: no model weights are written."""

    def save_soft_prompt(self, output_dir: Path) -> None:
        self.soft_prompt.save(output_dir, self.model)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the task losses and weights gathered since the last log (under eval_ when evaluating)."""
        mode = "train" if self.model.training else "eval"
        prefix = "" if mode == "train" else "eval_"
        logs.update({f"{prefix}{key}": sum(values) / len(values) for key, values in self.task_metrics[mode].items()})
        self.task_metrics[mode].clear()
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        """Train, then set the rows of the best checkpoint (by `metric_for_best_model`).

        The Trainer's own `load_best_model_at_end` (off in stage 1) looks for model weights, which stage-1
        checkpoints do not hold; it still tracks and keeps the best checkpoint without it.
        """
        output = super().train(*args, **kwargs)
        if self.state.best_model_checkpoint is not None:
            self._load_soft_rows(self.state.best_model_checkpoint)
        return output

    # Private Trainer hook, kept: `train(resume_from_checkpoint=...)` calls it before any callback runs and, for a
    # checkpoint without model weights (stage 1 writes the soft rows only), raises "Can't find a valid checkpoint".
    # Loading the rows here is what lets resume restore the optimizer, scheduler, RNG and step as usual.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_soft_rows(resume_from_checkpoint)

    def _load_soft_rows(self, folder: str) -> None:
        self.soft_prompt.restore(folder, self.model)


def stage1_metrics(counts: dict[str, RankCounts]) -> dict[str, float]:
    """RPS agreement (the LLM's top-1 = the SR model's top-1) and TA accuracy, each with its chance level."""
    names = {"rps": "rps_agreement", "ta": "ta_accuracy"}
    metrics = {}
    for task, entry in counts.items():
        values = entry.metrics()
        metrics[names[task]] = values["hr@1"]
        metrics[f"{task}_hr@5"] = values["hr@5"]
        metrics[f"{task}_chance"] = values["chance@1"]
    return metrics


class PatternDistillation(TrainingStage):
    """Stage 1 for `TrainingStage.run`: the soft prompt (global or per-user) on TA + RPS, the LLM frozen."""

    name = STAGE
    default_learning_rate = DEFAULT_LEARNING_RATE

    def __init__(self, args: DistillArguments, model_config, settings: TrainingSettings):
        super().__init__(args, model_config, settings)
        self.default_metric = "rps_agreement" if "rps" in args.tasks else "ta_accuracy"

    def summarize(self, counts: dict[str, RankCounts]) -> dict[str, float]:
        return stage1_metrics(counts)

    def tasks(self) -> list[str]:
        return list(self.args.tasks)

    def prepare(self, dataset) -> None:
        from delrec.llm.instances import read_task_predictions
        from delrec.prompts import get_template

        args = self.args
        if self.settings.weight_decay != 0:
            raise DelrecError(f"stage 1 trains soft-prompt rows with weight_decay 0 (decay would move every "
                              f"vocabulary row), got {self.settings.weight_decay}; remove weight_decay from the config")
        self.templates = {task: get_template(getattr(args, f"{task}_template"), args.prompts_dir)
                          for task in args.tasks}
        for task, template in self.templates.items():
            if template.task != task:
                raise DelrecError(f"{task}_template '{template.name}' is a template for task '{template.task}', "
                                  f"not {task}")
        first = "ta" if "ta" in args.tasks else "rps"  # TA needs the prefix predictions: check for them up front
        self.sr_model = _sr_model(
            read_task_predictions(first, dataset, "train", args.train_predictions).meta,
            read_task_predictions(first, dataset, "valid", args.valid_predictions).meta, args,
        )
        self.states = _user_states(args, dataset) if args.soft_prompt == "user" else None

    def attach(self, model, tokenizer) -> None:
        from delrec.llm.soft_prompt import SoftPrompt
        from delrec.llm.user_prompt import UserPrompt

        if self.states is None:
            self.soft = SoftPrompt(self.sr_model["name"], self.args.soft_prompt_tokens).add_to(
                model, tokenizer, init=self.args.soft_prompt_init, seed=self.settings.seed)
        else:
            self.soft = UserPrompt(self.sr_model["name"], self.args.soft_prompt_tokens).add_to(
                model, tokenizer, self.states.dim, self.states.item_table_digest(), seed=self.settings.seed)

    def instances(self, dataset, tokenizer, model) -> dict[str, list]:
        from delrec.llm.instances import InstanceOptions, build_instances
        from delrec.llm.loading import max_positions

        args = self.args

        def options(split: str, limit: int | None) -> InstanceOptions:
            return InstanceOptions(
                split=split, soft_prompt=self.soft.placeholder_text(), sr_model=self.sr_model["display_name"],
                domain=args.domain, num_candidates=args.num_candidates, sr_top=args.sr_top, max_instances=limit,
                seed=self.settings.seed, max_length=args.max_length, allow_truncation=args.allow_truncation,
                model_positions=max_positions(model), user_states=self.states is not None,
            )

        predictions = {"train": args.train_predictions, "valid": args.valid_predictions}
        limits = {"train": args.max_train_instances, "valid": args.eval_max_instances}
        return {split: [build_instances(dataset, self.templates[t], options(split, limits[split]), tokenizer,
                                        predictions[split], self.cache_dir) for t in args.tasks]
                for split in ("train", "valid")}

    def sft_overrides(self) -> dict:
        return {"load_best_model_at_end": False}  # the rows of the best checkpoint are set by SoftPromptTrainer

    def trainer(self, model, tokenizer, sets, config, run) -> SoftPromptTrainer:
        from datasets import concatenate_datasets

        args = self.args
        tokens_only = ["input_ids", "completion_mask", "task"]
        train_columns = tokens_only if args.objective == "answer" else [*LISTWISE_COLUMNS, "task"]
        if self.states is not None:
            train_columns = [*train_columns, "user_state"]
        train = concatenate_datasets([s.rows for s in sets["train"]]).select_columns(train_columns)
        valid = concatenate_datasets([s.rows for s in sets["valid"]])
        return SoftPromptTrainer(
            model=model,
            args=config,
            train_dataset=train,
            eval_dataset=valid.select_columns(tokens_only),
            processing_class=tokenizer,
            data_collator=(AnswerCollator(tokenizer.pad_token_id, list(args.tasks)) if args.objective == "answer"
                           else ListwiseCollator(tokenizer, list(args.tasks))),
            evaluator=CandidateEvaluator(valid, tokenizer, stage1_metrics, self.settings.eval_batch_size,
                                         self.settings.length_normalized),
            run_identity=run.identity,
            torch_compile=compiles_layers(self.settings, model),
            soft_prompt=self.soft,
            trained_parameters=self.soft.trained_parameters(model),
            tasks=list(args.tasks),
            weighting=args.task_weighting,
            task_weights=args.task_weights,
            weight_power=args.weight_power,
        )

    def info(self, sets) -> dict:
        args, soft = self.args, self.soft
        return {
            "sr_model": self.sr_model,
            "soft_prompt": {"name": soft.name, "num_tokens": soft.num_tokens, "init": args.soft_prompt_init,
                            **({} if self.states is None else {"kind": "user",
                                                               "item_table_sha256": soft.item_table_sha256})},
            "templates": {t: {"name": tp.name, "fingerprint": tp.fingerprint} for t, tp in self.templates.items()},
            "domain": args.domain,
            "tasks": list(args.tasks),
            "task_weighting": args.task_weighting,
            "objective": args.objective,
        }


def distill_pattern(args: DistillArguments, model_config, settings: TrainingSettings) -> StageResult:
    """Run stage 1: the summary printed and written to metrics.json, and the trainer (the trained model)."""
    return PatternDistillation(args, model_config, settings).run()


def _user_states(args: DistillArguments, dataset):
    """The train split's user states (a per-user prompt's input size and SR model), both splits checked to come
    from one SR model."""
    from delrec.predictions import read_user_states

    train = read_user_states(args.train_predictions, dataset, "train")
    valid = read_user_states(args.valid_predictions, dataset, "valid")
    if train.item_table_digest() != valid.item_table_digest():
        raise DelrecError(f"{args.train_predictions} and {args.valid_predictions} hold user states of different SR "
                          "models (their item tables differ); predict both splits with the same model")
    return train


def _sr_model(train_meta: dict, valid_meta: dict, args: DistillArguments) -> dict:
    """Which SR model the predictions come from (both files must agree): names the soft prompt."""
    from delrec.predictions import display_name

    model = train_meta.get("model") or {}
    if (valid_meta.get("model") or {}) != model:
        raise DelrecError(f"{args.train_predictions} and {args.valid_predictions} come from different SR models "
                          f"({model} vs {valid_meta.get('model')}); predict both splits with the same model")
    model_type = str(model.get("model_type") or "sr")
    return {
        "name": args.soft_prompt_name or model_type,
        "display_name": args.sr_display_name or display_name(model_type),
        "model_type": model_type,
        "path": model.get("path"),
    }

