"""The harness itself must fail loudly: an exception on one rank, or a hang, is a failed test, not a stuck suite."""
import time

import pytest
import torch.distributed as dist

from harness import run_distributed


def _raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    return dist.get_rank()


def _hang_on_rank_1():
    if dist.get_rank() == 1:
        time.sleep(3600)
    return dist.get_rank()


def test_results_come_back_in_rank_order():
    assert run_distributed(dist.get_rank, 3) == [0, 1, 2]


def test_exception_on_a_rank_is_raised_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*boom on rank 1"):
        run_distributed(_raise_on_rank_1, 2)


def test_hang_fails_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer from ranks \[1\]"):
        run_distributed(_hang_on_rank_1, 2, timeout=3)
    assert time.monotonic() - t0 < 20
