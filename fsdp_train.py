"""A complete small pretraining run on PyTorch's own FSDP (fully_shard), with the sharding strategy as one flag.

Fully sharded data parallelism is ZeRO-3 as PyTorch ships it: each rank stores 1/N of every parameter, gradient and
optimizer state, gathers a block's parameters just before using them and reduce-scatters its gradients after. With
Φ parameters of 4 bytes, a rank stores Φ·4/N bytes of parameters under FULL_SHARD and SHARD_GRAD_OP, Φ·4/S under
HYBRID_SHARD (sharded within groups of S ranks), Φ·4 under plain data parallelism. The loop is a real run's: warm-up,
cosine or WSD schedules, a data curriculum whose last, best stage is the WSD decay (annealing), gradient accumulation,
clipping, bf16, activation checkpointing, evaluation, sharded checkpoints that resume on any number of ranks, tokens/s
and MFU = achieved FLOP/s ÷ peak FLOP/s of the precision the matmuls run in.

Run:   torchrun --nproc_per_node=2 fsdp_train.py
       torchrun --nproc_per_node=4 fsdp_train.py --sharding hybrid --shard-size 2 --save-dir runs/a --save-every 50
       torchrun --nproc_per_node=2 fsdp_train.py --sharding full,grad_op,none --steps 30
       python fsdp_train.py --data CURRICULUM_DIR --steps 600      (data_mixing.py --curriculum DIR writes one)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from itertools import accumulate
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
    if sharding == "hybrid":  # main has checked that shard_size divides world_size
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
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    reshard = sharding != "grad_op"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model


@contextlib.contextmanager
def saved_activations():
    """Yields {storage address: bytes} of what autograd saves for backward while active: each storage once (a view and
    its base, or a tensor two ops save, are one allocation), parameters and their views left out: the activations."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t if t._base is None else t._base, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str, decay_frac=0.2, min_ratio=0.0) -> float:
    """Linear warm-up, then cosine to min_ratio·lr; or WSD: warm-up, stable at lr, then a linear decay to
    min_ratio·lr over the last decay_frac of the steps (the annealing phase, where the best data goes)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    decay_start = steps - round(decay_frac * steps)
    if step < decay_start:
        return lr
    return lr * (1 - (1 - min_ratio) * (step - decay_start + 1) / max(1, steps - decay_start))


# A curriculum is what data_mixing.py's write_curriculum leaves in a folder: one JSONL shard per stage, in order
# (stage_00_general.jsonl, ...), records {"id", "source", "stage", "text"}. A run spends each stage's share of its
# tokens on it; the last, best stage (1-5 % of the tokens) is the WSD decay: the lr reaches its floor on it.
def curriculum_shards(path: str | None) -> list[Path]:  # in stage order; [] for anything but a curriculum
    return sorted(Path(path).glob("stage_[0-9][0-9]_*.jsonl")) if path and Path(path).is_dir() else []


def load_curriculum(path: str, shares: list[float], seq_len: int, val_frac: float = 0.1):
    """[(stage name, its text as bytes)] and a validation set of held-out high-quality text: the last val_frac of
    the last stage's documents, removed from every stage (earlier stages hold the best documents too)."""
    stages = []
    for shard in curriculum_shards(path):
        lines = shard.read_text(encoding="utf-8").splitlines()
        stages.append((shard.stem.split("_", 2)[2], [json.loads(line)["text"] for line in lines if line.strip()]))
    if len(shares) != len(stages) or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"--stage-shares {shares}: give {len(stages)} shares >= 0 adding up to 1, one per stage")
    if shares[-1] and not 0.01 <= shares[-1] <= 0.05:
        raise ValueError(f"--stage-shares: the last (annealing) stage should hold 1-5 % of the tokens, not {shares[-1]}")
    best = stages[-1][1]
    held_out = best[len(best) - max(1, round(len(best) * val_frac)):]  # in file order: the same text on every rank
    held = set(held_out)
    # one spare byte, cut off again, lets an empty stage through frombuffer (which refuses empty buffers)
    as_bytes = lambda texts: torch.frombuffer(bytearray("\n\n".join(texts).encode() + b"\0"), dtype=torch.uint8)[:-1]
    stages, val = [(name, as_bytes([t for t in texts if t not in held])) for name, texts in stages], as_bytes(held_out)
    for (name, data), share in zip(stages + [("held-out validation", val)], shares + [1]):
        if share and data.numel() <= seq_len + 1:
            raise ValueError(f"--data {path}: stage {name} has {data.numel()} bytes, fewer than one sequence of "
                             f"--seq-len {seq_len} (give it more text or lower --seq-len)")
    return stages, val


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6Φ for the matrices (2 forward + 4 backward per parameter) plus attention's
    scores and weighted sum, 12·L·T·d (PaLM, appendix B), with Φ counted without the embeddings' lookups."""
    d, L, T = cfg.d_model, cfg.n_layer, cfg.seq_len
    phi = L * 12 * d * d + cfg.vocab_size * d  # blocks (4d² attention + 8d² MLP) and the output head
    return 6 * phi + 12 * L * T * d


