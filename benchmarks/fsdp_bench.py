"""fsdp_train.py's sharding strategies side by side, with and without activation checkpointing, in one run:
tokens/s, parameter + gradient + optimizer bytes per rank, and the activations saved for backward (measured with
autograd's saved-tensor hooks; on CUDA also the allocator's peak). With --peak-tflops on a GPU it adds MFU.

Run:   torchrun --nproc_per_node=2 benchmarks/fsdp_bench.py
       torchrun --nproc_per_node=4 benchmarks/fsdp_bench.py --d-model 256 --steps 10
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsdp_train as ft  # noqa: E402


def local_bytes(tensors):
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors if t is not None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args(argv)
    rank, n, device = ft.setup_distributed()
    cfg = ft.GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len)
    data = ft.load_text()
    strategies = ["full", "grad_op", "none"] + (["hybrid"] if n >= 4 and n % 2 == 0 else [])
    rows = []
    for sharding in strategies:
        for ac in (False, True):
            model = ft.build_model(cfg, device)
            mesh = ft.make_mesh(sharding, n, 2, device) if sharding != "none" else None
            wrapped = ft.apply_fsdp(model, mesh, sharding, "fp32", ac)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times, saved = [], [0]

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            for step in range(args.steps):
                x, y = ft.batch_for_step(data, step, args.batch_size * n, cfg.seq_len, 0, rank, n)
                saved[0] = 0
                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = wrapped(x.to(device), y.to(device))
                loss.backward()
                state = local_bytes(model.parameters()) + local_bytes(q.grad for q in model.parameters())
                opt.step()
                opt.zero_grad()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            state += local_bytes(t for s in opt.state.values() for t in s.values() if t.numel() > 1)
            dt = statistics.median(times[1:])
            tok = args.batch_size * n * cfg.seq_len / dt
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            mfu = ft.flops_per_token(cfg) * tok / (args.peak_tflops * 1e12 * n) if args.peak_tflops else None
            rows.append((sharding, ac, tok, state / 2**20, saved[0] / 2**20, peak, mfu))
            del wrapped, model, opt
    if rank == 0:
        print(f"TinyGPT d={cfg.d_model}, {cfg.n_layer} layers, batch {args.batch_size}×{cfg.seq_len} per rank, N = {n}, "
              f"fp32, median of {args.steps - 1} steps")
        print(f"{'sharding':<8} {'act. ckpt':>9} {'tok/s':>9} {'params+grads+optim MiB':>23} {'saved activations MiB':>22}"
              + (f"{'peak MiB':>17}" if device.type == "cuda" else "") + (f"{'MFU':>7}" if args.peak_tflops else ""))
        for s, ac, tok, st, act, peak, mfu in rows:
            print(f"{s:<8} {'on' if ac else 'off':>9} {tok:>9.0f} {st:>23.2f} {act:>22.2f}"
                  f"{'' if peak is None else f'{peak:>17.0f}'}{'' if mfu is None else f'{100 * mfu:>6.1f}%'}")
        base = {s: tok for s, ac, tok, *_ in rows if not ac}
        print("tokens/s relative to full sharding without checkpointing: "
              + ", ".join(f"{s}{'+ac' if ac else ''} {tok / base['full']:.2f}" for s, ac, tok, *_ in rows))
    ft.cleanup()


if __name__ == "__main__":
    main()
