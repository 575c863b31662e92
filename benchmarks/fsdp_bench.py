"""fsdp_train.py's sharding strategies side by side, with and without activation checkpointing, in one run:
tokens/s, MFU, parameter + gradient + optimizer bytes per rank, and the activations saved for backward (every tensor
autograd keeps, each storage once, parameters left out: fsdp_train.saved_activations), with peak memory reset per
row (on CUDA the allocator's peak; on a CPU the process's peak resident set).

Run:   torchrun --nproc_per_node=2 benchmarks/fsdp_bench.py
       torchrun --nproc_per_node=4 benchmarks/fsdp_bench.py --d-model 256 --steps 10
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fsdp_train as ft  # noqa: E402


def local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if t is not None)


def measure(sharding: str, ac: bool, cfg, data, args, rank: int, n: int, device) -> dict:
    """A few fp32 steps of one strategy: median step time, state bytes, saved activations, peak memory."""
    model = ft.build_model(cfg, device)
    mesh = ft.make_mesh(sharding, n, 2, device) if sharding != "none" else None
    wrapped = ft.apply_fsdp(model, mesh, sharding, "fp32", ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ft.peak_memory_mib(device, reset=True)
    times = []
    for step in range(args.steps):
        x, y = ft.batch_for_step(data, step, args.batch_size * n, cfg.seq_len, 0, rank, n)
        t0 = ft.now(device)
        with ft.saved_activations() as saved:
            loss = wrapped(x.to(device), y.to(device))
        activations = sum(saved.values())
        loss.backward()
        state = local_bytes(model.parameters()) + local_bytes(q.grad for q in model.parameters())
        opt.step()
        opt.zero_grad()
        times.append(ft.now(device) - t0)
    state += local_bytes(t for s in opt.state.values() for t in s.values() if t.numel() > 1)
    tok = args.batch_size * n * cfg.seq_len / statistics.median(times[1:])
    return {"sharding": sharding, "ac": ac, "tok": tok, "state": state / 2**20, "act": activations / 2**20,
            "peak": ft.peak_memory_mib(device), "mfu": ft.flops_per_token(cfg) * tok / (args.peak_tflops * 1e12 * n)}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per row (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--peak-tflops", type=float, default=None, help="one device's peak TFLOP/s for MFU "
                        "(default: fsdp_train's fp32 table on H100/H200, else a measured matmul)")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag in ("steps", "batch_size", "d_model", "n_layer", "seq_len"):
        if getattr(args, flag) < (2 if flag == "steps" else 1):
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: too small")
    if args.d_model % 4:
        parser.error(f"--d-model {args.d_model}: must divide into 4 heads")
    rank, n, device = ft.setup_distributed()
    peak = argparse.Namespace(precision="fp32", peak_tflops=args.peak_tflops)
    ft.resolve_peak(peak, device, rank)  # the datasheet's fp32 peak on H100/H200, else a matmul measured here
    args.peak_tflops = peak.peak_tflops
    cfg = ft.GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=4, seq_len=args.seq_len)
    data = ft.load_text()
    strategies = ["full", "grad_op", "none"] + (["hybrid"] if n >= 4 and n % 2 == 0 else [])
    rows = [measure(s, ac, cfg, data, args, rank, n, device) for s in strategies for ac in (False, True)]
    if rank == 0:
        print(f"TinyGPT d={cfg.d_model}, {cfg.n_layer} layers, batch {args.batch_size}×{cfg.seq_len} per rank, N = {n}, "
              f"fp32, median of {args.steps - 1} steps; MFU against {args.peak_tflops * 1e3:,.0f} GFLOP/s per process")
        print(f"{'sharding':<8} {'act. ckpt':>9} {'tok/s':>9} {'MFU':>6} {'params+grads+optim MiB':>23} "
              f"{'saved activations MiB':>22} {'peak MiB':>9}")
        for r in rows:
            print(f"{r['sharding']:<8} {'on' if r['ac'] else 'off':>9} {r['tok']:>9.0f} {100 * r['mfu']:>5.1f}% "
                  f"{r['state']:>23.2f} {r['act']:>22.2f} {r['peak']:>9.0f}")
        base = {r["sharding"]: r for r in rows if not r["ac"]}
        print("with checkpointing, activations saved: " + ", ".join(
            f"{r['sharding']} 1/{base[r['sharding']]['act'] / r['act']:.1f}" for r in rows if r["ac"]))
        print("tokens/s relative to full sharding without checkpointing: "
              + ", ".join(f"{r['sharding']}{'+ac' if r['ac'] else ''} {r['tok'] / base['full']['tok']:.2f}" for r in rows))
    ft.cleanup()


if __name__ == "__main__":
    main()
