"""3D parallelism: data × pipeline × tensor parallelism on one device mesh, with PyTorch's own building blocks.

GPUs = N_DP × N_PP × N_TP. Tensor parallelism splits every matrix of a layer and talks twice per layer in each
direction, so it lives inside a node, on the fastest links; pipeline parallelism cuts the model into stages that
only pass activations to their neighbour, so it spans nodes; data parallelism multiplies throughput and only
all-reduces gradients once per step. The ranks form a (dp, pp, tp) grid, TP innermost:

    rank = (d · N_PP + p) · N_TP + t,

so a TP group is N_TP consecutive ranks (one node). Here TP comes from DTensor (parallelize_module with
column/row-wise styles), the pipeline from torch.distributed.pipelining (1F1B), and data parallelism replicates the
stages and all-reduces their gradients over the DP group. tensor_parallel.py, pipeline_parallel.py and zero.py
build each piece from scratch; this file shows how production code composes them, and plans the degrees.

Run:   torchrun --nproc_per_node=8 parallel_3d.py --dp 2 --pp 2 --tp 2
       python parallel_3d.py --plan --params 70e9 --gpus 64 --gpus-per-node 8 --gpu-mem 80
"""
from __future__ import annotations

import argparse
import datetime
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage as TorchPipelineStage
from torch.distributed.pipelining import Schedule1F1B
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

# --- the technique -----------------------------------------------------


def mesh_coordinates(world_size: int, dp: int, pp: int, tp: int) -> dict:
    """Which global ranks form each DP, PP and TP group of a (dp, pp, tp) grid with TP innermost."""
    if dp * pp * tp != world_size:
        raise ValueError(f"--dp {dp} × --pp {pp} × --tp {tp} = {dp * pp * tp}, not the world size {world_size}")
    rank = lambda d, p, t: (d * pp + p) * tp + t
    return {"coords": [(r // (pp * tp), r // tp % pp, r % tp) for r in range(world_size)],
            "tp_groups": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
            "pp_groups": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "dp_groups": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]}


# The Megatron split of a block, in DTensor's words: q, k, v and fc1 by output columns, o and fc2 by input rows.
TP_PLAN = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
           "attn.o": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}


class Stage(nn.Module):
    """The blocks of one pipeline stage (consecutive, balanced), plus the embeddings on the first stage and the
    final norm and head on the last."""

    def __init__(self, model: "TinyGPT", p: int, n_stages: int):
        super().__init__()
        L = len(model.blocks)
        if n_stages > L:
            raise ValueError(f"{n_stages} pipeline stages but only {L} layers: use --n-layer {n_stages} or more")
        lo, hi = p * L // n_stages, (p + 1) * L // n_stages
        self.first, self.last = p == 0, p == n_stages - 1
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
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


def build_3d(model: "TinyGPT", mesh, n_microbatches: int, device):
    """This rank's piece of the model: its pipeline stage, tensor-parallel over the TP group, with a 1F1B schedule
    over the PP group. Every rank must start from the same full model (same seed)."""
    p = mesh["pp"].get_local_rank()
    stage = Stage(model, p, mesh["pp"].size())
    tp = mesh["tp"].size()
    stage.row_parallel_calls = 0
    for block in stage.blocks:
        parallelize_module(block, mesh["tp"], TP_PLAN)
        block.attn.n_head //= tp  # each rank now computes n_head / N_TP whole heads
        for row in (block.attn.o, block.mlp.fc2):  # each call ends in an all-reduce of its output over TP
            row.register_forward_hook(lambda *_: setattr(stage, "row_parallel_calls", stage.row_parallel_calls + 1))
    pipe = TorchPipelineStage(stage, p, mesh["pp"].size(), device, group=mesh["pp"].get_group())
    loss_fn = lambda logits, y: F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    return stage, Schedule1F1B(pipe, n_microbatches=n_microbatches, loss_fn=loss_fn)


