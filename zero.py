"""Data parallelism and ZeRO stages 1, 2 and 3, written from torch.distributed collectives.

Data parallelism gives every rank the whole model and a slice of the batch. With mixed-precision Adam each
parameter costs 2 bytes (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master copy, m and v) = 16 bytes, on every
rank. ZeRO (Rajbhandari et al. 2020) removes that redundancy one piece at a time; with Φ parameters and N ranks:

    stage        sharded                 memory per rank      bytes sent per rank per step (× (N-1)/N)
    0 (DDP)      nothing                 16Φ                  2Φ   all-reduce gradients
    1            optimizer states        4Φ + 12Φ/N           2Φ   reduce-scatter gradients, all-gather parameters
    2            + gradients             2Φ + 14Φ/N           2Φ   the same, reduce-scattered during backward
    3            + parameters            16Φ/N                3Φ   all-gather for forward and again for backward

The script trains a tiny GPT with any stage and prints each rank's memory and traffic, measured, beside this table.

Run:   torchrun --nproc_per_node=4 zero.py --stage 2
       torchrun --nproc_per_node=4 zero.py --stage 0,1,2,3 --param-dtype bfloat16 --check
       python zero.py --estimate --params 7e9 --world-size 8
"""
from __future__ import annotations

import argparse
import collections
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

# --- the technique -----------------------------------------------------

ADAM_BYTES = 12  # K in the ZeRO paper: fp32 master weight + m + v, 4 bytes each


