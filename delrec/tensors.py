"""Checks on tensors that the SR and the LLM stacks share (torch is imported where a check runs)."""

from __future__ import annotations

from typing import Any, Iterable


def first_nonfinite(tensors: Iterable[tuple[str, Any]]) -> tuple[str, int] | None:
    """`(name, count)` of the first floating-point tensor among `(name, tensor)` pairs that holds NaN or inf values;
    None when all are finite. Weights with such values score NaN, which has no order: loading or training refuses
    them rather than ranking, writing, serving or exporting what they compute.

    A tensor's sum is non-finite when any value is (NaN and inf propagate); only then, since finite values can also
    overflow a sum, are its values counted. Gemma 3 270M, one core: 0.03 s (bfloat16) to 0.1 s (float32) per pass
    over its 268M weights, against 1.1 to 1.8 s for `isfinite(tensor).all()` on each."""
    import torch

    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                return name, count
    return None
