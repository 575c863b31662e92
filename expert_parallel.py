"""Mixture-of-Experts and expert parallelism: tokens travel to their experts by all-to-all, and back.

A Mixture-of-Experts layer replaces a transformer's MLP with E expert MLPs and a router that sends each token to k of
them (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; DeepSeek-V3). Parameters grow E-fold while the
compute per token grows only k-fold. Expert parallelism puts E/N experts on each of N ranks. Each rank routes its own
T tokens, then one all-to-all sends every token to the rank of its expert, the experts run, and a second all-to-all
brings the outputs home. With balanced routing each rank sends, per layer and per direction,

    k·T·d·(N−1)/N elements          (k·T·d in all, of which 1/N stays on the rank itself)

and an assignment beyond its expert's capacity, C = ⌈capacity_factor · k·T / E⌉ slots for each rank's T tokens, is
dropped (the residual carries the token).
The Switch Transformer's auxiliary loss E·Σ_e f_e·P_e (f_e the share of assignments to expert e, P_e its mean router
probability) is 1 when routing is uniform and grows with imbalance.

Run:   torchrun --nproc_per_node=4 expert_parallel.py
       torchrun --nproc_per_node=4 expert_parallel.py --ep 2 --experts 8 --top-k 2 --compare
       python expert_parallel.py --help
"""
from __future__ import annotations

import argparse
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


class Router(nn.Module):
    """Scores every token against every expert and keeps the top k. Softmax gating renormalises the k chosen logits
    (Switch, Mixtral); sigmoid gating scores each expert on its own and normalises the k chosen scores (DeepSeek-V3)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, gating: str = "softmax"):
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.n_experts, self.top_k, self.gating = n_experts, top_k, gating

    def forward(self, x: torch.Tensor):
        """x (T, d) -> expert ids (T, k), their weights (T, k), the auxiliary load-balancing loss."""
        logits = self.gate(x)  # (T, E)
        if self.gating == "softmax":
            top_logits, experts = logits.topk(self.top_k, dim=-1)
            weights = top_logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
            top_scores, experts = scores.topk(self.top_k, dim=-1)
            weights = top_scores / top_scores.sum(dim=-1, keepdim=True)
        return experts, weights, load_balancing_loss(logits.softmax(dim=-1), experts, self.n_experts)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer: E · Σ_e f_e · P_e, f_e = share of the k·T assignments sent to e, P_e = mean prob of e."""
    # BEGIN SOLUTION
    f = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / experts.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()
    # END SOLUTION


