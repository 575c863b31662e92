"""Data parallelism and ZeRO stages 1, 2 and 3, built one step at a time from torch.distributed collectives.

Data parallelism gives every rank the whole model and a slice of the batch. With mixed-precision Adam each
parameter costs 2 bytes (bf16/fp16 weights) + 2 (gradients) + 12 (fp32 master copy, m and v) = 16 bytes, on every
rank. ZeRO (Rajbhandari et al. 2020) removes that redundancy one piece at a time. The paper's table, with Φ parameters
and N ranks (this file's stage 1 sends 3Φ: it all-reduces the gradients, then all-gathers the parameters):

    stage        sharded                 memory per rank      bytes sent per rank per step (× (N-1)/N)
    0 (DDP)      nothing                 16Φ                  2Φ   all-reduce gradients
    1            optimizer states        4Φ + 12Φ/N           2Φ   reduce-scatter gradients, all-gather parameters
    2            + gradients             2Φ + 14Φ/N           2Φ   the same, reduce-scattered during backward
    3            + parameters            16Φ/N                3Φ   all-gather for forward and again for backward

Run:   torchrun --nproc_per_node=4 zero.py --stage 2
       torchrun --nproc_per_node=4 zero.py --stage 0,1,2,3 --param-dtype bfloat16 --check
       python zero.py --estimate --params 7e9 --world-size 8
"""
from __future__ import annotations

import argparse
import datetime
import gc
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
ADAM_BYTES = 12  # K in the ZeRO paper: fp32 master weight + m + v, 4 bytes each


def broadcast_from_rank0(tensors, group=None) -> None:  # every rank starts from rank 0's values, however seeded
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0 if group is None else dist.get_global_rank(group, 0), group=group)


def trainable(params) -> list[nn.Parameter]:  # each once: a tied weight is one parameter wherever it is used
    return list({id(p): p for p in params if p.requires_grad}.values())


def grads_or_zeros(params) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


class FlatBucket:
    """Parameters flattened into one vector, zero-padded to N·S elements; rank r owns elements [r·S, (r+1)·S)."""
    def __init__(self, params: list[nn.Parameter], n_shards: int = 1, group_index: int = 0):
        self.params, self.n, self.group_index = params, n_shards, group_index
        self.numel = sum(p.numel() for p in params)
        self.shard_numel = -(-self.numel // n_shards)  # S = ceil(numel / N)
    def flatten(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:  # (N·S,)
        flat = torch.zeros(self.n * self.shard_numel, dtype=dtype, device=tensors[0].device)
        flat[: self.numel] = torch.cat([t.reshape(-1) for t in tensors])
        return flat
    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view_as(p) for t, p in zip(flat[: self.numel].split([p.numel() for p in self.params]), self.params)]


def make_buckets(params: list[nn.Parameter], bucket_mb: float, n_shards: int = 1, group_index: int = 0):
    groups, size = [], 0  # in reverse registration order (about backward's); 0 MiB: one parameter each, inf: one
    for p in reversed(params):
        if not groups or size + p.nbytes > bucket_mb * 2 ** 20:
            groups, size = groups + [[]], 0
        groups[-1].append(p)
        size += p.nbytes
    return [FlatBucket(g, n_shards, group_index) for g in groups]


class BucketedReduction:
    """What stages 0, 2 and 3 share: hooks count each bucket's gradients as backward produces them; a complete
    bucket's collective is launched (async) while backward goes on, in bucket order, the same on every rank (NCCL)."""
    def _hook_buckets(self, overlap: bool = True) -> None:
        self._ready, self._next, self._in_flight = [0] * len(self.buckets), 0, []
        for i, bucket in enumerate(self.buckets if overlap else []):
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(lambda p, i=i: self._grad_ready(i))
    def _grad_ready(self, i: int) -> None:  # bucket i has one more gradient: launch complete buckets, in order
        if self._ready[i] == len(self.buckets[i].params):  # a second backward would replace or drop the first's
            raise RuntimeError("a gradient arrived twice: call finish_gradient_synchronization() after every backward")
        # BEGIN SOLUTION
        self._ready[i] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next].params):
            self._in_flight.append(self._launch(self._next))
            self._next += 1
        # END SOLUTION
    def finish_gradient_synchronization(self) -> None:  # launch what backward did not, then wait for everything
        self._in_flight += [self._launch(i) for i in range(self._next, len(self.buckets))]  # no overlap, no gradient
        for work, land in self._in_flight:
            work.wait()
            land()
        self._ready, self._next, self._in_flight = [0] * len(self.buckets), 0, []


