"""A complete small pretraining run on PyTorch's own FSDP (fully_shard), with the sharding strategy as one flag.

Fully sharded data parallelism is ZeRO-3 as PyTorch ships it: each rank stores 1/N of every parameter, gradient
and optimizer state, gathers a block's parameters just before using them and reduce-scatters its gradients
after. With Φ parameters of 4 bytes each, a rank stores Φ·4/N bytes of parameters under FULL_SHARD and
SHARD_GRAD_OP, Φ·4/S under HYBRID_SHARD (sharded within groups of S ranks), Φ·4 under plain data parallelism.
The training loop is everything a real run has: warm-up and cosine or WSD learning-rate schedules, gradient
accumulation and clipping, bf16 mixed precision, activation checkpointing, evaluation, sharded checkpoints that
resume on any number of ranks, tokens/s and MFU = achieved FLOP/s ÷ peak FLOP/s.

Run:   torchrun --nproc_per_node=2 fsdp_train.py
       torchrun --nproc_per_node=4 fsdp_train.py --sharding hybrid --shard-size 2 --save-dir runs/a --save-every 50
       torchrun --nproc_per_node=2 fsdp_train.py --sharding full,grad_op,none --steps 30
       python fsdp_train.py --help
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

# --- the technique -----------------------------------------------------

SHARDINGS = ("full", "grad_op", "hybrid", "none")


def make_mesh(sharding: str, world_size: int, shard_size: int, device: torch.device):
    """1-D mesh over all ranks; for hybrid a 2-D (replicate, shard) mesh: shard inside groups of shard_size
    consecutive ranks (one node, fast links), replicate across groups (slow links carry only a gradient all-reduce)."""
    if sharding == "hybrid":
        if world_size % shard_size:
            raise ValueError(f"world size {world_size} is not divisible by --shard-size {shard_size}")
        return init_device_mesh(device.type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each block keeps only its input for backward and recomputes the rest: activation memory of L blocks becomes
    about one block's, for one extra forward per block."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=False)


def apply_fsdp(model: nn.Module, mesh, sharding: str, precision: str = "fp32", activation_checkpointing=False):
    """Wrap each transformer block as its own FSDP unit, then the root (embeddings, final norm, head).

    full    = FULL_SHARD:    parameters resharded after forward, gathered again for backward (3 passes, least memory)
    grad_op = SHARD_GRAD_OP: parameters stay gathered from forward to backward (2 passes, more memory)
    hybrid  = HYBRID_SHARD:  full sharding inside each group of the 2-D mesh, replication across groups
    none    = plain data parallelism (DDP): everything replicated, gradients all-reduced
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if sharding == "none":
        return DDP(model)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    reshard = sharding != "grad_op"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank stores (its shards, for FSDP's DTensor parameters)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str, decay_frac: float = 0.2,
          min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine to min_ratio·lr; or WSD: warm-up, stable at lr, then a linear decay to
    min_ratio·lr over the last decay_frac of the steps (the annealing phase, where the best data goes)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    decay_start = steps - int(decay_frac * steps)
    if step < decay_start:
        return lr
    return lr * (1 - (1 - min_ratio) * (step - decay_start + 1) / max(1, steps - decay_start))


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6Φ for the matrices (2 forward + 4 backward per parameter) plus attention's
    scores and weighted sum, 12·L·T·d (PaLM, appendix B), with Φ counted without the embeddings' lookups."""
    d, L, T = cfg.d_model, cfg.n_layer, cfg.seq_len
    phi = L * 12 * d * d + cfg.vocab_size * d  # blocks (4d² attention + 8d² MLP) and the output head
    return 6 * phi + 12 * L * T * d


# Checkpoints: torch.distributed.checkpoint writes one file per rank (its shards) plus metadata, and can load them
# on any number of ranks. We write into DIR.tmp and rename when every rank is done, so a run killed mid-save
# leaves the previous checkpoint untouched.

def save_checkpoint(save_dir: str, step: int, model, optimizer, cfg) -> str:
    final = Path(save_dir) / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (Path(save_dir) / "latest").write_text(final.name)
    dist.barrier()
    return str(final)


def find_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "latest").exists():
        p = p / (p / "latest").read_text().strip()
    if not (p / "train_state.json").exists():
        raise ValueError(f"--resume {path}: no checkpoint there (expected a --save-dir or one of its step_* folders)")
    return p


def load_checkpoint(path: str, model, optimizer, cfg) -> int:
    """Load a checkpoint written by any number of ranks into this model and optimizer; return its step."""
    p = find_checkpoint(path)
    state = json.loads((p / "train_state.json").read_text())
    if state["config"] != asdict(cfg):
        diff = {k: (v, asdict(cfg)[k]) for k, v in state["config"].items() if asdict(cfg).get(k) != v}
        raise ValueError(f"--resume {path}: written by a different model shape {diff} (saved, now): pass the same "
                         f"--n-layer/--n-head/--d-model/--seq-len")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(p))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return state["step"]


