"""`delrec student train`: an SR student distilled from teacher folders (DLLM2Rec, RD, RRD, HetComp, none; plus
a latent method: DE, FTD, HTD).

Options: `StudentArguments` + `delrec.distill.student.StudentConfig` (method, teachers, embedding
distillation) + `LatentChoice` (`--latent`) + `delrec.sr.TrainConfig` + the chosen model's config + the
chosen method's config (`DLLM2RecConfig`, `RDConfig`, `RRDConfig`, `HetCompConfig`) + the chosen latent method's
(`DEConfig`, `FTDConfig`, `HTDConfig`). As in `delrec sr train`, `--model`, `--method` and `--latent` (or
`model:` / `method:` / `latent:` in the YAML) are read first, so only the chosen model's and methods' keys
are accepted. `--teacher` may be repeated (`--teacher A --teacher B`) or given a list (`--teacher A B`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from delrec.cli.sr import DEFAULT_MODEL_FOR_HELP, check_config_keys_fit_model, train_summary
from delrec.config import parse_command, preparsed_option

DEFAULT_METHOD = "dllm2rec"
DEFAULT_LATENT = "none"
STUDENT_MODELS = ("sasrec", "gru4rec", "caser")


@dataclass
class StudentArguments:
    data: str = field(metadata={"help": "A prepared dataset folder (the one the teachers were exported for)."})
    model: str = field(metadata={"help": "Student model: sasrec, gru4rec or caser."})
    out: str = field(
        metadata={"help": "Output folder: the best student, metrics.json, log.jsonl and checkpoint/ (re-run to resume)."}
    )


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """`--teacher A --teacher B C` -> `--teacher A B C` (argparse keeps only the last occurrence)."""
    values, rest, at, index = [], [], None, 0
    while index < len(argv):
        arg = argv[index]
        if arg == flag or arg.startswith(flag + "="):
            at = len(rest) if at is None else at
            if "=" in arg:
                values.append(arg.split("=", 1)[1])
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
            continue
        rest.append(arg)
        index += 1
    return rest if at is None else rest[:at] + [flag, *values] + rest[at:]


def train_classes(argv) -> list[type]:
    """The config dataclasses of `delrec student train ARGV`: the model's and the method's depend on the flags."""
    from delrec.distill.student import LatentChoice, StudentConfig, latent_config_class, method_config_class
    from delrec.sr import model_class
    from delrec.sr.trainer import TrainConfig

    name = preparsed_option(argv, "model")
    cls = model_class(name if name is not None else DEFAULT_MODEL_FOR_HELP)
    method_class = method_config_class(preparsed_option(argv, "method", DEFAULT_METHOD))
    latent_class = latent_config_class(preparsed_option(argv, "latent", DEFAULT_LATENT))
    check_config_keys_fit_model(argv, cls)
    return [StudentArguments, StudentConfig, LatentChoice, TrainConfig, cls.config_class] + \
        [c for c in (method_class, latent_class) if c is not None]


def train(argv, prog: str, description: str) -> int:
    from delrec.device import launch_position
    from delrec.distill.student import latent_config_class, method_config_class, train_student
    from delrec.errors import DelrecError

    argv = _merge_repeated(list(argv), "--teacher")
    classes = train_classes(argv)
    args, student, choice, config, model_config, *configs = parse_command(classes, argv, prog, description)
    by_class = {type(c): c for c in configs}
    method_class, latent_class = method_config_class(student.method), latent_config_class(choice.latent)
    if args.model not in STUDENT_MODELS:
        raise DelrecError(f"--model {args.model}: a student is one of {', '.join(STUDENT_MODELS)}")
    result = train_student(
        args.data, model_config, config, student.teacher, student.method, by_class.get(method_class),
        args.out, student.embedding_distillation, student.ed_weight, student.weight_search,
        latent=choice.latent, latent_config=by_class.get(latent_class),
    )
    if not launch_position().main:  # under `accelerate launch`, one summary
        return 0
    search = result.metrics["distillation"].get("weight_search")
    latent = {"latent": choice.latent} if choice.latent != "none" else {}
    print(train_summary(result, args.model, method=student.method, **latent, teachers=student.teacher,
                        embedding_distillation=student.embedding_distillation,
                        **({"weight_scale": search["chosen"], "weight_search": search["why"]} if search else {})))
    return 0