class DataParallel(BucketedReduction, nn.Module):
    """Stage 0: every rank holds the whole model; gradients are averaged by all-reduce, bucket by bucket, during
    backward (overlap=False: after it, the baseline). Then finish_gradient_synchronization() and any torch.optim."""
    def __init__(self, module: nn.Module, bucket_mb: float = 25, overlap: bool = True, group=None):
        super().__init__()
        self.module, self.group, self.world_size = module, group, dist.get_world_size(group)
        broadcast_from_rank0(list(module.parameters()) + list(module.buffers()), group)
        self.buckets = make_buckets(trainable(module.parameters()), bucket_mb)
        self._hook_buckets(overlap)
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
    def _launch(self, i: int):
        bucket = self.buckets[i]
        flat = bucket.flatten(grads_or_zeros(bucket.params), bucket.params[0].dtype) / self.world_size  # sum -> mean
        def land():
            for p, g in zip(bucket.params, bucket.unflatten(flat)):
                p.grad = g
        return dist.all_reduce(flat, group=self.group, async_op=True), land


class ShardedOptimizer(torch.optim.Optimizer):
    """Stage 1: any element-wise torch.optim optimizer (AdamW, SGD, ...) steps only this rank's 1/N of every bucket, on
    fp32 masters, read from the averaged p.grad; every rank all-gathers the updated slices. Param groups are kept."""
    def __init__(self, params, optimizer_cls: type, process_group=None, bucket_mb: float = 25,
                 offload: str | None = None, **kwargs):
        super().__init__(params, kwargs)
        self.group, self.n, self.rank = process_group, dist.get_world_size(process_group), dist.get_rank(process_group)
        broadcast_from_rank0([p for g in self.param_groups for p in g["params"]], process_group)
        self.buckets = [b for gi, g in enumerate(self.param_groups)
                        for b in make_buckets(trainable(g["params"]), bucket_mb, self.n, gi)]
        mine = [b.flatten([p.detach() for p in b.params], torch.float32).view(self.n, -1)[self.rank]
                for b in self.buckets]  # fp32 (S,); offload="cpu": ZeRO-Offload, masters, states and step on the CPU
        self.masters = [nn.Parameter(m.to("cpu" if offload == "cpu" else m.device, copy=True)) for m in mine]
        in_group = lambda i: [m for m, b in zip(self.masters, self.buckets) if b.group_index == i]
        self.optimizer = optimizer_cls([dict(g, params=in_group(i)) for i, g in enumerate(self.param_groups)], **kwargs)
    def add_param_group(self, param_group: dict) -> None:  # torch.optim's __init__ calls it; a later group is refused
        if hasattr(self, "optimizer"):  # it would be neither sharded nor stepped
            raise RuntimeError("ShardedOptimizer shards its parameters at construction: pass every param group then")
        super().add_param_group(param_group)
    def state_dict(self) -> dict:  # this rank's shard only, the inner optimizer's (m, v, ...): one file per rank
        return self.optimizer.state_dict()
    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        for outer, inner in zip(self.param_groups, self.optimizer.param_groups):  # the saved hyperparameters
            outer.update({k: v for k, v in inner.items() if k != "params"})
    def _gradient_shard(self, i: int) -> torch.Tensor:  # bucket i's averaged gradient, this rank's slice, from p.grad
        b = self.buckets[i]
        return b.flatten(grads_or_zeros(b.params), b.params[0].dtype).view(self.n, -1)[self.rank]  # (S,)
    @torch.no_grad()
    def load_gradients(self) -> None:  # this rank's gradient slices, in fp32, onto the masters (CPU under offload)
        for i, m in enumerate(self.masters):
            if m.grad is None:  # once per step: the loss scaler loads them before step() does
                m.grad = self._gradient_shard(i).to(m.device, torch.float32)
    @torch.no_grad()
    def step(self, closure=None):  # closure: torch.optim's signature, unused
        self.load_gradients()
        for outer, inner in zip(self.param_groups, self.optimizer.param_groups):  # a scheduler sets the outer ones
            inner.update({k: v for k, v in outer.items() if k != "params"})
        self.optimizer.step()
        for b, m in zip(self.buckets, self.masters):
            full = shard = m.detach().to(b.params[0].device, b.params[0].dtype)
            if self.n > 1:  # every rank receives every rank's updated slice
                full = torch.empty(self.n * shard.numel(), dtype=shard.dtype, device=shard.device)
                dist.all_gather_single(full, shard, group=self.group)
            for p, new in zip(b.params, b.unflatten(full)):
                p.copy_(new)
        self.zero_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.optimizer.zero_grad()  # the masters' gradient slices: the next load_gradients() reads p.grad again