# MFU's denominator: one GPU's dense peak TFLOP/s in the precision its matmuls run in. Source: NVIDIA's H100 and H200
# SXM datasheets (the same compute): FP32 67; TF32 989 and BF16 1,979 "with sparsity", so dense is half of those.
# PCIe and NVL parts are slower; for them and any other device we measure a matmul.
PEAK_TFLOPS = dict.fromkeys(("H100", "H200"), {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5})


# Checkpoints: torch.distributed.checkpoint writes one file per rank (its shards) plus metadata, loadable on any number
# of ranks. We write DIR.tmp and rename it when every rank is done: a run killed mid-save leaves the last one intact.

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
        print(f"saved {final}", flush=True)
    dist.barrier()
    return str(final)


def find_checkpoint(path: str, cfg: GPTConfig) -> Path:
    """The checkpoint that `path` names (a --save-dir: its latest); refused if absent or of another model shape."""
    p = Path(path)
    if (p / "latest").exists():
        p = p / (p / "latest").read_text().strip()
    if not (p / "train_state.json").exists():
        raise ValueError(f"--resume {path}: no checkpoint there (expected a --save-dir or one of its step_* folders)")
    saved, shape = json.loads((p / "train_state.json").read_text())["config"], asdict(cfg)
    if saved != shape:
        raise ValueError(f"--resume {path}: saved by a model with {({k: v for k, v in saved.items() if shape[k] != v})}"
                         f": pass the same --n-layer/--n-head/--d-model/--seq-len")
    return p


def load_checkpoint(path: str, model, optimizer, cfg) -> int:
    """Load a checkpoint written by any number of ranks into this model and optimizer; return its step."""
    p = find_checkpoint(path, cfg)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(p))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return json.loads((p / "train_state.json").read_text())["step"]


# The training loop: every rank runs the same steps on its slice of the batch; FSDP gathers and scatters inside.
def build_model(cfg: GPTConfig, device="cpu", seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)  # the same initial weights on every rank, whatever the sharding
    return TinyGPT(cfg).to(device)


def load_run_data(args) -> dict:
    """Each stage's training text (one unnamed stage without a curriculum), its end step, validation text, decay."""
    if curriculum_shards(args.data):
        stages, val = load_curriculum(args.data, args.stage_shares, args.seq_len)
        # stage i runs for ends[i-1] <= step < ends[i]; the last stage's steps (>= 1 if its share is not 0) are the decay
        shares, steps = args.stage_shares, args.steps
        last = max(1, round(shares[-1] * steps)) if shares[-1] > 0 else 0
        ends = [min(round(c * steps), steps - last) for c in accumulate(shares[:-2])] + [steps - last, steps]
        decay = last / steps if last else args.decay_frac
        return {"stages": stages, "ends": ends, "val": val, "decay_frac": decay}
    data = load_text(args.data)
    cut = int(len(data) * 0.9)  # the last 10 % of the bytes is the validation set
    return {"stages": [(None, data[:cut])], "ends": [args.steps], "val": data[cut:], "decay_frac": args.decay_frac}


