"""mixed_precision.py measured against PyTorch: our DynamicLossScaler against torch.amp.GradScaler (time of
unscale + step + update on TinyGPT's gradients), the step time of every recipe side by side, and, on a GPU, FP8
(torch._scaled_mm) against BF16 matmul throughput.

Run:   python benchmarks/mixed_precision_bench.py
"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mixed_precision as mp  # noqa: E402


def median_ms(fn, device="cpu", repeats=20):
    """Median wall time of fn over `repeats` calls after one warm-up, read by the script's synchronising timer."""
    times = []
    for _ in range(repeats + 1):
        t0 = mp.now(device)
        fn()
        times.append(mp.now(device) - t0)
    return statistics.median(times[1:]) * 1e3


def main():
    torch.manual_seed(0)
    model = mp.TinyGPT(mp.GPTConfig(d_model=128, n_layer=4))
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    opt = torch.optim.SGD(params, lr=0.0)
    ours, theirs = mp.DynamicLossScaler(), torch.amp.GradScaler("cpu")
    theirs.scale(torch.ones(()))

    def with_ours():
        for p, g in zip(params, grads):
            p.grad = g.clone()
        ours.unscale_(opt)
        ours.step(opt)
        ours.update()

    def with_theirs():
        for p, g in zip(params, grads):
            p.grad = g.clone()
        theirs.step(opt)
        theirs.update()

    t_o, t_t = median_ms(with_ours), median_ms(with_theirs)
    print(f"loss scaler on {sum(p.numel() for p in params):,} parameters ({len(params)} tensors), median of 20:")
    print(f"  DynamicLossScaler {t_o:7.2f} ms | torch.amp.GradScaler {t_t:7.2f} ms | ours/theirs {t_o / t_t:.2f}x")

    data = mp.load_text()
    print("\nstep time per recipe (TinyGPT d=64, 2 layers, batch 16×64, median of 20 steps):")
    base = None
    for recipe in mp.RECIPES:
        r = mp.train(recipe, 20, data=data)
        base = base or r["ms_per_step"]
        path = f"  (matmuls: {r['fp8_gemm']})" if r["fp8_gemm"] else ""
        print(f"  {recipe:<5} {r['ms_per_step']:8.1f} ms  ({r['ms_per_step'] / base:.2f}x fp32){path}")

    if not torch.cuda.is_available():
        print("\nno CUDA device here: the FP8-vs-BF16 matmul comparison runs on a GPU machine")
        return
    n = 8192
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    a16, b16 = a.bfloat16(), b.bfloat16()
    one = torch.ones((), device="cuda")
    a8, b8 = a.to(mp.E4M3), b.to(mp.E4M3).t().contiguous().t()
    problem = mp.scaled_mm_problem(a8, b8, torch.cuda.get_device_capability())
    if problem:
        print(f"\nno FP8 GEMM on {torch.cuda.get_device_name()}: {problem}")
        return
    t16 = median_ms(lambda: a16 @ b16, "cuda")
    t8 = median_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), "cuda")
    flops = 2 * n ** 3
    print(f"\n{n}×{n} matmul on {torch.cuda.get_device_name()}: bf16 {flops / t16 / 1e9:.0f} TFLOP/s, "
          f"fp8 {flops / t8 / 1e9:.0f} TFLOP/s, fp8/bf16 speed {t16 / t8:.2f}x")


if __name__ == "__main__":
    main()
