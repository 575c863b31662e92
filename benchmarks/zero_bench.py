"""zero.py measured against PyTorch: our stage 1 vs ZeroRedundancyOptimizer + DDP, our stage 3 vs FSDP2 fully_shard
(same TinyGPT, same batches, one run: median step time and memory per rank, with ratios); and with --overlap, how much
of DataParallel's all-reduce time backward hides, per bucket size, beside the no-overlap baseline.

Run:   torchrun --nproc_per_node=2 benchmarks/zero_bench.py
       torchrun --nproc_per_node=2 benchmarks/zero_bench.py --overlap
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import zero  # noqa: E402


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if t is not None)


def my_batch(data, batch_size, seq_len, gen, device):
    """This rank's slice of one global batch (the generator is seeded alike on every rank)."""
    rank, batch = torch.distributed.get_rank(), zero.get_batch(data, batch_size * torch.distributed.get_world_size(), seq_len, gen)
    return [t[rank * batch_size:(rank + 1) * batch_size].to(device) for t in batch]


def reference_bytes(model, opt) -> dict:
    """PyTorch's side: local bytes (a DTensor counts its own shard), optimizer states of ZeRO-RO's inner optimizer."""
    inner, params = getattr(opt, "optim", opt), list(model.parameters())
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params), "optimizer": local_bytes(state)}


def run(name, model, opt, finish, batches, device):
    """Median ms per step (first dropped) and the bytes held between backward and step on the last one."""
    times, mem = [], None
    for x, y in batches:
        t0 = zero.now(device)
        model(x, y).backward()
        finish()
        mem = zero.held_bytes(model, opt) if hasattr(opt, "masters") or isinstance(model, zero.FullyShardedDataParallel) \
            else reference_bytes(model, opt)
        opt.step()
        opt.zero_grad()
        times.append(zero.now(device) - t0)
    return {"name": name, "ms": statistics.median(times[1:]) * 1e3, "mem": mem}


def measure_overlap(cfg: zero.GPTConfig, batch_size: int, data: torch.Tensor, device, steps: int = 5) -> list[dict]:
    """For bucket sizes from one parameter per bucket to one bucket: backward then all-reduce (the baseline) against
    the overlapped version, steps interleaved so that both see the same load; medians in ms."""
    x, y = my_batch(data, batch_size, cfg.seq_len, torch.Generator().manual_seed(0), device)
    model_mb, rows = sum(p.nbytes for p in zero.TinyGPT(cfg).parameters()) / 2 ** 20, []
    for bucket_mb in (0, model_mb / 16, model_mb / 4, float("inf")):
        models, times = {}, {False: ([], []), True: ([], [])}
        for overlap in (False, True):
            torch.manual_seed(0)
            models[overlap] = zero.DataParallel(zero.TinyGPT(cfg).to(device), bucket_mb, overlap)
        for _ in range(steps):
            for overlap, model in models.items():
                loss = model(x, y)
                with zero.CommCounter() as counter:
                    t0 = zero.now(device)
                    loss.backward()
                    t1, counter.phase = zero.now(device), "after backward"
                    model.finish_gradient_synchronization()
                    times[overlap][1].append(zero.now(device) - t1)
                times[overlap][0].append(t1 - t0)
                model.zero_grad()
        (backward, allreduce), (backward_ov, wait) = [[statistics.median(t) * 1e3 for t in times[o]] for o in (False, True)]
        rows.append({"bucket_mb": bucket_mb, "buckets": len(models[True].buckets), "backward_ms": backward,
                     "allreduce_ms": allreduce, "overlapped_ms": backward_ov + wait,
                     "hidden": (backward + allreduce - backward_ov - wait) / allreduce,
                     "launched_in_backward": counter.totals("").get("all_reduce", (0, 0))[0]})
    return rows


def print_overlap(rows: list[dict], n: int) -> None:
    print(f"\nDataParallel on N = {n}: all-reduce hidden behind backward (median ms per step)\n"
          f"{'bucket MiB':>10} {'buckets':>7} | {'backward':>8} {'then all-reduce':>15} | {'overlapped':>10} "
          f"{'launched in backward':>20} | {'hidden':>6}")
    for r in rows:
        print(f"{r['bucket_mb']:>10.3g} {r['buckets']:>7} | {r['backward_ms']:>8.1f} {r['allreduce_ms']:>15.1f} | "
              f"{r['overlapped_ms']:>10.1f} {r['launched_in_backward']:>13} of {r['buckets']:<4} | {r['hidden']:>6.0%}")
    print("hidden = (backward + all-reduce after it − overlapped) / all-reduce: the share of the communication "
          "that backward covered")


def compare(args, cfg, device):
    rank, n = torch.distributed.get_rank(), torch.distributed.get_world_size()
    data, g = zero.load_text(), torch.Generator().manual_seed(0)
    batches = [my_batch(data, args.batch_size, cfg.seq_len, g, device) for _ in range(args.steps)]
    kw = dict(lr=1e-3, weight_decay=0.1)

    def fresh():
        torch.manual_seed(0)
        return zero.TinyGPT(cfg).to(device)

    results = []
    for stage in (1, 3):
        model, opt, finish = zero.build(stage, fresh(), **kw)
        results.append(run(f"zero.py stage {stage}", model, opt, finish, batches, device))
        model = fresh()
        if stage == 1:
            ref = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **kw)
            results.append(run("ZeroRedundancyOptimizer+DDP", DDP(model), ref, lambda: None, batches, device))
        else:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            results.append(run("FSDP2 fully_shard", model, torch.optim.AdamW(model.parameters(), **kw), lambda: None,
                               batches, device))
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
        print("(Our optimizer column holds an fp32 master copy of the shard beside m and v at stage 1; PyTorch's "
              "optimizers in fp32 step the parameters themselves.)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the first is dropped; --overlap: all count)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--overlap", action="store_true", help="measure the all-reduce hidden behind backward instead")
    args = parser.parse_args(argv)
    if min(args.steps - 1, args.batch_size, args.d_model, args.n_layer, args.seq_len) < 1 or args.d_model % 4:
        parser.error("--steps must be at least 2, the sizes positive, --d-model a multiple of 4 (4 heads)")
    rank, n, device = zero.setup_distributed()
    cfg = zero.GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len, tie_weights=False)
    try:
        if args.overlap:
            rows = measure_overlap(cfg, args.batch_size, zero.load_text(), device, args.steps)
            if rank == 0:
                print_overlap(rows, n)
        else:
            compare(args, cfg, device)
    finally:
        zero.cleanup()


if __name__ == "__main__":
    main()
