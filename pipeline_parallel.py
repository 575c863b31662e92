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

Run:   torchrun --nproc_per_node=4 pipeline_parallel.py --schedule 1f1b --microbatches 8
       torchrun --nproc_per_node=4 pipeline_parallel.py --schedule gpipe --microbatches 4
       python pipeline_parallel.py --simulate --schedule zb-h1 --stages 4 --microbatches 8
"""
from __future__ import annotations

import argparse
import datetime
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
    bounds = [0]
    for s in range(pp_size):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp_size)]


SCHEDULES = ("gpipe", "1f1b", "zb-h1")  # executed by StageRunner; "interleaved" is simulated


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
    # ZB-H1: B is only the input gradient, which the previous stage waits for; W, the weight gradient, waits for
    # nobody. In the steady state W follows its B at once, so no more activations are alive than with 1F1B; in the
    # cool-down each W is held back by one B and fills the wait for the next gradient.
    out, held, steady = [], [], m - warmup
    for a, i in actions:
        out.append((a, i))
        if a == "B":
            if i < steady:
                out.append(("W", i))
            else:
                held.append(i)
                if len(held) > 1:
                    out.append(("W", held.pop(0)))
    return out + [("W", i) for i in held]


def interleaved_schedule(p: int, m: int, rank: int, v: int) -> list[tuple[str, int, int]]:
    """Interleaved 1F1B (Narayanan et al. 2021): micro-batches go through the v chunks in groups of p, forward
    chunk 0, 1, ..., backward in reverse; a deeper warm-up, then one forward, one backward. Each step is 1/v of a
    stage's work, so the p - 1 slots of fill and drain shrink by v: bubble = (p-1) / (v·m + p - 1)."""
    if m % p:
        raise ValueError(f"interleaved needs the micro-batches ({m}) to be a multiple of the stages ({p})")
    total = m * v
    forward = lambda k: ("F", k // (p * v) * p + k % p, k // p % v)
    backward = lambda k: ("B", k // (p * v) * p + k % p, v - 1 - k // p % v)
    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    actions = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [forward(warmup + k), backward(k)]
    return actions + [backward(k) for k in range(total - warmup, total)]


def simulate(kind: str, pp_size: int, n_microbatches: int, t_forward: float = 1.0, t_backward: float = 2.0,
             virtual: int = 2) -> dict:
    """Place every rank's actions in time from their dependencies: F(i) on rank r after F(i) on r-1; B(i) on r after
    B(i) on r+1 (and after F(i) on the last rank); W(i) after B(i). Returns the events, the makespan, the bubble
    (idle share of p·makespan) and each rank's peak number of micro-batches whose activations are alive.
    With zb-h1, B and W each take half of t_backward; with interleaved each of the v chunks takes 1/v, and F of
    chunk c on rank 0 follows F of chunk c-1 on the last rank (B the other way round)."""
    p, m = pp_size, n_microbatches
    v = virtual if kind == "interleaved" else 1
    orders = [[a if len(a) == 3 else (*a, 0) for a in schedule(kind, p, m, r, v)] for r in range(p)]
    cost = {"F": t_forward / v, "B": (t_backward / 2 if kind == "zb-h1" else t_backward) / v, "W": t_backward / 2}
    done, free, pos = {}, [0.0] * p, [0] * p
    events = [[] for _ in range(p)]
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progress = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                a, i, c = orders[r][pos[r]]
                if a == "F":
                    need = [("F", i, c, r - 1)] if r > 0 else ([("F", i, c - 1, p - 1)] if c > 0 else [])
                elif a == "B":
                    need = [("B", i, c, r + 1)] if r < p - 1 else \
                        ([("B", i, c + 1, 0)] if c < v - 1 else [("F", i, c, r)])
                else:
                    need = [("B", i, c, r)]
                if any(dep not in done for dep in need):
                    break
                start = max([free[r]] + [done[dep] for dep in need])
                done[(a, i, c, r)] = free[r] = start + cost[a]
                events[r].append((a, f"{i}{'abcdefgh'[c]}" if v > 1 else i, start, free[r]))
                pos[r] += 1
                progress = True
        if not progress:
            raise RuntimeError(f"{kind} deadlocks with p={p}, m={m}: every rank waits for another")
    makespan = max(free)
    busy = sum(e[3] - e[2] for ev in events for e in ev)
    peak = []
    for ev in events:
        alive, top = 0, 0
        for a, *_ in ev:  # activations live from F until the last backward piece that needs them
            alive += {"F": 1, "B": 0 if kind == "zb-h1" else -1, "W": -1}[a]
            top = max(top, alive)
        peak.append(top)
    return {"kind": kind, "p": p, "m": m, "v": v, "events": events, "makespan": makespan,
            "bubble": 1 - busy / (p * makespan), "peak_activations": peak}


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    """(p-1)/(m+p-1); with v interleaved chunks per rank, (p-1)/(v·m+p-1)."""
    return (p - 1) / (v * m + p - 1)


def render(timeline: dict) -> str:
    """One row per rank, one cell per time unit: F3 / B3 / W3 where that rank works on micro-batch 3, . where idle."""
    events = timeline["events"]
    unit = min(e[3] - e[2] for ev in events for e in ev)
    width = round(timeline["makespan"] / unit)
    rows = []
    for r, ev in enumerate(events):
        cells = ["." for _ in range(width)]
        for a, i, start, end in ev:
            for c in range(round(start / unit), round(end / unit)):
                cells[c] = f"{a}{i}"
        rows.append(f"rank {r} | " + " ".join(f"{c:<3}" for c in cells))
    return "\n".join(rows)


class PipelineStage(nn.Module):
    """The part of a TinyGPT that one rank runs: its blocks, plus the embeddings (first stage) or the final norm and
    head (last stage). The input is token ids on the first stage and the previous stage's activation elsewhere."""

    def __init__(self, model: "TinyGPT", rank: int, pp_size: int):
        super().__init__()
        self.first, self.last = rank == 0, rank == pp_size - 1
        self.blocks = nn.ModuleList(model.blocks[i] for i in partition_layers(len(model.blocks), pp_size)[rank])
        if self.first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        if self.last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x):
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)) if self.last else x