class ShardedGradientOptimizer(BucketedReduction, ShardedOptimizer):
    """Stage 2 = stage 1 with one change: a bucket complete in backward is reduce-scattered, not all-reduced, so a rank
    keeps only its slice (2Φ/N). Use it on the bare model; call finish_gradient_synchronization() after backward."""
    def __init__(self, *args, **kwargs):  # ShardedOptimizer's arguments
        super().__init__(*args, **kwargs)
        self.zero_grad()
        self._hook_buckets()
    def finish_gradient_synchronization(self) -> None:  # a later micro-batch's shards are added to the earlier ones'
        super().finish_gradient_synchronization()
        self.grad_shards = [s if e is None else e + s for e, s in zip(self._earlier, self.grad_shards)]
        self._earlier = list(self.grad_shards)
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.grad_shards, self._earlier = [None] * len(self.buckets), [None] * len(self.buckets)
    def _launch(self, i: int):  # returns (work, land), as DataParallel's: the shard lands in self.grad_shards[i]
        b = self.buckets[i]
        # BEGIN SOLUTION
        flat = b.flatten(grads_or_zeros(b.params), b.params[0].dtype) / self.n  # (N·S,): the mean after the sum
        for p in b.params:
            p.grad = None  # the full gradient is on its way: this rank keeps only its slice
        self.grad_shards[i] = torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
        # land keeps flat alive until the collective has read it
        return dist.reduce_scatter_single(self.grad_shards[i], flat, group=self.group, async_op=True), lambda: flat
        # END SOLUTION
    def _gradient_shard(self, i: int) -> torch.Tensor:
        return self.grad_shards[i]


