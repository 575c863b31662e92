"""zero.py against PyTorch's own sharding: our stage 1 vs ZeroRedundancyOptimizer (+ DDP), our stage 3 vs FSDP2
fully_shard. Same TinyGPT, same batches, one run: median step time and memory per rank, side by side, with ratios.

Run:   torchrun --nproc_per_node=2 benchmarks/zero_bench.py
       torchrun --nproc_per_node=4 benchmarks/zero_bench.py --steps 20 --d-model 256
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zero  # noqa: E402


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def run(name, model, opt, batches, rank, measure):
    times, mem = [], None
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        model(x, y).backward()
        if i == len(batches) - 1:
            mem = measure()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"name": name, "ms": statistics.median(times[1:]) * 1e3, "mem": mem}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    rank, n, device = zero.setup_distributed()
    cfg = zero.GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len, tie_weights=False)
    data = zero.load_text()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        x, y = zero.get_batch(data, args.batch_size * n, cfg.seq_len, g)
        sl = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        batches.append((x[sl].to(device), y[sl].to(device)))
    kw = dict(lr=1e-3, weight_decay=0.1)

    def fresh():
        torch.manual_seed(0)
        return zero.TinyGPT(cfg).to(device)

    results = []
    for stage in (1, 3):
        model = fresh()
        opt = zero.ZeroOptimizer(model, stage, **kw)
        results.append(run(f"zero.py stage {stage}", model, opt, batches, rank, lambda: opt.memory_bytes()))

        model = fresh()
        if stage == 1:
            ddp = DDP(model)
            ref = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **kw)
            measure = lambda: {"params": local_bytes(model.parameters()),
                               "grads": local_bytes(q.grad for q in model.parameters()),
                               "optimizer": local_bytes(t for s in ref.optim.state.values() for t in s.values()
                                                        if t.numel() > 1)}
            results.append(run("ZeroRedundancyOptimizer+DDP", ddp, ref, batches, rank, measure))
        else:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            ref = torch.optim.AdamW(model.parameters(), **kw)
            measure = lambda: {"params": local_bytes(model.parameters()),
                               "grads": local_bytes(q.grad for q in model.parameters()),
                               "optimizer": local_bytes(t for s in ref.state.values() for t in s.values()
                                                        if t.numel() > 1)}
            results.append(run("FSDP2 fully_shard", model, ref, batches, rank, measure))
    if rank == 0:
        phi = sum(q.numel() for q in fresh().parameters())
        print(f"TinyGPT Φ = {phi:,} parameters, fp32, N = {n}, batch {args.batch_size}×{cfg.seq_len} per rank, "
              f"median of {args.steps - 1} steps (first dropped)")
        print(f"{'':<28} {'ms/step':>8} {'params KiB':>11} {'grads KiB':>10} {'optim KiB':>10}")
        for r in results:
            m = r["mem"]
            print(f"{r['name']:<28} {r['ms']:>8.1f} {m['params'] / 1024:>11.1f} {m['grads'] / 1024:>10.1f} "
                  f"{m['optimizer'] / 1024:>10.1f}")
        for ours, theirs in ((results[0], results[1]), (results[2], results[3])):
            print(f"{ours['name']} / {theirs['name']}: step time {ours['ms'] / theirs['ms']:.2f}x")
        print("(In fp32 our optimizer column includes an fp32 master copy of the shard (4 of its 12 bytes); PyTorch's "
              "optimizers step the parameters themselves and hold only m and v.)")
    zero.cleanup()


if __name__ == "__main__":
    main()
