"""Top-K over the whole catalogue per user: the student timed here, the LLM teacher by its export.

The student is loaded and warmed up before its median of repeats is taken; the LLM's time is the one its
teacher export recorded over every training instance, model loading excluded.
"""

from __future__ import annotations

import time


def student_latency(model, histories: list[list[int]], num_items: int, topk: int, repeats: int, name: str) -> dict:
    """The K actually used (no more than every history leaves rankable) and the student's median time."""
    import torch

    from delrec.sr.evaluate import top_k

    k = min(topk, num_items - max(len(set(h)) for h in histories))
    top_k(model, histories, k, True, len(histories), False)  # warm-up
    timings = []
    for _ in range(repeats):
        began = time.perf_counter()
        top_k(model, histories, k, True, len(histories), False)
        timings.append(time.perf_counter() - began)
    seconds = sorted(timings)[len(timings) // 2]
    return {
        "topk": k,
        "student": {"name": name, "users": len(histories), "seconds": seconds,
                    "ms_per_user": 1000 * seconds / len(histories), "device": "cpu",
                    "threads": torch.get_num_threads(), "repeats": repeats},
        "llm": None,
    }


def add_teacher_latency(result: dict, teacher: str, info: dict) -> None:
    """Add the LLM teacher's time per user from its teacher.json `info`, and how many times slower it is;
    nothing when its export recorded no time."""
    if not info.get("seconds"):
        return
    source = info.get("source") or {}
    result["llm"] = {"teacher": teacher, "kind": source.get("kind"), "users": info["num_instances"],
                     "seconds": info["seconds"], "ms_per_user": 1000 * info["seconds"] / info["num_instances"],
                     "backend": source.get("backend")}
    result["ratio"] = result["llm"]["ms_per_user"] / result["student"]["ms_per_user"]
