"""3D parallelism: data × pipeline × tensor parallelism on one device mesh, and a model of its step time at scale.

GPUs = N_DP × N_PP × N_TP. TP all-reduces activations several times per layer, so it lives inside a node (NVLink);
PP passes activations between neighbouring stages, so it spans nodes; DP all-reduces gradients once per step. Ranks
form a (dp, pp, tp) grid, TP innermost: rank = (d · N_PP + p) · N_TP + t. TP comes from DTensor, the pipeline from
torch.distributed.pipelining (1F1B), DP is an all-reduce; every collective is counted from outside (torch.profiler,
CommCounter). The planner predicts a step at cluster scale:

    step = m · t_mb + bubble + exposed DP,   bubble = (p − 1)/(v·m + p − 1) of the pipeline's time,
    t_mb = FLOPs of one micro-batch on one GPU / (η · peak) + TP all-reduces on NVLink + PP sends on InfiniBand,

checked against Narayanan et al. (2021, Megatron-LM, 1.7B to 1T on up to 3,072 A100s) and LLaMA 3 405B.

Run:   torchrun --nproc_per_node=8 parallel_3d.py --dp 2 --pp 2 --tp 2
       python parallel_3d.py --plan --params 175e9 --gpus 1024 --gpu a100
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage as TorchPipelineStage, Schedule1F1B
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


# --- the technique -----------------------------------------------------


def mesh_coordinates(world_size: int, dp: int, pp: int, tp: int) -> dict:
    """The global ranks of each DP, PP and TP group of a (dp, pp, tp) grid, TP innermost; world_size = dp·pp·tp."""
    # BEGIN SOLUTION
    rank = lambda d, p, t: (d * pp + p) * tp + t
    return {"coords": [(r // (pp * tp), r // tp % pp, r % tp) for r in range(world_size)],
            "tp_groups": [[rank(d, p, t) for t in range(tp)] for d in range(dp) for p in range(pp)],
            "pp_groups": [[rank(d, p, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "dp_groups": [[rank(d, p, t) for d in range(dp)] for p in range(pp) for t in range(tp)]}
    # END SOLUTION


# The Megatron split of a block in DTensor's words: q, k, v, fc1 by output columns, o, fc2 by input rows. Forward, o and
# fc2 all-reduce their output; backward, q, k, v and fc1 each their input's gradient: 2 + 4 = 6 per micro-batch.
TP_PLAN = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
           "attn.o": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel()}


class Stage(nn.Module):
    """The blocks of one pipeline stage (consecutive, balanced), plus the embeddings on the first stage and the
    final norm and head on the last. A tied head and embedding become two copies on two stages: see sync_grads."""

    def __init__(self, model: "TinyGPT", p: int, n_stages: int):
        super().__init__()
        L = len(model.blocks)
        lo, hi = p * L // n_stages, (p + 1) * L // n_stages
        self.first, self.last = p == 0, p == n_stages - 1
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        if self.first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        if self.last:
            self.ln_f, self.head = model.ln_f, model.head
        # the copy of a tied embedding/head this stage holds when the pair lives on two stages (else None)
        tied = model.cfg.tie_weights and n_stages > 1 and (self.first or self.last)
        self.tied_weight = (model.tok_emb.weight if self.first else model.head.weight) if tied else None

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
    for block in stage.blocks:
        parallelize_module(block, mesh["tp"], TP_PLAN)
        block.attn.n_head //= mesh["tp"].size()  # each rank now computes n_head / N_TP whole heads
    # NCCL-safe p2p by construction: Schedule1F1B posts a step's mixed sends and receives together (batch_isend_irecv)
    pipe = TorchPipelineStage(stage, p, mesh["pp"].size(), device, group=mesh["pp"].get_group())
    loss_fn = lambda logits, y: F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    return stage, Schedule1F1B(pipe, n_microbatches=n_microbatches, loss_fn=loss_fn)


def tied_weight_groups(dp: int, pp: int, tp: int):
    """Megatron's embedding group: for each (d, t), the first and last stage ranks, which hold the two copies of a
    tied embedding/head. new_group is collective: every rank creates every group, in the same order."""
    groups = {tuple(r): dist.new_group([r[0], r[-1]]) for r in mesh_coordinates(dp * pp * tp, dp, pp, tp)["pp_groups"]}
    return next((group for r, group in groups.items() if dist.get_rank() in (r[0], r[-1])), None)


def run_pipeline(stage: Stage, schedule, x, y) -> list:
    """One 1F1B pass over the micro-batches: forward, backward, gradients accumulated."""
    out = []  # the first stage feeds the inputs, the last the targets and returns the micro-batch losses
    schedule.step(*((x,) if stage.first else ()), **(dict(target=y, losses=out) if stage.last else {}))
    return out


def allreduce_tied_grads(stage: Stage, tied_group) -> None:
    """Sum the tied embedding's and head's gradients between first and last stage, so that both copies take the
    single model's step (its gradient is the sum of both uses)."""
    # BEGIN SOLUTION
    if stage.tied_weight is not None:
        dist.all_reduce(stage.tied_weight.grad, group=tied_group)
    # END SOLUTION