# --- demo --------------------------------------------------------------


def build_model(cfg: GPTConfig, device="cpu", seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)  # the same initial weights on every rank, whatever the sharding
    return TinyGPT(cfg).to(device)


def split_data(data: torch.Tensor, val_frac: float = 0.1):
    """Deterministic split: the last val_frac of the bytes is the validation set."""
    cut = int(len(data) * (1 - val_frac))
    return data[:cut], data[cut:]


def batch_for_step(data, step: int, global_batch: int, seq_len: int, seed: int, rank: int, n: int):
    """This rank's slice of the global batch of `step`: a function of the step alone, so a resumed run sees the
    same data as an uninterrupted one."""
    x, y = get_batch(data, global_batch, seq_len, torch.Generator().manual_seed(seed * 1_000_003 + step))
    per = global_batch // n
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


@torch.no_grad()
def evaluate(model, val, cfg, batches: int, rank: int, n: int, device, per_batch: int = 16) -> float:
    """Mean loss on a fixed validation set (batches × per_batch sequences) that the ranks share out between them,
    so the figure does not depend on the number of ranks."""
    model.eval()
    total = torch.zeros(2, device=device)  # summed loss, tokens
    for b in range(batches):
        x, y = get_batch(val, per_batch, cfg.seq_len, torch.Generator().manual_seed(12345 + b))
        x, y = x[rank::n].contiguous().to(device), y[rank::n].contiguous().to(device)
        logits = model(x).float()
        total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total[1] += y.numel()
    dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def generate(model, prompt: bytes, length: int, cfg, device, temperature: float = 0.8, seed: int = 0) -> bytes:
    """Sample bytes; every rank runs the same forward passes (FSDP's gathers are collectives)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    for _ in range(length):
        logits = model(idx[:, -cfg.seq_len:])[0, -1].float() / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).to(device)
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    model.train()
    return bytes(idx[0, len(prompt):].tolist())


def measure_peak_tflops(device, size: int = 1024, repeats: int = 5) -> float:
    """What one rank's matmuls reach here: the denominator of MFU when no --peak-tflops is given on a CPU."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU: the process's peak resident set