def within_capacity(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """(T, k) bool: which assignments fit their expert's `capacity` slots, first come first served in token order."""
    # BEGIN SOLUTION
    one_hot = F.one_hot(experts.flatten(), n_experts)  # (T·k, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # the slot each assignment would take
    return (position < capacity).view_as(experts)
    # END SOLUTION


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


class MoE(nn.Module):
    """The Mixture-of-Experts MLP on one process: route, drop what exceeds capacity, run each expert on its tokens,
    add the weighted outputs. After forward, .aux_loss and .stats (tokens per expert, dropped) describe the routing."""

    def __init__(self, cfg: GPTConfig, n_experts: int, top_k: int, capacity_factor: float = 1.25,
                 gating: str = "softmax"):
        super().__init__()
        self.router = Router(cfg.d_model, n_experts, top_k, gating)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(n_experts))
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        for m in self.modules():  # the same GPT-2 initialisation as the dense model's MLP
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def route(self, tokens: torch.Tensor):
        """tokens (T, d) -> expert ids (T, k), weights (T, k), kept (T, k); sets .aux_loss and .stats."""
        experts, weights, self.aux_loss = self.router(tokens)
        capacity = expert_capacity(tokens.shape[0], self.top_k, self.n_experts, self.capacity_factor)
        kept = within_capacity(experts, self.n_experts, capacity)
        self.stats = {"tokens_per_expert": torch.bincount(experts[kept], minlength=self.n_experts),
                      "dropped": int((~kept).sum()), "assignments": kept.numel()}
        return experts, weights, kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (B·T, d)
        experts, weights, kept = self.route(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((experts == e) & kept, as_tuple=True)
            out.index_add_(0, token, weights[token, slot, None] * expert(tokens[token]))
        return out.view_as(x)


class _AllToAll(torch.autograd.Function):
    """Forward: row blocks go to the ranks, send_splits[r] rows to rank r. Backward: the gradients of the rows come
    back by the same all-to-all with the splits swapped — the one collective is its own conjugate."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # BEGIN SOLUTION
        out = grad.new_empty(sum(ctx.send_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None
        # END SOLUTION


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


class ExpertParallelMoE(MoE):
    """The same layer with its experts split over the ranks of `group`: rank r holds experts r·E/N ... (r+1)·E/N − 1.
    Routing is local; tokens reach their expert's rank by all-to-all, and the outputs come back by another."""

    @classmethod
    def from_dense(cls, moe: MoE, group=None) -> "ExpertParallelMoE":
        """Keep the router and this rank's experts of a single-process MoE (same weights, so same decisions)."""
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        if moe.n_experts % n:
            raise ValueError(f"{moe.n_experts} experts cannot be split evenly over {n} ranks")
        ep = cls.__new__(cls)
        nn.Module.__init__(ep)
        ep.router, ep.group, ep.n_experts = moe.router, group, moe.n_experts
        ep.top_k, ep.capacity_factor, ep.local = moe.top_k, moe.capacity_factor, moe.n_experts // n
        ep.experts = nn.ModuleList(moe.experts[rank * ep.local:(rank + 1) * ep.local])
        return ep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (T, d)
        experts, weights, kept = self.route(tokens)
        token, slot = torch.nonzero(kept, as_tuple=True)
        order = torch.argsort(experts[token, slot], stable=True)  # group the kept assignments by expert, so by rank
        token, slot = token[order], slot[order]
        send = tokens[token]  # (S, d): one row per kept assignment, in expert order

        # 1. exchange the counts: every rank learns how many rows each rank sends to each expert
        counts = self.stats["tokens_per_expert"]
        n = dist.get_world_size(self.group)
        all_counts = counts.new_empty(n * self.n_experts)
        dist.all_gather_single(all_counts, counts, group=self.group)
        all_counts = all_counts.view(n, self.n_experts)  # (N ranks, E experts)
        me = dist.get_rank(self.group)
        mine = all_counts[:, me * self.local:(me + 1) * self.local]  # (N, E/N): rows each rank sends me, per expert
        send_splits = counts.view(n, self.local).sum(dim=1).tolist()
        recv_splits = mine.sum(dim=1).tolist()
        self.stats["tokens_per_expert_global"] = all_counts.sum(dim=0)
        self.stats["bytes_leaving"] = (sum(send_splits) - send_splits[me]) * send[0].nbytes if len(send) else 0

        # 2. dispatch, 3. run this rank's experts, 4. combine
        received = all_to_all(send, send_splits, recv_splits, self.group)  # (R, d), by source rank, then expert
        local_expert = torch.repeat_interleave(torch.arange(self.local, device=x.device).repeat(n), mine.flatten())
        processed = torch.empty_like(received)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(local_expert == e, as_tuple=True)[0]
            processed[rows] = expert(received[rows])
        returned = all_to_all(processed, recv_splits, send_splits, self.group)  # (S, d), back in send order
        out = torch.zeros_like(tokens)
        out.index_add_(0, token, weights[token, slot, None] * returned)
        return out.view_as(x)


def moe_gpt(cfg: GPTConfig, n_experts: int, top_k: int, capacity_factor: float = 1.25, gating: str = "softmax",
            seed: int = 0) -> TinyGPT:
    """The tiny GPT with every block's MLP replaced by a Mixture-of-Experts layer."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    for block in model.blocks:
        block.mlp = MoE(cfg, n_experts, top_k, capacity_factor, gating)
    return model


def expert_parallel(model: TinyGPT, group=None) -> TinyGPT:
    """Turn every MoE layer of `model` into its expert-parallel version over `group`, in place."""
    for block in model.blocks:
        block.mlp = ExpertParallelMoE.from_dense(block.mlp, group)
    return model


def moe_loss(model: TinyGPT, x: torch.Tensor, y: torch.Tensor, aux_coef: float = 0.01) -> torch.Tensor:
    """Cross-entropy plus aux_coef times the mean load-balancing loss of the MoE layers."""
    loss = model(x, y)
    aux = [b.mlp.aux_loss for b in model.blocks if isinstance(b.mlp, MoE)]
    return loss + aux_coef * torch.stack(aux).mean() if aux else loss


def make_groups(world_size: int, ep: int):
    """Expert parallelism inside groups of `ep` consecutive ranks (the all-to-all stays within a node); ranks that
    hold the same experts form the expert-data-parallel groups. Every rank creates every group, in the same order."""
    rank = dist.get_rank()
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world_size, ep)]
    replica_groups = [dist.new_group(list(range(r, world_size, ep))) for r in range(ep)]
    return ep_groups[rank // ep], replica_groups[rank % ep]


def sync_gradients(model: TinyGPT, replica_group, world_size: int) -> None:
    """Average gradients over data parallelism. Shared parameters saw every rank's tokens only through their own
    rank: all-reduce over all ranks. An expert already summed the gradients of its whole EP group's tokens in the
    backward all-to-all: all-reduce over its replicas only. Both divide by the world size, the global batch."""
    # BEGIN SOLUTION
    expert_ids = {id(p) for b in model.blocks if isinstance(b.mlp, ExpertParallelMoE) for p in b.mlp.experts.parameters()}
    params = [p for p in model.parameters() if p.grad is not None]
    for group, chosen in ((None, [p for p in params if id(p) not in expert_ids]),
                          (replica_group, [p for p in params if id(p) in expert_ids])):
        if not chosen:
            continue
        flat = torch.cat([p.grad.flatten() for p in chosen])  # one all-reduce per kind, not one per tensor
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= world_size
        for p, g in zip(chosen, flat.split([p.numel() for p in chosen])):
            p.grad.copy_(g.view_as(p))
    # END SOLUTION


# --- demo --------------------------------------------------------------


def dense_twin(cfg: GPTConfig, top_k: int, seed: int = 0) -> TinyGPT:
    """A dense tiny GPT with the MoE model's active parameters per token: each MLP is k times as wide."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    for block in model.blocks:
        block.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * top_k * cfg.d_model), nn.GELU(),
                                  nn.Linear(4 * top_k * cfg.d_model, cfg.d_model))
        for m in block.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
    return model