def allreduce_dp_grads(stage: Stage, dp_group, dp: int) -> None:
    """Average every gradient of this stage shard over its data-parallel replicas."""
    for q in stage.parameters():
        if q.grad is not None:
            g = q.grad.to_local() if isinstance(q.grad, DTensor) else q.grad
            dist.all_reduce(g, group=dp_group)
            g /= dp


def layout_error(world: int, dp: int, pp: int, tp: int, cfg: "GPTConfig", batch: int, m: int) -> str | None:
    """The one place a training layout is checked (main reports it as a usage error, train raises it)."""
    if (n := dp * pp * tp) != world:
        return f"--dp {dp} × --pp {pp} × --tp {tp} = {n}, but the world size is {world}: make them multiply to it"
    if cfg.n_head % tp or cfg.d_model % cfg.n_head:
        return f"--n-head {cfg.n_head} must divide --d-model {cfg.d_model} and be divisible by --tp {tp}"
    if pp > cfg.n_layer:
        return f"--pp {pp} stages but only --n-layer {cfg.n_layer}: use --n-layer {pp} or more"
    if batch % m or m < pp:
        return f"--microbatches {m} must divide --batch-size {batch} and be at least --pp {pp} (1F1B fills the pipe)"
    return None


# --- the planner: memory and step time at cluster scale ---------------------------------------------------------

# Peak dense bf16 TFLOP/s, NVLink and InfiniBand GB/s per GPU (one direction), HBM GB, from NVIDIA's datasheets:
# A100 SXM4 80GB: 312 TFLOP/s, NVLink 3 600 GB/s both ways; DGX A100: one 200 Gb/s HDR adapter per GPU (25 GB/s).
# H100 SXM5: 989 TFLOP/s, NVLink 4 900 GB/s both ways, 80 GB; DGX H100: one 400 Gb/s NDR adapter per GPU (50 GB/s);
# H200 SXM: the H100's compute and links with 141 GB of HBM3e.
GPUS = {"a100": {"tflops": 312, "nvlink": 300, "ib": 25, "hbm": 80},
        "h100": {"tflops": 989, "nvlink": 450, "ib": 50, "hbm": 80},
        "h200": {"tflops": 989, "nvlink": 450, "ib": 50, "hbm": 141}}
# η, the fraction of peak the GEMMs reach: the one fitted constant, fitted by fit_efficiency on ONE row of Narayanan
# et al. (2021) Table 1, the one nearest GPT-3 (145.6B on 1,536 A100s, 148 TFLOP/s); every other row and the H100
# run are predictions with it.
EFFICIENCY = 0.580
RECOMPUTE = ("full", "selective", "none")


@dataclass
class Shape:
    """A GPT: Φ parameters, L layers, hidden h, a heads, sequence s, vocabulary V."""
    params: float
    layers: int
    hidden: int
    heads: int
    seq: int = 2048
    vocab: int = 51200