def allreduce_dp_grads(stage: nn.Module, dp_group, dp: int) -> int:
    """Average gradients over the data-parallel replicas of this stage shard; return the bytes a ring all-reduce
    of them sends (2(N-1)/N of the buffer, as collectives.py measures)."""
    sent = 0
    for q in stage.parameters():
        if q.grad is None:
            continue
        g = q.grad.to_local() if isinstance(q.grad, DTensor) else q.grad
        dist.all_reduce(g, group=dp_group)
        g /= dp
        sent += 2 * (dp - 1) * g.numel() * g.element_size() // dp
    return sent


def local_numel(module: nn.Module) -> int:
    return sum((q.to_local() if isinstance(q, DTensor) else q).numel() for q in module.parameters())


# --- the planner --------------------------------------------------------------------------

BYTES_PER_PARAM = 16  # mixed-precision Adam: 2 weights + 2 gradients + 12 fp32 master, m, v


def activation_bytes(params: float, seq_len: int, layers: int | None = None) -> tuple[float, int, int]:
    """Activations kept per layer with full recomputation (only each layer's bf16 input, 2·s·h bytes for one
    sequence), with a GPT shape guessed from Φ ≈ 12·L·h² and h ≈ 128·L (GPT-3 175B: h = 12288, L = 96)."""
    L = layers or max(8, 8 * round((params / (12 * 128 ** 2)) ** (1 / 3) / 8))  # a multiple of 8
    h = int(math.sqrt(params / (12 * L)))
    return 2 * seq_len * h, L, h