def batch_for_step(data, step: int, global_batch: int, seq_len: int, seed: int, rank: int, n: int):
    """This rank's slice of step's global batch: a function of the step alone, so a resumed run sees the same data."""
    x, y = get_batch(data, global_batch, seq_len, torch.Generator().manual_seed(seed * 1_000_003 + step))
    per = global_batch // n
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


@torch.no_grad()
def evaluate(model, val, cfg, batches: int, rank: int, n: int, device, per_batch: int = 16) -> float:
    """Mean loss on a fixed validation set (batches × per_batch sequences) that the ranks share out between them."""
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


def train_step(wrapped, model, opt, data, step: int, args, device) -> float:
    """One optimizer step over args.grad_accum micro-batches; returns this rank's loss."""
    rank, n, loss_sum = dist.get_rank(), dist.get_world_size(), 0.0
    for micro in range(args.grad_accum):  # gradients add up over K micro-steps, then one optimizer step
        x, y = batch_for_step(data, step * args.grad_accum + micro, args.batch_size * n, args.seq_len, args.seed, rank, n)
        # DDP has no mixed-precision policy: autocast gives it the same bf16 matmuls as FSDP's param_dtype
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16" and args.sharding == "none"):
            loss = wrapped(x.to(device), y.to(device)) / args.grad_accum
        loss.backward()
        loss_sum += loss.item()
    if args.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    opt.zero_grad()
    return loss_sum


def train(args) -> dict:
    """One training run as the flags describe; returns the figures it prints (rank 0 prints)."""
    rank, n, device = dist.get_rank(), dist.get_world_size(), torch.device(args.device_resolved)
    run = load_run_data(args)
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    model = build_model(cfg, device, args.seed)
    mesh = make_mesh(args.sharding, n, args.shard_size, device) if args.sharding != "none" else None
    wrapped = apply_fsdp(model, mesh, args.sharding, args.precision, args.activation_checkpointing)
    wrapped = torch.compile(wrapped) if args.compile else wrapped
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = load_checkpoint(args.resume, model, opt, cfg) if args.resume else 0
    peak_memory_mib(device, reset=True)
    log, times = {"step": [], "loss": [], "lr": [], "val": [], "stage": []}, []
    tokens = args.batch_size * n * cfg.seq_len * args.grad_accum
    for step in range(start, args.steps):
        stage = sum(end <= step for end in run["ends"])  # the stages are consumed in order, each for its steps
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.schedule, run["decay_frac"], args.min_lr_ratio)
        opt.param_groups[0]["lr"] = lr  # one group: every parameter
        t0 = now(device)
        loss = train_step(wrapped, model, opt, run["stages"][stage][1], step, args, device)
        times.append(now(device) - t0)
        mean = torch.tensor(loss, device=device)
        dist.all_reduce(mean)
        for key, value in zip(("step", "loss", "lr", "stage"), (step + 1, mean.item() / n, lr, run["stages"][stage][0])):
            log[key].append(value)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            log["val"].append((step + 1, evaluate(wrapped, run["val"], cfg, args.eval_batches, rank, n, device)))
        first_of_stage = log["stage"][-2:-1] != log["stage"][-1:]  # also true at the first step of this run
        if rank == 0 and (step % args.log_every == 0 or step + 1 == args.steps or first_of_stage):
            log_step(log, step, args, tokens, times[-1], cfg, device)
        if args.save_dir and args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.save_dir, step + 1, model, opt, cfg)
    if args.eval_every and not log["val"]:  # resumed at the last step: still report the validation loss
        log["val"].append((start, evaluate(wrapped, run["val"], cfg, args.eval_batches, rank, n, device)))
    sample = generate(wrapped, b"def ", args.sample_len, cfg, device) if args.sample_len else b""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]  # this rank's shards
    return {"sharding": args.sharding, "world_size": n, "num_params": sum(p.numel() for p in model.parameters()),
            "local_numel": sum(p.numel() for p in local), "param_bytes_per_rank": sum(p.nbytes for p in local), "log": log,
            "ms_per_step": statistics.median(times[1:] or times) * 1e3 if times else None, "start_step": start,
            "final_loss": (log["loss"] or [None])[-1], "final_val": (log["val"] or [(0, None)])[-1][1],
            "sample": sample.decode("utf-8", "replace"), "peak_mib": peak_memory_mib(device)}