class ShardedUnit:
    """One unit's trainable parameters. Parameter i is padded to N·S_i elements; rank r keeps [r·S_i, (r+1)·S_i) in
    fp32 as p.data between uses. The gathered copy is one flat buffer, its storage freed (resized to 0) between uses."""
    def __init__(self, module: nn.Module, params: list[nn.Parameter], n: int, rank: int, dtype: torch.dtype):
        self.module, self.params, self.n = module, params, n
        self.sizes = [-(-p.numel() // n) for p in params]  # S_i
        self.full = torch.empty(n * sum(self.sizes), dtype=dtype, device=params[0].device)
        self.blocks = self.full.split([n * s for s in self.sizes])  # parameter i's padded block, N·S_i elements
        self.views = [blk[: p.numel()].view(p.shape) for blk, p in zip(self.blocks, params)]
        self.shards = [FlatBucket([p], n).flatten([p.detach()], torch.float32).chunk(n)[rank].clone() for p in params]
        self.free()  # the parameters still hold their full tensors: free() leaves them the shards
    def all_gather(self, dtype: torch.dtype, group) -> list[torch.Tensor]:  # every rank's shards, in one collective
        mine = torch.cat([s.to(dtype) for s in self.shards])  # (T,), T = Σ S_i
        out = torch.empty(self.n * mine.numel(), dtype=dtype, device=mine.device)
        dist.all_gather_single(out, mine, group=group)
        return list(out.view(self.n, -1).split(self.sizes, dim=1))  # [(N, S_i) per parameter]
    def gather(self, group) -> None:
        if not self.full.untyped_storage().nbytes():  # freed
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
            for p, v, blk, rows in zip(self.params, self.views, self.blocks, self.all_gather(self.full.dtype, group)):
                blk.view(self.n, -1).copy_(rows)  # (N, S_i)
                p.data = v
    def free(self) -> None:
        if self.full.untyped_storage().nbytes():  # gathered
            for p, s in zip(self.params, self.shards):
                p.data = s  # reading p between uses gives the shard, never freed memory
            self.full.untyped_storage().resize_(0)
    def reduce_scatter(self, group):  # average the full gradients over ranks into this rank's shards: (work, land)
        cols = torch.cat([FlatBucket([p], self.n).flatten([g], g.dtype).view(self.n, -1)
                          for p, g in zip(self.params, grads_or_zeros(self.params))], dim=1)  # (N, T)
        for p in self.params:
            p.grad = None
        self.free()
        out = torch.empty(cols.shape[1], dtype=cols.dtype, device=cols.device)
        def land():
            for p, g in zip(self.params, out.split(self.sizes)):
                p.grad = g.float()  # fp32, the shard's shape: what the optimizer steps
        return dist.reduce_scatter_single(out, cols.view(-1).div_(self.n), group=group, async_op=True), land


class FullyShardedDataParallel(BucketedReduction, nn.Module):
    """Stage 3: the trainable parameters in ShardedUnits. A unit (each element of an nn.ModuleList; the root: all the
    rest) is all-gathered before its forward, freed after it, gathered again when backward reaches it, freed once its
    gradients are reduce-scattered. finish_gradient_synchronization() leaves p.grad = the shard's averaged fp32
    gradient, for any element-wise torch.optim optimizer. compute_dtype: gathered parameters, compute and comms."""
    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None, group=None):
        super().__init__()
        self.module, self.group = module, group
        n, rank, dtype = dist.get_world_size(group), dist.get_rank(group), compute_dtype or torch.float32
        broadcast_from_rank0(list(module.parameters()) + list(module.buffers()), group)
        for t in [p for p in module.parameters() if not p.requires_grad] + list(module.buffers()):
            t.data = t.data.to(dtype) if t.is_floating_point() else t.data
        lists = [m for sub in module.modules() if isinstance(sub, nn.ModuleList) for m in sub]
        in_lists = {id(sub) for m in lists for sub in m.modules()}
        # the root unit: parameters of modules outside the lists (a weight tied to one inside stays here)
        root = trainable(p for s in module.modules() if id(s) not in in_lists for p in s.parameters(recurse=False))
        self.units, taken = [ShardedUnit(module, root, n, rank, dtype)], {id(p) for p in root}
        for m in lists:
            if params := [p for p in trainable(m.parameters()) if id(p) not in taken]:
                taken.update(id(p) for p in params)
                self.units.append(ShardedUnit(m, params, n, rank, dtype))
        for u in self.units:  # the root's hooks are on the wrapped module: it stays gathered through the forward
            u.module.register_forward_pre_hook(lambda mod, args, u=u: u.gather(self.group))
            u.module.register_forward_hook(lambda mod, args, out, u=u: self._after_forward(u, out))
        self.buckets = self.units[::-1]  # backward's order: the last block first, the root last
        self._hook_buckets()  # a unit is complete when all its gradients are: reduce-scatter it and free it
    def forward(self, *args, **kwargs):  # the wrapped module must own parameters outside its lists: the root unit
        if torch.is_grad_enabled() and any(p.grad is not None for u in self.units for p in u.params):
            raise RuntimeError("stage 3 does not accumulate micro-batches: step() and zero_grad() before the next "
                               "forward")
        return self.module(*args, **kwargs)  # its hooks gather and free the units
    def _after_forward(self, unit: ShardedUnit, out):  # free it; gather it again when backward reaches its output
        # BEGIN SOLUTION
        unit.free()
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, u=unit: u.gather(self.group))
        # END SOLUTION
        return out
    def _launch(self, i: int):
        return self.buckets[i].reduce_scatter(self.group)
    @torch.no_grad()
    def gather_full_params(self) -> dict[str, torch.Tensor]:  # {name: full fp32 parameter}; collective: every rank
        full = {id(p): rows.reshape(-1)[: view.numel()].view(view.shape) for u in self.units  # (N, S_i) -> parameter
                for p, view, rows in zip(u.params, u.views, u.all_gather(torch.float32, self.group))}
        return {k: full.get(id(p), p.detach().float()).clone() for k, p in self.module.named_parameters()}