def gpt_shape(params: float, layers: int | None = None, hidden: int | None = None, heads: int | None = None,
              seq: int = 2048) -> Shape:
    """Fill in a shape from Φ ≈ 12·L·h² with h ≈ 128·L (GPT-3 175B: L = 96, h = 12288), heads of 128 (h a
    multiple of 1024, so that 8-way TP splits the heads)."""
    L = layers or max(8, 8 * round((params / (12 * 128 ** 2)) ** (1 / 3) / 8))
    h = hidden or max(1024, 1024 * round(math.sqrt(params / (12 * L)) / 1024))
    return Shape(params, L, h, heads or h // 128, seq)


def state_bytes(params: float, n: int, zero_stage: int = 0) -> float:
    """Mixed-precision Adam per GPU (zero.py's accounting): 2Φ bf16 weights + 2Φ gradients + 12Φ fp32 master, m, v,
    each divided by the N data-parallel ranks from its ZeRO stage on: 16Φ, 4Φ + 12Φ/N, 2Φ + 14Φ/N, 16Φ/N."""
    div = lambda stage: n if zero_stage >= stage else 1  # N from its stage on
    return params * (2 / div(3) + 2 / div(2) + 12 / div(1))


def activation_bytes(s: int, b: int, h: int, a: int, tp: int = 1, sp: bool = True, recompute: str = "none") -> float:
    """Bytes one layer keeps for backward per micro-batch (Korthikanti et al. 2022, 16-bit activations, 1-byte
    dropout masks): sbh(34 + 5as/h) without parallelism; TP divides 24 of the 34 and the 5as/h, sequence
    parallelism the rest; selective recomputation drops 5as/h; full recomputation keeps only the input, 2sbh."""
    # BEGIN SOLUTION
    if recompute == "full":
        return 2 * s * b * h / (tp if sp else 1)
    attention = 0 if recompute == "selective" else 5 * a * s / h
    return s * b * h * ((34 + attention) / tp if sp else 10 + (24 + attention) / tp)
    # END SOLUTION


def memory_per_gpu(shape: Shape, tp: int, pp: int, dp: int, m: int, micro: int = 1, v: int = 1, zero_stage: int = 0,
                   recompute: str = "selective", sp: bool = True) -> dict:
    """GB per GPU on the first stage (the fullest under 1F1B): states of Φ/(tp·pp) parameters, and the activations
    of min(p, m) micro-batches in flight through its L/p layers (interleaving keeps (p−1)/(p·v) more)."""
    states = state_bytes(shape.params / (tp * pp), dp, zero_stage)
    in_flight = shape.layers / pp * min(pp, m) * (1 + (pp - 1) / (pp * v) if v > 1 else 1)
    acts = in_flight * activation_bytes(shape.seq, micro, shape.hidden, shape.heads, tp, sp, recompute)
    return {"states": states / 1e9, "activations": acts / 1e9, "total": (states + acts) / 1e9}


def flops_per_token(shape: Shape, recompute: str) -> dict:
    """FLOPs per token: 6Φ for the matrices forward and backward plus 12·L·s·h for attention's scores and weighted
    sum ("model"); recomputation repeats a layer's forward (full: its 2Φ/L + 4sh; selective: attention's 4sh).
    Per layer and for the logits (6Vh, on the last stage) too, since the slowest stage sets the pipeline's pace."""
    s, h, L, V = shape.seq, shape.hidden, shape.layers, shape.vocab
    layer = 6 * (shape.params - V * h) / L + 12 * s * h
    extra = {"full": 2 * (shape.params - V * h) / L + 4 * s * h, "selective": 4 * s * h, "none": 0}[recompute]
    return {"model": L * layer + 6 * V * h, "hardware": L * (layer + extra) + 6 * V * h, "layer": layer + extra,
            "logits": 6 * V * h}


def ring_seconds(nbytes: float, n: int, gbps: float) -> float:
    """A ring all-reduce sends 2(N−1)/N of the buffer from every GPU over its link."""
    return 2 * (n - 1) / n * nbytes / (gbps * 1e9) if n > 1 else 0.0


def step_time(shape: Shape, gpu: str, tp: int, pp: int, dp: int, batch: int, micro: int = 1, v: int = 1,
              recompute: str = "selective", overlap_tp: bool = True, overlap_dp: bool = True, gpus_per_node: int = 8,
              efficiency: float = EFFICIENCY, grad_bytes: int = 4) -> dict:
    """Predicted seconds per step of `batch` sequences and its parts. TFLOP/s per GPU counts the FLOPs the GPUs
    execute (recomputation included, as Narayanan et al. count), MFU only the model's (as LLaMA 3 counts)."""
    g, s, h = GPUS[gpu], shape.seq, shape.hidden
    m, f = batch // (dp * micro), flops_per_token(shape, recompute)
    link = lambda ranks: g["nvlink"] if ranks <= gpus_per_node else g["ib"]  # GB/s of a group of `ranks` GPUs
    # one micro-batch on one GPU of the last stage: its L/p layers and the logits
    compute = (shape.layers / pp * f["layer"] + f["logits"]) * micro * s / tp / (efficiency * g["tflops"] * 1e12)
    # TP: per layer and micro-batch 2 all-reduces forward, 2 backward (+2 when the forward is recomputed); hidden
    # behind the GEMMs when overlapped (Megatron-Core's --tp-comm-overlap) as far as they last
    tp_comm = (4 + 2 * (recompute == "full")) * shape.layers / pp * ring_seconds(2 * micro * s * h, tp, link(tp))
    tp_exposed = max(0.0, tp_comm - compute) if overlap_tp else tp_comm
    # PP: each micro-batch's activation forward and its gradient back, split over the TP ranks (Megatron's
    # scatter/gather), over InfiniBand once the stages sit on different nodes
    pp_comm = v * 2 * (2 * micro * s * h / tp) / (link(tp * pp) * 1e9) if pp > 1 else 0.0
    t_mb = compute + tp_exposed + pp_comm
    # BEGIN SOLUTION
    bubble = (pp - 1) / v * t_mb  # = (p − 1)/(v·m + p − 1) of the pipeline's time
    # END SOLUTION
    # DP: fp32 gradients (Megatron's main grads) in a ring; overlapped, it hides behind the last backward
    dp_comm = ring_seconds(grad_bytes * shape.params / (tp * pp), dp, link(tp * pp * dp))
    dp_exposed = max(0.0, dp_comm - 2 / 3 * compute) if overlap_dp else dp_comm
    total = m * t_mb + bubble + dp_exposed
    per_gpu = batch * s / (tp * pp * dp)  # tokens per GPU per step
    return {"step_time_s": total, "compute_s": m * compute, "tp_s": m * tp_exposed, "pp_s": m * pp_comm,
            "bubble_s": bubble, "dp_exposed_s": dp_exposed, "microbatches": m,
            "tflops_per_gpu": f["hardware"] * per_gpu / total / 1e12,
            "mfu": f["model"] * per_gpu / total / (g["tflops"] * 1e12)}


def plan(shape: Shape, gpus: int, gpu: str = "a100", batch: int = 1536, gpus_per_node: int = 8,
         gpu_mem: float | None = None, zero_stage: int = 0, recompute: str = "selective",
         tp: int | None = None, pp: int | None = None) -> list[dict]:
    """Every layout that fits, fastest first. TP stays in a node and divides the heads; PP divides the layers;
    DP divides the batch; one sequence per micro-batch (the smallest bubble)."""
    mem, rows = gpu_mem or GPUS[gpu]["hbm"], []
    for t in [k for k in (1, 2, 4, 8, 16, 32) if k <= min(gpus_per_node, gpus) and shape.heads % k == 0]:
        for p in [k for k in range(1, shape.layers + 1) if shape.layers % k == 0 and (gpus // t) % k == 0]:
            d = gpus // (t * p)
            if t * p * d != gpus or batch % d or (tp and t != tp) or (pp and p != pp):
                continue
            memory = memory_per_gpu(shape, t, p, d, batch // d, zero_stage=zero_stage, recompute=recompute)
            if memory["total"] <= mem:
                rows.append({"tp": t, "pp": p, "dp": d, "memory_gb_per_gpu": memory["total"], **memory,
                             **step_time(shape, gpu, t, p, d, batch, recompute=recompute, gpus_per_node=gpus_per_node)})
    if not rows:
        raise ValueError(f"--params {shape.params:.3g} fits no layout on --gpus {gpus} of {mem:g} GB (TP inside a node "
                         f"of --gpus-per-node {gpus_per_node}, PP dividing {shape.layers} layers): add GPUs, "
                         f"--zero-stage, or --recompute full")
    return sorted(rows, key=lambda r: (round(r["step_time_s"], 6), r["tp"] * r["pp"]))  # ties: less model parallelism


# --- demo --------------------------------------------------------------

DTYPE_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4, "unsigned char": 1}


def collectives_seen(prof) -> dict[str, tuple[int, int]]:
    """{op: (calls, bytes)} from the backend's events in a torch.profiler trace (record_shapes): gloo and NCCL record
    each all_reduce, send and recv with its tensor's shape and dtype, also those DTensor and pipelining issue inside
    PyTorch, which never pass through dist.* in Python. (NCCL records a batch of p2p ops as one nccl:coalesced.)"""
    out = {}
    for e in prof.events():
        if match := re.match(r"(gloo|nccl):(\w+)", e.name):
            shapes = zip(e.input_shapes or [], e.input_dtypes or [])
            calls, nbytes = out.get(match[2], (0, 0))
            out[match[2]] = (calls + 1, nbytes + sum(math.prod(s) * DTYPE_BYTES[dtype] for s, dtype in shapes if s))
    return out


def measured_step(stage: Stage, schedule, x, y, mesh, dp: int, tied_group) -> tuple[list, dict]:
    """One step's communication watched from outside: the profiler sees what PyTorch runs for us (TP all-reduces,
    pipeline sends), CommCounter our own dist.all_reduce calls. Returns (losses, {kind: (calls, bytes)})."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = run_pipeline(stage, schedule, x, y)
    with CommCounter() as counter:
        counter.phase = "tied"
        allreduce_tied_grads(stage, tied_group)
        counter.phase = "dp"
        allreduce_dp_grads(stage, mesh["dp"].get_group(), dp)
    seen = collectives_seen(prof)
    p2p = [seen.get(op, (0, 0)) for op in ("send", "recv", "coalesced")]
    return out, {"tp": seen.get("all_reduce", (0, 0)), "pp": tuple(map(sum, zip(*p2p))),
                 "tied": counter.totals("tied").get("all_reduce", (0, 0)),
                 "dp": counter.totals("dp").get("all_reduce", (0, 0))}


def train(dp: int, pp: int, tp: int, steps: int = 5, cfg: GPTConfig | None = None, batch_size: int = 8,
          n_microbatches: int = 2, lr: float = 3e-3, data=None, device="cpu", seed: int = 0,
          log_every: int = 0) -> dict:
    """Train TinyGPT on a (dp, pp, tp) mesh of this process group, each DP replica on its slice of the global batch;
    count the last step's collectives (the first also carries pipelining's one-time shape exchange). Returns losses,
    the single-process step-0 loss, this rank's parameters and traffic."""
    cfg = cfg or GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, tie_weights=False)
    if error := layout_error(dist.get_world_size(), dp, pp, tp, cfg, batch_size, n_microbatches):
        raise ValueError(error)
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
    tied_group = tied_weight_groups(dp, pp, tp) if cfg.tie_weights and pp > 1 else None  # same test on every rank
    # DTensor and plain parameters in two groups: CUDA's default (foreach) AdamW cannot mix them in one call
    kinds = [[q for q in stage.parameters() if isinstance(q, DTensor) == d] for d in (True, False)]
    opt = torch.optim.AdamW([{"params": k} for k in kinds if k], lr=lr, weight_decay=0.1)
    losses, times, traffic = [], [], {}
    last = dist.get_global_rank(mesh["pp"].get_group(), pp - 1)  # this rank's peer on the last stage
    for step, (x, y) in enumerate(batches):
        x, y = x[d * batch_size:(d + 1) * batch_size].to(device), y[d * batch_size:(d + 1) * batch_size].to(device)
        t0 = now(device)
        if step == steps - 1:
            out, traffic = measured_step(stage, schedule, x, y, mesh, dp, tied_group)
        else:
            out = run_pipeline(stage, schedule, x, y)
            allreduce_tied_grads(stage, tied_group)
            allreduce_dp_grads(stage, mesh["dp"].get_group(), dp)
        opt.step()
        opt.zero_grad()
        times.append(now(device) - t0)
        loss = torch.stack(out).mean().reshape(1).detach() if out else torch.zeros(1, device=device)
        dist.broadcast(loss, src=last, group=mesh["pp"].get_group())  # the last stage knows the loss
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        losses.append(loss.item() / dp)
        if log_every and dist.get_rank() == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps} | loss {losses[-1]:.4f} | {times[-1] * 1e3:.0f} ms", flush=True)
    names = {id(q): n for n, q in model.named_parameters()}
    params = {names[id(q)]: (q.full_tensor() if isinstance(q, DTensor) else q).detach().clone()
              for q in stage.parameters()}  # every rank's TP slices joined
    held = sum((q.to_local() if isinstance(q, DTensor) else q).numel() for q in stage.parameters())
    return {"coords": (d, p, t), "losses": losses, "reference_step0_loss": reference_loss, "params": params,
            "params_held": held, "model_params": sum(q.numel() for q in TinyGPT(cfg).parameters()),
            "layers_held": len(stage.blocks), "traffic": traffic, "ms_per_step": statistics.median(times) * 1e3}


