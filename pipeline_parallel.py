"""Pipeline parallelism: consecutive layers on consecutive ranks, micro-batches to keep them all busy.

Rank r runs stage r of the model. A batch split into m micro-batches flows forward through the p stages and its
gradients flow back. Stage r cannot start before stage r-1 hands it something, and the last backward reaches
stage 0 long after its last forward: with uniform costs every schedule below idles for the same fraction,

    bubble = (p - 1) / (m + p - 1),

which only more micro-batches shrink. GPipe runs all m forwards, then all m backwards, so each rank holds the
activations of all m micro-batches. 1F1B (PipeDream-Flush) starts each backward as soon as it can and then
alternates one forward with one backward: the same bubble, but rank r never holds more than p - r. ZB-H1 (Qi et
al. 2023) splits each backward into B (the input gradient, which the previous stage waits for) and W (the weight
gradient, which nobody waits for) and uses the W's to fill the cool-down: a smaller bubble, the same memory.
Neighbours talk by send/recv. On NCCL a send may block until its receive is posted, so two neighbours that each
send before they receive wait for each other forever: such a send and receive go in one dist.batch_isend_irecv.

Run:   torchrun --nproc_per_node=4 pipeline_parallel.py --schedule 1f1b --microbatches 8
       python pipeline_parallel.py --simulate --schedule zb-h1 --stages 4 --microbatches 8
"""
from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
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


def partition_layers(n_layers: int, pp_size: int) -> list[range]:
    """Consecutive, balanced blocks of layers per stage (the first stages take one more when it does not divide).
    Stage 0 also holds the embeddings; the last stage the final norm, the head and the loss."""
    if pp_size > n_layers:
        raise ValueError(f"{pp_size} pipeline stages but only {n_layers} layers: use --n-layer {pp_size} or more")
    base, extra = divmod(n_layers, pp_size)
    bounds = list(itertools.accumulate((base + (s < extra) for s in range(pp_size)), initial=0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp_size)]


class PipelineStage(nn.Module):
    """The part of a TinyGPT that one rank runs: its blocks, plus the embeddings (first stage) or the final norm and
    head (last stage). The input is token ids on the first stage and the previous stage's activation elsewhere.

    A tied embedding and head (GPTConfig's default) become two copies once p > 1, on the first and the last stage.
    They start equal and stay equal if both take the step of the whole gradient: all_reduce_tied_grad sums the two
    parts on those two ranks, an all-reduce of two (Megatron-LM's embedding group)."""

    def __init__(self, model: "TinyGPT", rank: int, pp_size: int, group=None):
        super().__init__()
        self.first, self.last = rank == 0, rank == pp_size - 1
        self.blocks = nn.ModuleList(model.blocks[i] for i in partition_layers(len(model.blocks), pp_size)[rank])
        if self.first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        if self.last:
            self.ln_f, self.head = model.ln_f, model.head
        self.tied, self.group, self.other_end = None, group, pp_size - 1 if self.first else 0
        if model.head.weight is model.tok_emb.weight and pp_size > 1 and (self.first or self.last):
            self.tied = self.tok_emb.weight if self.first else self.head.weight

    def forward(self, x):
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x

    def all_reduce_tied_grad(self) -> None:
        """The two ends swap their parts of the tied gradient in one batch and add them: both then hold the whole."""
        if self.tied is not None:
            theirs = torch.empty_like(self.tied.grad)
            ops = [dist.P2POp(op, t, group=self.group, group_peer=self.other_end)
                   for op, t in ((dist.isend, self.tied.grad), (dist.irecv, theirs))]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            self.tied.grad += theirs


