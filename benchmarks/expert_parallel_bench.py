"""An MoE layer (expert_parallel.py) against a dense MLP of equal active compute (k times as wide), and the
expert-parallel layer against the same MoE in one process: median forward+backward time, side by side, with ratios.
The MoE holds E/k times the dense MLP's parameters for the same matmul FLOPs per token; what it pays for that is
routing, gathering rows per expert and, when split over ranks, two all-to-alls each way.

Run:   python benchmarks/expert_parallel_bench.py
       torchrun --nproc_per_node=2 benchmarks/expert_parallel_bench.py --experts 8 --tokens 4096
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import expert_parallel as ep  # noqa: E402


def median_ms(module, x, repeats, device):
    times = []
    for _ in range(repeats + 1):
        xi = x.clone().requires_grad_(True)
        dist.barrier()
        t0 = ep.now(device)
        module(xi).sum().backward()
        times.append(ep.now(device) - t0)
    return statistics.median(times[1:]) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256, help="model width d")
    parser.add_argument("--experts", type=int, default=8, help="experts E (a multiple of the world size)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (the median is printed)")
    args = parser.parse_args(argv)
    rank, n, device = ep.setup_distributed()
    if args.experts % n:
        parser.error(f"--experts {args.experts} is not divisible by the world size {n}")
    cfg = ep.GPTConfig(d_model=args.d_model, n_head=4)
    torch.manual_seed(0)
    moe = ep.MoE(cfg, args.experts, args.top_k, capacity_factor=float(args.experts)).to(device)  # no token dropped
    d, h = args.d_model, 4 * args.top_k * args.d_model
    dense = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).to(device)
    x = torch.randn(1, args.tokens, d, device=device)
    t_dense, t_moe = median_ms(dense, x, args.repeats, device), median_ms(moe, x, args.repeats, device)
    t_ep = median_ms(ep.ExpertParallelMoE.from_dense(moe), x, args.repeats, device) if n > 1 else None
    if rank == 0:
        count = lambda m: sum(p.numel() for p in m.parameters())
        print(f"d = {d}, E = {args.experts}, k = {args.top_k}, {args.tokens} tokens per rank, fp32, forward+backward, "
              f"median of {args.repeats}, {n} process(es) on {device}")
        print(f"{'dense MLP d -> ' + str(h) + ' -> d':<34} {t_dense:8.2f} ms  {count(dense):>10,} parameters")
        print(f"{'MoE, one process':<34} {t_moe:8.2f} ms  {count(moe):>10,} parameters")
        print(f"MoE / dense: {t_moe / t_dense:.2f}x the time for {count(moe) / count(dense):.2f}x the parameters")
        if t_ep is not None:
            print(f"{'MoE, expert-parallel over ' + str(n):<34} {t_ep:8.2f} ms  (each rank: its own {args.tokens} "
                  f"tokens, {args.experts // n} experts)")
            print(f"expert-parallel / one process: {t_ep / t_moe:.2f}x (the same work per rank, plus 4 all-to-alls)")
    ep.cleanup()


if __name__ == "__main__":
    main()