def print_report(per_rank: list[dict], m: int, tp: int) -> None:
    r0 = per_rank[0]
    print(f"\nstep-0 loss {r0['losses'][0]:.6f} | single-process model, same seed: {r0['reference_step0_loss']:.6f}")
    print(f"{'rank':>4} | {'(dp, pp, tp)':>12} | {'params held':>11} | {'DP all-reduce':>15} | {'tied':>9} | "
          f"{'TP all-reduce':>15} | {'PP send+recv':>15} | {'TP = 6·L·m':>10} | ms/step  (last step: calls / bytes)")
    cell = lambda cb, w: f"{cb[0]:>4} / {cb[1]:>{w - 7},}"
    for r, res in enumerate(per_rank):
        tr = res["traffic"]
        print(f"{r:>4} | {str(tuple(res['coords'])):>12} | {res['params_held']:>11,} | {cell(tr['dp'], 15)} | "
              f"{cell(tr['tied'], 9)} | {cell(tr['tp'], 15)} | {cell(tr['pp'], 15)} | "
              f"{6 * res['layers_held'] * m if tp > 1 else 0:>10} | {res['ms_per_step']:.0f}")
    print(f"(model: {r0['model_params']:,} parameters; TP, PP: torch.profiler's backend events; DP, tied: CommCounter)")