class DynamicLossScaler:
    """fp16's dynamic loss scale, explicit: scaler.scale(loss).backward(); finish...(); scaler.step(opt) unscales, and
    skips the step on every rank (halving the scale) if any rank saw inf/NaN. Nothing is scaled behind your back."""
    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000, group=None):
        self.loss_scale, self.growth_interval, self.group, self.good_steps = init_scale, growth_interval, group, 0
    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.loss_scale
    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if isinstance(optimizer, ShardedOptimizer):
            optimizer.load_gradients()  # its gradients are the slices on its fp32 masters
        holder = getattr(optimizer, "optimizer", optimizer)
        grads = [p.grad.div_(self.loss_scale) for g in holder.param_groups for p in g["params"] if p.grad is not None]
        device = optimizer.param_groups[0]["params"][0].device  # the model's: masters may be on the CPU
        overflow = torch.stack([~torch.isfinite(g).all() for g in grads]).any().float().to(device)
        dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=self.group)  # sharded ranks see different gradients
        if overflow.item():
            self.loss_scale, self.good_steps = self.loss_scale / 2, 0
            optimizer.zero_grad()
            return False
        optimizer.step()
        self.good_steps += 1  # consecutive good steps, as torch.amp.GradScaler counts them
        self.loss_scale *= 2 if self.good_steps % self.growth_interval == 0 else 1
        return True


def estimate_memory(num_params: float, world_size: int, stage: int, offload: str | None = None, param_bytes=2) -> dict:
    """Bytes per rank: the table above, param_bytes per parameter and gradient. offload="cpu" (ZeRO-Offload) moves
    gradients and optimizer states to CPU memory, "nvme" (ZeRO-Infinity) them and stage 3's parameters to NVMe."""
    phi, n = float(num_params), world_size
    # BEGIN SOLUTION
    out = {"params": param_bytes * phi / (n if stage >= 3 else 1), "grads": param_bytes * phi / (n if stage >= 2 else 1),
           "optimizer": ADAM_BYTES * phi / (n if stage >= 1 else 1), "cpu": 0.0, "nvme": 0.0}
    # END SOLUTION
    if offload in ("cpu", "nvme"):
        out[offload], out["grads"], out["optimizer"] = out["grads"] + out["optimizer"], 0.0, 0.0
        if offload == "nvme" and stage >= 3:
            out["nvme"], out["params"] = out["nvme"] + out["params"], 0.0
    return dict(out, total=out["params"] + out["grads"] + out["optimizer"])


# --- demo --------------------------------------------------------------
def build(stage: int, model: nn.Module, compute_dtype=None, offload=None, optimizer_cls=torch.optim.AdamW,
          bucket_mb: float = 25, **optimizer_kwargs) -> tuple:  # (model, optimizer, finish_gradient_synchronization)
    if stage == 3:
        model = FullyShardedDataParallel(model, compute_dtype)
        return model, optimizer_cls(model.parameters(), **optimizer_kwargs), model.finish_gradient_synchronization
    model = DataParallel(model, bucket_mb) if stage < 2 else model  # stage 2 reduce-scatters from the bare model
    one_rank = dist.new_subgroups(group_size=1)[0] if stage == 0 else None  # stage 0 shards over one rank
    opt = (ShardedGradientOptimizer if stage == 2 else ShardedOptimizer)(model.parameters(), optimizer_cls, one_rank,
                                                                          bucket_mb, offload, **optimizer_kwargs)
    if compute_dtype is not None:
        model.to(compute_dtype)  # after the optimizer took its fp32 masters
    return model, opt, (opt if stage == 2 else model).finish_gradient_synchronization


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, FullyShardedDataParallel):  # the shards, gathered
        return model.gather_full_params()
    return {k: p.detach().float().clone() for k, p in getattr(model, "module", model).named_parameters()}


