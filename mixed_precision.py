"""Mixed precision: FP32, FP16, BF16 and FP8 — the formats measured, loss scaling, master weights, FP8 with scales.

A float is sign · 2^exponent · 1.mantissa. The exponent bits set the range, the mantissa bits the precision:
BF16 keeps FP32's 8 exponent bits (same range, 3 significant digits) while FP16 has 5 (max 65504, and gradients
below 6e-8 become 0). So BF16 trains without help, and FP16 needs loss scaling: multiply the loss by S before
backward, divide the gradients by S after, and back off when something overflows. Mixed-precision Adam holds

    2 (fp16 weights) + 4 (fp32 gradients) + 4 (fp32 master weights) + 4 + 4 (Adam m, v) = 18 bytes per parameter

at its peak (counted from the tensors): torch's AdamW steps fp32 weights with fp32 gradients, so each fp16 gradient
is copied up and freed. The textbook 2 + 2 + 12 = 16 needs a fused step that reads the fp16 gradients directly.

FP8 (E4M3 for weights and activations, E5M2 for gradients) has so little range that every tensor must carry its
own scale: per tensor from the current or recent amax, or per block as in DeepSeek-V3.

Run:   python mixed_precision.py --formats
       python mixed_precision.py --compare
       torchrun --nproc_per_node=2 mixed_precision.py --compare
"""
from __future__ import annotations

import argparse
import collections
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

FORMATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_SAME_WIDTH_INT = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


def format_table() -> list[dict]:
    """Each format's layout and range, derived from torch.finfo and its bit patterns (nothing typed in): mantissa
    bits m from eps = 2^-m, exponent bits = total - 1 - m, the smallest subnormal by decoding the bits 0...01."""
    rows = []
    for name, dtype in FORMATS.items():
        fi = torch.finfo(dtype)
        mantissa = round(-math.log2(fi.eps))
        one = torch.tensor([1], dtype=_SAME_WIDTH_INT[fi.bits]).view(dtype)  # the bits 0...01
        rows.append({"format": name, "bits": fi.bits, "exponent_bits": fi.bits - 1 - mantissa,
                     "mantissa_bits": mantissa, "max": fi.max, "smallest_normal": fi.smallest_normal,
                     "smallest_subnormal": one.float().item(), "eps": fi.eps})
    return rows


def demonstrations() -> dict:
    """The three facts behind mixed-precision recipes, computed in each format."""
    out = {"1 + 2^-8": {}, "gradient 1e-8": {}}
    for name, dtype in FORMATS.items():
        out["1 + 2^-8"][name] = torch.tensor(1 + 2 ** -8).to(dtype).float().item()
        out["gradient 1e-8"][name] = torch.tensor(1e-8).to(dtype).float().item()
    out["fp16 65504 -> 65520"] = torch.tensor(65520.0).to(torch.float16).item()  # past the top: inf
    return out


class DynamicLossScaler:
    """Loss scaling, written out (the behaviour of torch.amp.GradScaler). Multiply the loss by S so small gradients
    stay above fp16's underflow; divide the gradients by S before the step. If any gradient overflowed (inf/NaN),
    skip the step and halve S; after growth_interval clean steps in a row, double S."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale_value, self.growth_factor, self.backoff_factor = init_scale, growth_factor, backoff_factor
        self.growth_interval, self.clean_steps, self.overflows, self.growths = growth_interval, 0, 0, 0
        self.found_inf = None  # None: not unscaled yet this step

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    @torch.no_grad()
    def unscale_(self, optimizer) -> None:
        """Divide every gradient by S and note whether any is inf or NaN."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale_value)  # one fused pass over all gradients
        # a norm is inf or NaN exactly when some element is: one check, one device-to-host sync
        self.found_inf = bool(grads) and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all().item()

    def step(self, optimizer) -> bool:
        """Step unless a gradient overflowed; return whether the step was taken."""
        if self.found_inf is None:
            self.unscale_(optimizer)
        if self.found_inf:
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        if self.found_inf:
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
            self.overflows += 1
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale_value *= self.growth_factor
                self.clean_steps = 0
                self.growths += 1
        self.found_inf = None


