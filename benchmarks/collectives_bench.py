"""Ring and naive all-reduce (collectives.py) against the built-in dist.all_reduce, 1 KiB to 64 MiB.

For each size: median time, algorithm bandwidth algbw = D / t and bus bandwidth busbw = algbw · 2(N-1)/N (the
nccl-tests definition: the per-link traffic of a bandwidth-optimal all-reduce), and our time / built-in time.

Run:   torchrun --nproc_per_node=4 benchmarks/collectives_bench.py
       torchrun --nproc_per_node=4 benchmarks/collectives_bench.py --max-bytes 4194304 --repeats 3
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectives  # noqa: E402


def median_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    """The slowest rank's median time of fn on a fresh copy of x (seconds)."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up buffers and connections and is dropped
        y = x.clone()
        dist.barrier()
        t0 = collectives.now(y.device)  # synchronises CUDA: the time of the work, not of its launch
        fn(y)
        times.append(collectives.now(y.device) - t0)
    # Every rank must agree on the time: the slowest rank's median is the collective's time.
    t = torch.tensor(statistics.median(times[1:]), dtype=torch.float64, device=x.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-bytes", type=int, default=1 << 10, help="smallest tensor, bytes (x4 per row)")
    parser.add_argument("--max-bytes", type=int, default=64 << 20, help="largest tensor, bytes")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per size; the median is printed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    args = parser.parse_args(argv)
    if args.min_bytes < 4 or args.max_bytes < args.min_bytes or args.repeats < 1:
        parser.error(f"--min-bytes {args.min_bytes}, --max-bytes {args.max_bytes}, --repeats {args.repeats}: "
                     f"need 4 <= min-bytes <= max-bytes and repeats >= 1")
    rank, n, device = collectives.setup_distributed(args.device)
    algorithms = {"ring": collectives.ring_all_reduce, "naive": collectives.naive_all_reduce,
                  "built-in": lambda y: dist.all_reduce(y)}
    if rank == 0:
        print(f"all-reduce of float32 on N = {n} ({dist.get_backend()}), median of {args.repeats}; "
              f"busbw = algbw · 2(N-1)/N = algbw · {2 * (n - 1) / n:.2f}")
        print(f"{'size':>9} | " + " | ".join(f"{a + ' ms':>11} {'algbw GB/s':>9} {'busbw GB/s':>9}" for a in algorithms)
              + f" | {'ring/built-in':>13} {'naive/built-in':>14}")
    size = args.min_bytes
    try:
        while size <= args.max_bytes:
            x = torch.randn(size // 4, device=device)
            t = {name: median_seconds(fn, x, args.repeats) for name, fn in algorithms.items()}
            if rank == 0:
                cells = []
                for name in algorithms:
                    algbw = size / t[name] / 1e9
                    cells.append(f"{t[name] * 1e3:>11.3f} {algbw:>9.3f} {algbw * 2 * (n - 1) / n:>9.3f}")
                label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
                print(f"{label:>9} | " + " | ".join(cells)
                      + f" | {t['ring'] / t['built-in']:>13.2f} {t['naive'] / t['built-in']:>14.2f}", flush=True)
            size *= 4
    finally:
        collectives.cleanup()


if __name__ == "__main__":
    main()
