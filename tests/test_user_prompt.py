"""The per-user soft prompt: P vectors projected from the SR model's state of each user's history.

What a test here pins: the projection formula, that an untrained prompt is a global one, that prompts holding it
are refused without states, that stage 1 trains the projector alone and writes it to reload exactly, and that it
learns what a global prompt cannot (users whose prompts read the same but whose SR top-1 differ)."""

import json

import pytest
import torch

from delrec.data.dataset import PreparedDataset
from delrec.errors import DelrecError
from delrec.llm.merge import export_model
from delrec.llm.files import USER_PROMPT_FILE
from delrec.llm.stage_folder import load_delrec_model
from delrec.llm.listwise import listwise_loss
from delrec.llm.scoring import score_candidates
from delrec.llm.loading import LoraSettings
from delrec.llm.stage1 import distill_pattern
from delrec.llm.stage2 import FinetuneArguments, finetune
from delrec.llm.tokenization import encode_completion, encode_prompt
from delrec.llm.trainer import TrainingSettings
from delrec.llm.user_prompt import PROJECTOR, UserPrompt, reading_states, read_file
from delrec.predictions import read_user_states
from delrec.ranking.base import ReadoutConfig
from delrec.ranking.hf import Options as HFOptions
from delrec.ranking.runner import RankArguments, rank
from delrec.sr import load_model as load_sr
from delrec.sr.evaluate import write_predictions
from llm_fixtures import load_tiny
from test_delrec_training import FAST, model_config, stage1_args

P = 3


def attached(folder, state_dim=5, seed=0):
    model, tokenizer = load_tiny(folder)
    prompt = UserPrompt("sasrec", P).add_to(model, tokenizer, state_dim, "digest", seed=seed)
    return model, tokenizer, prompt


def test_the_vectors_follow_the_formula_and_an_untrained_prompt_is_a_global_one(tiny_llm):
    model, tokenizer, prompt = attached(tiny_llm)
    projector = getattr(model, PROJECTOR)
    states = torch.randn(2, 5)
    assert torch.equal(projector(states), projector.scale * projector.base.expand(2, -1, -1))  # W starts at zero
    with torch.no_grad():
        projector.weight.normal_()
    normed = (states - states.mean(1, keepdim=True)) / (states.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    expected = projector.scale * (projector.base + (normed @ projector.weight).view(2, P, -1) / 5)
    assert torch.allclose(projector(states), expected, atol=1e-5)
    # the wrapped embedding: user ids take row b's vectors, every other id is embedded as before
    text = "A user" + prompt.placeholder_text() + " likes"
    ids = torch.tensor([encode_prompt(tokenizer, text)] * 2)
    at = torch.isin(ids, torch.tensor(prompt.token_ids))
    assert at.sum() == 2 * P
    plain = model.get_input_embeddings().embedding
    with reading_states(model, states), torch.no_grad():
        embedded = model.get_input_embeddings()(ids)
        vectors = projector(states)
    assert torch.equal(embedded[~at], plain(ids.masked_fill(at, 0))[~at])
    for row in range(2):
        assert torch.equal(embedded[row][at[row]], vectors[row].to(embedded.dtype))


def test_prompts_holding_it_are_refused_without_one_state_per_prompt(tiny_llm):
    model, tokenizer, prompt = attached(tiny_llm)
    ids = torch.tensor([encode_prompt(tokenizer, prompt.placeholder_text() + " x")] * 2)
    with pytest.raises(DelrecError, match=r"^the prompts hold a per-user soft prompt, which needs the SR model's state "
                                          r"of each of the 2 prompts in this pass \(got none\)"):
        model(input_ids=ids)
    with reading_states(model, torch.zeros(3, 5)), pytest.raises(DelrecError, match=r"\(got 3\)"):
        model(input_ids=ids)
    plain, _ = load_tiny(tiny_llm)
    with pytest.raises(DelrecError, match="reads no per-user soft prompt"), reading_states(plain, torch.zeros(2, 5)):
        pass


def test_it_learns_what_a_global_prompt_cannot(tiny_llm):
    """Four users whose prompts are the same text but whose SR top-1 differ: a global prompt ranks them all alike
    (at most one right); training the projector alone ranks every one right."""
    torch.manual_seed(0)
    model, tokenizer, prompt = attached(tiny_llm, state_dim=8)
    titles = ["game 1", "game 2", "game 3", "game 4"]  # alike: their likelihoods differ by the prompt alone
    text = "Recommendations by the SR model " + prompt.placeholder_text() + "\nCandidates: " + ", ".join(titles)
    prompts = [encode_prompt(tokenizer, text)] * 4
    candidates = [[encode_completion(tokenizer, t) for t in titles]] * 4
    states, targets = torch.randn(4, 8), [0, 1, 2, 3]

    def correct() -> int:
        scores = score_candidates(model, tokenizer, [text] * 4, [titles] * 4, states=states)
        return sum(max(range(4), key=lambda j: s.logprob[j]) == t for s, t in zip(scores, targets))

    assert correct() <= 1  # W = 0: every user gets the same vectors, so the same ranking
    parameters = prompt.trained_parameters(model)
    optimizer = torch.optim.Adam(parameters, lr=3e-2)
    for _ in range(60):
        optimizer.zero_grad()
        with reading_states(model, states):
            loss = listwise_loss(model, prompts, candidates, targets)
        loss.backward()
        optimizer.step()
    assert correct() == 4
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith(PROJECTOR))


