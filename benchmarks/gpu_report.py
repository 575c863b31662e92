"""GPU report: the figures the README's CPU tables cannot give, measured on one GPU node in one command.

1. All-reduce bus bandwidth by size: collectives.py's ring (send/recv) against NCCL's own dist.all_reduce;
   busbw = 2(N-1)/N · bytes / time (the nccl-tests definition), the slowest rank's median.
2. Matmul TFLOP/s at M = N = K = 4096 .. 16384: FP8 (E4M3 operands, per-tensor scales, torch._scaled_mm with a bf16
   output: mixed_precision.py's GEMM) against a bf16 matmul; 2·M·N·K FLOPs over the median time. Rank 0's GPU.
3. Newton–Schulz's share of a Muon step (muon.py: NS in bf16, split over the ranks), small and large model.
4. fsdp_train.py's MFU in bf16 (FSDP full sharding): 6Φ+attention FLOPs per token (its flops_per_token) × tokens
   over the median step time, against the precision's peak (its datasheet table, else a measured matmul).
Every timer synchronises (the scripts' now()). It prints; it asserts nothing.

Run:   torchrun --nproc_per_node=8 benchmarks/gpu_report.py
       torchrun --nproc_per_node=8 benchmarks/gpu_report.py --repeats 5 --allreduce-max-mib 256
"""
import argparse
import contextlib
import io
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectives  # noqa: E402
import fsdp_train  # noqa: E402
import mixed_precision as mp  # noqa: E402
import muon  # noqa: E402

now = collectives.now