def print_plan(rows: list[dict], shape: Shape, gpu: str, gpus: int, top: int) -> None:
    print(f"Φ = {shape.params:.3g} ({shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads, seq "
          f"{shape.seq}) on {gpus} × {gpu.upper()} ({GPUS[gpu]['tflops']} TFLOP/s bf16, η = {EFFICIENCY} of peak); "
          f"{len(rows)} layouts fit, the fastest {min(top, len(rows))}:")
    print(f"{'TP':>3} {'PP':>3} {'DP':>5} {'m':>5} | {'GB/GPU':>6} | {'step s':>7} {'TFLOP/s':>7} {'MFU':>5} | "
          f"time split: compute / TP / PP sends / bubble / exposed DP (s)")
    for r in rows[:top]:
        print(f"{r['tp']:>3} {r['pp']:>3} {r['dp']:>5} {r['microbatches']:>5} | {r['memory_gb_per_gpu']:>6.1f} | "
              f"{r['step_time_s']:>7.2f} {r['tflops_per_gpu']:>7.0f} {r['mfu']:>5.1%} | {r['compute_s']:.2f} / "
              f"{r['tp_s']:.2f} / {r['pp_s']:.2f} / {r['bubble_s']:.2f} / {r['dp_exposed_s']:.2f}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("--dp", type=int, help="data-parallel degree (training: default 1; --plan: pins it)")
    add("--pp", type=int, help="pipeline stages (training: default 1; --plan: pins it)")
    add("--tp", type=int, help="tensor-parallel degree (training: default 1; --plan: pins it, at most --gpus-per-node)")
    add("--steps", type=int, default=5, help="training steps")
    add("--batch-size", type=int, default=8, help="sequences per DP replica per step")
    add("--microbatches", type=int, default=2, help="micro-batches per step (at least --pp)")
    add("--n-layer", type=int, default=2, help="TinyGPT layers (at least --pp)")
    add("--n-head", type=int, default=4, help="TinyGPT heads (divisible by --tp)")
    add("--d-model", type=int, default=32, help="TinyGPT width (divisible by --n-head)")
    add("--seq-len", type=int, default=16, help="tokens per training sequence")
    add("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present, else cpu")
    add("--plan", action="store_true", help="rank the layouts of --params on --gpus by predicted step time")
    add("--params", type=float, default=70e9, help="--plan: the model's parameters Φ")
    add("--gpus", type=int, default=64, help="--plan: GPUs in the cluster")
    add("--gpus-per-node", type=int, default=8, help="--plan: GPUs per node (NVLink domain; TP stays inside)")
    add("--gpu", choices=sorted(GPUS), default="a100", help="--plan: the GPU, from the table in the file")
    add("--gpu-mem", type=float, help="--plan: GB per GPU (default: the GPU's HBM)")
    add("--layers", type=int, help="--plan: layers (default: from Φ ≈ 12·L·h², h ≈ 128·L)")
    add("--hidden", type=int, help="--plan: hidden size (default: from Φ and the layers)")
    add("--heads", type=int, help="--plan: attention heads (default: hidden / 128)")
    add("--seq", type=int, default=2048, help="--plan: sequence length")
    add("--batch", type=int, default=1536, help="--plan: global batch in sequences")
    add("--recompute", choices=RECOMPUTE, default="selective", help="--plan: activation recomputation")
    add("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0,
        help="--plan: ZeRO stage over DP for the states (0 means none, 16 bytes per parameter)")
    add("--top", type=int, default=5, help="--plan: layouts to print")
    add("--json", help="--plan: write the best layout's prediction to this file")
    return parser


def validate(parser: argparse.ArgumentParser, args) -> GPTConfig | Shape:
    """Every check, before any work, whatever the mode: one line naming the flag and the fix. Returns the model it
    checked: the training GPTConfig, or the --plan Shape."""
    if args.data and not Path(args.data).exists():
        parser.error(f"--data {args.data}: no such file or folder")
    for name in ("dp", "pp", "tp", "steps", "batch_size", "microbatches", "n_layer", "n_head", "d_model", "seq_len",
                 "params", "gpus", "gpus_per_node", "gpu_mem", "layers", "hidden", "heads", "seq", "batch", "top"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} {value:g} must be positive")
    if not args.plan:
        cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, seq_len=args.seq_len)
        error = layout_error(int(os.environ.get("WORLD_SIZE", 1)), args.dp or 1, args.pp or 1, args.tp or 1, cfg,
                             args.batch_size, args.microbatches)
        return parser.error(error) if error else cfg
    shape = gpt_shape(args.params, args.layers, args.hidden, args.heads, args.seq)
    if args.gpus > args.gpus_per_node and args.gpus % args.gpus_per_node:
        parser.error(f"--gpus {args.gpus} is not a whole number of nodes of --gpus-per-node {args.gpus_per_node}")
    if shape.hidden % shape.heads:
        parser.error(f"--hidden {shape.hidden} is not divisible by --heads {shape.heads}")
    if args.tp and args.tp > args.gpus_per_node:
        parser.error(f"--tp {args.tp} would cross nodes of --gpus-per-node {args.gpus_per_node}: TP stays in a node")
    if args.tp and shape.heads % args.tp:
        parser.error(f"--hidden {shape.hidden} with --heads {shape.heads} cannot be split by --tp {args.tp}")
    if args.pp and shape.layers % args.pp:
        parser.error(f"--pp {args.pp} does not divide --layers {shape.layers}")
    return shape


