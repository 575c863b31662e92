"""Muon: momentum orthogonalised by Newton-Schulz, for the hidden weight matrices of a transformer.

AdamW (written out first, below) scales every element of the update on its own and keeps two moments per parameter.
Muon treats a weight as a matrix: it takes the momentum M = U·Σ·Vᵀ and steps along msign(M) = U·Vᵀ, the same
directions with every singular value set to 1, so rare directions (small σ) move as far as dominant ones. Computing
an SVD each step would be slow; five Newton-Schulz iterations X ← aX + b(XXᵀ)X + c(XXᵀ)²X with
(a, b, c) = (3.4445, −4.7750, 2.0315) get close with matmuls only. Embeddings, the output head, norms and biases stay
with AdamW. Data parallel over N ranks, each rank orthogonalises 1/N of the matrices and one all-gather per group of
equal-sized matrices shares the results: each rank sends Σ_groups ⌈k/N⌉·numel·bytes per step.

Run:   python muon.py --compare
       python muon.py --ns-check
       python muon.py --lr-transfer
       torchrun --nproc_per_node=2 muon.py --optimizer muon --steps 100
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- the technique -----------------------------------------------------


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay, written out. Per element, at step t:
    m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  W ← W·(1 - lr·wd) - lr·m̂/(√v̂ + ε), m̂ = m/(1-β1ᵗ), v̂ = v/(1-β2ᵗ).
    State: m and v, 4 + 4 bytes per fp32 parameter; with mixed precision's fp32 master copy, zero.py's 12 bytes."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if lr <= 0:
            raise ValueError(f"learning rate {lr} must be positive")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["m"], state["v"]
                p.mul_(1 - g["lr"] * g["weight_decay"])  # decoupled: W shrinks; the decay never enters m or v
                m.lerp_(p.grad, 1 - beta1)  # m ← β1·m + (1-β1)·g
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v ← β2·v + (1-β2)·g²
                # lr·m̂/(√v̂ + ε) with both corrections folded into scalars, in torch.optim.AdamW's order (so the
                # two agree to the bit): √v / √(1-β2ᵗ) + ε, then m times -lr/(1-β1ᵗ) over it.
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(g["eps"])
                p.addcdiv_(m, denom, value=-g["lr"] / (1 - beta1 ** t))
        return loss


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: steepest slope at 0 that still lands near 1


def default_ns_dtype(device) -> torch.dtype:
    """bf16 on GPUs, as the literature runs it; float32 on CPUs, where bf16 matmuls are slow."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=None) -> torch.Tensor:
    """Approximately U·Vᵀ for G = U·Σ·Vᵀ: every singular value pushed towards 1, singular vectors kept.

    X ← aX + b(XXᵀ)X + c(XXᵀ)²X applies the odd polynomial p(σ) = aσ + bσ³ + cσ⁵ to each singular value.
    Dividing by the Frobenius norm first puts every σ in (0, 1]; five steps map them into roughly [0.7, 1.2]."""
    if G.ndim != 2:
        raise ValueError(f"newton_schulz5 takes a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or default_ns_dtype(G.device))
    tall = X.shape[0] > X.shape[1]
    if tall:  # work on the wide side: XXᵀ is then the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²; addmm fuses it: one rounding, not three, in bf16
        X = torch.addmm(X, B, X, beta=a)  # a·X + B·X
    return (X.T if tall else X).to(G.dtype).contiguous()


SCALES = ("none", "keller", "mup", "moonlight")


def scale_factor(scale: str, d_out: int, d_in: int) -> float:
    """How much to multiply the orthogonalised update of a (d_out, d_in) weight by.

    none: 1. keller: √max(1, d_out/d_in) (the original Muon). mup: √(d_out/d_in) (spectral/μP scaling).
    moonlight: 0.2·√max(d_out, d_in), which gives the update the RMS of a typical AdamW update, so AdamW's
    learning rate and weight decay carry over (Liu et al. 2025)."""
    if scale == "none":
        return 1.0
    if scale == "keller":
        return math.sqrt(max(1.0, d_out / d_in))
    if scale == "mup":
        return math.sqrt(d_out / d_in)
    if scale == "moonlight":
        return 0.2 * math.sqrt(max(d_out, d_in))
    raise ValueError(f"unknown scale {scale!r}: choose one of {', '.join(SCALES)}")


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised: M ← μM + (1-μ)G; with Nesterov U = (1-μ)G + μM, else U = M;
    W ← W·(1 - lr·wd) - lr·scale·newton_schulz5(U). Only for 2-D weights; its state is M alone (4 bytes, not 8).

    With distributed=True over N > 1 ranks (data parallelism, gradients already averaged), the matrices are grouped
    by size; in each group rank r orthogonalises every N-th matrix and one all-gather per N matrices shares them."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, scale: str = "keller", ns_dtype=None, group=None,
                 distributed: bool = False):
        if lr <= 0:
            raise ValueError(f"learning rate {lr} must be positive")
        scale_factor(scale, 1, 1)  # validates the name
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, scale=scale))
        for g in self.param_groups:
            for p in g["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon orthogonalises matrices; a parameter of shape {tuple(p.shape)} is not "
                                     f"one: give embeddings' rows, biases and norms to AdamW (see split_params)")
        self.ns_dtype, self.group, self.distributed = ns_dtype, group, distributed
        self.ns_seconds = 0.0  # time spent orthogonalising (and sharing), for --ns-check's overhead figure
        self.ns_calls = 0  # matrices this rank orthogonalised

    def _orthogonalise(self, p: torch.Tensor, g: dict, update: torch.Tensor) -> torch.Tensor:
        self.ns_calls += 1
        return newton_schulz5(update, g["ns_steps"], dtype=self.ns_dtype or default_ns_dtype(p.device))

    def _orthogonalise_shared(self, work: list) -> list[torch.Tensor]:
        """Each rank orthogonalises its share; one all-gather per N equal-sized matrices gives everyone all of them."""
        n, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        ortho, groups = [None] * len(work), {}  # groups: {numel: indices into work}
        for i, (p, _, _) in enumerate(work):
            groups.setdefault(p.numel(), []).append(i)
        for numel, idx in groups.items():
            p0 = work[idx[0]][0]
            dtype = self.ns_dtype or default_ns_dtype(p0.device)  # bf16 results travel as bf16: exact, half the bytes
            for start in range(0, len(idx), n):  # one round: rank r takes matrix idx[start + r]
                if start + r < len(idx):
                    o = self._orthogonalise(*work[idx[start + r]]).to(dtype).flatten()
                else:  # the group ran out before this rank: it sends padding, as the others wait for N pieces
                    o = torch.zeros(numel, dtype=dtype, device=p0.device)
                gathered = torch.empty(n, numel, dtype=dtype, device=p0.device)  # (N, numel): row k from rank k
                dist.all_gather(list(gathered.unbind(0)), o, group=self.group)
                for k, i in enumerate(idx[start:start + n]):
                    ortho[i] = gathered[k].view_as(work[i][0]).to(work[i][0].dtype)
        return ortho

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        work = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - g["momentum"])
                update = p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf
                work.append((p, g, update))
        device = self.param_groups[0]["params"][0].device
        t0 = now(device)
        if self.distributed and dist.get_world_size(self.group) > 1:
            ortho = self._orthogonalise_shared(work)
        else:
            ortho = [self._orthogonalise(*w) for w in work]
        self.ns_seconds += now(device) - t0
        for (p, g, _), o in zip(work, ortho):
            p.mul_(1 - g["lr"] * g["weight_decay"])
            p.add_(o, alpha=-g["lr"] * scale_factor(g["scale"], p.shape[0], p.shape[1]))
        return loss


