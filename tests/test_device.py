"""`delrec.device`: a command's thread count must not leak into the next one run in the process; a process reads its
place in a launch (and its GPUs) from the variables `accelerate launch` and torchrun set."""

import os

import pytest
import torch

from delrec.device import LaunchPosition, launch_position, torch_threads
from delrec.errors import DelrecError


def test_sets_the_count_and_puts_back_the_one_it_found():
    torch.set_num_threads(1)
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1


def test_puts_the_count_back_when_the_block_raises():
    torch.set_num_threads(1)
    with pytest.raises(KeyError):
        with torch_threads(2):
            raise KeyError("boom")
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("n", [0, None])
def test_zero_or_none_keeps_the_count(n):
    torch.set_num_threads(2)
    try:
        with torch_threads(n):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("n", [0, 3])
def test_a_count_the_block_sets_itself_does_not_leak(n):
    torch.set_num_threads(1)
    with torch_threads(n):
        torch.set_num_threads(2)  # as a command that sets threads without putting them back
    assert torch.get_num_threads() == 1


def test_the_launch_position_is_read_from_torchruns_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_position() == LaunchPosition(0, 1, 0) and launch_position().main
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert launch_position() == LaunchPosition(1, 4, 1) and not launch_position().main
    monkeypatch.setenv("RANK", "0")
    assert launch_position().main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DelrecError, match=r"\$RANK=4 is not below \$WORLD_SIZE=4"):
        launch_position()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(DelrecError, match=r"\$RANK='one': expected a process number"):
        launch_position()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DelrecError, match=r"\$WORLD_SIZE='two': expected a process number"):
        launch_position()


def test_each_process_of_a_launch_claims_its_own_gpus_for_vllm(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    LaunchPosition(0, 1, 0).claim_gpus(2)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # one process keeps what it sees
    LaunchPosition(1, 2, 1).claim_gpus(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    LaunchPosition(3, 4, 1).claim_gpus(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    with pytest.raises(DelrecError, match=r"needs GPUs 2..3 \(--tensor_parallel_size 2 each\), but CUDA_VISIBLE_"):
        LaunchPosition(1, 2, 1).claim_gpus(2)