class MasterWeights:
    """The fp16 recipe's optimizer: the model holds fp16 parameters and gradients; the optimizer steps an fp32 master
    copy with Adam's m and v (4 + 4 + 4 bytes). torch's AdamW needs fp32 gradients for fp32 weights, so copy_grads
    makes them and frees each fp16 gradient once copied: 2 + 4 + 12 = 18 bytes per parameter at the peak, not 20."""

    def __init__(self, model: nn.Module, optimizer_cls=torch.optim.AdamW, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.optimizer = optimizer_cls(self.master, **kwargs)
        self.param_groups = self.optimizer.param_groups

    def copy_grads(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # the recipe never reads it again: keeping it would hold 2 more bytes per parameter

    def step(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def zero_grad(self) -> None:
        for p in self.params + self.master:
            p.grad = None


# FP8: a tensor travels as (q, s) with q = fp8(clamp(x·s)) and x ≈ q / s; the scale s = max_fp8 / amax puts the
# tensor's largest magnitude at the top of the format's range, so its small values keep as much precision as the
# 3 (E4M3) or 2 (E5M2) mantissa bits allow. Forward tensors use E4M3 (precision), gradients E5M2 (range).
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class ScaleTracker:
    """Chooses the scale of one tensor, step after step.

    current: from this tensor's own amax (exact, but needs a pass over the tensor before casting it).
    delayed: from the amax history of the previous `history_len` steps (max, or most_recent), as Transformer
    Engine's DelayedScaling does: the cast can be fused into the op that produces the tensor, at the risk of an
    amax that grew since, whose values then saturate at the format's max."""

    def __init__(self, fmt, mode: str = "current", history_len: int = 16, algo: str = "max"):
        if mode not in ("current", "delayed"):
            raise ValueError(f"unknown scaling {mode!r}")
        if algo not in ("max", "most_recent"):
            raise ValueError(f"unknown amax algorithm {algo!r}: max or most_recent")
        self.fmt, self.mode, self.algo = fmt, mode, algo
        self.history = collections.deque(maxlen=history_len)

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        amax = used = t.detach().abs().max().float()
        if self.mode == "delayed" and self.history:
            used = max(self.history) if self.algo == "max" else self.history[-1]
        self.history.append(amax)
        return torch.finfo(self.fmt).max / torch.clamp(used, min=1e-12)


def quantize(t: torch.Tensor, fmt, scale: torch.Tensor) -> torch.Tensor:
    m = torch.finfo(fmt).max
    return (t.float() * scale).clamp(-m, m).to(fmt)


def block_quantize(t: torch.Tensor, fmt, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-V3's fine-grained scaling: one scale per (rows × cols) block, here returned dequantised (fp8 values
    times their block's 1/s, in fp32): PyTorch has no blockwise FP8 GEMM to call, but the rounding is exactly fp8's."""
    R, C = t.shape
    br, bc = min(block[0], R), min(block[1], C)
    pr, pc = -R % br, -C % bc
    x = F.pad(t.float(), (0, pc, 0, pr)).view((R + pr) // br, br, (C + pc) // bc, bc)  # (row blocks, br, col blocks, bc)
    amax = x.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)  # one per block: (row blocks, 1, col blocks, 1)
    s = torch.finfo(fmt).max / amax
    return (quantize(x, fmt, s).float() / s).view(R + pr, C + pc)[:R, :C]


# The FP8 GEMM is torch._scaled_mm(a, b): a (M, K) @ b (K, N) with fp32 scales, built on cuBLASLt on CUDA. Its rules
# there: a GPU of compute capability 8.9 or newer (Ada, Hopper), float8 operands (not both E5M2), a row-major and
# b column-major (the reduction dimension K contiguous in both), and K and N multiples of 16.
def scaled_mm_problem(a: torch.Tensor, b: torch.Tensor, capability: tuple[int, int] | None = None) -> str | None:
    """Why torch._scaled_mm on CUDA refuses a @ b, or None if it takes them."""
    if capability is not None and tuple(capability) < (8, 9):
        return (f"FP8 GEMMs need a GPU of compute capability 8.9 or newer (Ada, Hopper); this one is "
                f"{capability[0]}.{capability[1]} (use --recipe bf16, or --fp8-scaling block, which is emulated)")
    if {a.dtype, b.dtype} - {E4M3, E5M2} or a.dtype == b.dtype == E5M2:
        return f"operands must be float8 and not both E5M2, got {a.dtype} and {b.dtype}"
    (M, K), N = a.shape, b.shape[1]
    if K % 16 or N % 16:
        return f"K and N must be multiples of 16, got (M, K) @ (K, N) = ({M}, {K}) @ ({K}, {N})"
    if a.stride(1) != 1 or b.stride(0) != 1:
        return "a must be row-major and b column-major (the reduction dimension contiguous in both)"
    return None


def fp8_matmul(a_q, b_q, a_scale, b_scale, emulate: bool = False) -> torch.Tensor:
    """(a_q / a_scale) @ (b_q / b_scale) in fp32, by the FP8 GEMM (it multiplies by the scales it is given, so it gets
    the inverses), or emulated: dequantise, multiply in fp32 (FP8's rounding, not its speed). On CUDA an operand the
    GEMM cannot take is an error that says why, never a quiet fallback to the emulation."""
    if emulate:
        return (a_q.float() / a_scale) @ (b_q.float() / b_scale)
    if a_q.device.type == "cuda":
        problem = scaled_mm_problem(a_q, b_q, torch.cuda.get_device_capability(a_q.device))
        if problem:
            raise ValueError(f"torch._scaled_mm: {problem}")
    return torch._scaled_mm(a_q, b_q, scale_a=(1 / a_scale).float(), scale_b=(1 / b_scale).float(),
                            out_dtype=torch.float32)


# The two paths an Fp8Linear can take, reported by the demo: the FP8 GEMM, or (block scaling) its emulation.
SCALED_MM, EMULATED = "torch._scaled_mm", "an emulation (fp8 rounding, fp32 matmul)"


class _Fp8Linear(torch.autograd.Function):
    """y = x @ w^T with x, w in E4M3, and its backward with the output gradient gy in E5M2.
    M = tokens, K = in_features, N = out_features: x (M, K), w (N, K), y and gy (M, N)."""

    @staticmethod
    def forward(ctx, x, weight, layer):
        ctx.layer = layer
        if layer.scaling == "block":  # 1×128 tiles for activations, 128×128 blocks for weights: emulated
            xd, wd = block_quantize(x, E4M3, (1, 128)), block_quantize(weight, E4M3, (128, 128))
            ctx.save_for_backward(xd, wd)
            return xd @ wd.t()
        sx, sw = layer.x_tracker.scale(x), layer.w_tracker.scale(weight)
        xq, wq = quantize(x, E4M3, sx), quantize(weight, E4M3, sw)
        ctx.save_for_backward(xq, wq, sx, sw)
        # The FP8 GEMM wants the reduction dimension K contiguous in both operands: x (M, K) is row-major, and
        # wq.t() is a free view of the row-major wq (N, K) as a column-major (K, N). Nothing is copied.
        return fp8_matmul(xq, wq.t(), sx, sw, emulate=layer.gemm == EMULATED)

    @staticmethod
    def backward(ctx, gy):
        layer = ctx.layer
        if layer.scaling == "block":
            xd, wd = ctx.saved_tensors
            gd = block_quantize(gy, E5M2, (1, 128))
            return gd @ wd, gd.t() @ xd, None  # (M, N) @ (N, K), (N, M) @ (M, K)
        xq, wq, sx, sw = ctx.saved_tensors
        emulate, sg = layer.gemm == EMULATED, layer.g_tracker.scale(gy)
        gq = quantize(gy, E5M2, sg)
        # grad_x = gy @ w: (M, N) @ (N, K), reduced over N. gq is row-major, N contiguous: as it is. wq is stored
        # (N, K) with K contiguous, so it is transposed in memory: wq.t().contiguous() is (K, N) row-major, and
        # its .t() view is the (N, K) operand in column-major order, N contiguous.
        grad_x = fp8_matmul(gq, wq.t().contiguous().t(), sg, sw, emulate)
        # grad_w = gy^T @ x: (N, M) @ (M, K), reduced over the M tokens. Both gq (M, N) and xq (M, K) keep M as
        # their slow dimension, so both are transposed in memory: gq.t().contiguous() is (N, M) row-major, and
        # xq.t().contiguous().t() is (M, K) column-major. (FP8 training libraries keep transposed copies for this.)
        grad_w = fp8_matmul(gq.t().contiguous(), xq.t().contiguous().t(), sg, sx, emulate)
        return grad_x, grad_w, None


class Fp8Linear(nn.Module):
    """A drop-in for nn.Linear whose matmuls run in FP8: input and weight in E4M3, the output gradient in E5M2,
    every tensor with its own scale. Master weights, bias and output stay fp32. `gemm` says which path runs: the
    FP8 GEMM, or its emulation for block scaling (PyTorch has no blockwise FP8 GEMM to call)."""

    def __init__(self, in_features, out_features, bias=True, scaling="current", history_len=16, amax_algo="max",
                 device=None):
        super().__init__()
        if scaling not in ("current", "delayed", "block"):
            raise ValueError(f"unknown scaling {scaling!r}: current, delayed or block")
        self.in_features, self.out_features, self.scaling = in_features, out_features, scaling
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        mode = "current" if scaling == "block" else scaling
        self.x_tracker, self.w_tracker = (ScaleTracker(E4M3, mode, history_len, amax_algo) for _ in range(2))
        self.g_tracker = ScaleTracker(E5M2, mode, history_len, amax_algo)
        self.gemm = EMULATED if scaling == "block" else SCALED_MM

    def forward(self, x):
        y = _Fp8Linear.apply(x.reshape(-1, self.in_features).float(), self.weight, self)  # (M, K) -> (M, N)
        y = y.view(*x.shape[:-1], self.out_features)  # (B, T, N)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Fp8Linear":
        """The same layer, on the same device, with the same weights."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                    **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer


def convert_to_fp8(model: nn.Module, **kwargs) -> nn.Module:
    """Swap every nn.Linear inside the transformer blocks for an Fp8Linear with the same weights. The output head
    (and the embeddings) stay in high precision: the logits' small differences decide the loss."""
    for parent in [m for block in model.blocks for m in block.modules()]:
        for attr, sub in list(parent.named_children()):
            if isinstance(sub, nn.Linear):
                setattr(parent, attr, Fp8Linear.from_linear(sub, **kwargs))
    return model


# --- demo --------------------------------------------------------------

RECIPES = ("fp32", "bf16", "fp16", "fp8")


def check_recipe(recipe: str, device: torch.device, fp8_scaling: str = "current") -> None:
    """One clear line if this device cannot run the recipe. It touches the device: call it after set_device."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": E4M3}.get(recipe, torch.float32)
    try:
        one, a = torch.ones((), device=device), torch.ones(16, 16, device=device).to(dtype)
        fp8_matmul(a, a.t(), one, one, emulate=fp8_scaling == "block") if recipe == "fp8" else a @ a
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        hint = " (--fp8-scaling block runs an emulation)" if recipe == "fp8" else ""
        raise ValueError(f"--recipe {recipe} does not run on {device}: {str(e).splitlines()[0][:200]}{hint}") from e


def held_bytes(model: nn.Module, optimizer) -> dict:
    """Bytes per model parameter that the recipe's tensors occupy right now, read from the tensors: the model's
    parameters; the gradients (the model's, and the master copy's); the optimizer's master copy and states."""
    total = lambda tensors: sum(t.numel() * t.element_size() for t in tensors if t is not None)  # noqa: E731
    params, master = list(model.parameters()), getattr(optimizer, "master", [])  # a tied weight counts once
    inner = getattr(optimizer, "optimizer", optimizer)
    states = [t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    n = sum(p.numel() for p in params)
    return {"params": total(params) / n, "grads": total([p.grad for p in params] + [m.grad for m in master]) / n,
            "optimizer": total(master + states) / n}


def train_step(model, opt, scaler, x, y, bf16_autocast: bool = False) -> tuple[torch.Tensor, bool, dict]:
    """One step. Returns the loss, whether the optimizer stepped, and the most bytes per parameter the recipe's
    tensors held between the step's operations (after backward, after copying gradients to fp32, after the step)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
        loss = model(x, y)
    (loss if scaler is None else scaler.scale(loss)).backward()
    held, took = [held_bytes(model, opt)], True
    if scaler is None:
        opt.step()
    else:
        opt.copy_grads()  # fp16 gradients (still scaled) -> fp32 master gradients; each fp16 one freed once copied
        held.append(held_bytes(model, opt))
        took = scaler.step(opt)  # unscale, look for inf/NaN, step unless one was found
        scaler.update()
    held.append(held_bytes(model, opt))
    opt.zero_grad()
    return loss.detach(), took, max(held, key=lambda b: sum(b.values()))


def train(recipe: str = "fp32", steps: int = 100, cfg: GPTConfig | None = None, batch_size: int = 16, lr: float = 1e-3,
          data=None, device="cpu", seed: int = 0, log_every: int = 0, fp8_scaling: str = "current") -> dict:
    """Train TinyGPT with one precision recipe; the same seed and batches for every recipe."""
    cfg, device = cfg or GPTConfig(), torch.device(device)
    check_recipe(recipe, device, fp8_scaling)
    data = load_text() if data is None else data
    torch.manual_seed(seed)
    model, scaler = TinyGPT(cfg).to(device), None
    if recipe == "fp8":
        convert_to_fp8(model, scaling=fp8_scaling)
    if recipe == "fp16":
        model.half()
        opt, scaler = MasterWeights(model, lr=lr, weight_decay=0.1), DynamicLossScaler(growth_interval=50)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses, times, skipped, peak = [], [], 0, {}
    for step in range(steps):
        x, y = (t.to(device) for t in get_batch(data, batch_size, cfg.seq_len, gen))
        t0 = now(device)
        loss, took, held = train_step(model, opt, scaler, x, y, bf16_autocast=recipe == "bf16")
        losses.append(loss.item())
        times.append(now(device) - t0)
        skipped += not took
        peak = max(peak, held, key=lambda b: sum(b.values()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{recipe} | step {step + 1}/{steps} | loss {losses[-1]:.3f} | {times[-1] * 1e3:.0f} ms", flush=True)
    gemms = sorted({f"{m.gemm} on {m.weight.device.type}" for m in model.modules() if isinstance(m, Fp8Linear)})
    return {"recipe": recipe, "losses": losses, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "ms_per_step": statistics.median(times) * 1e3, "bytes_per_param": peak, "skipped_steps": skipped,
            "overflows": scaler.overflows if scaler else 0, "growths": scaler.growths if scaler else 0,
            "fp8_gemm": ", ".join(gemms) or None, "fp8_scaling": fp8_scaling if recipe == "fp8" else None}


def print_formats() -> None:
    print(f"{'format':<14} {'bits':>4} {'exp':>4} {'mant':>5} {'max':>12} {'smallest normal':>16} "
          f"{'smallest subnormal':>19} {'eps':>10}")
    for r in format_table():
        print(f"{r['format']:<14} {r['bits']:>4} {r['exponent_bits']:>4} {r['mantissa_bits']:>5} {r['max']:>12.6g} "
              f"{r['smallest_normal']:>16.6g} {r['smallest_subnormal']:>19.6g} {r['eps']:>10.6g}")
    d = demonstrations()
    print("\n1 + 2^-8 = 1.00390625 stored in each format: " +
          ", ".join(f"{k} {v:.8g}" for k, v in d["1 + 2^-8"].items()))
    print("a gradient of 1e-8: " + ", ".join(f"{k} {v:.3g}" for k, v in d["gradient 1e-8"].items())
          + "  (fp16 flushes it to 0; bf16 keeps fp32's exponent range)")
    print(f"fp16 overflow: 65504 is the largest fp16; 65520 becomes {d['fp16 65504 -> 65520']}")


def print_compare(results: list[dict]) -> None:
    base = results[0]["final_loss"]
    print(f"\n{'recipe':<6} | {'final loss':>10} {'gap to fp32':>11} | {'peak bytes/param: params':>24} {'grads':>6} "
          f"{'optimizer':>9} {'total':>6} | {'overflows':>9} {'growths':>7} {'skipped':>7} | {'ms/step':>8}")
    for r in results:
        b = r["bytes_per_param"]
        print(f"{r['recipe']:<6} | {r['final_loss']:>10.4f} {r['final_loss'] - base:>+11.4f} | {b['params']:>24.2f} "
              f"{b['grads']:>6.2f} {b['optimizer']:>9.2f} {sum(b.values()):>6.2f} | {r['overflows']:>9} "
              f"{r['growths']:>7} {r['skipped_steps']:>7} | {r['ms_per_step']:>8.1f}")
    print("(final loss = mean of the last 10 steps' losses; peak bytes/param = the most the recipe's tensors held "
          "between operations, counted from them: fp16 = 2 + 4 (fp32 master gradients) + 12 (master, m, v) = 18)")
    for r in (r for r in results if r["fp8_gemm"]):  # the path every Fp8Linear took
        print(f"fp8 ({r['fp8_scaling']} scaling) ran its matmuls with {r['fp8_gemm']}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--formats", action="store_true", help="print the format table and the demonstrations")
    parser.add_argument("--compare", action="store_true", help="train with every recipe, same seed and data")
    parser.add_argument("--recipe", default="bf16", help=f"a single run: {', '.join(RECIPES)}")
    parser.add_argument("--fp8-scaling", choices=["current", "delayed", "block"], default="current",
                        help="fp8 scales: per tensor from its own amax (current) or the amax history (delayed), or "
                             "per 1×128 / 128×128 block (block; emulated)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per recipe")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (at 3e-3 the tiny model leaves a "
                        "plateau at a step that rounding can shift, and the recipes' curves part)")
    parser.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads (divides --d-model)")
    parser.add_argument("--d-model", type=int, default=64, help="model width")
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per training sequence")
    parser.add_argument("--data", help="a text file, a folder, or data_pipeline.py's JSONL (default: Python's stdlib source)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag, whatever the mode, before any work: one line that names the flag and the fix."""
    for flag in ("steps", "batch_size", "n_layer", "n_head", "d_model", "seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr} must be positive (try --lr 1e-3)")
    if args.d_model % args.n_head:
        parser.error(f"--n-head {args.n_head} does not divide --d-model {args.d_model} (try --n-head 4)")
    if args.recipe not in RECIPES:
        parser.error(f"--recipe {args.recipe}: unknown recipe {args.recipe!r}: choose from {', '.join(RECIPES)}")
    on_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    fp8 = args.compare or args.recipe == "fp8"
    if on_cuda and fp8 and args.fp8_scaling != "block" and (args.d_model % 16 or args.batch_size * args.seq_len % 16):
        parser.error(f"--d-model {args.d_model}, --batch-size {args.batch_size}, --seq-len {args.seq_len}: the fp8 "
                     f"recipe's FP8 GEMM needs the width and batch-size × seq-len to be multiples of 16 on CUDA")


def main(argv=None) -> list[dict] | None:
    parser = make_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    if args.formats:
        return print_formats()
    recipes = list(RECIPES) if args.compare else [args.recipe]
    try:
        data = load_text(args.data)
    except ValueError as e:
        parser.error(str(e))
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    rank, n, device = setup_distributed(args.device)
    try:
        for r in recipes:  # it touches the device: after set_device, on every rank, before any work
            check_recipe(r, device, args.fp8_scaling)
        # under torchrun the recipes are shared out: recipe i runs on rank i mod N, the results meet on rank 0
        mine = [train(r, args.steps, cfg, args.batch_size, args.lr, data, device, seed=0,
                      log_every=max(1, args.steps // 4), fp8_scaling=args.fp8_scaling)
                for i, r in enumerate(recipes) if i % n == rank]
        gathered = [None] * n
        dist.all_gather_object(gathered, mine)
        results = sorted((r for part in gathered for r in part), key=lambda r: recipes.index(r["recipe"]))
        if rank == 0:
            print_compare(results)
        return results
    except ValueError as e:  # a recipe this device cannot run, or a text shorter than --seq-len: one line
        parser.error(str(e))
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
