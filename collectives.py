"""Collective communication: the five primitives, and ring all-reduce built from send/recv alone.

Every distributed training technique is made of five collectives: broadcast (initialise parameters), all-reduce
(data-parallel gradients), all-gather (ZeRO-3/FSDP parameters), reduce-scatter (ZeRO-2 gradients) and all-to-all
(mixture-of-experts token routing). This file shows each on small tensors, then rebuilds all-reduce from
point-to-point messages as a ring: reduce-scatter then all-gather, N-1 steps each. With D the bytes of the tensor
and N ranks, every rank of the ring sends

    reduce-scatter (N-1)/N·D  +  all-gather (N-1)/N·D  =  2(N-1)/N·D      (ring all-reduce, nearly 2D for any N)

while the naive all-reduce (everything to rank 0, then back) makes the root send (N-1)·D, growing with N. A counter
(CommCounter, from outside the algorithms) records what each rank really sent; the script prints it beside these
formulas.

Run:   torchrun --nproc_per_node=4 collectives.py
       torchrun --nproc_per_node=4 collectives.py --numel 1048576 --dtype float32
       python collectives.py --help
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

# --- the technique -----------------------------------------------------


def show_primitives(device: torch.device) -> list[str]:
    """Run the five built-in collectives on tiny tensors; return 'before -> after' lines of every rank (rank 0)."""
    r, n = dist.get_rank(), dist.get_world_size()
    lines = []

    def report(name, why, before, after):
        rows = [None] * n
        dist.all_gather_object(rows, ([round(v, 2) for v in before.tolist()], [round(v, 2) for v in after.tolist()]))
        lines.append(f"{name}: {why}")
        lines.extend(f"  rank {i}: {b} -> {a}" for i, (b, a) in enumerate(rows))

    x = torch.full((3,), float(r), device=device) if r else torch.tensor([0.1, 0.2, 0.3], device=device)
    before = x.clone()
    dist.broadcast(x, src=0)
    report("broadcast", "rank 0's initial weights reach every rank", before, x)

    x = torch.full((3,), float(r + 1), device=device)
    before = x.clone()
    dist.all_reduce(x)
    report("all-reduce (sum)", "every rank's gradient summed, the sum on every rank", before, x)

    x = torch.full((2,), float(r), device=device)
    out = torch.empty(2 * n, device=device)
    dist.all_gather_single(out, x)
    report("all-gather", "each rank's parameter shard, the full tensor on every rank", x, out)

    x = torch.arange(2 * n, dtype=torch.float32, device=device) + 10 * r
    out = torch.empty(2, device=device)
    dist.reduce_scatter_single(out, x)
    report("reduce-scatter (sum)", "gradients summed, each rank keeps only its shard of the sum", x, out)

    x = torch.tensor([100 * r + j for j in range(n)], dtype=torch.float32, device=device)
    out = torch.empty(n, device=device)
    dist.all_to_all_single(out, x)
    report("all-to-all", "token j of rank r goes to expert (rank) j: 100r+j lands on rank j", x, out)
    return lines


# All-reduce rebuilt from point-to-point messages: a ring of N ranks, reduce-scatter then all-gather.

def _check_device(x: torch.Tensor, group=None) -> None:
    backend = dist.get_backend(group)
    if backend == "nccl" and x.device.type != "cuda":
        raise ValueError(f"tensor is on {x.device} but the nccl backend sends CUDA tensors only: move it with "
                         f".cuda(), or run with --device cpu (gloo)")
    if backend == "gloo" and x.device.type != "cpu":
        raise ValueError(f"tensor is on {x.device} but gloo's send/recv takes CPU tensors: move it with .cpu(), "
                         f"or use the nccl backend (--device cuda)")


def _exchange(send_buf: torch.Tensor, recv_buf: torch.Tensor, dst: int, src: int, group=None) -> None:
    """Send to group rank dst while receiving from group rank src: every link of the ring carries one chunk at once."""
    # Posted together: NCCL may block a lone send until its receive is posted, and every rank of the ring sends first.
    ops = [dist.P2POp(dist.isend, send_buf, group=group, group_peer=dst),
           dist.P2POp(dist.irecv, recv_buf, group=group, group_peer=src)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def pad_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Flatten x and zero-pad it to n equal chunks: a view of shape (n, ceil(numel/n))."""
    # BEGIN SOLUTION
    flat = x.reshape(-1)  # (numel,)
    c = math.ceil(flat.numel() / n)
    padded = torch.zeros(n * c, dtype=x.dtype, device=x.device)
    padded[: flat.numel()] = flat
    return padded.view(n, c)  # (n, c): chunk i is row i
    # END SOLUTION