def estimate_memory(num_params: float, world_size: int, stage: int, offload: bool | str = False,
                    param_bytes: int = 2) -> dict:
    """Bytes per rank by the ZeRO paper's accounting (2Φ params, 2Φ grads, 12Φ optimizer in mixed precision).

    offload=True or "cpu" is ZeRO-Offload: optimizer states and their step live in CPU memory. offload="nvme" is
    ZeRO-Infinity: optimizer states, and with stage 3 the parameter shards too, live on NVMe. The keys params,
    grads, optimizer and total are accelerator memory; cpu and nvme say what moved there.
    """
    phi, n = float(num_params), world_size
    shard = {"params": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1}
    out = {}
    for key, k in (("params", param_bytes), ("grads", param_bytes), ("optimizer", ADAM_BYTES)):
        out[key] = k * phi / n if shard[key] else k * phi
    out["cpu"] = out["nvme"] = 0.0
    where = {True: "cpu", "cpu": "cpu", "nvme": "nvme"}.get(offload)
    if where:
        out[where], out["optimizer"] = out["optimizer"], 0.0
        if where == "nvme" and stage >= 3:
            out["nvme"], out["params"] = out["nvme"] + out["params"], 0.0
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def ring_bytes(collective: str, nbytes: int, n: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal (ring) implementation of a collective on a buffer of nbytes
    (the full buffer: all-reduce's tensor, reduce-scatter's input, all-gather's output). collectives.py measures
    these figures on a ring built from send/recv; here we count each call we make at that price."""
    return (2 if collective == "all_reduce" else 1) * (n - 1) * nbytes // n


class Unit:
    """A group of parameters that is flattened, padded to a multiple of N and sharded together: one transformer
    block, or the root (everything outside the blocks). Rank r owns elements [r·S, (r+1)·S) of the flat vector."""

    def __init__(self, name: str, params: list[nn.Parameter], n_shards: int):
        self.name, self.params = name, params
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = math.ceil(self.numel / n_shards)  # S
        self.padded_numel = self.shard_numel * n_shards
        self.ready = 0  # gradients accumulated in this backward (stage 2, 3)
        self.full = None  # stage 3: the gathered flat parameters, storage freed when not in use
        self.shard = None  # stage 3: this rank's slice of the parameters, in the compute dtype

    def flatten(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(self.padded_numel, dtype=dtype, device=tensors[0].device)
        flat[: self.numel] = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        return flat

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view_as(p) for t, p in zip(flat[: self.numel].split([p.numel() for p in self.params]), self.params)]


def find_units(model: nn.Module, n_shards: int) -> list[Unit]:
    """The elements of every nn.ModuleList (the transformer blocks) are units; the remaining parameters form the
    root unit, first. Parameters that do not require grad are left alone; tied parameters count once."""
    seen, units = set(), []

    def take(params):
        out = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in out)
        return out

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    in_lists = {id(p) for _, ml in lists for p in ml.parameters()}
    root = take(p for p in model.parameters() if id(p) not in in_lists)
    units.append(Unit("root", root, n_shards))
    for name, ml in lists:
        for i, block in enumerate(ml):
            params = take(block.parameters())
            if params:
                u = Unit(f"{name}.{i}", params, n_shards)
                u.module = block
                units.append(u)
    return units


class ZeroOptimizer:
    """Wraps any torch.optim optimizer in ZeRO stage 0 (plain data parallel), 1, 2 or 3.

    The training loop is unchanged: loss.backward(); opt.step(); opt.zero_grad(). With param_dtype (bfloat16 or
    float16) the model computes in that dtype and the optimizer keeps fp32 master weights. With float16, use
    opt.scale(loss).backward(): a dynamic loss scale whose overflow check is agreed by all ranks.
    """

    def __init__(self, model: nn.Module, stage: int, optimizer_cls=torch.optim.AdamW, param_dtype=None,
                 group=None, **optimizer_kwargs):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage {stage} does not exist: ZeRO has stages 0 (DDP), 1, 2 and 3")
        self.model, self.stage, self.group = model, stage, group
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.param_dtype = param_dtype or next(model.parameters()).dtype
        num_params = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
        if self.n > num_params:
            raise ValueError(f"world size {self.n} exceeds the {num_params} trainable parameters: use fewer ranks")
        with torch.no_grad():  # ranks seeded differently still start from rank 0's weights
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        self.units = find_units(model, 1 if stage == 0 else self.n)
        self.num_params = sum(u.numel for u in self.units)  # Φ

        # The optimizer sees one flat fp32 tensor: this rank's shard of every unit, concatenated (all of it at stage 0).
        mine = [u.flatten([p.detach() for p in u.params], torch.float32).view(-1, u.shard_numel)[self._index]
                for u in self.units]
        self.master = nn.Parameter(torch.cat(mine))
        self.master_slices = [s for s in self.master.detach().split([u.shard_numel for u in self.units])]
        self.optimizer = optimizer_cls([self.master], **optimizer_kwargs)
        self.grad_shard = None  # stage 2 and 3: the reduce-scattered gradient of our shard, param dtype
        model.to(self.param_dtype)

        self.traffic, self._last_traffic = collections.Counter(), {}
        self.gathered_numel = self.peak_gathered_numel = 0
        self.loss_scale = 2.0 ** 16 if self.param_dtype == torch.float16 else 1.0
        self.good_steps, self.skipped_steps = 0, 0
        if stage >= 2:
            for u in self.units:
                for p in u.params:
                    p.register_post_accumulate_grad_hook(lambda p, u=u: self._grad_ready(u))
        if stage == 3:
            self._shard_parameters()

    @property
    def _index(self) -> int:
        return 0 if self.stage == 0 else self.rank

    # collectives, each counted at the bytes a ring implementation sends
    def _count(self, name: str, t: torch.Tensor) -> None:
        self.traffic[name] += ring_bytes(name, t.numel() * t.element_size(), self.n)

    def _all_reduce(self, t):
        self._count("all_reduce", t)
        dist.all_reduce(t, group=self.group)

    def _reduce_scatter(self, full):
        self._count("reduce_scatter", full)
        out = torch.empty(full.numel() // self.n, dtype=full.dtype, device=full.device)
        dist.reduce_scatter_single(out, full, group=self.group)
        return out

    def _all_gather(self, shard, out=None, count=True):
        out = torch.empty(shard.numel() * self.n, dtype=shard.dtype, device=shard.device) if out is None else out
        if count:
            self._count("all_gather", out)
        dist.all_gather_single(out, shard, group=self.group)
        return out

    # stage 2 and 3: reduce-scatter a unit's gradients as soon as the last of them is ready
    def _grad_ready(self, unit: Unit) -> None:
        unit.ready += 1
        if unit.ready == len(unit.params):
            self._reduce_unit(unit)

    def _reduce_unit(self, unit: Unit) -> None:
        """Flatten one unit's full gradients (the one bucket a rank holds), reduce-scatter, keep our shard, free."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in unit.params]
        shard = self._reduce_scatter(unit.flatten(grads, self.param_dtype))
        for p in unit.params:
            p.grad = None
        if self.grad_shard is None:
            self.grad_shard = torch.zeros(self.master.numel(), dtype=self.param_dtype, device=self.master.device)
        self.grad_shard[self._offset(unit): self._offset(unit) + unit.shard_numel] += shard
        unit.ready = 0
        if self.stage == 3:
            self._free(unit)

    def _offset(self, unit: Unit) -> int:
        return sum(u.shard_numel for u in self.units[: self.units.index(unit)])

    # stage 3: parameters live as shards; a unit is gathered just before it computes and freed right after
    def _shard_parameters(self) -> None:
        for u, master in zip(self.units, self.master_slices):
            u.shard = master.to(self.param_dtype)
            u.full = torch.zeros(u.padded_numel, dtype=self.param_dtype, device=self.master.device)
            for p, view in zip(u.params, u.unflatten(u.full)):
                p.data = view  # parameters become views of the unit's flat buffer: one storage to free and refill
            self._free(u)
            if u.name != "root":
                u.module.register_forward_pre_hook(lambda m, args, u=u: self._gather(u))
                u.module.register_forward_hook(lambda m, args, out, u=u: self._after_forward(u, out))
        root = self.units[0]
        self.model.register_forward_pre_hook(lambda m, args: self._gather(root))
        self.model.register_forward_hook(lambda m, args, out: self._after_forward(root, out))

    def _gather(self, u: Unit) -> None:
        if u.full.untyped_storage().size() == 0:
            u.full.untyped_storage().resize_(u.padded_numel * u.full.element_size())
            self._all_gather(u.shard, out=u.full)
            self.gathered_numel += u.padded_numel
            self.peak_gathered_numel = max(self.peak_gathered_numel, self.gathered_numel)

    def _free(self, u: Unit) -> None:
        if u.full.untyped_storage().size() > 0:
            u.full.untyped_storage().resize_(0)
            self.gathered_numel = max(0, self.gathered_numel - u.padded_numel)

    def _after_forward(self, u: Unit, out) -> None:
        """Free the unit; if backward will come, gather it again when the gradient reaches its output."""
        self._free(u)
        outputs = out if isinstance(out, (tuple, list)) else [out]
        for t in outputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, u=u: self._gather(u))

    # the optimizer step
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale

    @torch.no_grad()
    def step(self) -> None:
        if self.stage in (0, 1):
            for u in self.units:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in u.params]
                flat = u.flatten(grads, self.param_dtype)
                if self.stage == 0:
                    self._all_reduce(flat)
                    shard = flat
                else:
                    shard = self._reduce_scatter(flat)
                if self.grad_shard is None:
                    self.grad_shard = torch.zeros(self.master.numel(), dtype=self.param_dtype,
                                                  device=self.master.device)
                self.grad_shard[self._offset(u): self._offset(u) + u.shard_numel] = shard
        else:
            for u in self.units:  # a unit whose last gradient never came (unused parameters): reduce it now
                if u.ready:
                    self._reduce_unit(u)
        grad = self.grad_shard.float() / (self.n * self.loss_scale)  # summed over ranks -> mean
        if self.param_dtype == torch.float16:  # skip the step on overflow; every rank must agree
            overflow = torch.tensor([float(not torch.isfinite(grad).all())], device=grad.device)
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=self.group)  # one flag: not counted as traffic
            if overflow.item():
                self.loss_scale /= 2
                self.skipped_steps += 1
                self._finish_step()
                return
            self.good_steps += 1
            if self.good_steps % 2000 == 0:
                self.loss_scale *= 2
        self.master.grad = grad
        self.optimizer.step()
        self.master.grad = None
        for u, master in zip(self.units, self.master_slices):
            if self.stage == 3:
                u.shard.copy_(master)  # gathered lazily at the next forward
            else:
                full = master.to(self.param_dtype) if self.stage == 0 else self._all_gather(master.to(self.param_dtype))
                for p, new in zip(u.params, u.unflatten(full)):
                    p.copy_(new)
        self._finish_step()

    def _finish_step(self) -> None:
        self._last_traffic, self.traffic = dict(self.traffic), collections.Counter()

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        if self.grad_shard is not None and self.stage >= 2:
            self.grad_shard.zero_()
        else:
            self.grad_shard = None

    # what this rank holds and sends
    def memory_bytes(self) -> dict:
        """Bytes this rank holds now: model parameters (at rest: gathered stage-3 units are not counted, see
        peak_gathered_numel), gradients, and optimizer (fp32 master + every state tensor)."""
        if self.stage == 3:
            params = sum(u.shard.numel() * u.shard.element_size() for u in self.units)
        else:
            params = sum(p.numel() * p.element_size() for u in self.units for p in u.params)
        if self.stage >= 2:
            grads = 0 if self.grad_shard is None else self.grad_shard.numel() * self.grad_shard.element_size()
        else:
            grads = sum(p.grad.numel() * p.grad.element_size() for u in self.units for p in u.params
                        if p.grad is not None)
        state = [t for s in self.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.numel() > 1]
        optimizer = self.master.numel() * 4 + sum(t.numel() * t.element_size() for t in state)
        return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}

    def traffic_bytes(self) -> dict:
        """Bytes this rank sent during the last step (forward, backward and step), per collective."""
        return dict(self._last_traffic)

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """Every parameter, full and in fp32 (gathered from the master shards), by name. Collective: call on all ranks."""
        full = {}
        for u, master in zip(self.units, self.master_slices):
            flat = master if self.stage == 0 else self._all_gather(master.contiguous(), count=False)
            for p, t in zip(u.params, u.unflatten(flat)):
                full[id(p)] = t.clone()
        return {name: full[id(p)] if id(p) in full else p.detach().float().clone()
                for name, p in self.model.named_parameters()}


