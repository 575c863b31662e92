import math
import re

import pytest
import torch
import torch.distributed as dist

import collectives
from harness import cli_error, readme_command, run_distributed, run_script, run_torchrun

NUMELS = (1, 7, 1000, 65539)
DTYPES = (torch.float32, torch.float64, torch.int64)


def tolerance(dtype, n, max_abs):
    """Ring and built-in add the same N numbers in different orders. Each of the N-1 additions rounds by at most
    half an ulp of a partial sum no larger than N·max|x|, so two orders differ by at most N·eps·N·max|x| absolute
    (a relative bound would fail on sums that cancel to near zero). Integers must be exact."""
    if not dtype.is_floating_point:
        return dict(rtol=0, atol=0)
    return dict(rtol=0, atol=n * n * torch.finfo(dtype).eps * max_abs)


@pytest.mark.parametrize("numel, n", [(1, 4), (7, 4), (8, 4), (12, 3), (5, 1)])
def test_pad_chunks_rows_are_consecutive_slices_then_zeros(numel, n):
    x = torch.arange(1, numel + 1).view(numel, 1)  # values from 1, so padding (0) is told apart; 2-D: flattened
    c = -(-numel // n)  # ceil(numel / N) elements per chunk
    values = list(range(1, numel + 1)) + [0] * (n * c - numel)
    expected = torch.tensor([[values[i * c + j] for j in range(c)] for i in range(n)])  # row i = slice i, built by hand
    got = collectives.pad_chunks(x, n)
    assert got.dtype == x.dtype and torch.equal(got, expected)


# Each ring phase is N-1 steps of one chunk of ceil(numel/N) elements (padding included), computed by hand here;
# the distributed test below checks the bytes really sent against the same count.
@pytest.mark.parametrize("numel, e, n, phase", [(1000, 4, 4, 3 * 250 * 4), (7, 8, 4, 3 * 2 * 8), (1, 4, 2, 1 * 1 * 4),
                                                (65539, 2, 3, 2 * 21847 * 2), (10, 4, 1, 0)])
def test_ring_bytes_formula_by_hand(numel, e, n, phase):
    want = {"ring_reduce_scatter": phase, "ring_all_gather": phase, "ring_all_reduce": 2 * phase}
    assert collectives.ring_bytes_formula(numel, e, n) == want


def _counted(fn):
    """fn()'s result and its {op: (calls, bytes)}, counted from outside by the script's CommCounter."""
    with collectives.CommCounter() as counter:
        result = fn()
    return result, counter.totals()


def _ring_vs_builtin():
    r, n = dist.get_rank(), dist.get_world_size()
    for numel in NUMELS:
        for dtype in DTYPES:
            g = torch.Generator().manual_seed(100 * r + numel)
            x = (torch.randn(numel, generator=g, dtype=torch.float64) * 100).to(dtype)
            summed = x.clone()
            dist.all_reduce(summed)
            max_abs = x.abs().max().double()
            dist.all_reduce(max_abs, op=dist.ReduceOp.MAX)
            tol = tolerance(dtype, n, max_abs.item())
            c = math.ceil(numel / n)
            e = x.element_size()
            padded_sum = torch.zeros(n * c, dtype=dtype)
            padded_sum[:numel] = summed

            chunk, sent = _counted(lambda: collectives.ring_reduce_scatter(x))
            torch.testing.assert_close(chunk, padded_sum[r * c:(r + 1) * c], **tol)
            # Padding counted as sent: each of the N-1 steps sends one whole chunk of ceil(numel/N) elements, and
            # receives one, in one batch (no unbatched send or recv).
            assert sent == {"isend": (n - 1, (n - 1) * c * e), "irecv": (n - 1, (n - 1) * c * e)}

            mine = padded_sum[r * c:(r + 1) * c].clone()
            full, sent = _counted(lambda: collectives.ring_all_gather(mine))
            builtin = torch.empty(n * c, dtype=dtype)
            dist.all_gather_single(builtin, mine)
            assert torch.equal(full, builtin)
            assert sent["isend"] == (n - 1, (n - 1) * c * e)

            y = x.clone()
            out, sent = _counted(lambda: collectives.ring_all_reduce(y))
            assert out is y  # in place, like dist.all_reduce
            torch.testing.assert_close(y, summed, **tol)
            assert sent["isend"][1] == 2 * (n - 1) * c * e
            if numel % n == 0:
                assert sent["isend"][1] == 2 * (n - 1) / n * numel * e

            y = x.clone()
            _, sent = _counted(lambda: collectives.naive_all_reduce(y))
            torch.testing.assert_close(y, summed, **tol)
            assert sent["send"] == ((n - 1, (n - 1) * numel * e) if r == 0 else (1, numel * e))
    return True


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_collectives_equal_builtins_and_bytes_equal_formula_under_nccl_rules(world_size):
    # nccl_rules: every send/recv must be posted so that it would not hang on NCCL (tests/harness.py NcclRules).
    assert run_distributed(_ring_vs_builtin, world_size, nccl_rules=True) == [True] * world_size


def _subgroup():
    # Ranks 1 and 3 form a group of their own: peers must be addressed as group ranks (the group maps them).
    group = dist.new_group([1, 3])
    r = dist.get_rank()
    x = torch.arange(5, dtype=torch.float64) * (r + 1)
    y = x.clone()
    if r in (1, 3):
        collectives.ring_all_reduce(x, group=group)
        collectives.naive_all_reduce(y, group=group)
        return x.tolist(), y.tolist()
    return None


def test_group_argument_under_nccl_rules():
    results = run_distributed(_subgroup, 4, nccl_rules=True)
    expected = (torch.arange(5, dtype=torch.float64) * (2 + 4)).tolist()
    assert results == [None, (expected, expected), None, (expected, expected)]


def test_wrong_device_is_a_clear_error():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="gloo's send/recv takes CPU tensors"):
            collectives.ring_all_reduce(torch.ones(4, device="meta"))
    finally:
        dist.destroy_process_group()


