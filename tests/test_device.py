"""`delrec.device.torch_threads`: a command's thread count must not leak into the next one run in the process."""

import pytest
import torch

from delrec.device import torch_threads


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