@pytest.fixture(scope="module")
def states_files(sr_model, tiny_llm_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-states")
    dataset, model = PreparedDataset.load(tiny_llm_data), load_sr(sr_model, "cpu")
    for split in ("train", "valid", "test"):
        write_predictions(folder / f"{split}.jsonl", model, dataset, split, 10, prefix_predictions=True,
                          user_states=True)
    return folder


@pytest.fixture(scope="module")
def user_stage1(tiny_llm_data, tiny_llama, states_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("user-stage1") / "run"
    result = distill_pattern(stage1_args(tiny_llm_data, states_files, out, soft_prompt="user", objective="listwise"),
                             model_config(tiny_llama), TrainingSettings(**FAST))
    return out, result


def test_stage1_trains_the_projector_alone_and_reloads_it_exactly(user_stage1, tiny_llama, tiny_llm_data,
                                                                   states_files):
    out, result = user_stage1
    trained = result.trainer.model
    base, _ = load_tiny(tiny_llama)
    parameters = dict(trained.named_parameters())
    for name, before in base.named_parameters():
        assert torch.equal(parameters[name.replace("embed_tokens.", "embed_tokens.embedding.")], before), name
    metadata, tensors = read_file(out / USER_PROMPT_FILE)
    projector = getattr(trained, PROJECTOR)
    assert torch.equal(tensors["weight"], projector.weight.detach()) and projector.weight.abs().sum() > 0
    dataset = PreparedDataset.load(tiny_llm_data)
    digest = read_user_states(states_files / "train.jsonl", dataset, "train").item_table_digest()
    info = json.loads((out / "delrec.json").read_text())
    assert info["soft_prompt"] == {"name": "sasrec", "num_tokens": 4, "init": "vocab", "kind": "user",
                                   "item_table_sha256": digest}
    assert metadata["item_table_sha256"] == digest and not (out / "soft_prompt.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["valid"]["rps_agreement"] <= 1
    # a fresh base model with the saved prompt scores the valid instances exactly as the trained one
    evaluator = result.trainer.evaluator
    fresh, tokenizer = load_tiny(tiny_llama)
    UserPrompt.load(out, fresh, tokenizer)
    first = score_candidates(trained, tokenizer, evaluator.prompts, evaluator.candidates, states=evaluator.states)
    again = score_candidates(fresh, tokenizer, evaluator.prompts, evaluator.candidates, states=evaluator.states)
    assert first == again


def test_stage1_without_user_states_says_how_to_write_them(tiny_llm_data, tiny_llama, tiny_pop, tmp_path):
    with pytest.raises(DelrecError, match=r"train.jsonl: written without user states.*--user_states"):
        distill_pattern(stage1_args(tiny_llm_data, tiny_pop, tmp_path / "out", soft_prompt="user"),
                        model_config(tiny_llama), TrainingSettings(**FAST))


def splits(folder) -> dict:
    return {f"{split}_predictions": str(folder / f"{split}.jsonl") for split in ("train", "valid", "test")}


@pytest.fixture(scope="module", params=[False, True], ids=["frozen", "co-trained"])
def user_stage2(request, user_stage1, tiny_llm_data, tiny_llama, states_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("user-stage2") / "run"
    args = FinetuneArguments(data=str(tiny_llm_data), out=str(out), stage1=str(user_stage1[0]), objective="listwise",
                             train_soft_prompt=request.param, max_train_instances=16, eval_max_instances=4,
                             test_max_instances=6, max_length=512, **splits(states_files))
    result = finetune(args, model_config(tiny_llama), LoraSettings(r=2, lora_alpha=4, lora_dropout=0.0),
                      TrainingSettings(**{**FAST, "learning_rate": 1e-2}))
    return request.param, out, result


def test_stage2_freezes_or_co_trains_the_projector_and_reloads_it_exactly(user_stage2, user_stage1, tiny_llm_data,
                                                                           states_files):
    co_trained, out, result = user_stage2
    _, stage1_tensors = read_file(user_stage1[0] / USER_PROMPT_FILE)
    _, tensors = read_file(out / USER_PROMPT_FILE)
    moved = not torch.equal(tensors["weight"], stage1_tensors["weight"])
    assert moved == co_trained
    trainable = [p.requires_grad for name, p in result.trainer.model.named_parameters() if PROJECTOR in name]
    assert trainable and any(trainable) == co_trained
    info = json.loads((out / "delrec.json").read_text())
    assert info["soft_prompt"]["kind"] == "user" and info["soft_prompt"]["trained"] == co_trained
    # the folder reloads to the same scores as the trained model, and `delrec rank` reads it with the test states
    dataset = PreparedDataset.load(tiny_llm_data)
    states = read_user_states(states_files / "test.jsonl", dataset, "test")
    ranked = rank(RankArguments(model=str(out), data=str(tiny_llm_data), out=str(out.parent / "rank"), max_instances=6,
                                predictions=str(states_files / "test.jsonl"), progress=False),
                  ReadoutConfig(), HFOptions(device="cpu", batch_size=4))
    loaded, tokenizer, _ = load_delrec_model(out, device="cpu", dtype="float32")
    rows = [json.loads(line) for line in (out.parent / "rank" / "rankings.jsonl").read_text().splitlines()]
    index = {inst.id: i for i, inst in enumerate(dataset.instances("test"))}
    prompts = [r.prompt for r in rank_requests(out, tiny_llm_data, tokenizer, states)]
    titles = [[dataset.titles[i] for i in dataset.candidates("test")[index[row["id"]]]] for row in rows]
    chosen = states.states[[index[row["id"]] for row in rows]]
    trained = score_candidates(result.trainer.model, tokenizer, prompts, titles, states=chosen)
    again = score_candidates(loaded, tokenizer, prompts, titles, states=chosen)
    assert torch.allclose(torch.tensor([s.logprob for s in trained]), torch.tensor([s.logprob for s in again]),
                          atol=1e-5)
    for row, scores in zip(rows, again):
        assert sorted(row["logprob"], reverse=True) == pytest.approx(sorted(scores.logprob, reverse=True), abs=1e-4)
    assert 0 <= ranked["test"]["hr@1"] <= 1


def rank_requests(model, data, tokenizer, states):
    from delrec.ranking.models import describe_model
    from delrec.ranking.requests import build_requests
    from delrec.prompts import get_template

    spec = describe_model(str(model))
    return build_requests(PreparedDataset.load(data), "test", spec, get_template(spec.template), tokenizer, 512,
                          lambda titles: 16, 6, None, states)


@pytest.mark.parametrize("case", ["no predictions", "export", "generate"])
def test_what_cannot_read_a_per_user_prompt_refuses_it_in_one_line(case, user_stage2, tiny_llm_data, states_files,
                                                                    tmp_path):
    _, out, _ = user_stage2
    if case == "export":
        with pytest.raises(DelrecError, match=r"a per-user soft prompt needs the hf backend.*--predictions FILE"):
            export_model(out, tmp_path / "merged")
        return
    args = RankArguments(model=str(out), data=str(tiny_llm_data), out=str(tmp_path / "rank"), max_instances=2,
                         progress=False, **({} if case == "no predictions" else
                                            {"predictions": str(states_files / "test.jsonl")}))
    expected = {"no predictions": r"reads a per-user soft prompt: pass --predictions, the test split's predictions",
                "generate": r"the generate read-out cannot hand each prompt its user state"}[case]
    with pytest.raises(DelrecError, match=expected):
        rank(args, ReadoutConfig(readout="score" if case == "no predictions" else "generate"),
             HFOptions(device="cpu", batch_size=2))


def test_co_training_needs_a_per_user_prompt(tiny_llm_data, tiny_llama, tmp_path):
    args = FinetuneArguments(data=str(tiny_llm_data), out=str(tmp_path / "run"), soft_prompt="random",
                             train_soft_prompt=True)
    with pytest.raises(DelrecError, match=r"^train_soft_prompt co-trains a per-user soft prompt, and this run has none"):
        finetune(args, model_config(tiny_llama), LoraSettings(r=2, lora_alpha=4), TrainingSettings(**FAST))


@pytest.mark.parametrize("case", ["rerank", "no predictions", "grounding"])
def test_the_teacher_export_reranks_with_each_users_state(case, user_stage2, sr_model, tiny_llm_data, states_files,
                                                           tmp_path):
    from delrec.distill.teacher_export import TeacherExportConfig, export_teacher

    _, out, _ = user_stage2
    config = TeacherExportConfig(model=str(out), data=str(tiny_llm_data), out=str(tmp_path / "teacher"),
                                 mode="grounding" if case == "grounding" else "rerank", sr_model=str(sr_model),
                                 topk=3, sr_topm=4, num_random=2, max_instances=5, progress=False,
                                 predictions=None if case == "no predictions" else str(states_files / "train.jsonl"))
    if case != "rerank":
        expected = {"no predictions": r"reads a per-user soft prompt: pass --predictions, the train split's",
                    "grounding": r"only --mode rerank hands each prompt"}[case]
        with pytest.raises(DelrecError, match=expected):
            export_teacher(config, HFOptions(device="cpu", batch_size=4))
        return
    folder = export_teacher(config, HFOptions(device="cpu", batch_size=4))
    teacher = json.loads((folder / "teacher.json").read_text())
    assert teacher["source"]["kind"] == "llm-rerank" and teacher["source"]["model"]["soft_prompt"]
