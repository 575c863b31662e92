"""Muon (muon.py) against AdamW: a learning-rate sweep for each on TinyGPT and the default corpus, steps to reach
a target training loss and their ratio; then our Muon's optimizer step against torch.optim.Muon's, and our AdamW's
against torch.optim.AdamW's, on the same matrices. The best learning rates found here are muon.py's BEST_LR.

Run:   python benchmarks/muon_bench.py
       python benchmarks/muon_bench.py --steps 300 --target 2.6
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import muon  # noqa: E402


def steps_to(losses, target):
    return next((i + 1 for i, v in enumerate(muon.smooth(losses)) if v <= target), None)


def time_step(opt, params, repeats=3) -> float:
    """Median ms of one optimizer step (the first, which allocates the state, not counted)."""
    times = []
    for _ in range(repeats + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        t0 = muon.now(params[0].device)
        opt.step()
        times.append(muon.now(params[0].device) - t0)
    return statistics.median(times[1:]) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per learning rate")
    parser.add_argument("--target", type=float, default=2.8, help="training loss (mean of 10 steps) to reach")
    parser.add_argument("--adamw-lrs", default="1e-3,3e-3,1e-2,3e-2", help="AdamW's learning rates to sweep")
    parser.add_argument("--muon-lrs", default="0.01,0.02,0.05,0.1", help="Muon's learning rates to sweep")
    args = parser.parse_args(argv)
    if args.steps < 11 or args.target <= 0:
        parser.error(f"--steps {args.steps} --target {args.target}: give at least 11 steps (past the warm-up) "
                     f"and a positive loss")
    data = muon.load_text()
    best = {}
    print(f"TinyGPT (d=64, 2 layers), {args.steps} steps, batch 16×64; steps to a training loss of {args.target}")
    print(f"{'optimizer':<12} {'lr':>7} {'final loss':>10} {'val loss':>9} {'steps to target':>16} {'ms/step':>8}")
    for name, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        for lr in map(float, lrs.split(",")):
            r = muon.train(name, args.steps, lr=lr, data=data)
            reach = steps_to(r["losses"], args.target)
            print(f"{name:<12} {lr:>7g} {muon.smooth(r['losses'])[-1]:>10.3f} {r['val_loss']:>9.3f} "
                  f"{reach if reach else '-':>16} {r['ms_per_step']:>8.1f}", flush=True)
            if name not in best or r["val_loss"] < best[name][1]:
                best[name] = (lr, r["val_loss"], reach)
    (la, va, ra), (lm, vm, rm) = best["adamw"], best["muon"]
    print(f"\nbest: AdamW lr {la:g} (val {va:.3f}), Muon lr {lm:g} (val {vm:.3f})")
    if ra and rm:
        print(f"steps to {args.target}: AdamW {ra}, Muon {rm}: AdamW needs {ra / rm:.2f}x the steps")

    torch.manual_seed(0)
    model = muon.TinyGPT(muon.GPTConfig(d_model=256, n_layer=4))
    matrices, _ = muon.split_params(model)
    ours32 = time_step(muon.Muon(matrices, lr=0.02, ns_dtype=torch.float32), matrices)
    ours16 = time_step(muon.Muon(matrices, lr=0.02, ns_dtype=torch.bfloat16), matrices)
    theirs = time_step(torch.optim.Muon(matrices, lr=0.02, weight_decay=0.0), matrices)
    print(f"\noptimizer step on the {len(matrices)} hidden matrices of a d=256, 4-layer TinyGPT (median of 3):")
    print(f"ours, Newton-Schulz in float32  {ours32:8.2f} ms  ({ours32 / theirs:.2f}x torch.optim.Muon)")
    print(f"ours, Newton-Schulz in bfloat16 {ours16:8.2f} ms  ({ours16 / theirs:.2f}x torch.optim.Muon)")
    print(f"torch.optim.Muon (bfloat16)     {theirs:8.2f} ms")
    ours_adamw = time_step(muon.AdamW(matrices, lr=1e-3), matrices)
    torch_adamw = time_step(torch.optim.AdamW(matrices, lr=1e-3, foreach=False), matrices)
    print(f"AdamW on the same matrices: ours {ours_adamw:.2f} ms, torch.optim.AdamW (foreach=False) {torch_adamw:.2f} ms "
          f"({ours_adamw / torch_adamw:.2f}x)")


if __name__ == "__main__":
    main()
