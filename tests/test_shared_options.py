"""Options are declared once: the LLM stages' are TRL's and PEFT's under their names (passed on by name, anything else
reachable through `trainer_options` / `lora_options`; runs recorded under the old LoRA names still resume), and the
options several commands share (the template folder, the template and wording, the device) come from one place."""

import dataclasses
import importlib
import json
import pkgutil
import re
import typing

import pytest

from delrec.config import parse_command
from delrec.errors import DelrecError
from delrec.llm.loading import LoraSettings
from delrec.llm.run_folder import RUN_IDENTITY_FILE, _check_identity, prepare_run, run_identity
from delrec.llm.trainer import DELREC_SETTINGS, TrainingSettings, sft_config


def _config(settings: TrainingSettings, tmp_path, **overrides):
    return sft_config(settings, tmp_path, True, "no", learning_rate=1e-3, metric_for_best_model="ndcg@5",
                      resuming=False, **overrides)


def test_every_training_setting_is_an_sft_config_field_of_that_name_or_one_delrec_decides():
    """If TRL renames or drops a field, this fails instead of the option silently reaching nothing."""
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    names = {f.name for f in dataclasses.fields(TrainingSettings)}
    assert DELREC_SETTINGS <= names
    assert names - DELREC_SETTINGS <= known, sorted(names - DELREC_SETTINGS - known)


def test_settings_reach_the_sft_config_by_name(tmp_path):
    settings = TrainingSettings(num_train_epochs=3.0, max_steps=7, per_device_train_batch_size=3,
                                gradient_accumulation_steps=5, warmup_steps=2, lr_scheduler_type="linear",
                                max_grad_norm=0.5, weight_decay=0.01, logging_steps=4, eval_steps=6,
                                save_total_limit=3, seed=11, dataloader_num_workers=0)
    config = _config(settings, tmp_path)
    for field in dataclasses.fields(TrainingSettings):
        if field.name not in DELREC_SETTINGS:
            assert getattr(config, field.name) == getattr(settings, field.name), field.name
    assert (config.learning_rate, config.save_steps, config.data_seed) == (1e-3, 6, 11)  # decided from them
    assert config.metric_for_best_model == "ndcg@5" and config.disable_tqdm is False


def test_trainer_options_reach_any_other_sft_config_field(tmp_path):
    config = _config(TrainingSettings(trainer_options={"adam_beta2": 0.95, "lr_scheduler_kwargs": {"min_lr": 1e-5}}),
                     tmp_path)
    assert config.adam_beta2 == 0.95 and config.lr_scheduler_kwargs == {"min_lr": 1e-5}