def gather_bytes_per_step(params: list[torch.Tensor], n: int, itemsize: int) -> tuple[int, int]:
    """The formula for distributed Muon's traffic from each rank per step: (calls, bytes) = Σ over groups of equal
    numel of ⌈k/N⌉ all-gathers, each sending one matrix of numel elements."""
    sizes = collections.Counter(p.numel() for p in params)  # {numel: k}
    calls = sum(math.ceil(k / n) for k in sizes.values())
    return calls, sum(math.ceil(k / n) * numel * itemsize for numel, k in sizes.items())


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Hidden matrices (attention q, k, v, o and the MLP, inside the blocks) to Muon; embeddings, the output head,
    norms and biases to AdamW. An embedding is a lookup table, not a linear map, so orthogonalising it means nothing."""
    muon, adamw, seen = [], [], set()
    blocks = getattr(model, "blocks", None)
    in_blocks = {id(p) for p in blocks.parameters()} if blocks is not None else set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (muon if p.ndim == 2 and id(p) in in_blocks else adamw).append(p)
    return muon, adamw


class MuonWithAdamW:
    """One optimizer object for the usual recipe: Muon for the hidden matrices, AdamW for everything else."""

    def __init__(self, model: nn.Module, lr: float = 0.02, adamw_lr: float = 3e-3, momentum: float = 0.95,
                 weight_decay: float = 0.0, adamw_weight_decay: float = 0.0, scale: str = "keller", ns_dtype=None,
                 group=None, distributed: bool = False):
        muon_params, adamw_params = split_params(model)
        self.muon = Muon(muon_params, lr=lr, momentum=momentum, weight_decay=weight_decay, scale=scale,
                         ns_dtype=ns_dtype, group=group, distributed=distributed)
        self.adamw = AdamW(adamw_params, lr=adamw_lr, betas=(0.9, 0.95), weight_decay=adamw_weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """One data-parallel step on this rank's slice (x, y) of the batch. The optimizers here, distributed Muon
    included, expect gradients already averaged over the N ranks: the all-reduce comes before opt.step().
    Returns the whole batch's loss (the mean of the ranks' losses), the same on every rank."""
    loss = model(x, y)
    loss.backward()
    logged = loss.detach().clone()  # on the run's device, so that NCCL can reduce it
    if n > 1:  # each rank saw a slice: average the gradients, and the logged loss, over the ranks
        for t in [logged] + [p.grad for p in model.parameters()]:
            dist.all_reduce(t)
            t /= n
    opt.step()
    opt.zero_grad()
    return logged


# --- demo --------------------------------------------------------------

# From benchmarks/muon_bench.py's learning-rate sweep (the README's table); muon_adamw (AdamW's half of Muon) not swept.
BEST_LR = {"adamw": 1e-2, "muon": 0.05, "muon_adamw": 3e-3}
# --lr-transfer's grid (factors of 2): around the best at d = 64 (0.05), and for moonlight around AdamW's (1e-2).
LR_GRID = {"none": (0.0125, 0.025, 0.05, 0.1, 0.2), "moonlight": (0.0025, 0.005, 0.01, 0.02, 0.04)}


@torch.no_grad()
def evaluate(model: TinyGPT, val: torch.Tensor, batches: int = 4, per_batch: int = 16, device="cpu") -> float:
    """Mean loss on fixed held-out batches (the same on every rank and in every run)."""
    model.eval()
    held = (get_batch(val, per_batch, model.cfg.seq_len, torch.Generator().manual_seed(99 + b)) for b in range(batches))
    losses = [model(x.to(device), y.to(device)) for x, y in held]
    model.train()
    return torch.stack(losses).mean().item()


def train(optimizer: str = "muon", steps: int = 100, lr: float | None = None, scale: str = "keller",
          cfg: GPTConfig | None = None, batch_size: int = 16, data=None, device="cpu", seed: int = 0,
          log_every: int = 0, warmup: int = 10) -> dict:
    """Train TinyGPT with one optimizer; under torchrun each rank takes its slice of every batch (train_step).
    Returns the training losses, the validation loss, the median ms per step and Newton-Schulz's share of it."""
    cfg = cfg or GPTConfig()
    rank, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    data = load_text() if data is None else data
    train_data, val_data = data.tensor_split([int(len(data) * 0.9)])  # views: the first 90 %, the last 10 %
    torch.manual_seed(seed)
    model = TinyGPT(cfg).to(device)
    if optimizer == "adamw":  # our AdamW on every parameter
        opt = AdamW(model.parameters(), lr=lr or BEST_LR["adamw"], betas=(0.9, 0.95), weight_decay=0.0)
    elif optimizer == "muon":  # Muon on the hidden matrices, AdamW on the rest
        opt = MuonWithAdamW(model, lr=lr or BEST_LR["muon"], adamw_lr=BEST_LR["muon_adamw"], scale=scale,
                            distributed=n > 1)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: choose muon or adamw")
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    mine = slice(rank * (batch_size // n), (rank + 1) * (batch_size // n))  # this rank's rows of every batch
    for step in range(steps):
        for g, lr0 in zip(opt.param_groups, base):  # linear warm-up, then linear decay to 0
            g["lr"] = lr0 * min((step + 1) / warmup, (steps - step) / max(1, steps - warmup))
        batch = get_batch(train_data, batch_size, cfg.seq_len, gen)  # the same (B, T) batch on every rank
        x, y = (t[mine].to(device) for t in batch)
        t0 = now(device)
        logged = train_step(model, opt, x, y, n)
        times.append((now(device) - t0) * 1e3)  # ms
        losses.append(logged.item())
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"{optimizer} | step {step + 1}/{steps} | loss {losses[-1]:.3f} | {times[-1]:.0f} ms", flush=True)
    ns_ms = opt.muon.ns_seconds * 1e3 if optimizer == "muon" else 0.0
    return {"optimizer": optimizer, "losses": losses, "val_loss": evaluate(model, val_data, device=device),
            "ms_per_step": statistics.median(times), "ns_share": ns_ms / sum(times), "model": model, "opt": opt}


def smooth(xs: list[float], k: int = 10) -> list[float]:
    """Mean of the last k values at every step: single-batch losses are noisy."""
    return [sum(xs[max(0, i - k + 1): i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(xs))]


def compare(steps: int = 150, cfg: GPTConfig | None = None, data=None, device="cpu", every: int = 15,
            verbose: bool = False) -> dict:
    """AdamW vs Muon+AdamW, same seed and batches; a twice-as-long AdamW run counts its steps to Muon's final loss."""
    muon = train("muon", steps, cfg=cfg, data=data, device=device)
    adamw = train("adamw", steps, cfg=cfg, data=data, device=device)
    longer = train("adamw", 2 * steps, cfg=cfg, data=data, device=device)
    target = smooth(muon["losses"])[-1]
    reach = next((i + 1 for i, v in enumerate(smooth(longer["losses"])) if v <= target), None)
    if verbose:
        m, a = smooth(muon["losses"]), smooth(adamw["losses"])
        print(f"{'step':>5} | {'AdamW':>7} | {'Muon+AdamW':>10}   (training loss, mean of the last 10 steps)")
        for s in range(every - 1, steps, every):
            print(f"{s + 1:>5} | {a[s]:>7.3f} | {m[s]:>10.3f}")
        print(f"\nvalidation loss after {steps} steps: AdamW {adamw['val_loss']:.3f} | "
              f"Muon+AdamW {muon['val_loss']:.3f}")
        print(f"AdamW needs {reach} steps to reach Muon's final training loss {target:.3f} (Muon: {steps}): "
              f"{reach / steps:.2f}x the steps; the seed's claim at scale is about 2x" if reach else
              f"AdamW did not reach Muon's final loss {target:.3f} in {2 * steps} steps (> 2x)")
        print(f"step time: AdamW {adamw['ms_per_step']:.1f} ms | Muon+AdamW {muon['ms_per_step']:.1f} ms "
              f"(Newton-Schulz {100 * muon['ns_share']:.1f}% of Muon's step)")
    return {"steps": steps, "every": every, "muon": muon, "adamw": adamw, "adamw_2x": longer, "target": target,
            "adamw_steps_to_target": reach}


def ns_check(cfg: GPTConfig | None = None, data=None, device="cpu", verbose: bool = False) -> dict:
    """Newton-Schulz against the exact UVᵀ from an SVD, on random matrices and on the momentum of 20 Muon steps."""
    torch.manual_seed(0)
    mats = [(f"random {r}x{c}", torch.randn(r, c)) for r, c in ((128, 512), (512, 128), (256, 256))]
    run = train("muon", 20, cfg=cfg, data=data, device=device)
    state = run["opt"].muon.state
    mats += [(f"momentum {name}", state[p]["momentum_buffer"].float().cpu())
             for name, p in run["model"].named_parameters() if p in state and name.startswith("blocks.0")]
    rows = []
    for name, G in mats:  # the SVD reference in float64 on the CPU; Newton-Schulz on the run's device
        U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
        exact = U @ Vh
        X = newton_schulz5(G.to(device)).double().cpu()
        sv = torch.linalg.svdvals(X)
        rows.append({"matrix": name, "cond": (S[0] / S[-1]).item(), "sv_min": sv.min().item(),
                     "sv_max": sv.max().item(), "rel_error": ((X - exact).norm() / exact.norm()).item()})
    if verbose:
        print(f"{'matrix':<34} {'cond(G)':>9} {'min σ(NS)':>10} {'max σ(NS)':>10} {'|NS-UVᵀ|/|UVᵀ|':>15}")
        for r in rows:
            print("{matrix:<34} {cond:>9.1f} {sv_min:>10.3f} {sv_max:>10.3f} {rel_error:>15.3f}".format(**r))
        print(f"exact UVᵀ has every σ = 1. Newton-Schulz ({default_ns_dtype(device)}) took "
              f"{100 * run['ns_share']:.1f}% of a {run['ms_per_step']:.0f} ms training step")
    return {"rows": rows, "ns_share": run["ns_share"], "ms_per_step": run["ms_per_step"],
            "ns_dtype": default_ns_dtype(device)}


def lr_transfer(widths: tuple[int, ...] = (64, 256), scales: tuple[str, ...] = ("none", "moonlight"),
                steps: int = 60, cfg: GPTConfig | None = None, data=None, device="cpu", grid: dict | None = None,
                batch_size: int = 16, verbose: bool = False) -> dict:
    """Sweep Muon's learning rate per width and update scale; a scale transfers if one rate is best at every width."""
    cfg, grid = cfg or GPTConfig(), grid or LR_GRID

    def run(scale: str, d: int, lr: float) -> float:
        r = train("muon", steps, lr, scale, dataclasses.replace(cfg, d_model=d), batch_size, data, device)
        if verbose:
            print(f"scale {scale:<9} | d {d:>4} | lr {lr:<7g} | val loss {r['val_loss']:.3f}", flush=True)
        return r["val_loss"]
    val = {(scale, d): [run(scale, d, lr) for lr in grid[scale]] for scale in scales for d in widths}
    best = {k: grid[k[0]][min(range(len(v)), key=v.__getitem__)] for k, v in val.items()}
    if verbose:
        print(f"\nvalidation loss after {steps} steps, Muon's learning rate swept (AdamW's half fixed at "
              f"{BEST_LR['muon_adamw']:g}); * marks the best per width")
        for scale in scales:
            print(f"{'scale ' + scale:<16}" + "".join(f"{'d = ' + str(d):>12}" for d in widths))
            for i, lr in enumerate(grid[scale]):
                cells = (f"{val[(scale, d)][i]:>11.3f}" + ("*" if best[(scale, d)] == lr else " ") for d in widths)
                print(f"  lr {lr:<11g}" + "".join(cells))
            bests = [best[(scale, d)] for d in widths]
            print(f"  best lr per width: {', '.join(f'd = {d}: {b:g}' for d, b in zip(widths, bests))} -> "
                  f"{'the same rate' if len(set(bests)) == 1 else 'different rates'} (grid step 2x)")
    return dict(widths=tuple(widths), scales=tuple(scales), grid=grid, steps=steps, val_loss=val, best=best)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("--compare", action="store_true", help="AdamW vs Muon+AdamW, same seed, data and steps")
    add("--ns-check", action="store_true", help="Newton-Schulz vs the exact SVD")
    add("--lr-transfer", action="store_true", help="sweep Muon's lr at each of --widths, scales none, moonlight")
    add("--widths", default="64,256", help="comma-separated model widths for --lr-transfer")
    add("--optimizer", choices=["muon", "adamw"], default="muon", help="for a single run")
    add("--scale", default="keller", help=f"Muon's update scale: {', '.join(SCALES)}")
    add("--lr", type=float, default=None, help="default: the benchmark's best for the optimizer")
    add("--steps", type=int, default=None, help="training steps (default 150; 60 per run for --lr-transfer)")
    add("--batch-size", type=int, default=16, help="sequences per step, split over the ranks")
    add("--n-layer", type=int, default=2, help="transformer blocks")
    add("--n-head", type=int, default=4, help="attention heads (must divide --d-model)")
    add("--d-model", type=int, default=64, help="model width")
    add("--seq-len", type=int, default=64, help="tokens (bytes) per sequence")
    add("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.Tensor:
    """Every flag checked before any work, one line naming the flag and the fix; returns the text --data names."""
    if args.scale not in SCALES:
        parser.error(f"--scale {args.scale}: choose one of {', '.join(SCALES)}")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr {args.lr}: the learning rate must be positive")
    for flag in ("steps", "batch_size", "n_layer", "n_head", "d_model", "seq_len"):
        if (value := getattr(args, flag)) is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if not all(w.strip().lstrip("-").isdigit() for w in args.widths.split(",")):
        parser.error(f"--widths {args.widths}: give comma-separated integers, e.g. 64,256")
    args.widths = tuple(int(w) for w in args.widths.split(","))
    for w in args.widths:
        if w < 1 or (args.lr_transfer and w % args.n_head):  # a single run uses --d-model, not --widths
            parser.error(f"--widths: {w} is not a positive multiple of --n-head {args.n_head} "
                         f"(try {max(1, round(w / args.n_head)) * args.n_head})")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
    try:
        return load_text(args.data)
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    data = check_args(parser, args)
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    steps = args.steps or (60 if args.lr_transfer else 150)
    rank, n, device = setup_distributed(args.device)
    try:
        if args.ns_check:
            return ns_check(cfg, data, device, verbose=rank == 0)
        if args.lr_transfer:
            return lr_transfer(args.widths, ("none", "moonlight"), steps, cfg, data, device,
                               batch_size=args.batch_size, verbose=rank == 0)
        if args.compare:
            return compare(steps, cfg, data, device, verbose=rank == 0)
        with CommCounter() as counter:  # one run; under torchrun, Muon's all-gathers are counted from outside
            r = train(args.optimizer, steps, args.lr, args.scale, cfg, args.batch_size, data, device,
                      log_every=max(1, steps // 10))
        if rank == 0:
            print(f"validation loss {r['val_loss']:.3f} | {r['ms_per_step']:.1f} ms/step")
        if rank == 0 and n > 1 and args.optimizer == "muon":  # the all-gathers counted, beside the formula
            calls, nbytes = counter.totals().get("all_gather", (0, 0))
            params = r["opt"].muon.param_groups[0]["params"]
            f_calls, f_bytes = gather_bytes_per_step(params, n, default_ns_dtype(device).itemsize)
            print(f"Muon's all-gathers per step, counted: {calls / steps:g} calls, {nbytes / steps / 1024:.1f} KiB "
                  f"sent by each rank | formula Σ⌈k/N⌉·numel·bytes: {f_calls} calls, {f_bytes / 1024:.1f} KiB")
        return r
    finally:
        cleanup()


# --- common core: identical in every file (tests/test_common.py checks) -----------------------------------
# Process-group setup, a timer that synchronises, the communication counter and, in the training scripts, the
# tiny GPT and the text loader. Read them once; every file that needs them carries the same lines.


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun job (or make a job of one process): nccl on CUDA, gloo on CPU. CUDA is touched only after
    set_device, so every process works on its own GPU."""
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but this machine has no CUDA GPU (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                             f"(launch at most that many processes per node with --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if not dist.is_initialized():
        # torch.optim imports this lazily; imported after init it pins the group past cleanup and gloo aborts at exit
        import torch.distributed.nn as _  # noqa: F401
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("DIST_TIMEOUT", 300)))
        if "MASTER_ADDR" in os.environ:  # launched by torchrun (one node or many): everything comes from its env
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # plain `python X.py`: a world of one, no network needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), dev


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # free garbage that holds collective work now, not from gloo's threads during interpreter shutdown


def now(device: torch.device | str | None = None) -> float:
    """Wall-clock seconds, read after `device` has finished its queued work: CUDA kernels run asynchronously, so a
    timer that does not synchronise measures their launch, not their work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class CommCounter:
    """Counts what this process hands to torch.distributed while active: one event (phase, op, bytes) per call, the
    bytes being the tensors it sends (for recv, the buffer it fills; for batch_isend_irecv, one event per isend or
    irecv). It wraps torch.distributed's functions from outside, so the code it watches stays plain
    torch.distributed. Set .phase to label the calls that follow ("forward", "backward", ...)."""
    PAYLOAD_ARG = {"all_reduce": 0, "broadcast": 0, "reduce": 0, "send": 0, "recv": 0, "all_gather": 1,
                   "all_gather_into_tensor": 1, "all_gather_single": 1, "reduce_scatter": 1,
                   "reduce_scatter_tensor": 1, "reduce_scatter_single": 1, "all_to_all": 1, "all_to_all_single": 1,
                   "batch_isend_irecv": 0}

    def __init__(self):
        self.events, self.phase, self._originals = [], "", {}  # events: (phase, op, bytes)

    def __enter__(self) -> "CommCounter":
        for op, arg in self.PAYLOAD_ARG.items():
            self._originals[op] = getattr(dist, op)
            setattr(dist, op, self._counted(op, arg, self._originals[op]))
        return self

    def __exit__(self, *exc) -> None:
        for op, original in self._originals.items():
            setattr(dist, op, original)

    def _counted(self, op: str, arg: int, original):
        def counted(*args, **kwargs):
            named = [v for k, v in kwargs.items() if k.startswith(("tensor", "input", "p2p"))]
            payload = args[arg] if len(args) > arg else named[0]
            if op == "batch_isend_irecv":
                self.events += [(self.phase, p2p.op.__name__, p2p.tensor.nbytes) for p2p in payload]
            else:
                tensors = payload if isinstance(payload, (list, tuple)) else [payload]
                self.events.append((self.phase, op, sum(t.nbytes for t in tensors)))
            return original(*args, **kwargs)
        return counted

    def totals(self, phase: str | None = None) -> dict[str, tuple[int, int]]:
        """{op: (calls, bytes)} over the events of one phase, or of all of them."""
        out = {}
        for _, op, nbytes in (e for e in self.events if phase in (None, e[0])):
            calls, total = out.get(op, (0, 0))
            out[op] = (calls + 1, total + nbytes)
        return out


@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    tie_weights: bool = True


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C); -1 lets a module that holds some heads reuse it


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc2 = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        for m in self.modules():  # GPT-2's initialisation: small weights keep the first logits near uniform
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".html", ".htm", ".json", ".c", ".h"}


def load_text(path: str | None = None, max_bytes: int = 8_000_000) -> torch.Tensor:
    """Bytes of real text as uint8: by default the standard library's own .py files; else a file, a folder, or the
    JSONL ('text' field) that data_pipeline.py writes."""
    if path is None:
        files = sorted(Path(os.__file__).parent.glob("*.py"))
    else:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"--data {path}: no such file or folder")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES | {".jsonl"})
    chunks, total = [], 0
    for f in files:
        raw = f.read_bytes()
        if f.suffix == ".jsonl":
            raw = "\n\n".join(json.loads(line)["text"] for line in raw.decode().splitlines() if line.strip()).encode()
        chunks.append(raw)
        total += len(raw)
        if total >= max_bytes:
            break
    data = torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)
    if data.numel() < 2:
        raise ValueError(f"--data {path}: no text found")
    return data


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """batch_size random windows of seq_len bytes and the same shifted by one: (B, T) int64 inputs and targets."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"the text has {data.numel()} bytes, fewer than one sequence of {seq_len + 1}: "
                         f"lower --seq-len or give more --data")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s: s + seq_len] for s in starts.tolist()]).long()
    y = torch.stack([data[s + 1: s + seq_len + 1] for s in starts.tolist()]).long()
    return x, y


if __name__ == "__main__":
    main()