def ring_reduce_scatter(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum x over the ranks and return this rank's chunk r of the flattened, zero-padded sum.

    Step s (0..N-2): send chunk (r-s-1) to the next rank, receive chunk (r-s-2) from the previous one and add it to
    ours. Each chunk travels once around the ring collecting one addend per hop and ends, complete, at its owner.
    Sent: (N-1) chunks of ceil(numel/N) elements (the zero padding crosses the wire too).
    """
    _check_device(x, group)
    n, r = dist.get_world_size(group), dist.get_rank(group)
    chunks = pad_chunks(x, n).clone()  # (N, c)
    incoming = torch.empty_like(chunks[0])
    for s in range(n - 1):
        # BEGIN SOLUTION
        _exchange(chunks[(r - s - 1) % n], incoming, (r + 1) % n, (r - 1) % n, group)
        chunks[(r - s - 2) % n] += incoming
        # END SOLUTION
    return chunks[r]


def ring_all_gather(chunk: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's equal-sized chunk, in rank order: returns a flat tensor of N·numel(chunk).

    Step s: pass on the chunk received in the previous step (first our own); after N-1 steps each rank has all.
    Sent: (N-1) chunks.
    """
    _check_device(chunk, group)
    n, r = dist.get_world_size(group), dist.get_rank(group)
    out = torch.empty((n, chunk.numel()), dtype=chunk.dtype, device=chunk.device)  # (N, c): row i from rank i
    out[r] = chunk.reshape(-1)
    for s in range(n - 1):
        _exchange(out[(r - s) % n], out[(r - s - 1) % n], (r + 1) % n, (r - 1) % n, group)
    return out.view(-1)  # (N·c,)


def ring_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum x over the ranks in place, like dist.all_reduce: ring reduce-scatter, then ring all-gather."""
    full = ring_all_gather(ring_reduce_scatter(x, group), group)  # (N·c,), the padded sum
    x.copy_(full[: x.numel()].view_as(x))
    return x


def naive_all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum x in place the obvious way: every rank sends x to rank 0, rank 0 adds and sends the sum back.

    Rank 0 receives and sends (N-1)·D: its link, not the network, sets the speed, and it gets worse with N.
    """
    _check_device(x, group)
    n, r = dist.get_world_size(group), dist.get_rank(group)
    # Safe when every send blocks until matched: rank 0 receives in rank order from senders that do nothing else
    # first, then sends to ranks already waiting in recv; no rank ever waits on a rank that waits on it.
    if r == 0:
        incoming = torch.empty_like(x)
        for src in range(1, n):
            dist.recv(incoming, group=group, group_src=src)
            x += incoming
        for dst in range(1, n):
            dist.send(x, group=group, group_dst=dst)
    else:
        dist.send(x, group=group, group_dst=0)
        dist.recv(x, group=group, group_src=0)
    return x


def ring_bytes_formula(numel: int, element_size: int, n: int) -> dict:
    """Bytes one rank sends: (N-1)·ceil(numel/N)·e per ring phase; = (N-1)/N·D exactly when N divides numel."""
    # BEGIN SOLUTION
    phase = (n - 1) * math.ceil(numel / n) * element_size
    return {"ring_reduce_scatter": phase, "ring_all_gather": phase, "ring_all_reduce": 2 * phase}
    # END SOLUTION


def naive_bytes_formula(numel: int, element_size: int, n: int, rank: int) -> int:
    """The root sends the sum to N-1 ranks; every other rank sends its tensor once."""
    d = numel * element_size
    return (n - 1) * d if rank == 0 else (d if n > 1 else 0)


# --- demo --------------------------------------------------------------


def bytes_sent(fn) -> tuple[object, int]:
    """Run fn() under a CommCounter; return its result and the bytes this rank handed to send/isend."""
    with CommCounter() as counter:
        result = fn()
    totals = counter.totals()
    return result, sum(totals.get(op, (0, 0))[1] for op in ("send", "isend"))


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = now(device)
        fn()
        times.append((now(device) - t0) * 1e3)
    return statistics.median(times)


def compare_all_reduce(numel: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> list[dict]:
    """Ring and naive collectives against the built-ins: bytes sent (measured and formula), time, max |error|."""
    r, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1234 + r)
    if dtype.is_floating_point:
        x = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype).to(device)
    else:
        x = torch.randint(-1000, 1000, (numel,), generator=g, dtype=dtype).to(device)
    summed = x.clone()
    dist.all_reduce(summed)
    chunk = pad_chunks(x, n)[r].clone()
    gathered = torch.empty(n * chunk.numel(), dtype=dtype, device=device)
    dist.all_gather_single(gathered, chunk)
    e = x.element_size()
    ring = ring_bytes_formula(numel, e, n)
    cases = [  # name, call, what the built-in gives, bytes formula, the formula in words
        ("ring_reduce_scatter", lambda: ring_reduce_scatter(x.clone()), pad_chunks(summed, n)[r],
         ring["ring_reduce_scatter"], "(N-1)/N·D"),
        ("ring_all_gather", lambda: ring_all_gather(chunk), gathered, ring["ring_all_gather"], "(N-1)/N·D"),
        ("ring_all_reduce", lambda: ring_all_reduce(x.clone()), summed, ring["ring_all_reduce"], "2(N-1)/N·D"),
        ("naive_all_reduce", lambda: naive_all_reduce(x.clone()), summed, naive_bytes_formula(numel, e, n, r),
         "(N-1)·D at rank 0"),
        ("dist.all_reduce", lambda: dist.all_reduce(x.clone()), None, None, "library: not counted"),
    ]
    rows = []
    for name, fn, reference, formula, formula_text in cases:
        result, sent = bytes_sent(fn)
        error = None if reference is None else (result.double() - reference.double()).abs().max().item()
        rows.append({"algorithm": name, "bytes_measured": None if formula is None else sent,
                     "bytes_formula": formula, "formula": formula_text, "ms": _median_ms(fn, repeats, device),
                     "max_error": error})
    return rows