def train(args) -> dict:
    """One training run as the flags describe; returns the figures it prints (rank 0 prints)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device_resolved)
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    data = load_text(args.data)
    train_data, val_data = split_data(data)
    model = build_model(cfg, device, args.seed)
    phi = sum(p.numel() for p in model.parameters())
    mesh = make_mesh(args.sharding, n, args.shard_size, device) if args.sharding != "none" else None
    wrapped = apply_fsdp(model, mesh, args.sharding, args.precision, args.activation_checkpointing)
    if args.compile:
        wrapped = torch.compile(wrapped)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = load_checkpoint(args.resume, model, opt, cfg) if args.resume else 0
    global_batch = args.batch_size * n
    fpt = flops_per_token(cfg)
    log = {"step": [], "loss": [], "lr": [], "val": []}
    times = []
    for step in range(start, args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.schedule, args.decay_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(args.grad_accum):  # gradients add up over K micro-steps, then one optimizer step
            x, y = batch_for_step(train_data, step * args.grad_accum + micro, global_batch, cfg.seq_len, args.seed, rank, n)
            loss = wrapped(x.to(device), y.to(device)) / args.grad_accum
            loss.backward()
            loss_sum += loss.item()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        times.append(dt)
        mean = torch.tensor(loss_sum, device=device)
        dist.all_reduce(mean)
        log["step"].append(step + 1)
        log["loss"].append(mean.item() / n)
        log["lr"].append(lr)
        tokens = global_batch * cfg.seq_len * args.grad_accum
        mfu = fpt * tokens / dt / (args.peak_tflops * 1e12 * n)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            log["val"].append((step + 1, evaluate(wrapped, val_data, cfg, args.eval_batches, rank, n, device)))
        if rank == 0 and (step % args.log_every == 0 or step + 1 == args.steps):
            val = f" | val {log['val'][-1][1]:.3f}" if log["val"] and log["val"][-1][0] == step + 1 else ""
            print(f"step {step + 1}/{args.steps} | loss {log['loss'][-1]:.3f}{val} | lr {lr:.2e} | "
                  f"{tokens / dt / 1e3:.1f}k tok/s | {dt * 1e3:.0f} ms | peak {peak_memory_mib(device):.0f} MiB | "
                  f"MFU {100 * mfu:.2f}%", flush=True)
        if args.save_dir and args.save_every and (step + 1) % args.save_every == 0:
            path = save_checkpoint(args.save_dir, step + 1, model, opt, cfg)
            if rank == 0:
                print(f"saved {path}", flush=True)
    if args.eval_every and not log["val"]:  # resumed at the last step: still report the validation loss
        log["val"].append((start, evaluate(wrapped, val_data, cfg, args.eval_batches, rank, n, device)))
    sample = generate(wrapped, b"def ", args.sample_len, cfg, device) if args.sample_len else b""
    return {"sharding": args.sharding, "world_size": n, "num_params": phi, "local_numel": local_numel(model),
            "param_bytes_per_rank": sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters()),
            "log": log,
            "ms_per_step": statistics.median(times[1:] or times) * 1e3 if times else None,
            "final_loss": log["loss"][-1] if log["loss"] else None,
            "final_val": log["val"][-1][1] if log["val"] else None, "sample": sample.decode("utf-8", "replace"),
            "peak_mib": peak_memory_mib(device), "start_step": start}


def expected_param_bytes(r: dict, shard_size: int) -> float:
    """Φ·4/N for full and grad_op, Φ·4/shard_size for hybrid (sharded within a group), Φ·4 replicated."""
    divisor = {"full": r["world_size"], "grad_op": r["world_size"], "hybrid": shard_size, "none": 1}[r["sharding"]]
    return r["num_params"] * 4 / divisor


def print_summary(results: list[dict], shard_size: int) -> None:
    print(f"\n{'sharding':<8} | {'param bytes/rank':>16} {'formula':>12} | {'ms/step':>8} | {'train loss':>10} "
          f"{'val loss':>9} | {'peak MiB':>8}")
    for r in results:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        print(f"{r['sharding']:<8} | {r['param_bytes_per_rank']:>16,} {expected_param_bytes(r, shard_size):>12,.0f} | "
              f"{fmt(r['ms_per_step'], '>8.1f'):>8} | {fmt(r['final_loss'], '>10.3f'):>10} "
              f"{fmt(r['final_val'], '>9.3f'):>9} | {r['peak_mib']:>8.0f}")
    print("(fp32 master parameters: 4 bytes each. FSDP splits each parameter along dim 0, so a dimension that N does "
          "not divide puts a few more elements on the first ranks.)")
    if results[-1]["sample"]:
        print(f"\nsample after training, from the prompt 'def ':\n{results[-1]['sample']!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sharding", default="full", help="full, grad_op, hybrid or none; or a list such as full,none")
    p.add_argument("--shard-size", type=int, default=None, help="hybrid: ranks per sharding group (default: 2)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (needs a C++ compiler on CPU)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per micro-step")
    p.add_argument("--grad-accum", type=int, default=1, help="K micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    p.add_argument("--decay-frac", type=float, default=0.2, help="wsd: share of the steps spent decaying")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-dir")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", help="a --save-dir (its latest checkpoint) or one step_* folder in it")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device, for MFU "
                   "(default: 989 on CUDA, the H100/H200 bf16 dense figure; on CPU, measured by a matmul)")
    p.add_argument("--sample-len", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON (rank 0)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    strategies = args.sharding.split(",")
    for s in strategies:
        if s not in SHARDINGS:
            p.error(f"--sharding {s}: choose from {', '.join(SHARDINGS)}")
    if args.shard_size is None:
        args.shard_size = 2 if world % 2 == 0 else 1
    if "hybrid" in strategies and (args.shard_size < 1 or world % args.shard_size):
        p.error(f"--shard-size {args.shard_size} does not divide the world size {world} (try --shard-size "
                f"{next(k for k in range(min(world, max(1, args.shard_size)), 0, -1) if world % k == 0)})")
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.resume and len(strategies) > 1:
        p.error("--resume takes one --sharding, not a list")
    if args.resume:
        try:
            find_checkpoint(args.resume)
        except ValueError as e:
            p.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible here (use --device cpu)")
    try:
        n_bytes = load_text(args.data).numel()
    except ValueError as e:
        p.error(str(e))
    if int(n_bytes * 0.1) <= args.seq_len + 1:
        p.error(f"--data has {n_bytes:,} bytes: too few for a validation split of sequences of --seq-len "
                f"{args.seq_len} (give more text or lower --seq-len)")
    args.device_resolved = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, n, device = setup_distributed(args.device)
    args.device_resolved = str(device)
    if args.peak_tflops is None:
        args.peak_tflops = 989.0 if device.type == "cuda" else measure_peak_tflops(device)
        if rank == 0 and device.type == "cpu":
            print(f"MFU is measured against this CPU's own fp32 matmul rate, {args.peak_tflops * 1e3:.1f} GFLOP/s "
                  f"per process (--peak-tflops to give another)", flush=True)
    try:
        results = []
        for s in strategies:
            if rank == 0 and len(strategies) > 1:
                print(f"--- sharding {s} ---", flush=True)
            try:
                results.append(train(argparse.Namespace(**{**vars(args), "sharding": s})))
            except ValueError as e:  # e.g. a checkpoint of another model shape: the same on every rank
                if rank == 0:
                    print(f"error: {e}")
                raise SystemExit(2)
        if rank == 0:
            print_summary(results, args.shard_size)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
        return results
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