class StageRunner:
    """Executes one rank's schedule with send/recv: activations travel forward, their gradients backward.

    Sends are isend (never block); receives block. Since the schedule's dependencies form no cycle (simulate
    checks), every blocking receive is eventually matched. batch_isend_irecv is avoided: it can hang on gloo."""

    def __init__(self, stage: PipelineStage, rank: int, pp_size: int, group=None, split_backward=False):
        self.stage, self.rank, self.p, self.group = stage, rank, pp_size, group
        self.split_backward = split_backward  # zb-h1: backward in two pieces, B (input) and W (weights)
        self.pending_sends = []
        self.events = []  # (action, micro-batch, start, end) of compute only: waiting is the bubble
        self.peak_alive = 0

    def _peer(self, r):
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _send(self, t, to):
        self.pending_sends.append(dist.isend(t.contiguous(), self._peer(to), group=self.group))

    def _recv(self, shape, dtype, device, frm):
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, self._peer(frm), group=self.group)
        return t

    def run(self, actions, inputs: list, targets: list, act_shape, dtype=torch.float32) -> float:
        """One training step's forward and backward over the micro-batches; returns the mean loss (last stage).
        Gradients accumulate in the stage's parameters; each micro-batch's loss is scaled by 1/m."""
        m, saved, losses = len(inputs), {}, []
        self.events = []
        device = next(self.stage.parameters()).device
        t_step = time.perf_counter()
        for a, i in actions:
            if a == "F":
                x = inputs[i] if self.stage.first else self._recv(act_shape, dtype, device, self.rank - 1).requires_grad_()
                t0 = time.perf_counter()
                y = self.stage(x)
                if self.stage.last:
                    y = F.cross_entropy(y.float().view(-1, y.shape[-1]), targets[i].view(-1)) / m
                    losses.append(y.item())
                self.events.append(("F", i, t0 - t_step, time.perf_counter() - t_step))
                if not self.stage.last:
                    self._send(y.detach(), self.rank + 1)
                saved[i] = (x, y)
                self.peak_alive = max(self.peak_alive, len(saved))
            else:
                grad = None
                if a == "B" and not self.stage.last:
                    grad = self._recv(saved[i][1].shape, dtype, device, self.rank + 1)
                t0 = time.perf_counter()
                gx = None
                if a == "W":  # zb-h1: the weight gradients, from the graph kept alive since B
                    x, y, grad = saved.pop(i)
                    torch.autograd.backward(y, grad, inputs=list(self.stage.parameters()))
                elif self.split_backward:  # zb-h1's B: only dL/dx, which the previous stage is waiting for
                    x, y = saved[i]
                    if not self.stage.first:
                        (gx,) = torch.autograd.grad(y, x, grad, retain_graph=True)
                    saved[i] = (x, y, grad)
                else:
                    x, y = saved.pop(i)
                    y.backward(grad)
                    gx = x.grad
                self.events.append((a, i, t0 - t_step, time.perf_counter() - t_step))
                if a == "B" and not self.stage.first:
                    self._send(gx, self.rank - 1)
        for req in self.pending_sends:
            req.wait()
        self.pending_sends = []
        self.step_time = time.perf_counter() - t_step
        return sum(losses)

    def bubble(self) -> float:
        """Measured idle share of the last step: 1 - compute time / step time."""
        return 1 - sum(e[3] - e[2] for e in self.events) / self.step_time