def held_bytes(model: nn.Module, optimizer) -> dict:  # read from the tensors: parameters, gradients, optimizer
    params, inner = trainable(model.parameters()), getattr(optimizer, "optimizer", optimizer)
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    size = lambda ts: sum(t.nbytes for t in ts if t is not None)
    out = {"params": size(p.data for p in params), "optimizer": size(getattr(optimizer, "masters", []) + state),
           "grads": size([p.grad for p in params] + list(getattr(optimizer, "grad_shards", [])))}
    return dict(out, total=sum(out.values()))


def train(stage: int, steps: int = 20, batch_size: int = 8, cfg: GPTConfig | None = None, lr: float = 3e-3,
          compute_dtype=None, data: torch.Tensor | None = None, device=None, seed: int = 0, offload=None,
          bucket_mb: float = 25, log_every: int = 0, check: bool = False) -> dict:
    """Train TinyGPT with ZeRO `stage` on this process group (batch_size sequences per rank); return the figures."""
    cfg, device, data = cfg or GPTConfig(), device or torch.device("cpu"), load_text() if data is None else data
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed + rank)  # deliberately different: construction must broadcast rank 0's weights
    model, opt, finish = build(stage, TinyGPT(cfg).to(device), compute_dtype, offload, bucket_mb=bucket_mb, lr=lr,
                               weight_decay=0.1)
    if check:  # the reference: one process, the global batch, plain AdamW, from the same start
        reference = TinyGPT(cfg).to(device)
        reference.load_state_dict(full_params(model), strict=False)  # a tied weight has one name
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.1)
    gen, losses, times = torch.Generator().manual_seed(seed), [], []  # the same on every rank: one global batch
    scaler = DynamicLossScaler() if compute_dtype == torch.float16 else None
    for step in range(steps):
        xs, ys = (t.to(device) for t in get_batch(data, batch_size * n, cfg.seq_len, gen))
        x, y = xs[rank * batch_size:(rank + 1) * batch_size], ys[rank * batch_size:(rank + 1) * batch_size]
        with CommCounter() as counter:
            t0 = now(device)
            counter.phase = "forward"
            loss = model(x, y)
            counter.phase = "backward"
            (scaler.scale(loss) if scaler else loss).backward()
            counter.phase = "after backward"
            finish()
            memory = held_bytes(model, opt)  # gradients are held now, between backward and step
            scaler.step(opt) if scaler else opt.step()
            opt.zero_grad()
            times.append(now(device) - t0)
        dist.all_reduce(mean_loss := loss.detach().float() / n)
        losses.append(mean_loss.item())
        if check:
            reference(xs, ys).backward()
            ref_opt.step()
            ref_opt.zero_grad()
        if log_every and rank == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"stage {stage} | step {step + 1}/{steps} | loss {losses[-1]:.3f} | "
                  f"{batch_size * n * cfg.seq_len / times[-1] / 1e3:.1f}k tok/s | {times[-1] * 1e3:.0f} ms", flush=True)
    ring = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter_single": (n - 1) / n, "all_gather_single": n - 1}
    final = full_params(model)  # a collective at stage 3
    out = {"stage": stage, "world_size": n, "num_params": sum(t.numel() for t in final.values()), "losses": losses,
           "param_bytes": (compute_dtype or torch.float32).itemsize, "memory": memory, "events": counter.events,
           "ms_per_step": statistics.median(times) * 1e3, "sent": sum(ring[op] * b for _, op, b in counter.events)}
    if check:
        out["max_param_diff"] = max((p.detach() - final[k]).abs().max().item() for k, p in reference.named_parameters())
    return out


