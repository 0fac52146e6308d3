"""Which torch device a command runs on: one rule for every command (SR, LLM, serving)."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch

from delrec.errors import DelrecError

BFLOAT16_MIN_SPEEDUP = 1.5
CPU_BFLOAT16_ENV = "DELREC_CPU_BFLOAT16"


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


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """Run the block with `n` torch CPU threads (0 or None: the current count), then put back the count it found.

    Why: tests and the pipeline run several commands in one process, so a command's thread count must not leak into
    the next; the count is put back even where the block itself changed it, or raised."""
    threads = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def cpu_bfloat16_speedup() -> float:
    """How many times faster this CPU multiplies bfloat16 matrices than float32 ones, measured (~0.1 s, once).

    Why measure: the same machine kind has come with an AMD EPYC whose avx512_bf16 runs bfloat16 GEMMs at 3.3x
    its float32 rate and with an Intel Xeon without it, where bfloat16 runs at a fifth of float32; no flag says
    which, a GEMM at the LLMs' shapes (a token block through an MLP matrix) does."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 2048, dtype=dtype)
        a @ b  # warm-up: kernels are chosen and packed on the first call
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        rates[dtype] = 1.0 / best
    return rates[torch.bfloat16] / rates[torch.float32]


def cpu_prefers_bfloat16() -> bool:
    """Whether bfloat16 compute pays on this CPU: its measured GEMM rate beats float32's by a margin (1.5x) that
    covers the casts and the elementwise work bfloat16 does not speed up. `DELREC_CPU_BFLOAT16=1` or `0` decides
    instead of the measurement (the test suite sets 0, so its results do not depend on the CPU it runs on)."""
    forced = os.environ.get(CPU_BFLOAT16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise DelrecError(f"${CPU_BFLOAT16_ENV}={forced!r}: expected 1 (use bfloat16 on CPU), 0 (float32) or unset "
                          "(measure)")
    return cpu_bfloat16_speedup() >= BFLOAT16_MIN_SPEEDUP


# --- the processes of a launch -------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPosition:
    """This process's place in a launch: `index` of `count` processes, `local` on its machine."""

    index: int = 0
    count: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.index == 0

    def claim_gpus(self, per_process: int) -> None:
        """Leave this process only its own `per_process` GPUs (CUDA_VISIBLE_DEVICES), before a vLLM engine starts:
        the engine takes the first visible GPUs whatever LOCAL_RANK says, so a launch's engines would share one."""
        if self.count == 1:
            return
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        first = self.local * per_process
        if visible and first + per_process > len(visible):
            raise DelrecError(f"process {self.local} on this machine needs GPUs {first}..{first + per_process - 1} "
                              f"(--tensor_parallel_size {per_process} each), but CUDA_VISIBLE_DEVICES shows "
                              f"{len(visible)}; launch fewer processes or lower --tensor_parallel_size")
        ids = range(first, first + per_process)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if visible else str(i) for i in ids)


def launch_position() -> LaunchPosition:
    """This process's place among those `accelerate launch` (torchrun) started: RANK of WORLD_SIZE, LOCAL_RANK on
    its machine; one process alone where they are not set."""
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = os.environ.get(name, "").strip()
        if text and not text.isdigit():
            raise DelrecError(f"${name}={text!r}: expected a process number, as accelerate launch and torchrun set it")
        numbers[name] = int(text) if text else 0
    count, index = max(numbers["WORLD_SIZE"], 1), numbers["RANK"]
    if index >= count:
        raise DelrecError(f"$RANK={index} is not below $WORLD_SIZE={count}: not a process of a launch")
    return LaunchPosition(index, count, numbers["LOCAL_RANK"])