def measure_scaling(numel: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Bytes rank 0 sends in ring and naive all-reduce on the first n ranks, for every n = 2..N of this job."""
    rows = []
    for n in range(2, dist.get_world_size() + 1):
        group = dist.new_group(list(range(n)))  # every rank must take part in creating a group, members or not
        if dist.get_rank() < n:
            x = torch.ones(numel, dtype=dtype, device=device)
            _, ring = bytes_sent(lambda: ring_all_reduce(x.clone(), group=group))
            _, naive = bytes_sent(lambda: naive_all_reduce(x.clone(), group=group))
            rows.append({"n": n, "ring": ring, "naive_root": naive})
            dist.barrier(group=group)  # NCCL's sends may still be in flight: every member done before the group goes
        dist.destroy_process_group(group)
    return rows


def print_report(args, n: int, lines: list[str], every_rank: list[list[dict]], scaling: list[dict]) -> None:
    """Rank 0's output: the primitives, the table of measured vs formula bytes, the scaling with N."""
    print(f"The five collectives on {n} rank(s) ({dist.get_backend()}), tensor values before -> after:")
    print("\n".join(lines))
    if n == 1:
        print("\nOne process: every collective is the identity and nothing crosses a wire (0 bytes below).\n"
              "Run `torchrun --nproc_per_node=4 collectives.py` to see the ring's 2(N-1)/N·D appear.")
    d = args.numel * DTYPES[args.dtype].itemsize
    print(f"\nAll-reduce of {args.numel:,} x {args.dtype} = D = {d:,} bytes on N = {n}; "
          f"ring all-reduce sends 2(N-1)/N·D = {2 * (n - 1) / n * d:,.0f} bytes per rank"
          + ("" if args.numel % n == 0 else f" (+ zero padding: {args.numel} is not a multiple of {n})"))
    print(f"{'algorithm':<20} {'rank':>4} {'bytes sent (measured)':>22} {'formula':>14}  {'':<22}"
          f"{'time (median)':>14} {'max |err| vs built-in':>24}")
    fmt = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
    for r, table in enumerate(every_rank):
        for row in table:
            if r and row["algorithm"] != "naive_all_reduce":
                continue  # the ring is symmetric: rank 0 stands for all; the naive one is not
            err = "-" if row["max_error"] is None else f"{row['max_error']:.2e}"
            formula_text = row["formula"] if r == 0 else "D (not root)"
            print(f"{row['algorithm']:<20} {r:>4} {fmt(row['bytes_measured']):>22} "
                  f"{fmt(row['bytes_formula']):>14}  {formula_text:<22}{row['ms']:>11.2f} ms {err:>24}")
    if scaling:
        print(f"\nBytes rank 0 sends as the group grows (subgroups of the first n ranks, same D = {d:,} bytes):")
        print(f"{'n':>3} {'ring (measured)':>16} {'2(n-1)/n·D':>14} {'naive root (measured)':>22} {'(n-1)·D':>14}")
        for row in scaling:
            k = row["n"]
            ring = ring_bytes_formula(args.numel, DTYPES[args.dtype].itemsize, k)["ring_all_reduce"]
            print(f"{k:>3} {row['ring']:>16,} {ring:>14,} {row['naive_root']:>22,} {(k - 1) * d:>14,}")
    if any(args.numel % k for k in range(2, n + 1)):
        print("(where n does not divide the numel, the formula counts each chunk as ceil(numel/n) elements: "
              "the zero padding crosses the wire too)")


DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "int32": torch.int32}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 20, help="elements in the all-reduced tensor")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="element type of the tensor")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is printed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--json", metavar="PATH", help="also write every rank's table as JSON (rank 0 writes)")
    return parser


