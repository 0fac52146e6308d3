"""An SR model compiled ahead of time for serving: the top-K of one user in about a tenth of a millisecond.

Why: in eager torch one user per call costs ~0.6 ms, and most of it is Python and per-operator
dispatch, not arithmetic (benchmarks/RESULTS.md). `torch.export` + AOTInductor turn the whole
answer (encode -> product with the item table -> history exclusion -> top-K) into one C++ graph
with fused kernels, loaded from a `.pt2` package and called without Python in the loop.

    delrec sr compile --model runs/student --topk 20       # runs/student/compiled/top20.pt2 (+ top20.json)
    fast = CompiledTopK.load("runs/student", topk=20)
    fast.top_items(histories)                             # == top_items(model, histories, 20, True, ...)

The graph takes the last `context_length` items of each history (left-padded) and, for the
exclusion, every history item (padded to the longest); the batch size is free. A package is
tied to the weights and the torch that built it: its sidecar JSON records the weights' SHA-256
and the torch version, and loading refuses a stale or foreign package with the command that
remakes it. Compiling needs a C++ compiler (the one torch.compile uses); serving does not.

A package is native code (a shared library the loader maps and runs, like a pickle in that
respect): the sidecar also records the package's own SHA-256 when it is compiled, and loading
refuses a package whose bytes differ, so a swapped `.pt2` in a shared folder does not run. It
protects against a package replaced on its own; whoever can rewrite both files is trusted
(docs/security.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from delrec.errors import DelrecError
from delrec.headers import SR_MODEL_WEIGHTS_FILE, FieldRule, Header, positive_int
from delrec.io import atomic_write, make_parents, sha256_file, write_json
from delrec.metrics import exclude_history_
from delrec.sr.base import SequentialRecommender, load_model, pad_histories
from delrec.sr.evaluate import ranked_pairs

COMPILED_DIR = "compiled"
COMPILED_KIND = "delrec-compiled-top-k"
COMPILED_VERSION = 2  # 2: package_sha256
COMPILED_HEADER = Header(
    "delrec compiled top-K description", "kind", COMPILED_KIND, COMPILED_VERSION, "re-run `delrec sr compile`",
    fields={"topk": FieldRule(positive_int, "a positive integer"),
            "context_length": FieldRule(positive_int, "a positive integer"),
            "num_items": FieldRule(positive_int, "a positive integer"),
            "exclude_history": FieldRule(lambda v: isinstance(v, bool), "true or false"),
            "weights_sha256": FieldRule(lambda v: isinstance(v, str), "a hex digest"),
            "package_sha256": FieldRule(lambda v: isinstance(v, str), "a hex digest"),
            "torch_version": FieldRule(lambda v: isinstance(v, str), "a version string")},
)
MAX_BATCH = 1 << 16
CHECK_HISTORIES = 8  # random histories the fresh package must rank exactly as the eager model does


class TopKGraph(nn.Module):
    """What gets compiled: (recent [B, context_length], seen [B, S]) -> (scores [B, k], items [B, k]).

    Excluded items score -inf, as in `delrec.sr.evaluate.top_k` (an excluded or padding slot can
    only be returned, with -inf, when fewer than k items remain). Scores are laid out in blocks of
    `BLOCK`, padded with -inf (the pad id of `seen` falls in the padding), for two savings measured
    in benchmarks/RESULTS.md: models that score with the base `encode . item table` get one product
    with the transposed, padded table plus a -inf bias on the padding, so nothing is copied; and
    the top-K is exact but two-level on large catalogues: the k blocks with the highest maxima hold
    every top-k item (each holds one at least as high as the k-th score, and at most k blocks can),
    so topk runs over N/BLOCK maxima and k*BLOCK scores instead of over N."""

    BLOCK = 64

    def __init__(self, model: SequentialRecommender, topk: int, exclude_history: bool):
        super().__init__()
        self.model = model
        self.topk = topk
        self.exclude_history = exclude_history
        self.num_items = model.num_items
        self.blocks = -(-(model.num_items + 1) // self.BLOCK)  # + 1: a column for the pad id
        width = self.blocks * self.BLOCK
        if type(model).score_all is SequentialRecommender.score_all:
            table = model.item_embeddings().detach()
            self.register_buffer("item_table_t", F.pad(table.T, (0, width - self.num_items)).contiguous())
            padding = torch.zeros(width, dtype=table.dtype, device=table.device)
            padding[self.num_items:] = float("-inf")
            self.register_buffer("padding_bias", padding)
        else:
            self.item_table_t = self.padding_bias = None

    def padded_scores(self, recent: torch.Tensor) -> torch.Tensor:
        """[B, blocks * BLOCK]: the catalogue's scores, then -inf."""
        if self.item_table_t is None:
            scores = self.model.score_all(recent)
            return F.pad(scores, (0, self.blocks * self.BLOCK - self.num_items), value=float("-inf"))
        return torch.addmm(self.padding_bias, self.model.encode(recent), self.item_table_t)

    def forward(self, recent: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.padded_scores(recent)
        if self.exclude_history:
            scores = scores.scatter(1, seen, float("-inf"))
        k, block = self.topk, self.BLOCK
        if self.blocks <= 4 * k:
            values, items = scores.topk(k, dim=1)
        else:
            tiles = scores.view(scores.shape[0], self.blocks, block)
            best = tiles.amax(2).topk(k, dim=1).indices  # [B, k] block numbers
            candidates = tiles.gather(1, best[..., None].expand(-1, -1, block)).flatten(1)
            values, position = candidates.topk(k, dim=1)
            items = best.gather(1, position // block) * block + position % block
        return values, items.clamp(max=self.num_items - 1)


def _inductor():
    """torch._inductor, imported on first use: it takes a second, and training never needs it."""
    import torch._inductor

    return torch._inductor


def package_path(folder: str | Path, topk: int, exclude_history: bool = True) -> Path:
    suffix = "" if exclude_history else "-keep-history"
    return Path(folder) / COMPILED_DIR / f"top{topk}{suffix}.pt2"


def weights_digest(folder: str | Path) -> str:
    return sha256_file(Path(folder) / SR_MODEL_WEIGHTS_FILE)


def graph_inputs(histories: Sequence[Sequence[int]], num_items: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(recent, seen) for the graph; item ids are checked here, since the compiled graph cannot."""
    if not histories:
        raise DelrecError("no histories to rank")
    flat = [i for h in histories for i in h]
    if flat and (min(flat) < 0 or max(flat) >= num_items):
        raise DelrecError(f"history item ids must be in 0..{num_items - 1}, found {min(flat)}..{max(flat)}")
    recent = pad_histories(histories, num_items, context, min_length=context)
    if context >= 2 and max(len(h) for h in histories) <= context:
        return recent, recent  # every item is in the context: nothing older to exclude
    seen = pad_histories(histories, num_items, min_length=2)  # 2: export would fix a width-1 dimension
    return recent, seen


def compile_top_k(folder: str | Path, topk: int = 20, exclude_history: bool = True, announce: bool = False) -> Path:
    """Compile the model folder's top-K into `folder/compiled/`, check it against the eager model, and
    return the package path. Both files are written atomically, the description last. `announce`
    says on stderr that the (half-minute) compilation has started."""
    folder = Path(folder)
    model = load_model(folder)
    if not 1 <= topk <= model.num_items:
        raise DelrecError(f"--topk {topk} must be between 1 and the catalogue size ({model.num_items} items)")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    graph = TopKGraph(model, topk, exclude_history).eval()
    generator = torch.Generator().manual_seed(0)
    longest = model.context_length + 3  # one at least: the exclusion must reach past the context
    lengths = [*torch.randint(1, longest + 1, (CHECK_HISTORIES - 1,), generator=generator).tolist(), longest]
    histories = [torch.randint(0, model.num_items, (n,), generator=generator).tolist() for n in lengths]
    example = graph_inputs(histories, model.num_items, model.context_length)
    batch, seen = torch.export.Dim("batch", min=1, max=MAX_BATCH), torch.export.Dim("seen", min=2, max=1 << 20)
    out = package_path(folder, topk, exclude_history)
    make_parents(out)
    if announce:
        print(f"compiling {folder} ({model.model_type}, top-{topk}) with AOTInductor, about half a minute ...",
              file=sys.stderr, flush=True)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".compile-") as scratch, torch.inference_mode():
        staged = Path(scratch) / out.name
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own pytree deprecations
                warnings.filterwarnings("ignore", message=".*assigned during export")  # nn.GRU's flat weights
                program = torch.export.export(graph, example, dynamic_shapes={"recent": {0: batch},
                                                                              "seen": {0: batch, 1: seen}})
                _inductor().aoti_compile_and_package(program, package_path=str(staged))
        except Exception as exc:  # inductor raises many types; the first line says what failed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DelrecError(f"{folder}: AOTInductor could not compile the model ({first}); compiling needs a C++ "
                              "compiler (g++ or clang++ on PATH, or CXX) and the torch that will serve it") from None
        compiled = CompiledTopK(_inductor().aoti_load_package(str(staged)), _description(model, folder, topk,
                                                                                            exclude_history), out)
        if not _agrees(compiled, model, histories):
            raise DelrecError(f"{folder}: the compiled graph ranks differently from the eager model on random "
                              "histories; nothing was written (please report this with the model folder)")
        with atomic_write(out, "wb") as handle:
            handle.write(staged.read_bytes())
    write_json(out.with_suffix(".json"), {**compiled.description, "package_sha256": sha256_file(out),
                                          "compile_seconds": round(time.perf_counter() - began, 1)})
    return out


def _agrees(compiled: "CompiledTopK", model: SequentialRecommender, histories: list[list[int]]) -> bool:
    """The compiled top-K values are the eager model's, and each returned item has the returned score
    (checked by score, so that the order of tied items, which no kernel promises, does not matter).
    The random histories are short enough to leave k items; the tests cover the other case."""
    items, scores = compiled.top_k(histories)
    with torch.inference_mode():
        reference = model.score_all(pad_histories(histories, model.pad_id, model.context_length))
    if compiled.exclude_history:
        exclude_history_(reference, histories)
    expected = reference.topk(compiled.topk, dim=1).values
    rankable = scores != float("-inf")  # the -inf slots (fewer than k items left) name no item
    return (torch.allclose(scores, expected, atol=1e-5)
            and torch.allclose(reference.gather(1, items)[rankable], scores[rankable], atol=1e-5))


def _description(model: SequentialRecommender, folder: Path, topk: int, exclude_history: bool) -> dict:
    return {"kind": COMPILED_KIND, "format_version": COMPILED_VERSION, "model_type": model.model_type,
            "num_items": model.num_items, "context_length": model.context_length, "topk": topk,
            "exclude_history": exclude_history, "weights_sha256": weights_digest(folder),
            "torch_version": torch.__version__}


class CompiledTopK:
    """A loaded package: `top_k` and `top_items` as in `delrec.sr.evaluate`, for any batch size."""

    def __init__(self, package, description: dict, path: Path):
        # the package's loader, called with the flat inputs: `AOTICompiledModel.__call__` re-parses its
        # input/output specs (JSON) on every call, ~20 of ~100 us for one user
        self.run = package.loader.run
        self.description = description
        self.path = path
        self.topk = description["topk"]
        self.exclude_history = description["exclude_history"]
        self.num_items = description["num_items"]
        self.context_length = description["context_length"]

    @classmethod
    def load(cls, folder: str | Path, topk: int = 20, exclude_history: bool = True) -> "CompiledTopK":
        """The package compiled from model folder `folder`; a `DelrecError` saying what to re-run if it is
        missing, stale (the weights changed since) or built by another torch."""
        folder = Path(folder)
        path = package_path(folder, topk, exclude_history)
        remake = (f"run `delrec sr compile --model {folder} --topk {topk}"
                  f"{'' if exclude_history else ' --keep_history true'}`")
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise DelrecError(f"{folder}: no compiled top-{topk} graph ({path} is missing); {remake}")
        description = COMPILED_HEADER.read(path.with_suffix(".json"))
        if description["torch_version"] != torch.__version__:
            raise DelrecError(f"{path}: compiled with torch {description['torch_version']}, this is torch "
                              f"{torch.__version__} (packages do not carry over); {remake}")
        if description["weights_sha256"] != weights_digest(folder):
            raise DelrecError(f"{path}: compiled from other weights than {folder / SR_MODEL_WEIGHTS_FILE} "
                              f"(the model changed since); {remake}")
        if description["package_sha256"] != sha256_file(path):
            raise DelrecError(f"{path}: not the package {path.with_suffix('.json').name} records (its SHA-256 "
                              f"differs); a package is native code, so it was not loaded; {remake}")
        return cls(_inductor().aoti_load_package(str(path)), description, path)

    def top_k(self, histories: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, k] items, [R, k] scores), best first; excluded items score -inf."""
        with torch.inference_mode():
            scores, items = self.run(list(graph_inputs(histories, self.num_items, self.context_length)))
        return items, scores

    def top_items(self, histories: Sequence[Sequence[int]]) -> list[list[tuple[int, float]]]:
        """Per history: the top-K (item, score) pairs, excluded items dropped."""
        return ranked_pairs(*self.top_k(histories))
