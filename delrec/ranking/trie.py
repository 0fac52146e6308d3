"""The candidates of one instance as a prefix tree of token ids, for constrained decoding.

Each candidate is its completion ids (title + EOS, `encode_completion`), so the leaves are exactly
the candidates and a decoding that follows the tree always ends on a candidate title. Identical
id sequences share one leaf, listed lower candidate index first. Torch-free, so any backend's
constrained decoding can walk it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


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