# --- demo --------------------------------------------------------------


def train(kind: str = "1f1b", n_microbatches: int = 8, steps: int = 10, batch_size: int = 16, cfg: GPTConfig | None = None,
          lr: float = 3e-3, data=None, device="cpu", seed: int = 0, log_every: int = 0, group=None) -> dict:
    """Train TinyGPT split into one stage per rank of `group`; every rank reads the same batch (the first stage
    uses the inputs, the last the targets). Returns losses, measured bubbles and peak live micro-batches."""
    cfg = cfg or GPTConfig(n_layer=4, tie_weights=False)
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    if batch_size % n_microbatches:
        raise ValueError(f"--batch-size {batch_size} is not divisible by --microbatches {n_microbatches}")
    data = load_text() if data is None else data
    torch.manual_seed(seed)  # every rank builds the same model and keeps its stage
    model = TinyGPT(cfg).to(device)
    stage = PipelineStage(model, rank, p)
    opt = torch.optim.AdamW(stage.parameters(), lr=lr, weight_decay=0.1)
    runner = StageRunner(stage, rank, p, group, split_backward=(kind == "zb-h1"))
    actions = schedule(kind, p, n_microbatches, rank)
    mb = batch_size // n_microbatches
    gen = torch.Generator().manual_seed(seed)
    losses, bubbles, times = [], [], []
    for step in range(steps):
        x, y = (t.to(device) for t in get_batch(data, batch_size, cfg.seq_len, gen))
        loss = runner.run(actions, list(x.split(mb)), list(y.split(mb)), (mb, cfg.seq_len, cfg.d_model))
        opt.step()
        opt.zero_grad()
        # the loss lives on the last stage: send it to everyone so that rank 0 can print it
        t = torch.tensor([float(loss)], device=device)
        dist.broadcast(t, src=dist.get_global_rank(group, p - 1) if group else p - 1, group=group)
        losses.append(t.item())
        bubbles.append(runner.bubble())
        times.append(runner.step_time)
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps} | loss {losses[-1]:.3f} | "
                  f"{batch_size * cfg.seq_len / times[-1] / 1e3:.1f}k tok/s | {times[-1] * 1e3:.0f} ms", flush=True)
    names = {id(q): name for name, q in model.named_parameters()}
    return {"kind": kind, "rank": rank, "p": p, "m": n_microbatches, "losses": losses,
            "bubble": statistics.median(bubbles[1:] or bubbles), "peak_alive": runner.peak_alive,
            "ms_per_step": statistics.median(times) * 1e3, "events": runner.events,
            "params": {names[id(q)]: q.detach().clone() for q in stage.parameters()}}


