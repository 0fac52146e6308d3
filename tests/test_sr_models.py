"""SR models: the uniform interface, causal states, overfitting, model folders, the embedding seam."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from delrec.data.prepare import prepare_dataset
from delrec.data.preprocess import PreprocessConfig
from delrec.data.synthetic import make_synthetic
from delrec.errors import DelrecError
from delrec.sr import (
    CaserConfig,
    GRU4RecConfig,
    ItemEmbedding,
    PopConfig,
    SASRecConfig,
    TrainConfig,
    build_model,
    evaluate_full,
    load_model,
    model_class,
    pad_histories,
    train_sr,
)

NUM_ITEMS = 40
TINY = {
    "sasrec": SASRecConfig(hidden_size=16, num_layers=2, num_heads=2, inner_size=32, dropout=0.1, max_length=12),
    "gru4rec": GRU4RecConfig(hidden_size=16, gru_size=24, num_layers=2, dropout=0.1, max_length=12),
    "caser": CaserConfig(hidden_size=16, window=3, num_horizontal=4, num_vertical=2, dropout=0.1, max_length=12),
}
CASER_2_TO_L = CaserConfig(hidden_size=16, window=4, min_height=2, num_horizontal=4, num_vertical=2, max_length=12)
SASREC_1_BLOCK = SASRecConfig(hidden_size=16, num_layers=1, num_heads=2, inner_size=32, dropout=0.1, max_length=12)
OTHER_SHAPES = {"caser 2..L": CASER_2_TO_L, "sasrec 1 block": SASREC_1_BLOCK}  # encode's other code paths


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    raw = make_synthetic(num_users=80, num_items=30, min_length=8, max_length=14, seed=1, follow_prob=1.0)
    return prepare_dataset(raw, PreprocessConfig(num_candidates=10), tmp_path_factory.mktemp("tiny") / "data")


def random_histories(generator, batch=5, max_len=9):
    lengths = torch.randint(1, max_len + 1, (batch,), generator=generator).tolist()
    return [torch.randint(0, NUM_ITEMS, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(TINY))
def test_interface_shapes_and_consistency(name):
    torch.manual_seed(0)
    model = build_model(TINY[name], NUM_ITEMS).eval()
    generator = torch.Generator().manual_seed(1)
    histories = random_histories(generator)
    seqs = pad_histories(histories, model.pad_id)
    d = model.item_embeddings().shape[1]
    assert model.item_embeddings().shape == (NUM_ITEMS, d)
    with torch.no_grad():
        states = model.sequence_states(seqs)
        assert states.shape == (*seqs.shape, d)
        encoded = model.encode(seqs)
        scores = model.score_all(seqs)
        items = torch.randint(0, NUM_ITEMS, (len(histories), 7), generator=generator)
        picked = model.score_items(seqs, items)
    assert encoded.shape == (len(histories), d) and scores.shape == (len(histories), NUM_ITEMS)
    torch.testing.assert_close(picked, scores.gather(1, items))
    torch.testing.assert_close(encoded, states[:, -1])


@pytest.mark.parametrize("name", [*TINY, *OTHER_SHAPES])
def test_states_are_causal_and_independent_of_padding(name):
    """State at position t of a padded batch = encode of the prefix ending at t, alone."""
    torch.manual_seed(0)
    model = build_model(TINY.get(name) or OTHER_SHAPES[name], NUM_ITEMS).eval()
    histories = random_histories(torch.Generator().manual_seed(2))
    seqs = pad_histories(histories, model.pad_id, min_length=11)  # extra left padding
    with torch.no_grad():
        states = model.sequence_states(seqs)
        for row, history in enumerate(histories):
            for t in range(1, len(history) + 1):
                alone = model.encode(pad_histories([history[:t]], model.pad_id))
                column = seqs.shape[1] - len(history) + t - 1
                torch.testing.assert_close(states[row, column], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [TINY["sasrec"], SASREC_1_BLOCK], ids=["2 blocks", "1 block"])
def test_sasrec_encode_computes_the_last_row_of_the_full_states(config):
    """`encode` runs the last block on the last query only; it must equal the full pass, pads and
    an empty (all-pad) history included."""
    torch.manual_seed(0)
    model = build_model(config, NUM_ITEMS).eval()
    seqs = pad_histories([[3, 7, 1], [], [5]], model.pad_id, min_length=4)
    with torch.no_grad():
        encoded, states = model.encode(seqs), model.sequence_states(seqs)
    assert torch.isfinite(encoded).all()
    torch.testing.assert_close(encoded, states[:, -1])


@pytest.mark.parametrize("name", list(TINY))
def test_each_model_overfits_a_tiny_synthetic_set(name, tiny_dataset, tmp_path):
    """Deterministic successors (follow_prob=1): a model that fits them ranks the next item first."""
    config = TrainConfig(epochs=25, lr=0.02, batch_size=16, patience=0, progress=False, seed=0)
    result = train_sr(tiny_dataset, TINY[name], config, tmp_path / name)
    losses = [entry["loss"] for entry in result.log]
    assert losses[-1] < 0.2 * losses[0], losses
    train = evaluate_full(result.model, tiny_dataset.instances("train"))
    assert train["hr@1"] > 0.7, train  # chance: 1/30; the data allow ~0.9 (some items have two successors)


@pytest.mark.parametrize("name", [*TINY, "pop"])
def test_save_and_load_give_bit_identical_scores(name, tiny_dataset, tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY.get(name, PopConfig()), tiny_dataset.num_items, tiny_dataset.fingerprint)
    if name == "pop":
        model.fit(inst.history for inst in tiny_dataset.instances("train"))
    else:
        with torch.no_grad():  # move away from the initial values, so that loading must restore them
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
            model.item_embedding.weight[model.pad_id].zero_()
    model.eval()
    folder = model.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == name and config["num_items"] == tiny_dataset.num_items
    assert config["format_version"] == 1 and config["dataset_fingerprint"] == tiny_dataset.fingerprint
    loaded = load_model(folder)
    assert type(loaded) is type(model) and not loaded.training
    histories = pad_histories([inst.history for inst in tiny_dataset.instances("test")], model.pad_id, 12)
    items = torch.tensor(tiny_dataset.candidates("test"))
    with torch.no_grad():
        assert torch.equal(model.score_all(histories), loaded.score_all(histories))
        assert torch.equal(model.score_items(histories, items), loaded.score_items(histories, items))


def _write_config(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def test_loading_a_folder_of_another_kind_is_a_one_line_error(tmp_path):
    model = build_model(TINY["sasrec"], NUM_ITEMS)
    good = model.save_pretrained(tmp_path / "good")
    good_config = json.loads((good / "config.json").read_text())
    cases = {
        "missing": (tmp_path / "nope", "model folder not found"),
        "hf": (_write_config(tmp_path / "hf", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
               "Hugging Face model folder .*'llama'.*not a delrec SR model"),
        "version": (_write_config(tmp_path / "v2", {**good_config, "format_version": 2}),
                    "SR model format version 2, this delrec reads 1"),
        "no weights": (_write_config(tmp_path / "noweights", good_config), "model.safetensors is missing"),
        "bad key": (_write_config(tmp_path / "badkey", {**good_config, "hiden_size": 3}),
                    "unknown key 'hiden_size'; did you mean 'hidden_size'"),
    }
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    cases["peft"] = (tmp_path / "peft", "not an SR model folder, it is a PEFT adapter folder")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    cases["dataset"] = (tmp_path / "data", "it is a prepared dataset folder")
    for name, (folder, message) in cases.items():
        with pytest.raises(DelrecError, match=message) as info:
            load_model(folder)
        assert "\n" not in str(info.value), name
    shrunk = build_model(SASRecConfig(hidden_size=8, num_heads=2), NUM_ITEMS).save_pretrained(tmp_path / "mixed")
    (shrunk / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(DelrecError, match="weights do not match config.json"):
        load_model(shrunk)
    with pytest.raises(DelrecError, match="unknown model 'bert4rec'; expected one of: sasrec, gru4rec, caser, pop"):
        model_class("bert4rec")


class ProjectedEmbedding(nn.Module):
    """A DLLM2Rec-style seam user: e_i = b_i + alpha * (W z_i + c) with a frozen teacher z."""

    def __init__(self, base: ItemEmbedding, teacher: torch.Tensor, alpha: float):
        super().__init__()
        self.base, self.alpha = base, alpha
        self.project = nn.Linear(teacher.shape[1], base.embedding_dim)
        self.register_buffer("teacher", teacher)

    def table(self):
        return self.base.table() + self.alpha * self.project(self.teacher)

    def forward(self, ids):
        padded = torch.cat([self.table(), torch.zeros_like(self.table()[:1])])
        return padded[ids]


@pytest.mark.parametrize("name", list(TINY))
def test_item_embedding_seam_can_be_wrapped_then_baked(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY[name], NUM_ITEMS).eval()
    histories = pad_histories(random_histories(torch.Generator().manual_seed(3)), model.pad_id)
    with torch.no_grad():
        before = model.score_all(histories)
        model.item_embedding = ProjectedEmbedding(model.item_embedding, torch.randn(NUM_ITEMS, 7), alpha=0.3)
        wrapped = model.score_all(histories)
    assert not torch.allclose(before, wrapped)  # the wrapper feeds both input and output
    with pytest.raises(ValueError, match="bake_item_embedding"):
        model.save_pretrained(tmp_path / "m")
    model.bake_item_embedding()
    assert type(model.item_embedding) is ItemEmbedding
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(histories), wrapped)
        torch.testing.assert_close(load_model(model.save_pretrained(tmp_path / "m")).score_all(histories), wrapped)


def test_sr_package_never_imports_the_llm_stack():
    code = (
        "import sys, delrec.sr, delrec.sr.trainer, delrec.sr.evaluate; "
        "bad = [m for m in ('transformers', 'peft', 'trl', 'vllm') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"delrec.sr imported {result.stdout.strip()} {result.stderr[-300:]}"


def test_caser_all_positions_trick_equals_the_papers_window_convolutions():
    torch.manual_seed(0)
    model = build_model(CASER_2_TO_L, NUM_ITEMS).eval()
    window, d = CASER_2_TO_L.window, CASER_2_TO_L.hidden_size
    histories = [[3, 7], [1, 2, 3, 4, 5, 6], [9]]
    with torch.no_grad():
        got = model.encode(pad_histories(histories, model.pad_id))
        for row, history in enumerate(histories):
            recent = history[-window:]
            W = torch.zeros(window, d)  # the last L item embeddings, zero rows where items are missing
            W[window - len(recent):] = model.item_embeddings()[recent]
            horizontal = []
            for height, conv in zip(model.heights, model.horizontal):
                kernel = conv.weight.permute(0, 2, 1)  # [filters, h, d]
                values = torch.stack([(kernel * W[o:o + height]).sum((1, 2)) + conv.bias for o in range(window - height + 1)])
                horizontal.append(torch.relu(values).max(0).values)
            vertical = model.vertical.weight[:, 0, :] @ W + model.vertical.bias[:, None]  # [n_v, d]
            expected = torch.relu(model.fc(torch.cat([vertical.flatten(), *horizontal])))
            torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