def plan(params: float, gpus: int, gpus_per_node: int, gpu_mem_gb: float, seq_len: int = 2048,
         layers: int | None = None) -> dict:
    """Degrees by the usual rules: one GPU holds it → DDP; below 10B → FSDP/ZeRO-3 over all GPUs; larger → TP =
    GPUs per node (fast links), PP across as many nodes as the 16Φ states need (and that divide the layers and the
    node count), DP for the rest. Every (tp, pp) candidate is listed with its memory per GPU."""
    if gpus % gpus_per_node and gpus > gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a whole number of nodes of --gpus-per-node {gpus_per_node}")
    mem = gpu_mem_gb * 1e9
    per_layer, L, h = activation_bytes(params, seq_len, layers)
    state = BYTES_PER_PARAM * params
    candidates = []
    tp = 1
    while tp <= min(gpus_per_node, gpus):
        for pp in [k for k in range(1, gpus // tp + 1) if (gpus // tp) % k == 0 and L % k == 0]:
            dp = gpus // (tp * pp)
            # states split by TP × PP; 1F1B keeps up to pp micro-batches of its L/pp layers: L layer inputs
            need = state / (tp * pp) + per_layer * L / tp
            candidates.append({"tp": tp, "pp": pp, "dp": dp, "gb_states": state / (tp * pp) / 1e9,
                               "gb_activations": per_layer * L / tp / 1e9, "gb": need / 1e9, "fits": need <= mem})
        tp *= 2
    if state + per_layer * L <= mem:
        choice = {"strategy": "DDP", "tp": 1, "pp": 1, "dp": gpus, "gb": (state + per_layer * L) / 1e9}
    elif params < 10e9 and state / gpus + per_layer * L <= mem:
        choice = {"strategy": "FSDP / ZeRO-3", "tp": 1, "pp": 1, "dp": gpus, "gb": (state / gpus + per_layer * L) / 1e9}
    else:
        tp = min(gpus_per_node, gpus)
        nodes_needed = math.ceil(state / (tp * mem))  # nodes whose memory the 16Φ states need
        fitting = [c for c in candidates if c["tp"] == tp and c["pp"] >= nodes_needed and c["fits"]]
        if not fitting:
            raise ValueError(f"{params:.3g} parameters do not fit on {gpus} GPUs of {gpu_mem_gb:g} GB by TP × PP: "
                             f"add GPUs or shard the optimizer states too (ZeRO-1 across DP)")
        c = min(fitting, key=lambda c: c["pp"])
        choice = {"strategy": "3D (TP in a node, PP across nodes, DP for the rest)", "tp": c["tp"], "pp": c["pp"],
                  "dp": c["dp"], "gb": c["gb"]}
    return {"params": params, "layers": L, "hidden": h, "choice": choice, "candidates": candidates}


# --- demo --------------------------------------------------------------


def train(dp: int, pp: int, tp: int, steps: int = 5, cfg: GPTConfig | None = None, batch_size: int = 8,
          n_microbatches: int = 2, lr: float = 3e-3, data=None, device="cpu", seed: int = 0, log_every: int = 0) -> dict:
    """Train TinyGPT on a (dp, pp, tp) mesh of this process group; each DP replica takes its slice of the global
    batch. Returns the losses, the single-process step-0 loss, this rank's parameters and traffic."""
    cfg = cfg or GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, tie_weights=False)
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    d, p, t = mesh.get_coordinate()
    data = load_text() if data is None else data
    torch.manual_seed(seed)  # every rank builds the same full model, then keeps its piece
    model = TinyGPT(cfg).to(device)
    gen = torch.Generator().manual_seed(seed)
    batches = [get_batch(data, batch_size * dp, cfg.seq_len, gen) for _ in range(steps)]
    with torch.no_grad():
        reference_loss = model(*(b.to(device) for b in batches[0])).item()
    stage, schedule = build_3d(model, mesh, n_microbatches, device)
    opt = torch.optim.AdamW(stage.parameters(), lr=lr, weight_decay=0.1)
    losses, times, traffic = [], [], {}
    last = dist.get_global_rank(mesh["pp"].get_group(), pp - 1)  # this rank's peer on the last stage
    for step, (x, y) in enumerate(batches):
        x, y = x[d * batch_size:(d + 1) * batch_size].to(device), y[d * batch_size:(d + 1) * batch_size].to(device)
        t0 = time.perf_counter()
        out = []
        stage.row_parallel_calls = 0
        if stage.first:
            schedule.step(x, target=y if stage.last else None, losses=out if stage.last else None)
        elif stage.last:
            schedule.step(target=y, losses=out)
        else:
            schedule.step()
        dp_bytes = allreduce_dp_grads(stage, mesh["dp"].get_group(), dp)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        loss = torch.tensor([torch.stack(out).mean().item() if out else 0.0])
        dist.broadcast(loss, src=last, group=mesh["pp"].get_group())  # the last stage knows the loss
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        losses.append(loss.item() / dp)
        mb_bytes = batch_size // n_microbatches * cfg.seq_len * cfg.d_model * 4  # one micro-batch's activation
        # forward: one all-reduce per row-parallel call (counted by hooks); backward mirrors it at the
        # column-parallel inputs, whose gradients are partial sums: as many again
        tp_calls = 2 * stage.row_parallel_calls if tp > 1 else 0
        # pipeline: each micro-batch's activation forward (unless last) and its gradient back (unless first)
        pp_sends = n_microbatches * ((not stage.last) + (not stage.first))
        traffic = {"dp": dp_bytes, "tp": tp_calls * 2 * (tp - 1) * mb_bytes // tp, "tp_collectives": tp_calls,
                   "pp": pp_sends * mb_bytes}
        if log_every and dist.get_rank() == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps} | loss {losses[-1]:.4f} | {times[-1] * 1e3:.0f} ms", flush=True)
    params = {}
    names = {id(q): n for n, q in model.named_parameters()}
    for q in stage.parameters():
        params[names[id(q)]] = (q.full_tensor() if isinstance(q, DTensor) else q).detach().clone()
    return {"coords": (d, p, t), "losses": losses, "reference_step0_loss": reference_loss, "params": params,
            "params_held": local_numel(stage), "model_params": sum(q.numel() for q in TinyGPT(cfg).parameters()),
            "traffic": traffic, "ms_per_step": statistics.median(times) * 1e3}


