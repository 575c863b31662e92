"""Tensor parallelism (Megatron-LM): each weight matrix split across N ranks, two all-reduces per layer each way.

For the MLP Y = GeLU(X·A)·B, split A by columns and B by rows. Rank r computes GeLU(X·A_r) on its own, no
communication, because GeLU acts on each column separately; then X·A_r·B_r is a partial sum and one all-reduce
(g) adds the N partials. Attention splits by heads the same way (q, k, v by columns, the output projection by
rows). In backward the roles swap: the input's gradient is the sum of the ranks' partials (f's all-reduce). So

    one transformer layer = 2 all-reduces forward + 2 backward, each of B·T·d elements,

and every matrix weighs 1/N per rank. The embedding and the loss are split over the vocabulary, so the full
B·T·V logits are never gathered. With --sequence-parallel (Korthikanti et al. 2022) each all-reduce becomes a
reduce-scatter plus an all-gather (the same bytes) and the layer norms work on T/N tokens per rank.

Run:   torchrun --nproc_per_node=2 tensor_parallel.py
       torchrun --nproc_per_node=4 tensor_parallel.py --sequence-parallel
       python tensor_parallel.py --help
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
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- the technique -----------------------------------------------------


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's x, concatenated along dim in rank order: dim grows N-fold."""
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's slice of x along dim (no communication)."""
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """The sum over ranks of x, of which this rank keeps its slice along dim."""
    parts = [p.contiguous() for p in x.chunk(dist.get_world_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _mapping(forward, backward):
    """A differentiable region boundary: forward(x, group) on the way in, backward(grad, group) on the way back."""
    class Mapping(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, grad):
            return backward(grad, ctx.group), None
    return lambda x, group=None: Mapping.apply(x, group)


HIDDEN, SEQ = -1, 1  # activations are (B, T, d): tensor parallelism splits d, sequence parallelism splits T
# Megatron's mappings, in conjugate pairs: what one does forward, its partner does backward. f enters a column-
# parallel layer, g leaves a row-parallel one; gather/scatter serve gather_output and input_is_parallel=False.
# Sequence parallelism (Korthikanti et al. 2022) splits each all-reduce into its two halves, so that outside the
# tensor-parallel regions activations stay split along the sequence and the layer norms see T/N tokens.
#                                      forward                            backward
copy_to_tp_region           = _mapping(_identity,                         _all_reduce)  # f
reduce_from_tp_region       = _mapping(_all_reduce,                       _identity)  # g
gather_from_tp_region       = _mapping(partial(_all_gather, dim=HIDDEN),  partial(_split, dim=HIDDEN))
scatter_to_tp_region        = _mapping(partial(_split, dim=HIDDEN),       partial(_all_gather, dim=HIDDEN))
gather_from_sp_region       = _mapping(partial(_all_gather, dim=SEQ),     partial(_reduce_scatter, dim=SEQ))
reduce_scatter_to_sp_region = _mapping(partial(_reduce_scatter, dim=SEQ), partial(_all_gather, dim=SEQ))


def _divide(total: int, n: int, what: str) -> int:
    """total / n for a dimension split over n ranks; a remainder is refused: every rank holds an equal slice."""
    if total % n:
        hint = f" (try {what} {n * max(1, round(total / n))})" if what.startswith("--") else ""
        raise ValueError(f"{what} {total} is not divisible by the tensor-parallel size {n}{hint}")
    return total // n


def _sharded(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Mark a parameter as this rank's slice along dim (Megatron's partition_dim): load_dense splits the dense
    tensor along it, gather_dense_state concatenates the ranks' slices along it."""
    param.split_dim = dim
    return param


def check_sizes(cfg: GPTConfig, n: int, sequence_parallel: bool = False) -> None:
    """Refuse a model that N ranks cannot split evenly (ValueError naming the flag): whole heads per rank (so d,
    3d and 4d split too), the vocabulary by rows, and the sequence under sequence parallelism."""
    _divide(cfg.n_head, n, "--n-head")
    if cfg.d_model % cfg.n_head:
        raise ValueError(f"--d-model {cfg.d_model} is not divisible by --n-head {cfg.n_head}")
    _divide(cfg.vocab_size, n, "the vocabulary")
    if sequence_parallel:
        _divide(cfg.seq_len, n, "--seq-len")


class ColumnParallelLinear(nn.Module):
    """Y = XA with A split by columns: rank r computes Y_r = X A_r, no communication in forward. The input enters
    through f (or, with sequence parallelism, an all-gather of the sequence)."""

    def __init__(self, in_features, out_features, bias=True, gather_output=False, group=None,
                 sequence_parallel=False):
        super().__init__()
        self.group, self.gather_output, self.sequence_parallel = group, gather_output, sequence_parallel
        local = _divide(out_features, dist.get_world_size(group), "out_features")
        self.weight = _sharded(nn.Parameter(torch.empty(local, in_features)), 0)  # rows of nn.Linear's (out, in)
        self.bias = _sharded(nn.Parameter(torch.zeros(local)), 0) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        x = gather_from_sp_region(x, self.group) if self.sequence_parallel else copy_to_tp_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # (B, T, out/N)
        return gather_from_tp_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = XA with A split by rows (X by columns): rank r computes X_r A_r, and g sums the partial products (with
    sequence parallelism, a reduce-scatter along the sequence). The bias is added once, after the sum."""

    def __init__(self, in_features, out_features, bias=True, input_is_parallel=True, group=None,
                 sequence_parallel=False):
        super().__init__()
        self.group, self.input_is_parallel, self.sequence_parallel = group, input_is_parallel, sequence_parallel
        local = _divide(in_features, dist.get_world_size(group), "in_features")
        self.weight = _sharded(nn.Parameter(torch.empty(out_features, local)), 1)  # columns of nn.Linear's weight
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        # BEGIN SOLUTION
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.group)  # (B, T, in/N)
        partial_sum = F.linear(x, self.weight)
        y = reduce_scatter_to_sp_region(partial_sum, self.group) if self.sequence_parallel \
            else reduce_from_tp_region(partial_sum, self.group)
        # END SOLUTION
        return y if self.bias is None else y + self.bias


class ParallelMLP(nn.Module):
    """GeLU(X A) B with A column-parallel and B row-parallel: one f, one g, nothing gathered in between."""

    def __init__(self, d_model, hidden, group=None, sequence_parallel=False):
        super().__init__()
        self.fc1 = ColumnParallelLinear(d_model, hidden, group=group, sequence_parallel=sequence_parallel)
        self.fc2 = RowParallelLinear(hidden, d_model, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ParallelSelfAttention(nn.Module):
    """Causal attention split by heads: q, k, v are one column-parallel matmul (rank r computes heads
    r·h/N .. (r+1)·h/N in full), attention needs no communication, and the output projection is row-parallel."""

    def __init__(self, d_model, n_head, group=None, sequence_parallel=False):
        super().__init__()
        self.local_heads = _divide(n_head, dist.get_world_size(group), "n_head")
        self.head_dim = d_model // n_head
        # q, k, v fused so that one f covers all three: our 3·d/N output columns are [q_r | k_r | v_r]
        self.qkv = ColumnParallelLinear(d_model, 3 * d_model, group=group, sequence_parallel=sequence_parallel)
        self.o = RowParallelLinear(d_model, d_model, group=group, sequence_parallel=sequence_parallel)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, d/N)
        B, T = q.shape[:2]
        q, k, v = (t.view(B, T, self.local_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, h/N, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d/N) into the row-parallel projection


class VocabParallelEmbedding(nn.Module):
    """Rank r owns token ids [r·V/N, (r+1)·V/N): it looks up the ids in its range, writes zeros for the others,
    and one all-reduce (a reduce-scatter with sequence parallelism) assembles every row."""

    def __init__(self, vocab_size, d_model, group=None, sequence_parallel=False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.per_rank = _divide(vocab_size, dist.get_world_size(group), "vocab_size")
        self.start = dist.get_rank(group) * self.per_rank
        self.weight = _sharded(nn.Parameter(torch.empty(self.per_rank, d_model)), 0)
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, idx):
        # BEGIN SOLUTION
        local = idx - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp_region(x, self.group) if self.sequence_parallel \
            else reduce_from_tp_region(x, self.group)
        # END SOLUTION


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, start, group):
        # logits: (N_tokens, V/N), this rank's columns. Three all-reduces of N_tokens numbers each; never V.
        # BEGIN SOLUTION
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        local = targets - start
        mine = (local >= 0) & (local < logits.shape[-1])
        picked = shifted.gather(1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)  # (N_tokens,)
        target_logit = torch.where(mine, picked, torch.zeros_like(row_max))
        target_logit = _all_reduce(target_logit, group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine)
        return (sum_exp.log() - target_logit).mean()
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors
        g = softmax.clone()  # d(mean CE)/d logits = (softmax - onehot) / N_tokens, our columns only
        rows = torch.arange(g.shape[0], device=g.device)[mine]
        g[rows, local[mine]] -= 1.0
        return g * (grad / g.shape[0]), None, None, None


def vocab_parallel_cross_entropy(logits_shard, targets, group=None):
    """Mean cross-entropy over the full vocabulary from each rank's slice of the logits (..., V/N)."""
    start = dist.get_rank(group) * logits_shard.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits_shard.reshape(-1, logits_shard.shape[-1]),  # (B·T, V/N)
                                            targets.reshape(-1), start, group)


@torch.no_grad()
def load_dense(parallel: nn.Module, dense: nn.Module, group=None) -> nn.Module:
    """Copy a dense module's weights into its tensor-parallel twin: this rank's slice of every split parameter
    (along its split_dim), the whole of every replicated one; q, k, v land fused as this rank's [q_r; k_r; v_r]."""
    full = dense.state_dict()
    for name, p in parallel.named_parameters():
        names = [name.replace("qkv", c) for c in "qkv"] if "qkv" in name.split(".") else [name]
        split = [_split(full[k], group, p.split_dim) if hasattr(p, "split_dim") else full[k] for k in names]
        p.copy_(torch.cat(split))
    return parallel


@torch.no_grad()
def gather_dense_state(parallel: nn.Module, group=None) -> dict:
    """The inverse of load_dense: the dense module's state dict, gathered from every rank's slices (collective)."""
    out = {}
    for name, p in parallel.named_parameters():
        full = _all_gather(p, group, p.split_dim) if hasattr(p, "split_dim") else p.clone()
        if "qkv" in name.split("."):  # rank r's rows are [q_r; k_r; v_r]: regroup them into q, k, v
            per_rank = full.chunk(dist.get_world_size(group))
            for j, c in enumerate("qkv"):
                out[name.replace("qkv", c)] = torch.cat([rows.chunk(3)[j] for rows in per_rank])
        else:
            out[name] = full
    return out


# --- the tiny GPT, tensor-parallel -------------------------------------


class TPBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, group=None, sequence_parallel=False):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = ParallelSelfAttention(cfg.d_model, cfg.n_head, group, sequence_parallel)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = ParallelMLP(cfg.d_model, 4 * cfg.d_model, group, sequence_parallel)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TPGPT(nn.Module):
    """TinyGPT with every matrix split over the tensor-parallel group: vocab-parallel embedding tied to a
    vocab-parallel head, parallel attention and MLP; layer norms and the position embedding are replicated."""

    def __init__(self, cfg: GPTConfig, group=None, sequence_parallel=False):
        super().__init__()
        check_sizes(cfg, dist.get_world_size(group), sequence_parallel)
        self.cfg, self.group, self.sequence_parallel = cfg, group, sequence_parallel
        self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, group, sequence_parallel)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(TPBlock(cfg, group, sequence_parallel) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        if self.sequence_parallel:  # we hold tokens [r·T/N, (r+1)·T/N) of every sequence
            pos = _split(pos, self.group, dim=0)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, d), or (B, T/N, d) with sequence parallelism
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        x = gather_from_sp_region(x, self.group) if self.sequence_parallel else copy_to_tp_region(x, self.group)
        logits_shard = F.linear(x, self.tok_emb.weight)  # the head is tied: (B, T, V/N), never gathered
        if targets is None:
            return logits_shard
        return vocab_parallel_cross_entropy(logits_shard, targets, self.group)

    @classmethod
    def from_dense(cls, model: TinyGPT, group=None, sequence_parallel=False) -> TPGPT:
        """This rank's shard of a dense TinyGPT (the same weights, so the two can be compared)."""
        if not model.cfg.tie_weights:
            raise ValueError("TPGPT ties the head to the embedding: build the dense model with tie_weights=True")
        return load_dense(cls(model.cfg, group, sequence_parallel), model, group)

    def full_state_dict(self) -> dict:
        """The dense TinyGPT's state dict, gathered from the shards (collective: call on every rank)."""
        out = gather_dense_state(self, self.group)
        return {**out, "head.weight": out["tok_emb.weight"]}  # the head is the embedding, tied

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds whole: layer norms, position embedding, row-parallel biases."""
        return [p for p in self.parameters() if not hasattr(p, "split_dim")]


def allreduce_sequence_parallel_grads(model: TPGPT) -> None:
    """With sequence parallelism each rank's layer norms saw only its T/N tokens: sum their gradients."""
    for p in model.replicated_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=model.group)


