"""The candidates of one instance as a prefix tree of token ids, for constrained decoding.

Each candidate is its completion ids (title + EOS, `encode_completion`), so the leaves are exactly
the candidates and a decoding that follows the tree always ends on a candidate title. Identical
id sequences share one leaf, listed lower candidate index first. Torch-free, so any backend's
constrained decoding can walk it.

The beam search over it is the same for every backend, which only differs in how it gets the
next-token log-probabilities: each step, every live `Beam` is extended by each child token of its
node; `prune` keeps each prompt's `num_beams` best extensions (ties: lower candidate index), and a
kept beam that reaches a leaf is finished (it takes its slot: fewer beams stay live); the search
ends when no beam is live, and `ranked` lists the finished candidates best first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence


@dataclass
class TrieNode:
    children: dict[int, "TrieNode"] = field(default_factory=dict)
    leaves: list[int] = field(default_factory=list)  # candidate indices ending here (a node after EOS)
    first: int = 0  # lowest candidate index below this node: the tie-break


def build_trie(completions: Sequence[Sequence[int]]) -> TrieNode:
    """The prefix tree of one instance's candidate completions (each ends with EOS)."""
    root = TrieNode(first=0)
    for index, ids in enumerate(completions):
        node = root
        for token in ids:
            node = node.children.setdefault(token, TrieNode(first=index))
        node.leaves.append(index)
    return root


@dataclass
class Beam:
    owner: int  # which prompt of the batch
    node: TrieNode
    score: float  # summed log-probability of `tokens`
    tokens: tuple[int, ...] = ()
    parent: int = -1  # row of the beam it extends in the previous step (-1: a root)

    def extend(self, token: int, logprob: float, row: int) -> "Beam":
        return Beam(self.owner, self.node.children[token], self.score + logprob, (*self.tokens, token), row)


Finished = list[list[tuple[float, int, list[int]]]]  # per prompt: (score, tie-break, candidate indices)


def prune(extensions: Iterable[Beam], num_beams: int, finished: Finished) -> list[Beam]:
    """The live beams of the next step: per prompt the `num_beams` best extensions, less those that
    finished (moved to `finished`)."""
    by_owner: dict[int, list[Beam]] = {}
    for beam in extensions:
        by_owner.setdefault(beam.owner, []).append(beam)
    live = []
    for options in by_owner.values():
        for beam in sorted(options, key=_best_first)[:num_beams]:
            if beam.node.leaves:
                finished[beam.owner].append((beam.score, beam.node.first, beam.node.leaves))
            else:
                live.append(beam)
    return live


def _best_first(beam: Beam) -> tuple[float, int]:
    """Sort key: higher score first, ties to the lower candidate index. A NaN score sorts first, so its beam is kept
    and finishes with it, and the ranking refuses it (`delrec.ranking.base.refuse_non_finite`) instead of the
    search pruning it silently (NaN compares false with everything, so sorting would place it anywhere)."""
    return (-math.inf if math.isnan(beam.score) else -beam.score, beam.node.first)


def ranked(finished: Finished) -> list[list[tuple[int, float]]]:
    """Per prompt: the finished candidates, best first, as (candidate index, summed log-probability)."""
    return [
        [(index, score) for score, _, leaves in sorted(done, key=lambda f: (-f[0], f[1])) for index in leaves]
        for done in finished
    ]


def beam_search(
    tries: Sequence[TrieNode], num_beams: int, next_logprobs: Callable[[list[Beam]], list[dict[int, float]]]
) -> list[list[tuple[int, float]]]:
    """The search over each prompt's trie, for backends that answer a whole step at once: `next_logprobs`
    gives, for each live beam, the log-probability of each child token of its node."""
    beams = [Beam(owner, root, 0.0) for owner, root in enumerate(tries)]
    finished: Finished = [[] for _ in tries]
    while beams:
        extensions = (beam.extend(token, values[token], row)
                      for row, (beam, values) in enumerate(zip(beams, next_logprobs(beams)))
                      for token in beam.node.children)
        beams = prune(extensions, num_beams, finished)
    return ranked(finished)