def main(argv=None) -> list[list[dict]]:
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag, example in (("numel", 1048576), ("repeats", 5)):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} {getattr(args, flag)} is not positive (try --{flag} {example})")
    rank, n, device = setup_distributed(args.device)
    try:
        dtype = DTYPES[args.dtype]
        lines = show_primitives(device)
        rows = compare_all_reduce(args.numel, dtype, device, args.repeats)
        scaling = measure_scaling(args.numel, dtype, device)
        every_rank = [None] * n
        dist.all_gather_object(every_rank, rows)
        if rank == 0:
            print_report(args, n, lines, every_rank, scaling)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"world_size": n, "numel": args.numel, "dtype": args.dtype,
                               "bytes": args.numel * dtype.itemsize, "ranks": every_rank, "scaling": scaling},
                              f, indent=1)
        return every_rank
    finally:
        cleanup()


# --- common core: identical in every file (tests/test_common.py checks) -----------------------------------
# Process-group setup, a timer that synchronises, the communication counter and, in the training scripts, the
# tiny GPT and the text loader. Read them once; every file that needs them carries the same lines.


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun job (or make a job of one process): nccl on CUDA, gloo on CPU. CUDA is touched only after
    set_device, so every process works on its own GPU."""
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but this machine has no CUDA GPU (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                             f"(launch at most that many processes per node with --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if not dist.is_initialized():
        # torch.optim imports this lazily; imported after init it pins the group past cleanup and gloo aborts at exit
        import torch.distributed.nn as _  # noqa: F401
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("DIST_TIMEOUT", 300)))
        if "MASTER_ADDR" in os.environ:  # launched by torchrun (one node or many): everything comes from its env
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # plain `python X.py`: a world of one, no network needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), dev


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # free garbage that holds collective work now, not from gloo's threads during interpreter shutdown


def now(device: torch.device | str | None = None) -> float:
    """Wall-clock seconds, read after `device` has finished its queued work: CUDA kernels run asynchronously, so a
    timer that does not synchronise measures their launch, not their work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class CommCounter:
    """Counts what this process hands to torch.distributed while active: one event (phase, op, bytes) per call, the
    bytes being the tensors it sends (for recv, the buffer it fills; for batch_isend_irecv, one event per isend or
    irecv). It wraps torch.distributed's functions from outside, so the code it watches stays plain
    torch.distributed. Set .phase to label the calls that follow ("forward", "backward", ...)."""
    PAYLOAD_ARG = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "send": 0, "recv": 0, "all_gather": 1,
                   "all_gather_into_tensor": 1, "all_gather_single": 1, "reduce_scatter": 1,
                   "reduce_scatter_tensor": 1, "reduce_scatter_single": 1, "all_to_all": 1, "all_to_all_single": 1,
                   "batch_isend_irecv": 0}

    def __init__(self):
        self.events, self.phase, self._originals = [], "", {}  # events: (phase, op, bytes)

    def __enter__(self) -> "CommCounter":
        for op, arg in self.PAYLOAD_ARG.items():
            self._originals[op] = getattr(dist, op)
            setattr(dist, op, self._counted(op, arg, self._originals[op]))
        return self

    def __exit__(self, *exc) -> None:
        for op, original in self._originals.items():
            setattr(dist, op, original)

    def _counted(self, op: str, arg: int, original):
        def counted(*args, **kwargs):
            named = [v for k, v in kwargs.items() if k.startswith(("tensor", "input", "p2p"))]
            payload = args[arg] if len(args) > arg else named[0]
            if op == "batch_isend_irecv":
                self.events += [(self.phase, p2p.op.__name__, p2p.tensor.nbytes) for p2p in payload]
            else:
                tensors = payload if isinstance(payload, (list, tuple)) else [payload]
                self.events.append((self.phase, op, sum(t.nbytes for t in tensors)))
            return original(*args, **kwargs)
        return counted

    def totals(self, phase: str | None = None) -> dict[str, tuple[int, int]]:
        """{op: (calls, bytes)} over the events of one phase, or of all of them."""
        out = {}
        for _, op, nbytes in (e for e in self.events if phase in (None, e[0])):
            calls, total = out.get(op, (0, 0))
            out[op] = (calls + 1, total + nbytes)
        return out


if __name__ == "__main__":
    main()
