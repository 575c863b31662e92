"""The harness itself must fail loudly: an exception on one rank, or a hang, is a failed test, not a stuck suite."""
import time

import pytest
import torch
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


def _old_ring_exchange():
    """The ring step collectives.py used to make: isend to the next rank, then irecv from the previous one, as two
    separate calls. gloo buffers the send; NCCL may block it until the next rank posts its receive, which it never
    does, being blocked in its own send."""
    r, n = dist.get_rank(), dist.get_world_size()
    incoming = torch.empty(1)
    sending = dist.isend(torch.full((1,), float(r)), (r + 1) % n)
    receiving = dist.irecv(incoming, (r - 1) % n)
    receiving.wait()
    sending.wait()
    return incoming.item()


def _safe_exchanges():
    """Two NCCL-safe patterns: the ring step as one batch (P2POp checks its op against torch's own isend/irecv:
    the emulation's must pass), and blocking send/recv on a subgroup in an order that is safe when sends block
    (group ranks must be mapped to global ones to match the peer's announcement)."""
    r, n = dist.get_rank(), dist.get_world_size()
    incoming = torch.empty(1)
    ops = [dist.P2POp(dist.isend, torch.full((1,), float(r)), (r + 1) % n),
           dist.P2POp(dist.irecv, incoming, (r - 1) % n)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    group = dist.new_group([1, 2])
    x = torch.full((1,), float(r))
    if r == 1:  # group rank 0: sends first, then receives
        dist.send(x, group=group, group_dst=1)
        dist.recv(x, group=group, group_src=1)
    elif r == 2:  # group rank 1: receives first (global rank addressing), then sends back its sum
        y = torch.empty(1)
        dist.recv(y, src=1, group=group)
        x += y
        dist.send(x, dst=1, group=group)
    return incoming.item(), x.item()


def test_old_ring_exchange_passes_on_plain_gloo():
    assert run_distributed(_old_ring_exchange, 3) == [2.0, 0.0, 1.0]


def test_old_ring_exchange_deadlocks_under_nccl_rules():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"NCCL rules: rank \d's send #0 to rank \d \(dist.isend\) waited 3 s"):
        run_distributed(_old_ring_exchange, 3, nccl_rules=True, nccl_timeout=3, timeout=60)
    assert time.monotonic() - t0 < 45  # a failure within seconds, not the harness's hang timeout


def test_batched_and_ordered_exchanges_pass_under_nccl_rules():
    results = run_distributed(_safe_exchanges, 3, nccl_rules=True)
    assert [incoming for incoming, _ in results] == [2.0, 0.0, 1.0]
    assert [x for _, x in results][1:] == [3.0, 3.0]  # ranks 1 and 2 both end with 1 + 2