@pytest.mark.parametrize("options, message", [
    ({"eval_strategy": "no"}, "trainer_options: eval_strategy is set by delrec"),
    ({"learning_rate": 0.1}, "trainer_options: learning_rate is an option of its own; set learning_rate directly"),
    ({"seed": 3}, "trainer_options: seed is an option of its own"),
    ({"adam_beta3": 0.9}, "trainer_options: adam_beta3 is not a field of TRL's SFTConfig (did you mean adam_beta"),
])
def test_trainer_options_refuse_what_delrec_sets_declares_or_trl_lacks(tmp_path, options, message):
    with pytest.raises(DelrecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(TrainingSettings(trainer_options=options), tmp_path)


def test_lora_settings_are_peft_names_and_lora_options_reach_the_rest():
    config = LoraSettings(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"],
                          lora_options={"use_rslora": True, "bias": "lora_only"}).peft_config(modules_to_save=["p"])
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert set(config.target_modules) == {"q_proj"} and config.modules_to_save == ["p"]
    assert config.use_rslora is True and config.bias == "lora_only" and config.task_type == "CAUSAL_LM"
    assert LoraSettings().peft_config().target_modules == "all-linear"


@pytest.mark.parametrize("options, message", [
    ({"task_type": "SEQ_CLS"}, "lora_options: task_type is set by delrec"),
    ({"lora_alpha": 3}, "lora_options: lora_alpha is an option of its own"),
    ({"use_rslroa": True}, "lora_options: use_rslroa is not a field of PEFT's LoraConfig"),
    ({"layers_pattern": "layers"}, "PEFT refused them"),
])
def test_lora_options_refuse_what_delrec_sets_declares_or_peft_lacks(options, message):
    with pytest.raises(DelrecError, match=message):
        LoraSettings(lora_options=options).peft_config()


def test_mapping_options_from_flags_and_yaml(tmp_path):
    (lora,) = parse_command([LoraSettings], ["--lora_options", "use_rslora=true", "bias=lora_only", "rank_pattern={a: 2}"],
                            "finetune")
    assert lora.lora_options == {"use_rslora": True, "bias": "lora_only", "rank_pattern": {"a": 2}}
    config = tmp_path / "lora.yaml"
    config.write_text("lora_alpha: 4\nlora_options: {use_dora: true}\n")
    (lora,) = parse_command([LoraSettings], ["--config", str(config)], "finetune")
    assert (lora.lora_alpha, lora.lora_options) == (4, {"use_dora": True})
    (lora,) = parse_command([LoraSettings], ["--config", str(config), "--lora_options", "bias=all"], "finetune")
    assert lora.lora_options == {"bias": "all"}  # the flag's pairs replace the file's mapping
    config.write_text("lora_options: [use_dora]\n")
    with pytest.raises(DelrecError, match=f"{config}: key 'lora_options' expects a mapping of option names to values"):
        parse_command([LoraSettings], ["--config", str(config)], "finetune")


def test_a_pair_without_a_value_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_command([LoraSettings], ["--lora_options", "use_rslora"], "finetune")
    assert exit_.value.code == 2
    assert "expected NAME=VALUE, got 'use_rslora'" in capsys.readouterr().err


def test_a_run_recorded_under_the_old_lora_names_resumes(tmp_path):
    """Runs started when delrec said alpha/dropout (hours of games LoRA) resume under lora_alpha/lora_dropout."""
    old = {"r": 8, "alpha": 16, "dropout": 0.0, "seed": 0, "out": str(tmp_path)}
    new = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_options": None, "seed": 0, "out": str(tmp_path)}
    checkpoint = tmp_path / "checkpoints" / "checkpoint-96"
    checkpoint.mkdir(parents=True)
    (checkpoint / RUN_IDENTITY_FILE).write_text(json.dumps(run_identity("finetune", old)))
    _check_identity(checkpoint, run_identity("finetune", new), "remedy")  # accepted
    with pytest.raises(DelrecError, match="written by a run with lora_alpha = 16, not 32; remedy"):
        _check_identity(checkpoint, run_identity("finetune", {**new, "lora_alpha": 32}), "remedy")
    (tmp_path / "run.json").write_text(json.dumps({"stage": "finetune", "config": old}))
    (tmp_path / "metrics.json").write_text("{}")
    prepare_run(tmp_path, "finetune", new, resume=False)  # the recorded configuration matches
    with pytest.raises(DelrecError, match="was started with lora_dropout = 0.0, not 0.1"):
        prepare_run(tmp_path, "finetune", {**new, "lora_dropout": 0.1}, resume=False)


def _option_dataclasses():
    """Every dataclass of the package with a `metadata={"help": ...}` field: the commands' and stages' options."""
    import delrec

    found = set()
    for module in pkgutil.walk_packages(delrec.__path__, "delrec."):
        if module.name.endswith("__main__"):
            continue
        for value in vars(importlib.import_module(module.name)).values():
            if dataclasses.is_dataclass(value) and isinstance(value, type) and any(
                    "help" in f.metadata for f in dataclasses.fields(value)):
                found.add(value)
    return found


def test_options_several_commands_share_are_declared_once():
    from delrec.config import Device
    from delrec.prompts.options import PromptsFolder, TemplateChoice

    folder_help = dataclasses.fields(PromptsFolder)[0].metadata["help"]
    shared = {f.name: f.metadata["help"] for f in dataclasses.fields(TemplateChoice)}
    holders = {"prompts_dir": [], "template": [], "device": []}
    for cls in _option_dataclasses():
        for f in dataclasses.fields(cls):
            if f.name == "prompts_dir":
                holders["prompts_dir"].append(cls.__name__)
                assert f.metadata["help"] == folder_help and issubclass(cls, PromptsFolder), cls
            if f.name == "template" and f.metadata["help"] == shared["template"]:
                holders["template"].append(cls.__name__)
            if f.name == "device":
                holders["device"].append(cls.__name__)
                assert typing.get_type_hints(cls)["device"] == Device, cls
                assert re.fullmatch(r"[^:]+: cpu, cuda, or auto \(.+\)\.", f.metadata["help"]), cls  # device_option
    assert len(holders["prompts_dir"]) >= 6 and {"RankArguments", "TeacherExportConfig"} <= set(holders["template"])
    assert len(holders["device"]) >= 8, holders["device"]