def routing_figures(model: TinyGPT, counter: CommCounter, tokens_per_rank: int, d_model: int, top_k: int) -> dict:
    """What one step's routing and all-to-alls came to on this rank: imbalance, drops, bytes per all-to-all."""
    layers = [b.mlp for b in model.blocks]
    load = torch.stack([m.stats.get("tokens_per_expert_global", m.stats["tokens_per_expert"]) for m in layers])
    imbalance = (load.max(dim=1).values / load.float().mean(dim=1)).max().item()
    forward = [b for phase, op, b in counter.events if phase == "forward" and op == "all_to_all_single"]
    backward = [b for phase, op, b in counter.events if phase == "backward" and op == "all_to_all_single"]
    return {"imbalance": imbalance, "dropped": sum(m.stats["dropped"] for m in layers),
            "assignments": sum(m.stats["assignments"] for m in layers),
            "a2a_calls_forward": len(forward), "a2a_calls_backward": len(backward),
            "dispatch_bytes": statistics.mean(forward[0::2]) if forward else 0,  # per layer: dispatch, then combine
            "bytes_leaving": statistics.mean(m.stats.get("bytes_leaving", 0) for m in layers),
            "no_drop_dispatch_bytes": top_k * tokens_per_rank * d_model * 4}


def train_step(model, opt, x, y, aux_coef, replica_group, world_size, counter: CommCounter) -> float:
    """One step; returns the cross-entropy alone (without the balance loss), comparable with a dense model's."""
    counter.phase = "forward"
    loss = moe_loss(model, x, y, aux_coef)
    aux = [b.mlp.aux_loss.item() for b in model.blocks if isinstance(b.mlp, MoE)]
    counter.phase = "backward"
    loss.backward()
    counter.phase = "sync"
    sync_gradients(model, replica_group, world_size)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item() - (aux_coef * statistics.mean(aux) if aux else 0.0)


