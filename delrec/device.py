"""Which torch device a command runs on: one rule for every command (SR, LLM, serving)."""

from __future__ import annotations

import os

import torch

from delrec.errors import DelrecError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` (or None) -> CUDA when available, else CPU; `cuda` without CUDA is a one-line error.

    A bare `cuda` follows LOCAL_RANK, so each process of an `accelerate launch` takes its own GPU.
    """
    if isinstance(name, torch.device):
        return name
    name = "auto" if name is None else str(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name != "auto" and not name.startswith("cuda"):
        raise DelrecError(f"unknown device '{name}'; expected auto, cpu or cuda")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        raise DelrecError(f"--device {name} was requested but CUDA is not available (torch {torch.__version__}, "
                          f"{build}); use --device cpu or auto")
    if name in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return torch.device(name)
    except RuntimeError:
        raise DelrecError(f"unknown device '{name}'; expected auto, cpu, cuda or cuda:N") from None