# --- demo --------------------------------------------------------------


def count_layer_collectives(cfg: GPTConfig, sequence_parallel: bool, batch_size: int = 2, device="cpu") -> dict:
    """One transformer layer forward and backward alone: {"forward"|"backward": {op: (calls, bytes)}}."""
    torch.manual_seed(0)
    block = TPBlock(cfg, sequence_parallel=sequence_parallel).to(device)
    T = cfg.seq_len // dist.get_world_size() if sequence_parallel else cfg.seq_len
    x = torch.randn(batch_size, T, cfg.d_model, device=device, requires_grad=True)  # (B, T or T/N, d)
    with CommCounter() as counter:
        counter.phase = "forward"
        y = block(x)
        counter.phase = "backward"
        y.sum().backward()
    return {phase: counter.totals(phase) for phase in ("forward", "backward")}


def train(cfg: GPTConfig, steps: int = 20, batch_size: int = 8, lr: float = 3e-3, sequence_parallel=False,
          data=None, device="cpu", seed: int = 0, log_every: int = 0) -> dict:
    """Train TPGPT on this process group (every rank sees the same batch); check step 0 against the dense model."""
    data = load_text() if data is None else data
    torch.manual_seed(seed)  # the same dense model on every rank; each keeps its shard
    dense = TinyGPT(cfg).to(device)
    model = TPGPT.from_dense(dense, sequence_parallel=sequence_parallel).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for step in range(steps):
        x, y = (t.to(device) for t in get_batch(data, batch_size, cfg.seq_len, gen))
        if step == 0:
            with torch.no_grad():
                dense_loss = dense(x, y).item()
        t0 = now(device)
        with CommCounter() as counter:  # what the step hands to torch.distributed; the last step's is reported
            counter.phase = "forward"
            loss = model(x, y)
            counter.phase = "backward"
            loss.backward()
            if sequence_parallel:
                allreduce_sequence_parallel_grads(model)
        opt.step()
        opt.zero_grad()
        times.append(now(device) - t0)
        losses.append(loss.item())
        if log_every and dist.get_rank() == 0 and (step % log_every == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps} | loss {losses[-1]:.3f} | "
                  f"{batch_size * cfg.seq_len / times[-1] / 1e3:.1f}k tok/s | {times[-1] * 1e3:.0f} ms", flush=True)
    return {"world_size": dist.get_world_size(), "losses": losses, "dense_step0_loss": dense_loss,
            "ms_per_step": statistics.median(times) * 1e3,
            "params_per_rank": sum(p.numel() for p in model.parameters()),
            "dense_params": sum(p.numel() for p in dense.parameters()),
            "replicated_params": sum(p.numel() for p in model.replicated_parameters()),
            "step": {phase: counter.totals(phase) for phase in ("forward", "backward")},
            "layer": count_layer_collectives(cfg, sequence_parallel, batch_size, device=device)}