def train(cfg: GPTConfig, n_experts: int = 8, top_k: int = 2, ep: int | None = None, steps: int = 30,
          batch_size: int = 8, lr: float = 3e-3, capacity_factor: float = 1.25, gating: str = "softmax",
          aux_coef: float = 0.1, dense: bool = False, data=None, device="cpu", seed: int = 0,
          log_every: int = 0) -> dict:
    """Train the MoE tiny GPT with expert parallelism `ep` × data parallelism world/ep (or its dense twin)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = ep or world
    ep_group, replica_group = make_groups(world, ep)
    data = load_text() if data is None else data
    if dense:
        model = dense_twin(cfg, top_k, seed).to(device)
    else:
        model = expert_parallel(moe_gpt(cfg, n_experts, top_k, capacity_factor, gating, seed), ep_group).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed + rank)  # every rank its own batch: data parallelism
    log = []
    for step in range(steps):
        x, y = (t.to(device) for t in get_batch(data, batch_size, cfg.seq_len, gen))
        with CommCounter() as counter:
            t0 = now(device)
            loss = train_step(model, opt, x, y, aux_coef, replica_group, world, counter)
            ms = (now(device) - t0) * 1e3
        mean_loss = torch.tensor([loss], device=device)
        dist.all_reduce(mean_loss)
        row = {"step": step + 1, "loss": mean_loss.item() / world, "ms": ms}
        if not dense:
            row.update(routing_figures(model, counter, batch_size * cfg.seq_len, cfg.d_model, top_k))
        log.append(row)
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            balance = "" if dense else f" | imbalance {row['imbalance']:.2f} | dropped {row['dropped']}/{row['assignments']}"
            print(f"{'dense' if dense else 'moe'} step {step + 1}/{steps} | loss {row['loss']:.3f}{balance} | {ms:.0f} ms",
                  flush=True)
    params = sum(p.numel() for p in model.parameters())
    return {"log": log, "params_per_rank": params, "world_size": world, "ep": ep, "dense": dense,
            "ms_per_step": statistics.median(r["ms"] for r in log)}


def print_report(r: dict, cfg: GPTConfig, args, dense: dict | None) -> None:
    last, n = r["log"][-1], r["ep"]
    T, k, d = args.batch_size * cfg.seq_len, args.top_k, cfg.d_model
    print(f"\nexpert parallelism {n} × data parallelism {r['world_size'] // n}: {args.experts} experts per layer, "
          f"{args.experts // n} per rank, top-{k}, capacity factor {args.capacity_factor}")
    print("all-to-alls of the last step, per rank (measured | balanced-routing formula):")
    print(f"  calls: {last['a2a_calls_forward']} forward + {last['a2a_calls_backward']} backward | "
          f"2 per layer each way = {2 * cfg.n_layer} + {2 * cfg.n_layer}")
    kept = last["assignments"] - last["dropped"]
    print(f"  bytes one dispatch hands to the all-to-all: {last['dispatch_bytes']:,.0f} | kept·d·4 = "
          f"{kept / cfg.n_layer * d * 4:,.0f} (k·T·d·4 = {last['no_drop_dispatch_bytes']:,} with nothing dropped)")
    print(f"  of them, bytes leaving the rank: {last['bytes_leaving']:,.0f} | balanced routing, nothing dropped: "
          f"k·T·d·4·(N−1)/N = {last['no_drop_dispatch_bytes'] * (n - 1) // n:,}")
    print(f"  load imbalance (max/mean tokens per expert, worst layer): {last['imbalance']:.2f} | 1.00 if balanced")
    print(f"  dropped assignments: {last['dropped']} of {last['assignments']} (capacity "
          f"{expert_capacity(T, k, args.experts, args.capacity_factor)} per expert per layer for each rank's tokens)")
    print(f"parameters per rank: {r['params_per_rank']:,}; median step {r['ms_per_step']:.0f} ms")
    if dense:
        print(f"\ncross-entropy after {args.steps} steps: MoE {last['loss']:.3f} | dense with the same active parameters per "
              f"token {dense['log'][-1]['loss']:.3f} ({dense['params_per_rank']:,} parameters)")
        shown = range(1, args.steps + 1, max(1, args.steps // 8))
        print("step  " + " ".join(f"{s:>6}" for s in shown))
        for name, res in (("moe", r), ("dense", dense)):
            print(f"{name:<6}" + " ".join(f"{res['log'][s - 1]['loss']:6.3f}" for s in shown))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (a multiple of --ep)")
    parser.add_argument("--top-k", type=int, default=2, help="experts each token is sent to")
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="slots per expert, as a multiple of k·T/E")
    parser.add_argument("--gating", choices=["softmax", "sigmoid"], default="softmax",
                        help="softmax over the k chosen logits (Switch), or normalised sigmoids (DeepSeek-V3)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: all ranks; the rest is "
                        "data parallelism)")
    parser.add_argument("--aux-coef", type=float, default=0.1, help="weight of the load-balancing loss (0 means off; "
                        "Switch used 0.01, this tiny model at this learning rate collapses onto few experts with it)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads")
    parser.add_argument("--d-model", type=int, default=64, help="model width d")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="random seed (any integer)")
    parser.add_argument("--compare", action="store_true", help="also train the dense twin and print both curves")
    parser.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON (rank 0)")
    return parser


def validate(parser: argparse.ArgumentParser, args) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))  # known before any communication, the same on every rank
    for flag in ("experts", "top_k", "steps", "batch_size", "n_layer", "n_head", "d_model", "seq_len"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    for flag in ("capacity_factor", "lr"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be above 0")
    if args.aux_coef < 0:
        parser.error(f"--aux-coef {args.aux_coef}: must be 0 or more")
    if args.ep is not None and (args.ep <= 0 or world % args.ep):
        parser.error(f"--ep {args.ep}: must divide the world size {world} (try --ep {world})")
    ep = args.ep or world
    if args.experts % ep:
        parser.error(f"--experts {args.experts} is not divisible by the expert-parallel size {ep} "
                     f"(try --experts {ep * max(1, round(args.experts / ep))})")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is above --experts {args.experts}")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    try:
        data = load_text(args.data)
    except ValueError as e:
        parser.error(str(e))
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    rank, world, device = setup_distributed(args.device)
    try:
        common = dict(top_k=args.top_k, ep=args.ep, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      data=data, device=device, seed=args.seed, log_every=max(1, args.steps // 6))
        r = train(cfg, args.experts, capacity_factor=args.capacity_factor, gating=args.gating,
                  aux_coef=args.aux_coef, **common)
        dense = train(cfg, dense=True, **common) if args.compare else None
        if rank == 0:
            print_report(r, cfg, args, dense)
            if args.json:
                Path(args.json).write_text(json.dumps({"moe": r, "dense": dense}, indent=1))
        return r, dense
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