# --- demo --------------------------------------------------------------


@torch.no_grad()
def generate(model, prompt: bytes, length: int, cfg, device, temperature: float = 0.8, seed: int = 0) -> bytes:
    """Sample bytes; every rank runs the same forward passes (FSDP's gathers are collectives)."""
    model.eval()
    g, idx = torch.Generator().manual_seed(seed), list(prompt)
    for _ in range(length):
        logits = model(torch.tensor([idx[-cfg.seq_len:]], device=device))[0, -1].float() / temperature
        idx.append(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).item())
    model.train()
    return bytes(idx[len(prompt):])


def measure_peak_tflops(device, dtype=torch.float32, size: int = 1024, repeats: int = 5) -> float:
    """The best rate one rank's matmuls reach here in `dtype`: MFU's denominator where the table has no entry."""
    a, b = torch.randn(2, size, size, device=device, dtype=dtype)
    seconds = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = now(device)
        a @ b
        seconds.append(now(device) - t0)
    return 2 * size**3 / min(seconds[1:]) / 1e12


def peak_memory_mib(device, reset: bool = False) -> float:
    """Peak memory since the last reset (so each strategy reports its own): CUDA's allocator, or a CPU process's peak
    resident set (Linux's VmHWM, which writing 5 to clear_refs resets)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device) if reset else None
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5") if reset else None
        return next(int(line.split()[1]) for line in Path("/proc/self/status").open() if line.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the peak since the process began


def log_step(log: dict, step: int, args, tokens: int, dt: float, cfg, device) -> None:
    """One line per logged step (rank 0): stage, loss, lr, throughput, memory and MFU."""
    stage = f" | stage {log['stage'][-1]}" if log["stage"][-1] else ""
    val = f" | val {log['val'][-1][1]:.3f}" if log["val"] and log["val"][-1][0] == step + 1 else ""
    mfu = flops_per_token(cfg) * tokens / dt / (args.peak_tflops * 1e12 * dist.get_world_size())
    print(f"step {step + 1}/{args.steps}{stage} | loss {log['loss'][-1]:.3f}{val} | lr {log['lr'][-1]:.2e} | "
          f"{tokens / dt / 1e3:.1f}k tok/s | {dt * 1e3:.0f} ms | peak {peak_memory_mib(device):.0f} MiB | "
          f"MFU {100 * mfu:.2f}%", flush=True)


def print_summary(results: list[dict], shard_size: int) -> None:
    print(f"\n{'sharding':<8} | {'param bytes/rank':>16} {'formula':>12} | {'ms/step':>8} | {'train loss':>10} "
          f"{'val loss':>9} | {'peak MiB':>8}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in results:  # formula: Φ·4/N for full and grad_op, Φ·4/S for hybrid (sharded within a group), Φ·4 for DDP
        divisor = {"full": r["world_size"], "grad_op": r["world_size"], "hybrid": shard_size, "none": 1}[r["sharding"]]
        print(f"{r['sharding']:<8} | {r['param_bytes_per_rank']:>16,} {r['num_params'] * 4 / divisor:>12,.0f} | "
              f"{fmt(r['ms_per_step'], '>8.1f'):>8} | {fmt(r['final_loss'], '>10.3f'):>10} "
              f"{fmt(r['final_val'], '>9.3f'):>9} | {r['peak_mib']:>8.0f}")
    print("(fp32: 4 bytes per parameter; FSDP splits each along dim 0, so a size N does not divide puts more on rank 0)")
    if results[-1]["sample"]:
        print(f"\nsample after training, from the prompt 'def ':\n{results[-1]['sample']!r}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("--sharding", default="full", help="full, grad_op, hybrid or none; or a list such as full,none")
    add("--shard-size", type=int, help="hybrid: ranks per sharding group (default: 2, or 1 for an odd world size)")
    add("--precision", choices=["fp32", "tf32", "bf16"], default="fp32", help="matmul precision (tf32: CUDA only)")
    add("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    add("--compile", action="store_true", help="torch.compile the model (needs a C++ compiler on CPU)")
    add("--steps", type=int, default=200, help="optimizer steps")
    add("--batch-size", type=int, default=8, help="sequences per rank per micro-step")
    add("--grad-accum", type=int, default=1, help="K micro-steps per optimizer step")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--warmup", type=int, default=20, help="warm-up steps (0 means none)")
    add("--schedule", choices=["cosine", "wsd"], help="learning-rate schedule (default: cosine; wsd with a curriculum)")
    add("--decay-frac", type=float, help="wsd: share of the steps spent decaying (default 0.2; a curriculum's: its last)")
    add("--min-lr-ratio", type=float, default=0.0, help="the floor the schedule decays to, × --lr (0 means zero)")
    add("--clip", type=float, default=1.0, help="gradient-norm clipping (0 means off)")
    add("--n-layer", type=int, default=4, help="transformer blocks")
    add("--n-head", type=int, default=4, help="attention heads")
    add("--d-model", type=int, default=128, help="model width")
    add("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    add("--data", help="a text file, a folder, data_pipeline.py's JSONL, a curriculum (default: the stdlib's source)")
    add("--stage-shares", type=float, nargs="+", help="a curriculum's token share per stage (default: 0.6 0.25 0.12 "
        "0.03); a last share of 0 leaves the annealing stage out")
    add("--eval-every", type=int, default=50, help="steps between validation losses (0 means no evaluation)")
    add("--eval-batches", type=int, default=4, help="validation batches of 16 sequences")
    add("--log-every", type=int, default=10, help="steps between log lines")
    add("--save-dir", help="write sharded checkpoints here")
    add("--save-every", type=int, default=0, help="steps between checkpoints (0 means never)")
    add("--resume", help="a --save-dir (its latest checkpoint) or one step_* folder in it")
    add("--peak-tflops", type=float, help="a device's peak TFLOP/s for MFU (default: H100/H200 table, else measured)")
    add("--sample-len", type=int, default=120, help="bytes to sample after training (0 means no sample)")
    add("--seed", type=int, default=0, help="any integer: the initial weights and the batches")
    add("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    add("--json", metavar="PATH", help="write the figures as JSON (rank 0)")
    return parser


def validate_numbers(parser: argparse.ArgumentParser, args) -> None:
    """Every numeric flag in range, whatever else is asked."""
    positive = ("steps", "batch_size", "grad_accum", "n_layer", "n_head", "d_model", "seq_len", "eval_batches",
                "log_every", "lr", "peak_tflops", "shard_size", "decay_frac")
    for name in positive + ("warmup", "clip", "eval_every", "save_every", "sample_len", "min_lr_ratio"):
        value = getattr(args, name)
        if value is not None and (value < 0 or value == 0 and name in positive):
            parser.error(f"--{name.replace('_', '-')} {value}: must be {'positive' if name in positive else '0 or more'}")
    if (args.decay_frac or 0) > 1:
        parser.error(f"--decay-frac {args.decay_frac}: a share of the steps, at most 1 (try 0.2)")
    if args.min_lr_ratio >= 1:
        parser.error(f"--min-lr-ratio {args.min_lr_ratio}: a share of --lr, below 1 (0 decays to zero)")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")


def validate(parser: argparse.ArgumentParser, args) -> list[str]:
    """All checks, before any work; returns the strategies to run. Fills in the defaults that depend on others."""
    validate_numbers(parser, args)
    world, strategies = int(os.environ.get("WORLD_SIZE", 1)), args.sharding.split(",")
    curriculum = curriculum_shards(args.data)
    for s in strategies:
        if s not in SHARDINGS:
            parser.error(f"--sharding {s}: choose from {', '.join(SHARDINGS)}")
    args.shard_size = args.shard_size or (2 if world % 2 == 0 else 1)
    if "hybrid" in strategies and world % args.shard_size:
        parser.error(f"--shard-size {args.shard_size} does not divide the world size {world} (try --shard-size "
                     f"{next(k for k in range(min(world, args.shard_size), 0, -1) if world % k == 0)})")
    if args.resume and len(strategies) > 1:
        parser.error("--resume takes one --sharding, not a list")
    if (args.device == "cuda" or args.precision == "tf32") and not torch.cuda.is_available():
        parser.error(f"--{'device cuda' if args.device == 'cuda' else 'precision tf32'}: no CUDA device is visible here "
                     f"(use --device cpu and --precision fp32 or bf16)")
    if args.stage_shares and not curriculum:
        parser.error("--stage-shares needs --data DIR holding a curriculum (stage_NN_name.jsonl shards)")
    if curriculum and args.schedule == "cosine":
        parser.error("--schedule cosine: a curriculum's last stage is the WSD decay (use --schedule wsd)")
    try:
        if args.resume:
            find_checkpoint(args.resume, GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                                                   d_model=args.d_model))
        if curriculum:
            args.stage_shares, args.schedule = args.stage_shares or [0.6, 0.25, 0.12, 0.03], "wsd"  # data_pipeline's stages
            load_curriculum(args.data, args.stage_shares, args.seq_len)
        elif int(load_text(args.data).numel() * 0.1) <= args.seq_len + 1:
            parser.error(f"--data {args.data}: too few bytes for a validation split of sequences of --seq-len "
                         f"{args.seq_len} (give more text or lower --seq-len)")
    except ValueError as e:
        parser.error(str(e))
    args.schedule, args.decay_frac = args.schedule or "cosine", args.decay_frac or 0.2
    return strategies


def resolve_peak(args, device: torch.device, rank: int) -> None:
    """MFU's denominator: --peak-tflops, else the datasheet's peak for this GPU and precision, else a matmul here."""
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"  # fp32 means fp32 matmuls, tf32 tensor cores
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    sxm = "PCIe" not in name and "NVL" not in name
    table = next((peaks[args.precision] for gpu, peaks in PEAK_TFLOPS.items() if gpu in name and sxm), None)
    source = "given" if args.peak_tflops else "datasheet dense peak" if table else "measured matmul rate"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    args.peak_tflops = args.peak_tflops or table or measure_peak_tflops(device, dtype)
    if rank == 0:
        print(f"MFU against {args.peak_tflops * 1e3:,.1f} GFLOP/s per process: {source} ({name}, {args.precision})",
              flush=True)


def main(argv=None) -> list[dict]:
    parser = make_parser()
    args = parser.parse_args(argv)
    strategies = validate(parser, args)
    rank, n, device = setup_distributed(args.device)
    args.device_resolved = str(device)
    try:
        resolve_peak(args, device, rank)
        results = []
        for s in strategies:
            if rank == 0 and len(strategies) > 1:
                print(f"--- sharding {s} ---", flush=True)
            results.append(train(argparse.Namespace(**{**vars(args), "sharding": s})))
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