def print_report(per_rank: list[dict]) -> None:
    r0 = per_rank[0]
    print(f"\nstep-0 loss {r0['losses'][0]:.6f} | single-process model, same seed: {r0['reference_step0_loss']:.6f}")
    print(f"\n{'rank':>4} | {'(dp, pp, tp)':>12} | {'params held':>11} {'of model':>9} | {'bytes/step: DP':>14} "
          f"{'TP':>10} {'(collectives)':>13} {'PP':>9}")
    for r, res in enumerate(per_rank):
        tr = res["traffic"]
        print(f"{r:>4} | {str(tuple(res['coords'])):>12} | {res['params_held']:>11,} {res['model_params']:>9,} | "
              f"{tr['dp']:>14,} {tr['tp']:>10,} {tr['tp_collectives']:>13} {tr['pp']:>9,}")
    print("(DP: our gradient all-reduce at a ring's 2(N-1)/N of the buffer; TP: all-reduces of one micro-batch's "
          "activation, forward ones counted by hooks on the row-parallel layers and as many backward; PP: the "
          "activations and gradients this stage passes to its neighbours)")


def print_plan(result: dict, gpus: int, gpus_per_node: int, mem: float) -> None:
    c = result["choice"]
    print(f"Φ = {result['params']:.3g} parameters (assumed shape: {result['layers']} layers, hidden {result['hidden']}), "
          f"{gpus} GPUs of {mem:g} GB, {gpus_per_node} per node; 16 bytes per parameter, full recomputation")
    print(f"{'TP':>4} {'PP':>4} {'DP':>5} | {'states GB/GPU':>13} {'activations':>11} {'total':>8} | fits")
    for cand in result["candidates"]:
        mark = "  <- chosen" if c["strategy"].startswith("3D") and (cand["tp"], cand["pp"]) == (c["tp"], c["pp"]) else ""
        print(f"{cand['tp']:>4} {cand['pp']:>4} {cand['dp']:>5} | {cand['gb_states']:>13.1f} "
              f"{cand['gb_activations']:>11.2f} {cand['gb']:>8.1f} | {'yes' if cand['fits'] else 'no':<3}{mark}")
    print(f"\nrecommended: {c['strategy']}: TP {c['tp']}, PP {c['pp']}, DP {c['dp']}, {c['gb']:.1f} GB per GPU")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per DP replica per step")
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--plan", action="store_true", help="recommend degrees for --params on --gpus")
    p.add_argument("--params", type=float, default=70e9)
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--layers", type=int, default=None, help="the planned model's layers (default: guessed from Φ)")
    args = p.parse_args(argv)
    if args.plan:
        try:
            result = plan(args.params, args.gpus, args.gpus_per_node, args.gpu_mem, layers=args.layers)
        except ValueError as e:
            p.error(str(e))
        print_plan(result, args.gpus, args.gpus_per_node, args.gpu_mem)
        return result
    world = int(os.environ.get("WORLD_SIZE", 1))  # checked on every rank before any communication
    if args.dp * args.pp * args.tp != world:
        p.error(f"--dp {args.dp} × --pp {args.pp} × --tp {args.tp} = {args.dp * args.pp * args.tp}, but the world "
                f"size is {world}: the degrees must multiply to it")
    if args.n_head % args.tp or args.d_model % args.tp:
        p.error(f"--n-head {args.n_head} and --d-model {args.d_model} must be divisible by --tp {args.tp}")
    if args.pp > args.n_layer:
        p.error(f"--pp {args.pp} stages but only --n-layer {args.n_layer}: use --n-layer {args.pp} or more")
    if args.batch_size % args.microbatches:
        p.error(f"--batch-size {args.batch_size} is not divisible by --microbatches {args.microbatches}")
    try:
        data = load_text(args.data)
    except ValueError as e:
        p.error(str(e))
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, seq_len=args.seq_len,
                    tie_weights=False)
    rank, n, device = setup_distributed(args.device)
    try:
        r = train(args.dp, args.pp, args.tp, args.steps, cfg, args.batch_size, args.microbatches, data=data,
                  device=device, log_every=1)
        per_rank = [None] * n
        dist.all_gather_object(per_rank, {k: v for k, v in r.items() if k != "params"})
        if rank == 0:
            print_report(per_rank)
        return r
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