def run_plan(parser: argparse.ArgumentParser, args, shape: Shape) -> list[dict]:
    try:
        rows = plan(shape, args.gpus, args.gpu, args.batch, args.gpus_per_node, args.gpu_mem, args.zero_stage,
                    args.recompute, args.tp, args.pp)
    except ValueError as e:
        parser.error(str(e))
    rows = [r for r in rows if args.dp in (None, r["dp"])] or parser.error(f"--dp {args.dp}: no layout fits with it")
    print_plan(rows, shape, args.gpu, args.gpus, args.top)
    if args.json:
        keys = ("tp", "pp", "dp", "tflops_per_gpu", "mfu", "step_time_s", "memory_gb_per_gpu")
        Path(args.json).write_text(json.dumps({k: rows[0][k] for k in keys}, indent=1))
    return rows


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    spec = validate(parser, args)  # the training GPTConfig, or the --plan Shape
    if args.plan:
        return run_plan(parser, args, spec)
    data = load_text(args.data)
    dp, pp, tp = args.dp or 1, args.pp or 1, args.tp or 1
    rank, n, device = setup_distributed(args.device)
    try:
        r = train(dp, pp, tp, args.steps, spec, args.batch_size, args.microbatches, data=data, device=device,
                  log_every=1)
        per_rank = [None] * n
        dist.all_gather_object(per_rank, {k: v for k, v in r.items() if k != "params"})
        if rank == 0:
            print_report(per_rank, args.microbatches, tp)
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