def slowest_median(fn, repeats: int, device: torch.device, reset=None, warmup: int = 2) -> float:
    """Seconds: each rank's median of fn() after warm-ups, then the slowest rank's (a collective ends with it).
    reset() runs before each call, untimed."""
    times = []
    for i in range(warmup + repeats):
        if reset is not None:
            reset()
        dist.barrier()
        t0 = now(device)
        fn()
        if i >= warmup:
            times.append(now(device) - t0)
    t = torch.tensor(statistics.median(times), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def allreduce_table(device: torch.device, repeats: int, max_mib: int) -> list[dict]:
    """Ring vs NCCL all-reduce of float32 tensors from 1 MiB up to max_mib, x8 per row."""
    n, rows, mib = dist.get_world_size(), [], 1
    while mib <= max_mib:
        x = torch.randn(mib * 2**20 // 4, device=device)
        y = torch.empty_like(x)  # summed in place: refilled from x before every call, outside the timer
        t = {"ring": slowest_median(lambda: collectives.ring_all_reduce(y), repeats, device, lambda: y.copy_(x)),
             "nccl": slowest_median(lambda: dist.all_reduce(y), repeats, device, lambda: y.copy_(x))}
        busbw = {k: 2 * (n - 1) / n * x.nbytes / v / 1e9 for k, v in t.items()}
        rows.append({"mib": mib, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                     **{f"{k}_busbw": v for k, v in busbw.items()}})
        del x, y
        mib *= 8
    return rows


def matmul_seconds(fn, repeats: int, device: torch.device, inner: int = 5) -> float:
    """Median seconds of one fn() call: `inner` calls between two synchronisations, after two warm-ups."""
    times = []
    for i in range(2 + repeats):
        t0 = now(device)
        for _ in range(inner):
            fn()
        if i >= 2:
            times.append((now(device) - t0) / inner)
    return statistics.median(times)


def matmul_table(device: torch.device, repeats: int, sizes=(4096, 8192, 16384)) -> list[dict]:
    """TFLOP/s of bf16 and FP8 (per-tensor scaled) GEMMs of size M = N = K on this rank's GPU."""
    fp8 = torch.cuda.get_device_capability(device) >= (8, 9)
    rows = []
    for s in sizes:
        a, b = (torch.randn(s, s, device=device, dtype=torch.bfloat16) for _ in range(2))
        row = {"size": s, "bf16": 2 * s**3 / matmul_seconds(lambda: a @ b, repeats, device) / 1e12, "fp8": None}
        if fp8:
            # per-tensor scales, as mixed_precision's current scaling sets them: amax maps to E4M3's largest value
            sa, sb = (torch.finfo(mp.E4M3).max / t.abs().max().float() for t in (a, b))
            aq = mp.quantize(a, mp.E4M3, sa)  # (M, K) row-major
            bq = mp.quantize(b.t().contiguous(), mp.E4M3, sb).t()  # (K, N) column-major: K contiguous, as required
            ia, ib = 1 / sa, 1 / sb
            gemm = lambda: torch._scaled_mm(aq, bq, scale_a=ia, scale_b=ib, out_dtype=torch.bfloat16)  # noqa: E731
            row["fp8"] = 2 * s**3 / matmul_seconds(gemm, repeats, device) / 1e12
            del aq, bq
        rows.append(row)
        del a, b
        torch.cuda.empty_cache()
    return rows


def muon_rows(device: torch.device, steps: int) -> list[dict]:
    """Newton–Schulz's share of Muon's training step on this job (data parallel; NS divided over the ranks)."""
    n, rows = dist.get_world_size(), []
    for cfg in (muon.GPTConfig(), muon.GPTConfig(seq_len=512, n_layer=4, n_head=16, d_model=1024)):
        r = muon.train("muon", steps, cfg=cfg, batch_size=8 * n, device=device)
        rows.append({"d": cfg.d_model, "layers": cfg.n_layer, "seq": cfg.seq_len, "batch": 8 * n,
                     "ns_share": r["ns_share"], "ms": r["ms_per_step"], "ns_dtype": muon.default_ns_dtype(device)})
        del r
        torch.cuda.empty_cache()
    return rows


FSDP_MODEL = ["--d-model", "1024", "--n-layer", "12", "--n-head", "16", "--seq-len", "1024", "--batch-size", "8"]


def fsdp_mfu(device: torch.device, steps: int) -> dict:
    """fsdp_train.main in bf16 with full sharding (its own log hidden); MFU from its median step time. fsdp_train.main
    ends the process group, so this runs last."""
    argv = FSDP_MODEL + ["--precision", "bf16", "--sharding", "full", "--steps", str(steps), "--warmup", "5",
                         "--eval-every", "0", "--sample-len", "0", "--log-every", str(steps), "--device", device.type]
    flags = fsdp_train.make_parser().parse_args(argv)
    peak = argparse.Namespace(precision="bf16", peak_tflops=None)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        fsdp_train.resolve_peak(peak, device, 0)  # the same table (or measured matmul) that fsdp_train uses
        result = fsdp_train.main(argv)[0]
    cfg = fsdp_train.GPTConfig(seq_len=flags.seq_len, n_layer=flags.n_layer, n_head=flags.n_head, d_model=flags.d_model)
    n = result["world_size"]
    tokens = flags.batch_size * n * cfg.seq_len  # per optimizer step (no gradient accumulation)
    achieved = fsdp_train.flops_per_token(cfg) * tokens / (result["ms_per_step"] / 1e3)
    return {"n": n, "params": result["num_params"], "ms": result["ms_per_step"],
            "tok_s": tokens / result["ms_per_step"] * 1e3,
            "tflops_per_gpu": achieved / n / 1e12, "peak": peak.peak_tflops, "source": quiet.getvalue().splitlines()[0],
            "mfu": achieved / n / (peak.peak_tflops * 1e12), "loss": result["final_loss"]}


def print_tables(n: int, allreduce: list[dict], matmul: list[dict], muons: list[dict]) -> None:
    nccl = torch.cuda.nccl.version()  # a tuple in recent PyTorch, an int in older ones
    nccl = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    print(f"GPU report: {n} x {torch.cuda.get_device_name()} (NCCL {nccl}, "
          f"torch {torch.__version__})\n")
    print(f"1. All-reduce, float32, N = {n}: busbw = 2(N-1)/N · bytes / time (slowest rank's median)")
    print(f"{'size':>9} | {'ring ms':>9} {'ring busbw GB/s':>16} | {'NCCL ms':>9} {'NCCL busbw GB/s':>16} | "
          f"{'ring/NCCL time':>14}")
    for r in allreduce:
        print(f"{r['mib']:>5} MiB | {r['ring_ms']:>9.3f} {r['ring_busbw']:>16.1f} | {r['nccl_ms']:>9.3f} "
              f"{r['nccl_busbw']:>16.1f} | {r['ring_ms'] / r['nccl_ms']:>14.2f}")
    print("\n2. Matmul M = N = K, TFLOP/s = 2·M·N·K / median time (rank 0's GPU; FP8: E4M3 operands, per-tensor "
          "scales, bf16 output, quantisation not timed)")
    print(f"{'size':>6} | {'bf16':>8} | {'fp8 _scaled_mm':>14} | {'fp8/bf16':>8}")
    for r in matmul:
        fp8 = "n/a (< sm89)" if r["fp8"] is None else f"{r['fp8']:.0f}"
        ratio = "-" if r["fp8"] is None else f"{r['fp8'] / r['bf16']:.2f}"
        print(f"{r['size']:>6} | {r['bf16']:>8.0f} | {fp8:>14} | {ratio:>8}")
    ns_dtype = str(muons[0]["ns_dtype"]).replace("torch.", "")
    print(f"\n3. Muon (muon.py): Newton–Schulz's share of a training step, NS in {ns_dtype}, split over {n} ranks "
          f"(its all-gathers included), model fp32")
    print(f"{'d_model':>7} {'layers':>6} {'seq':>5} {'batch':>5} | {'ms/step':>8} | {'NS share':>8}")
    for r in muons:
        print(f"{r['d']:>7} {r['layers']:>6} {r['seq']:>5} {r['batch']:>5} | {r['ms']:>8.1f} | "
              f"{100 * r['ns_share']:>7.1f}%")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per figure; the median is printed")
    parser.add_argument("--allreduce-max-mib", type=int, default=512, help="largest all-reduce, MiB (1, 8, 64, ...)")
    parser.add_argument("--muon-steps", type=int, default=20, help="Muon training steps per model size")
    parser.add_argument("--fsdp-steps", type=int, default=30, help="fsdp_train steps (0 means skip the MFU row)")
    return parser


def main(argv=None) -> None:
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag in ("repeats", "allreduce_max_mib", "muon_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give at least 1")
    if args.fsdp_steps < 0:
        parser.error(f"--fsdp-steps {args.fsdp_steps}: give 0 (skip) or more")
    if not torch.cuda.is_available():
        sys.exit("gpu_report.py needs CUDA GPUs and none is visible here: run it on a GPU node "
                 "(torchrun --nproc_per_node=8 benchmarks/gpu_report.py)")
    rank, n, device = collectives.setup_distributed("cuda")
    try:
        allreduce = allreduce_table(device, args.repeats, args.allreduce_max_mib)
        matmul = matmul_table(device, args.repeats) if rank == 0 else []
        dist.barrier()
        muons = muon_rows(device, args.muon_steps)
        if rank == 0:
            print_tables(n, allreduce, matmul, muons)
            sys.stdout.flush()
        if args.fsdp_steps:
            f = fsdp_mfu(device, args.fsdp_steps)
            if rank == 0:
                print(f"\n4. fsdp_train.py, bf16, full sharding, {f['params'] / 1e6:.0f}M parameters "
                      f"({' '.join(FSDP_MODEL)}) on {f['n']} GPUs, {args.fsdp_steps} steps")
                print(f"{f['ms']:.1f} ms/step (median) | {f['tok_s'] / 1e3:.1f}k tok/s | {f['tflops_per_gpu']:.1f} "
                      f"TFLOP/s per GPU | MFU {100 * f['mfu']:.1f}% of {f['peak']:.1f} TFLOP/s | final loss "
                      f"{f['loss']:.3f}\n({f['source']})")
    finally:
        collectives.cleanup()


if __name__ == "__main__":
    main()