def test_readme_torchrun_line_prints_measured_bytes_equal_to_formula():
    line = readme_command("collectives.py")
    assert "--nproc_per_node=4" in line
    out = run_torchrun(line, "--numel 65536 --repeats 1").stdout
    rows = re.findall(r"^(ring_\w+|naive_all_reduce)\s+(\d)\s+([\d,]+)\s+([\d,]+)", out, re.M)
    assert len(rows) == 3 + 4, out  # three ring rows (rank 0), the naive row of every rank
    for name, rank, measured, formula in rows:
        assert measured == formula, (name, rank)
    # 65536 float32 = 262144 bytes; ring all-reduce on 4 ranks sends 2·3/4·D = 393216 bytes
    assert any(name == "ring_all_reduce" and measured == "393,216" for name, _, measured, _ in rows)
    # The scaling table (subgroups of 2, 3, 4 ranks): measured equals formula, computed here independently.
    scaling = re.findall(r"^\s+(\d)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", out, re.M)
    assert [int(n) for n, *_ in scaling] == [2, 3, 4], out
    for n, ring, ring_formula, naive, naive_formula in scaling:
        n, d = int(n), 262144
        assert int(ring.replace(",", "")) == 2 * (n - 1) * math.ceil(65536 / n) * 4 and ring == ring_formula
        assert int(naive.replace(",", "")) == (n - 1) * d and naive == naive_formula


def test_single_process_runs_and_explains():
    out = run_script(["collectives.py", "--numel", "100", "--repeats", "1"]).stdout
    assert "One process" in out


@pytest.mark.parametrize("args, message", [(["--numel", "0"], "--numel 0 is not positive"),
                                           (["--dtype", "float7"], "invalid choice: 'float7'")])
def test_bad_input_is_one_line(args, message, capsys):
    assert message in cli_error(collectives.main, args, capsys)