class StageRunner:
    """One rank's share of a step: four pieces of work (forward, backward, zero-bubble's backward_input and _weight),
    messages to the neighbours (activations, gradients: act_shape (mb, T, d)), 1F1B written out, run() for all."""

    def __init__(self, stage: PipelineStage, act_shape: tuple, group=None, dtype: torch.dtype = torch.float32):
        self.stage, self.act_shape, self.group, self.dtype = stage, tuple(act_shape), group, dtype
        self.rank, self.p = dist.get_rank(group), dist.get_world_size(group)
        self.device = next(stage.parameters()).device
        dist.barrier(group=group)  # NCCL: a group's first collective must involve all its ranks; a batch may not

    def post(self, send: dict, recv: tuple = ()) -> tuple[dict, list]:
        """Post sends ({"next": activation, "prev": gradient}) and receives ("prev", "next") as one batch, whose ops
        progress together on NCCL; directions without a neighbour are skipped. Returns the buffers and the works."""
        peer = {d: self.rank + step for d, step in (("prev", -1), ("next", 1)) if 0 <= self.rank + step < self.p}
        got = {d: torch.empty(self.act_shape, dtype=self.dtype, device=self.device) for d in recv if d in peer}
        ops = [dist.P2POp(dist.isend, t.contiguous(), group=self.group, group_peer=peer[d])
               for d, t in send.items() if d in peer and t is not None]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=peer[d]) for d, t in got.items()]
        return got, dist.batch_isend_irecv(ops) if ops else []

    def exchange(self, send: dict | None = None, recv: tuple = ()) -> dict:
        got, works = self.post(send or {}, recv)  # and wait until every op of the batch is done
        for work in works:
            work.wait()
        return got

    def forward(self, i: int, x: torch.Tensor | None) -> torch.Tensor | None:
        """F: micro-batch i (token ids on the first stage, else the activation x) through the stage, kept for B.
        Returns the activation for the next stage; the last keeps the loss, scaled 1/m so that m backwards add up."""
        x = self.inputs[i] if self.stage.first else x.requires_grad_()
        y = self.stage(x)
        if self.stage.last:
            y = F.cross_entropy(y.float().view(-1, y.shape[-1]), self.targets[i].view(-1)) / self.m  # (mb·T, V)
            self.losses.append(y.detach())
        self.saved[i] = (x, y)
        return None if self.stage.last else y.detach()

    def backward(self, i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """B: from dL/dy (None on the last stage: y is the loss), the weights' gradients and dL/dx, in one pass."""
        x, y = self.saved.pop(i)
        y.backward(grad)
        return None if self.stage.first else x.grad

    def backward_input(self, i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
        """ZB-H1's B: only dL/dx, which the previous stage is waiting for; the graph is kept for backward_weight."""
        x, y = self.saved[i]
        self.saved[i] = (x, y, grad)
        # the first stage's input, token ids, has no gradient: all of its backward is W
        return None if self.stage.first else torch.autograd.grad(y, x, grad, retain_graph=True)[0]

    def backward_weight(self, i: int) -> None:
        """ZB-H1's W: the weight gradients, which nobody waits for, so they can fill the bubble; frees the graph."""
        x, y, grad = self.saved.pop(i)
        torch.autograd.backward(y, grad, inputs=list(self.stage.parameters()))

    def _start(self, inputs: list, targets: list) -> None:
        self.inputs, self.targets, self.m, self.losses = inputs, targets, len(inputs), []
        self.saved = {}  # micro-batch -> what its backward needs: (input, output[, output's gradient])

    def one_f_one_b(self, inputs: list, targets: list) -> float:
        """1F1B written out (PipeDream-Flush, in Megatron-LM's shape). Returns the loss (last stage; 0 elsewhere);
        gradients accumulate in the stage's parameters."""
        self._start(inputs, targets)
        m, warmup = self.m, min(self.p - self.rank - 1, self.m)  # warm-up: forwards before a gradient can return
        # warm-up: forwards only; ops alone, safe when sends block: the next stage, one forward behind, receives them
        for i in range(warmup):
            y = self.forward(i, self.exchange(recv=("prev",)).get("prev"))
            self.exchange({"next": y})
        # steady state: one forward, one backward. Neighbours cross here (this rank sends activation j and waits for
        # gradient k while the next one sends gradient k and waits for activation j): each such pair is one batch
        x = self.exchange(recv=("prev",)).get("prev") if warmup < m else None
        for k in range(m - warmup):
            grad = self.exchange({"next": self.forward(warmup + k, x)}, ("next",)).get("next")  # send fwd, recv bwd
            more = warmup + k + 1 < m
            x = self.exchange({"prev": self.backward(k, grad)}, ("prev",) if more else ()).get("prev")  # the converse
        # cool-down: the backwards still to come; alone again, safe: the previous stage is posting these receives
        for k in range(m - warmup, m):
            self.exchange({"prev": self.backward(k, self.exchange(recv=("next",)).get("next"))})
        return float(sum(self.losses)) if self.losses else 0.0

    def run(self, kind: str, inputs: list, targets: list) -> float:
        """Any schedule() - GPipe, 1F1B or ZB-H1 - executed step by step from comm_plan(). A receive is waited for
        just before the next F or B (a W computes while it travels); a lone send only at the end of the step."""
        self._start(inputs, targets)
        backward = self.backward_input if kind == "zb-h1" else self.backward
        got, receiving, sending, out = {}, [], [], None
        for step in comm_plan(kind, self.p, len(inputs), self.rank):
            if step[0] == "post":
                received, works = self.post({step[1]: out} if step[1] else {}, step[2])
                got.update(received)
                (receiving if received else sending).extend(works)
            elif step[0] == "W":
                self.backward_weight(step[1])
            else:
                while receiving:
                    receiving.pop().wait()
                a, i = step
                out = self.forward(i, got.pop("prev", None)) if a == "F" else backward(i, got.pop("next", None))
        for work in sending:
            work.wait()
        return float(sum(self.losses)) if self.losses else 0.0


SCHEDULES = ("gpipe", "1f1b", "zb-h1")  # executed by StageRunner.run; "interleaved" is simulated


def schedule(kind: str, pp_size: int, n_microbatches: int, rank: int, virtual: int = 2) -> list[tuple]:
    """The ordered actions of one rank: ("F", i) forward of micro-batch i, ("B", i) its backward; with zb-h1 the
    backward is split into ("B", i), the input gradient that the previous stage waits for, and ("W", i), the
    weight gradient that nobody waits for and that fills the bubbles (Qi et al. 2023). With interleaved each rank
    holds `virtual` model chunks (chunk c of rank r is stage c·p + r) and actions are ("F", i, c) / ("B", i, c)."""
    p, m = pp_size, n_microbatches
    if kind == "interleaved":
        return interleaved_schedule(p, m, rank, virtual)
    if kind == "gpipe":  # every forward, then every backward: m micro-batches of activations alive at the peak
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if kind not in ("1f1b", "zb-h1"):
        raise ValueError(f"unknown schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")
    warmup = min(p - rank - 1, m)  # forwards in flight before the first backward can come back
    actions = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        actions += [("F", warmup + i), ("B", i)]
    actions += [("B", i) for i in range(m - warmup, m)]  # cool-down: the backwards still to come
    if kind == "1f1b":
        return actions
    # ZB-H1: in the steady state W follows its B at once, so no more activations are alive than with 1F1B; in the
    # cool-down each W is held back by one B and fills the wait for the next gradient.
    out, held, steady = [], [], m - warmup
    for a, i in actions:
        out.append((a, i))
        if a == "B":
            held.append(i)
            if i < steady or len(held) > 1:
                out.append(("W", held.pop(0)))
    return out + [("W", i) for i in held]


def interleaved_schedule(p: int, m: int, rank: int, v: int) -> list[tuple[str, int, int]]:
    """Interleaved 1F1B (Narayanan et al. 2021): micro-batches go through the v chunks in groups of p, forward
    chunk 0, 1, ..., backward in reverse; a deeper warm-up, then one forward, one backward. Each step is 1/v of a
    stage's work, so the p - 1 slots of fill and drain shrink by v: bubble = (p-1) / (v·m + p - 1)."""
    if m % p:
        raise ValueError(f"--microbatches {m} is not a multiple of the {p} stages: interleaved runs groups of p")
    total = m * v
    forward = lambda k: ("F", k // (p * v) * p + k % p, k // p % v)
    backward = lambda k: ("B", k // (p * v) * p + k % p, v - 1 - k // p % v)
    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    actions = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [forward(warmup + k), backward(k)]
    return actions + [backward(k) for k in range(total - warmup, total)]


SEND = {"F": "next", "B": "prev"}  # where an action's result goes: an activation forward, a gradient back
RECV = {"F": ("prev",), "B": ("next",)}  # where its input comes from


def comm_plan(kind: str, p: int, m: int, rank: int) -> list[tuple]:
    """Rank's actions with ("post", send, recv) steps between them: `send` the direction of the last action's result,
    `recv` those to receive from. Each op alone - a receive just before its action, a send just after - is an order
    safe when every send blocks until matched, unless two neighbours cross: each would send the other something
    before receiving what the other sends (1F1B's steady state). Those two go in one batch, on both sides, like
    Megatron-LM's send_forward_recv_backward. The tests check every plan for p <= 8, m <= 16 under NCCL's rules."""
    talks = lambda r: [a for a in schedule(kind, p, m, r) if a[0] != "W"] if 0 <= r < p else []  # W never talks
    following = dict(zip(talks(rank), talks(rank)[1:]))  # my next F or B
    then = {d: dict(zip(talks(rank + s), talks(rank + s)[1:])) for d, s in (("prev", -1), ("next", 1))}  # theirs
    plan, early = [], set()
    for a in schedule(kind, p, m, rank):
        if a[0] != "W" and a not in early:
            plan.append(("post", None, RECV[a[0]]))
        plan.append(a)
        if a[0] == "W":
            continue
        b, to = following.get(a), SEND[a[0]]
        cross = b is not None and RECV[b[0]] == (to,) and then[to].get(b) == a  # they run b, then a
        plan.append(("post", to, RECV[b[0]] if cross else ()))
        if cross:
            early.add(b)
    return plan


def simulate(kind: str, pp_size: int, n_microbatches: int, t_forward: float = 1.0, t_backward: float = 2.0,
             virtual: int = 2, durations: dict | None = None) -> dict:
    """Place every rank's actions in time from their dependencies: F(i) on rank r after F(i) on r-1; B(i) on r after
    B(i) on r+1 (and after F(i) on the last rank); W(i) after B(i). Returns the events, the makespan, each rank's
    idle share, the bubble (idle share of p·makespan) and each rank's peak of live micro-batches. zb-h1: B and W take
    t_backward/2 each; interleaved: a chunk takes 1/v, and F of chunk c on rank 0 follows F of chunk c-1 on the last
    rank (B the other way round). `durations` {(action, micro-batch, rank): seconds}: measured costs instead."""
    p, m = pp_size, n_microbatches
    v = virtual if kind == "interleaved" else 1
    orders = [[a if len(a) == 3 else (*a, 0) for a in schedule(kind, p, m, r, v)] for r in range(p)]
    cost = {"F": t_forward / v, "B": (t_backward / 2 if kind == "zb-h1" else t_backward) / v, "W": t_backward / 2}
    done, free, pos, events = {}, [0.0] * p, [0] * p, [[] for _ in range(p)]
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progress = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                a, i, c = orders[r][pos[r]]
                last = ("B", i, c + 1, 0) if c < v - 1 else ("F", i, c, r)  # what B on the last rank waits for
                need = {"F": [("F", i, c, r - 1)] if r > 0 else [("F", i, c - 1, p - 1)] * (c > 0),
                        "B": [("B", i, c, r + 1) if r < p - 1 else last], "W": [("B", i, c, r)]}[a]
                if any(dep not in done for dep in need):
                    break
                start = max([free[r]] + [done[dep] for dep in need])
                done[(a, i, c, r)] = free[r] = start + (durations[a, i, r] if durations else cost[a])
                events[r].append((a, f"{i}{'abcdefgh'[c]}" if v > 1 else i, start, free[r]))
                pos[r] += 1
                progress = True
        if not progress:
            raise RuntimeError(f"{kind} deadlocks with p={p}, m={m}: every rank waits for another")
    makespan = max(free)
    idle = [1 - sum(e[3] - e[2] for e in ev) / makespan for ev in events]
    change = {"F": 1, "B": 0 if kind == "zb-h1" else -1, "W": -1}  # alive from F to the last backward piece
    peak = [max(itertools.accumulate(change[e[0]] for e in ev)) for ev in events]
    return {"kind": kind, "p": p, "m": m, "v": v, "events": events, "makespan": makespan, "idle": idle,
            "bubble": sum(idle) / p, "peak_activations": peak}


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    """(p-1)/(m+p-1); with v interleaved chunks per rank, (p-1)/(v·m+p-1)."""
    return (p - 1) / (v * m + p - 1)


def render(timeline: dict) -> str:
    """One row per rank, one cell per time unit: F3 / B3 / W3 where that rank works on micro-batch 3, . where idle."""
    unit = min(e[3] - e[2] for ev in timeline["events"] for e in ev)
    rows = []
    for r, ev in enumerate(timeline["events"]):
        cells = ["."] * round(timeline["makespan"] / unit)
        for a, i, start, end in ev:
            cells[round(start / unit): round(end / unit)] = [f"{a}{i}"] * (round(end / unit) - round(start / unit))
        rows.append(f"rank {r} | " + " ".join(f"{c:<3}" for c in cells))
    return "\n".join(rows)


# --- demo --------------------------------------------------------------


class Timeline:
    """Watches a StageRunner from outside: wraps its pieces of work to timestamp them (now()) and count the live
    micro-batches, and its step methods to time the step from a common start until every rank is done (the barriers
    are the observer's). 1 - compute / step is then each rank's share of the idle time that (p-1)/(m+p-1) predicts."""
    LABELS = {"forward": "F", "backward": "B", "backward_input": "B", "backward_weight": "W"}

    def __init__(self, runner: StageRunner):
        self.runner, self.device = runner, runner.device
        self.events, self.bubbles, self.windows, self.peak_alive = [], [], [], 0
        for name, label in self.LABELS.items():
            setattr(runner, name, self._timed(label, getattr(runner, name)))
        for name in ("run", "one_f_one_b"):
            setattr(runner, name, self._step(getattr(runner, name)))

    def _timed(self, label: str, work):
        def timed(i, *args):
            start = now(self.device) - self.t0
            out = work(i, *args)
            self.events.append((label, i, start, now(self.device) - self.t0))
            self.peak_alive = max(self.peak_alive, len(self.runner.saved))
            return out
        return timed

    def _step(self, step_method):
        def step(*args):
            self.events = []  # (action, micro-batch, start, end) in seconds since the step began; the rest is idle
            dist.barrier(group=self.runner.group)
            self.t0 = now(self.device)
            out = step_method(*args)
            dist.barrier(group=self.runner.group)
            self.windows.append((self.t0, now(self.device)))  # absolute: the tests compare ranks on one host
            self.bubbles.append(1 - sum(e[3] - e[2] for e in self.events) / (self.windows[-1][1] - self.t0))
            return out
        return step


def train(kind: str = "1f1b", n_microbatches: int = 8, steps: int = 10, batch_size: int = 16, cfg: GPTConfig | None = None,
          lr: float = 3e-3, data=None, device="cpu", seed: int = 0, log_every: int = 0, group=None) -> dict:
    """Train TinyGPT split into one stage per rank of `group`; every rank reads the same batch (the first stage
    uses the inputs, the last the targets). Returns losses, measured bubbles, peak live micro-batches, bytes sent."""
    cfg = cfg or GPTConfig(n_layer=4)
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    data = load_text() if data is None else data
    torch.manual_seed(seed)  # every rank builds the same model and keeps its stage
    model = TinyGPT(cfg).to(device)
    stage = PipelineStage(model, rank, p, group)
    opt = torch.optim.AdamW(stage.parameters(), lr=lr, weight_decay=0.1)
    mb, gen, losses = batch_size // n_microbatches, torch.Generator().manual_seed(seed), []
    runner = StageRunner(stage, (mb, cfg.seq_len, cfg.d_model), group)
    timeline = Timeline(runner)
    with CommCounter() as counter:
        for step in range(steps):
            x, y = (t.to(device) for t in get_batch(data, batch_size, cfg.seq_len, gen))
            counter.phase = "pipeline"
            loss = runner.run(kind, list(x.split(mb)), list(y.split(mb)))  # m micro-batches of (mb, T)
            counter.phase = "tied weights"
            stage.all_reduce_tied_grad()
            opt.step()
            opt.zero_grad()
            # the loss lives on the last stage: send it to everyone so that rank 0 can print it
            t = torch.tensor([loss], device=device)
            dist.broadcast(t, group=group, group_src=p - 1)
            losses.append(t.item())
            ms = (timeline.windows[-1][1] - timeline.windows[-1][0]) * 1e3
            if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
                print(f"step {step + 1}/{steps} | loss {losses[-1]:.3f} | "
                      f"{batch_size * cfg.seq_len / ms:.1f}k tok/s | {ms:.0f} ms", flush=True)
    names = {id(q): name for name, q in model.named_parameters()}
    return {"kind": kind, "rank": rank, "p": p, "m": n_microbatches, "losses": losses, "bubbles": timeline.bubbles,
            "bubble": statistics.median(timeline.bubbles[1:] or timeline.bubbles), "windows": timeline.windows,
            "peak_alive": timeline.peak_alive, "events": timeline.events, "act_bytes": 4 * mb * cfg.seq_len * cfg.d_model,
            "sent_bytes": counter.totals("pipeline").get("isend", (0, 0))[1] // steps,
            "params": {names[id(q)]: q.detach().clone() for q in stage.parameters()}}


def print_report(per_rank: list[dict]) -> None:
    kind, p, m = per_rank[0]["kind"], per_rank[0]["p"], per_rank[0]["m"]
    print(f"\n{kind} schedule, p = {p} stages, m = {m} micro-batches (simulated with t_B = 2·t_F):")
    print(render(simulate(kind, p, m)))
    own = simulate(kind, p, m, durations={(a, i, r["rank"]): end - start  # the last step's, communication free
                                          for r in per_rank for a, i, start, end in r["events"]})
    print(f"\n{'rank':>4} | {'bubble measured':>15} {'simulated (own times)':>21} {'(p-1)/(m+p-1)':>13} | "
          f"{'peak live micro-batches':>23} {'formula':>7} | {'sent KiB/step':>13} {'formula':>7}")
    for r in per_rank:
        rank, act = r["rank"], m * r["act_bytes"] / 1024
        live = m if kind == "gpipe" else min(m, p - rank)
        sent = act * ((rank < p - 1) + (rank > 0))  # m activations forward, m gradients back
        print(f"{rank:>4} | {r['bubble']:>15.3f} {own['idle'][rank]:>21.3f} {bubble_formula(p, m):>13.3f} | "
              f"{r['peak_alive']:>23} {live:>7} | {r['sent_bytes'] / 1024:>13.1f} {sent:>7.1f}")
    print(f"mean measured bubble {statistics.mean(r['bubble'] for r in per_rank):.3f}; simulated with this run's "
          f"compute times {own['bubble']:.3f}; (p-1)/(m+p-1) = {bubble_formula(p, m):.3f}"
          + ("  (zb-h1 does better than the 1F1B formula by design)" if kind == "zb-h1" else ""))
    print("(measured = 1 - compute time / step time on each rank, timestamps from a common start: waiting, sending and "
          "receiving count as idle; with more processes than cores so does time the OS gave to another rank)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("--schedule", choices=SCHEDULES + ("interleaved",), default="1f1b",
        help="the order of forwards and backwards; interleaved (virtual stages) runs with --simulate only")
    add("--virtual", type=int, default=2, help="interleaved: model chunks per rank")
    add("--microbatches", type=int, default=8, help="m: micro-batches per step")
    add("--steps", type=int, default=10, help="training steps")
    add("--batch-size", type=int, default=16, help="sequences per step, split into m micro-batches")
    add("--lr", type=float, default=3e-3, help="AdamW learning rate")
    add("--n-layer", type=int, default=4, help="transformer blocks, split over the p stages")
    add("--n-head", type=int, default=4, help="attention heads per block")
    add("--d-model", type=int, default=64, help="width of the residual stream")
    add("--seq-len", type=int, default=64, help="tokens (bytes) per sequence")
    add("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present, else cpu")
    add("--simulate", action="store_true", help="only draw the schedule for --stages, no training")
    add("--stages", type=int, default=4, help="with --simulate: p")
    add("--timeout", type=int, default=120, help="seconds a rank waits for a peer before failing")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace, world: int) -> torch.Tensor | None:
    """Every check of the command line, before any work, each failure one line naming the flag. Returns the text."""
    for name in "virtual microbatches steps batch_size n_layer n_head d_model seq_len stages timeout".split():
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr}: give a positive learning rate")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.schedule == "interleaved" and not args.simulate:
        parser.error("--schedule interleaved runs in the simulator only: add --simulate, or train with 1f1b or zb-h1")
    if args.batch_size % args.microbatches and not args.simulate:
        parser.error(f"--batch-size {args.batch_size} is not divisible by --microbatches {args.microbatches} "
                     f"(try --batch-size {args.microbatches * max(1, args.batch_size // args.microbatches)})")
    try:  # the checks that live with the technique: m a multiple of p (interleaved), p <= layers, enough text
        if args.simulate:
            return schedule(args.schedule, args.stages, args.microbatches, 0, args.virtual) and None
        partition_layers(args.n_layer, world)  # world = p stages, the same on every rank
        data = load_text(args.data)
        get_batch(data, 1, args.seq_len, torch.Generator())
        return data
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    data = validate(parser, args, int(os.environ.get("WORLD_SIZE", 1)))
    if args.simulate:
        v = args.virtual if args.schedule == "interleaved" else 1
        t = simulate(args.schedule, args.stages, args.microbatches, virtual=v)
        print(render(t) + f"\nbubble {t['bubble']:.3f} (formula (p-1)/({'v·' if v > 1 else ''}m+p-1) = "
              f"{bubble_formula(args.stages, args.microbatches, v):.3f}); peak live "
              f"{'micro-batch chunks' if v > 1 else 'micro-batches'} per rank {t['peak_activations']}")
        return t
    os.environ.setdefault("DIST_TIMEOUT", str(args.timeout))
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)  # tied
    rank, n, device = setup_distributed(args.device)
    try:
        r = train(args.schedule, args.microbatches, args.steps, args.batch_size, cfg, args.lr, data, device,
                  log_every=max(1, args.steps // 5))
        per_rank = [None] * n
        dist.all_gather_object(per_rank, {k: v for k, v in r.items() if k != "params"})
        if rank == 0:
            print_report(per_rank)
        return per_rank
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
