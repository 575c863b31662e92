"""Our ParallelMLP (tensor_parallel.py) against PyTorch's DTensor tensor parallelism (parallelize_module with
ColwiseParallel on fc1 and RowwiseParallel on fc2): the same MLP weights and input, outputs compared, and the median
forward+backward time side by side with the ratio.

Run:   torchrun --nproc_per_node=2 benchmarks/tensor_parallel_bench.py
       torchrun --nproc_per_node=4 benchmarks/tensor_parallel_bench.py --d-model 512 --tokens 4096
"""
import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tensor_parallel as tp  # noqa: E402


def median_ms(module, x: torch.Tensor, repeats: int) -> float:
    """Median forward+backward time in ms (the first run, a warm-up, is dropped)."""
    times = []
    for _ in range(repeats + 1):
        xi = x.clone().requires_grad_(True)
        dist.barrier()
        t0 = tp.now(x.device)  # synchronises CUDA: the time of the work, not of its launch
        module(xi).sum().backward()
        times.append(tp.now(x.device) - t0)
    return statistics.median(times[1:]) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256, help="MLP width d (hidden 4d, a multiple of N)")
    parser.add_argument("--tokens", type=int, default=2048, help="B·T rows of the input")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats; the median is printed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    args = parser.parse_args(argv)
    if min(args.d_model, args.tokens, args.repeats) < 1:
        parser.error("--d-model, --tokens and --repeats must be at least 1")
    rank, n, device = tp.setup_distributed(args.device)
    torch.manual_seed(0)
    cfg = tp.GPTConfig(d_model=args.d_model)
    dense = tp.MLP(cfg).to(device)
    x = torch.randn(1, args.tokens, args.d_model, device=device)  # (B=1, T=tokens, d)

    ours = tp.load_dense(tp.ParallelMLP(args.d_model, 4 * args.d_model).to(device), dense)
    mesh = init_device_mesh(device.type, (n,))
    theirs = parallelize_module(copy.deepcopy(dense), mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    with torch.no_grad():
        y_ours, y_theirs, y_dense = ours(x), theirs(x), dense(x)
    diff = (y_ours - y_theirs).abs().max().item()
    diff_dense = (y_ours - y_dense).abs().max().item()
    t_ours, t_theirs = median_ms(ours, x, args.repeats), median_ms(theirs, x, args.repeats)
    if rank == 0:
        print(f"MLP d={args.d_model} -> {4 * args.d_model} -> {args.d_model}, {args.tokens} tokens, fp32, N = {n}, "
              f"forward+backward, median of {args.repeats}")
        print(f"max |ours - DTensor| = {diff:.2e}; max |ours - dense| = {diff_dense:.2e}")
        print(f"{'ParallelMLP (ours)':<28} {t_ours:>8.2f} ms")
        print(f"{'DTensor parallelize_module':<28} {t_theirs:>8.2f} ms")
        print(f"ours / DTensor: {t_ours / t_theirs:.2f}x")
    tp.cleanup()


if __name__ == "__main__":
    main()