def print_report(r: dict, cfg: GPTConfig, batch_size: int, sequence_parallel: bool) -> None:
    n, L, D = r["world_size"], cfg.n_layer, batch_size * cfg.seq_len * cfg.d_model * 4  # D: one activation's bytes
    print(f"\nstep-0 loss: tensor-parallel {r['losses'][0]:.6f} | dense model, same seed {r['dense_step0_loss']:.6f} | "
          f"difference {abs(r['losses'][0] - r['dense_step0_loss']):.1e}")
    split, dense_split = r["params_per_rank"] - r["replicated_params"], r["dense_params"] - r["replicated_params"]
    print(f"parameters per rank: {r['params_per_rank']:,} of the dense model's {r['dense_params']:,}; the split "
          f"matrices: {split:,} of {dense_split:,} = 1/{dense_split / split:.2f} (formula 1/N = 1/{n})")
    print("\ncollectives of one transformer layer, counted by CommCounter (measured | formula):")
    # An all-reduce or a reduce-scatter takes the whole activation in; an all-gather, this rank's T/N slice of it.
    per_call = {"all_reduce": D, "reduce_scatter": D, "all_gather": D // n}
    ops = ("all_gather", "reduce_scatter") if sequence_parallel else ("all_reduce",)
    for phase in ("forward", "backward"):
        for op in (ops if phase == "forward" else ops[::-1]):
            calls, nbytes = r["layer"][phase].get(op, (0, 0))
            print(f"  {op:<15} {phase:<9} {calls} | 2 calls, {nbytes // max(1, calls):>9,} | {per_call[op]:>9,} "
                  f"bytes each")
    print(f"  bytes: B·T·d·4{', B·(T/N)·d·4 handed to an all-gather' if sequence_parallel else ''} "
          f"(B={batch_size}, T={cfg.seq_len}, d={cfg.d_model}, fp32)")
    if not sequence_parallel:
        forward, backward = (r["step"][phase].get("all_reduce", (0, 0))[0] for phase in ("forward", "backward"))
        print(f"whole model per step: {forward} all-reduces forward (2L + 1 embedding + 3 in the cross-entropy = "
              f"{2 * L + 4}), {backward} backward (2L + 1 at the head = {2 * L + 1})")
    print(f"median step time {r['ms_per_step']:.1f} ms")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (B), the same on every rank")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks (L)")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads (a multiple of the ranks N)")
    parser.add_argument("--d-model", type=int, default=64, help="model width d (a multiple of --n-head)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (T)")
    parser.add_argument("--sequence-parallel", action="store_true", help="split activations outside the TP regions "
                        "along the sequence (T a multiple of N)")
    parser.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: stdlib source)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON (rank 0)")
    return parser


def validate(parser: argparse.ArgumentParser, args) -> GPTConfig:
    """Every flag, before any communication and identically on every rank; returns the model's config."""
    for flag in ("steps", "batch_size", "n_layer", "n_head", "d_model", "seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.lr <= 0:
        parser.error(f"--lr {args.lr}: must be above 0 (try --lr 3e-3)")
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    try:  # the divisibility rules live in check_sizes, which TPGPT applies too
        check_sizes(cfg, int(os.environ.get("WORLD_SIZE", 1)), args.sequence_parallel)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def main(argv=None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    cfg = validate(parser, args)
    try:
        data = load_text(args.data)
    except ValueError as e:
        parser.error(str(e))
    rank, n, device = setup_distributed(args.device)
    try:
        r = train(cfg, args.steps, args.batch_size, args.lr, args.sequence_parallel, data, device,
                  log_every=max(1, args.steps // 6))
        if rank == 0:
            print_report(r, cfg, args.batch_size, args.sequence_parallel)
            if args.json:
                Path(args.json).write_text(json.dumps(r, indent=1))
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