def print_report(results: list[dict], n: int) -> None:
    phi, p = results[0]["num_params"], results[0]["param_bytes"]  # p: bytes per model parameter
    print(f"\nPer-rank memory and traffic on N = {n}, Φ = {phi:,} parameters, KiB (formula: {p} bytes per parameter "
          "and gradient)\nstage |   params  formula |    grads  formula |    optim  formula |    total  formula | "
          "sent/step    paper | ms/step")
    for r in results:
        f, m = estimate_memory(phi, n, r["stage"], param_bytes=p), r["memory"]
        paper = (3 if r["stage"] == 3 else 2) * phi * p * (n - 1) / n
        cells = " | ".join(f"{m[k] / 1024:8.1f} {f[k] / 1024:8.1f}" for k in ("params", "grads", "optimizer", "total"))
        print(f"{r['stage']:5} | {cells} | {r['sent'] / 1024:9.1f} {paper / 1024:8.1f} | {r['ms_per_step']:7.1f}")
    stage3 = "split differently." if p == 2 else ("not the formula's 20Φ/N:\nthe fp32 shard is its master, where "
                                                  "stages 0-2 keep an fp32 master beside fp32 parameters.")
    print("sent/step: the collectives CommCounter saw, priced at what a ring sends; stage 1 all-reduces, then all-"
          f"gathers\n(3Φ). Stage 3 holds fp32 shards and gradients (4Φ/N each) and m, v (8Φ/N): 16Φ/N, {stage3}")
    for r in [r for r in results if "max_param_diff" in r]:
        print(f"stage {r['stage']}: largest |parameter difference| from single-process torch.optim.AdamW after "
              f"{len(r['losses'])} steps: {r['max_param_diff']:.2e}")


def print_estimate(num_params: float, world_size: int) -> None:
    print(f"Memory per rank for Φ = {num_params:.3g} parameters on N = {world_size} ranks, mixed-precision Adam "
          f"(2 + 2 + 12 bytes per parameter), GB:\n{'':<31}   params    grads optimizer   on GPU      CPU     NVMe")
    names = {None: "", "cpu": " + ZeRO-Offload (CPU)", "nvme": " + ZeRO-Infinity (NVMe)"}
    for s, off in [(0, None), (1, None), (2, None), (3, None), (1, "cpu"), (2, "cpu"), (3, "cpu"), (3, "nvme")]:
        e, label = estimate_memory(num_params, world_size, s, off), f"stage {s}" + (names[off] if s else " (DDP)")
        gb = "".join(f"{e[k] / 1e9:9.1f}" for k in ("params", "grads", "optimizer", "total", "cpu", "nvme"))
        print(f"{label:<31}{gb}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("--stage", default="2", help="0, 1, 2, 3, or a list such as 0,1,2,3 to compare them in one run")
    add("--steps", type=int, default=30, help="training steps per stage")
    add("--batch-size", type=int, default=8, help="sequences per rank per step")
    add("--lr", type=float, default=3e-3, help="AdamW learning rate")
    add("--param-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="compute and communication dtype; the optimizer keeps fp32 masters (float16 adds a loss scaler)")
    add("--offload", choices=["cpu"], help="ZeRO-Offload: optimizer states and their step on the CPU (stages 0-2)")
    add("--n-layer", type=int, default=2, help="transformer blocks")
    add("--n-head", type=int, default=4, help="attention heads (must divide --d-model)")
    add("--d-model", type=int, default=64, help="model width")
    add("--seq-len", type=int, default=64, help="tokens (bytes) per sequence")
    add("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    add("--check", action="store_true", help="also train single-process AdamW and print the difference")
    add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present, else cpu")
    add("--estimate", action="store_true", help="print the memory table for --params on --world-size")
    add("--params", type=float, default=7e9, help="Φ for --estimate")
    add("--world-size", type=int, default=8, help="N for --estimate")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)  # every flag is checked before any work
    for flag in ("steps", "batch_size", "n_layer", "n_head", "d_model", "seq_len", "world_size", "lr", "params"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    stages = [int(s) if s.strip().isdigit() else -1 for s in args.stage.split(",")]
    if any(s not in (0, 1, 2, 3) for s in stages):
        parser.error(f"--stage {args.stage}: ZeRO has stages 0 (DDP), 1, 2 and 3 (a list such as 0,1,2,3 runs several)")
    if args.offload and 3 in stages:
        parser.error(f"--offload {args.offload}: offloading is built on stages 0-2 here (drop 3 from --stage)")
    if args.d_model % args.n_head:
        parser.error(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.estimate:
        return print_estimate(args.params, args.world_size)
    try:
        data = load_text(args.data)
    except ValueError as e:
        parser.error(str(e))
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    rank, n, device = setup_distributed(args.device)
    try:
        results = [train(s, args.steps, args.batch_size, cfg, args.lr, getattr(torch, args.param_dtype), data, device,
                         offload=args.offload, log_every=max(1, args.steps // 5), check=args.check) for s in stages]
        if rank == 0:
            print_report(results, n)
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