# --- demo --------------------------------------------------------------


def train(stage: int, steps: int = 20, batch_size: int = 8, cfg: GPTConfig | None = None, lr: float = 3e-3,
          param_dtype=None, data: torch.Tensor | None = None, device=None, seed: int = 0, log_every: int = 0,
          check: bool = False) -> dict:
    """Train TinyGPT with ZeRO `stage` on this process group (batch_size sequences per rank); return the figures."""
    cfg = cfg or GPTConfig()
    device = device or torch.device("cpu")
    rank, n = dist.get_rank(), dist.get_world_size()
    data = load_text() if data is None else data
    torch.manual_seed(seed + rank)  # deliberately different: the initial broadcast must make them equal
    model = TinyGPT(cfg).to(device)
    opt = ZeroOptimizer(model, stage, param_dtype=param_dtype, lr=lr, weight_decay=0.1)
    init = opt.full_state_dict() if check else None
    gen = torch.Generator().manual_seed(seed)  # the same on every rank: each takes its slice of one global batch
    losses, times, memory, traffic = [], [], None, None
    for step in range(steps):
        x, y = get_batch(data, batch_size * n, cfg.seq_len, gen)
        x, y = x[rank * batch_size:(rank + 1) * batch_size].to(device), y[rank * batch_size:(rank + 1) * batch_size].to(device)
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.scale(loss).backward()
        if step == steps - 1:
            memory = opt.memory_bytes()  # gradients are held now, between backward and step
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / n)
        traffic = opt.traffic_bytes()
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            tok = batch_size * n * cfg.seq_len / times[-1]
            print(f"stage {stage} | step {step + 1}/{steps} | loss {losses[-1]:.3f} | {tok / 1e3:.1f}k tok/s | "
                  f"{times[-1] * 1e3:.0f} ms", flush=True)
    out = {"stage": stage, "world_size": n, "num_params": opt.num_params, "losses": losses, "memory": memory,
           "traffic": traffic, "ms_per_step": statistics.median(times) * 1e3,
           "peak_gathered_numel": opt.peak_gathered_numel, "skipped_steps": opt.skipped_steps,
           "param_bytes": torch.empty((), dtype=opt.param_dtype).element_size()}
    final = opt.full_state_dict()
    if check:
        out["max_param_diff"] = reference_diff(init, final, cfg, data, steps, batch_size, n, lr, device, seed)
    return out