def print_report(per_rank: list[dict]) -> None:
    r0 = per_rank[0]
    kind, p, m = r0["kind"], r0["p"], r0["m"]
    sim = simulate(kind, p, m)
    print(f"\n{kind} schedule, p = {p} stages, m = {m} micro-batches (simulated with t_B = 2·t_F):")
    print(render(sim))
    print(f"\n{'rank':>4} | {'bubble (measured)':>17} {'simulated':>10} {'(p-1)/(m+p-1)':>14} | "
          f"{'peak live micro-batches':>23} {'formula':>8}")
    for r in per_rank:
        formula = m if kind == "gpipe" else min(m, p - r["rank"])
        print(f"{r['rank']:>4} | {r['bubble']:>17.3f} {sim['bubble']:>10.3f} {bubble_formula(p, m):>14.3f} | "
              f"{r['peak_alive']:>23} {formula:>8}")
    mean = statistics.mean(r["bubble"] for r in per_rank)
    print(f"mean measured bubble {mean:.3f} vs (p-1)/(m+p-1) = {bubble_formula(p, m):.3f}"
          + ("  (zb-h1 does better than the 1F1B formula by design)" if kind == "zb-h1" else ""))
    print("(measured = 1 - compute time / step time on each rank, from its own timestamps: waiting for a neighbour, "
          "sending and receiving all count as bubble; with more processes than cores it also includes time the OS "
          "gave to another rank)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--schedule", choices=SCHEDULES + ("interleaved",), default="1f1b",
                   help="interleaved (virtual stages) runs with --simulate only")
    p.add_argument("--virtual", type=int, default=2, help="interleaved: model chunks per rank")
    p.add_argument("--microbatches", type=int, default=8, help="m: micro-batches per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, split into m micro-batches")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--simulate", action="store_true", help="only draw the schedule for --stages, no training")
    p.add_argument("--stages", type=int, default=4, help="with --simulate: p")
    p.add_argument("--timeout", type=int, default=120, help="seconds a rank waits for a peer before failing")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))  # checked before any send/recv, the same on every rank
    if args.microbatches < 1:
        p.error(f"--microbatches {args.microbatches}: give at least 1")
    if args.simulate:
        v = args.virtual if args.schedule == "interleaved" else 1
        if args.schedule == "interleaved" and args.microbatches % args.stages:
            p.error(f"--microbatches {args.microbatches}: interleaved needs a multiple of --stages {args.stages}")
        t = simulate(args.schedule, args.stages, args.microbatches, virtual=v)
        print(render(t))
        print(f"bubble {t['bubble']:.3f} (formula (p-1)/({'v·' if v > 1 else ''}m+p-1) = "
              f"{bubble_formula(args.stages, args.microbatches, v):.3f}); peak live "
              f"{'micro-batch chunks' if v > 1 else 'micro-batches'} per rank {t['peak_activations']}")
        return t
    if args.schedule == "interleaved":
        p.error("--schedule interleaved runs in the simulator only: add --simulate, or train with 1f1b or zb-h1")
    if world > args.n_layer:
        p.error(f"{world} pipeline stages but only --n-layer {args.n_layer}: use --n-layer {world} or more")
    if args.batch_size % args.microbatches:
        p.error(f"--batch-size {args.batch_size} is not divisible by --microbatches {args.microbatches} "
                f"(try --batch-size {args.microbatches * max(1, args.batch_size // args.microbatches)})")
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    try:
        data = load_text(args.data)
    except ValueError as e:
        p.error(str(e))
    os.environ.setdefault("DIST_TIMEOUT", str(args.timeout))
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                    tie_weights=False)
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
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
        self.events: list[tuple[str, str, int]] = []
        self.phase = ""
        self._originals = {}

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
        for ph, op, nbytes in self.events:
            if phase is None or ph == phase:
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