def reference_diff(init, final, cfg, data, steps, batch_size, n, lr, device, seed) -> float:
    """Train the unsharded model with torch.optim.AdamW on the full global batch; largest |difference| from ours."""
    model = TinyGPT(cfg).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init[name])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = get_batch(data, batch_size * n, cfg.seq_len, gen)
        model(x.to(device), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    return max((p.detach() - final[name]).abs().max().item() for name, p in model.named_parameters())


def print_report(results: list[dict], n: int) -> None:
    """Memory and traffic per rank, measured beside the ZeRO formulas (p = bytes per parameter in the model)."""
    print(f"\nPer-rank memory and traffic on N = {n}, Φ = {results[0]['num_params']:,} parameters "
          f"(formulas with p bytes per model parameter, 12 for fp32 master + Adam m, v):")
    print(f"{'stage':>5} | {'params':>9} {'formula':>9} | {'grads':>9} {'formula':>9} | {'optimizer':>9} {'formula':>9} | "
          f"{'total':>9} {'formula':>9} | {'sent/step':>10} {'formula':>10} | {'ms/step':>7}")
    for r in results:
        phi, p, stage = r["num_params"], r["param_bytes"], r["stage"]
        f = estimate_memory(phi, n, stage, param_bytes=p)
        comm = (3 if stage == 3 else 2) * phi * p * (n - 1) / n
        m, sent = r["memory"], sum(r["traffic"].values())
        kib = lambda b: f"{b / 1024:>8.1f}K"
        print(f"{stage:>5} | {kib(m['params'])} {kib(f['params'])} | {kib(m['grads'])} {kib(f['grads'])} | "
              f"{kib(m['optimizer'])} {kib(f['optimizer'])} | {kib(m['total'])} {kib(f['total'])} | "
              f"{sent / 1024:>9.1f}K {comm / 1024:>9.1f}K | {r['ms_per_step']:>7.1f}")
    print("(K = KiB. Measured values exceed the formulas only by the zero padding that makes each unit divisible by "
          "N.\n Traffic counts every collective call at what a ring implementation of it sends: (N-1)/N of the buffer, "
          "twice for all-reduce.)")
    for r in results:
        if r["stage"] == 3:
            print(f"stage 3 peak of gathered parameters: {r['peak_gathered_numel']:,} elements "
                  f"(the root unit and one block; the model has {r['num_params']:,})")
        if "max_param_diff" in r:
            print(f"stage {r['stage']}: largest |parameter difference| from single-process torch.optim.AdamW after "
                  f"{len(r['losses'])} steps: {r['max_param_diff']:.2e}")


def print_estimate(num_params: float, world_size: int) -> None:
    print(f"Memory per rank for Φ = {num_params:.3g} parameters on N = {world_size} ranks, mixed-precision Adam "
          f"(2 + 2 + 12 bytes per parameter), GB:")
    print(f"{'':<28} {'params':>8} {'grads':>8} {'optimizer':>9} {'on GPU':>8} {'CPU':>8} {'NVMe':>8}")
    rows = [(f"stage {s}" + (" (DDP)" if s == 0 else ""), s, False) for s in range(4)]
    rows += [(f"stage {s} + ZeRO-Offload (CPU)", s, "cpu") for s in (1, 2, 3)]
    rows += [("stage 3 + ZeRO-Infinity (NVMe)", 3, "nvme")]
    for label, s, off in rows:
        e = estimate_memory(num_params, world_size, s, off)
        print(f"{label:<28} " + " ".join(f"{e[k] / 1e9:>{w}.1f}" for k, w in
                                         (("params", 8), ("grads", 8), ("optimizer", 9), ("total", 8), ("cpu", 8), ("nvme", 8))))


PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", default="2", help="0, 1, 2, 3, or a list such as 0,1,2,3 to compare them in one run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--param-dtype", choices=sorted(PARAM_DTYPES), default="float32")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    p.add_argument("--check", action="store_true", help="also train single-process AdamW and print the difference")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--estimate", action="store_true", help="print the memory table for --params on --world-size")
    p.add_argument("--params", type=float, default=7e9)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON (rank 0)")
    args = p.parse_args(argv)
    if args.estimate:
        return print_estimate(args.params, args.world_size)
    try:
        stages = [int(s) for s in args.stage.split(",")]
    except ValueError:
        p.error(f"--stage {args.stage}: give 0, 1, 2 or 3, or a list such as 0,1,2,3")
    if any(s not in (0, 1, 2, 3) for s in stages):
        p.error(f"--stage {args.stage}: ZeRO has stages 0 (DDP), 1, 2 and 3")
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible here (use --device cpu)")
    dtype = PARAM_DTYPES[args.param_dtype]
    try:
        torch.ones(2, 2, dtype=dtype, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu")) @ \
            torch.ones(2, 2, dtype=dtype, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        p.error(f"--param-dtype {args.param_dtype}: this device cannot multiply matrices in it (try bfloat16)")
    try:
        data = load_text(args.data)
    except ValueError as e:
        p.error(str(e))
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    rank, n, device = setup_distributed(args.device)
    try:
        results = []
        for stage in stages:
            results.append(train(stage, args.steps, args.batch_size, cfg, args.lr, dtype, data, device,
                                 log_every=max(1, args.steps // 5), check=args.check))
        if rank == 0:
            print_report(results, n)
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
