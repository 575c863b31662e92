"""The GPU tier: every script's README launch line on real GPUs over NCCL, checked as the CPU tests check it.

Run on a GPU node with `python -m pytest -q -m gpu`. It uses G = min(4, GPUs) processes, one per GPU; degrees that
must multiply to the process count (parallel_3d's --dp/--pp/--tp) are chosen for G. Where a launch line's output
says too little (pipeline and expert parallelism equal to one process), the CPU tests' own bodies run on the GPUs
through run_distributed(..., backend="nccl"), with the script's model and batches made on each rank's GPU.
Without CUDA every test here is skipped, at no cost, with its reason.
"""
import functools
import importlib
import re

import pytest
import torch

from harness import readme_command, run_distributed, run_torchrun

GPUS = min(4, torch.cuda.device_count()) if torch.cuda.is_available() else 0
SHOWN = GPUS or 4  # the layouts below are named for a 4-GPU node where there is no GPU (they are skipped then)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU here: the GPU tier runs on a GPU node "
                                                   "(python -m pytest -q -m gpu)")]
needs_two = pytest.mark.skipif(GPUS == 1, reason="NCCL between ranks needs at least 2 GPUs")
LAUNCH_TIMEOUT = 300  # seconds: a first launch on a node also initialises CUDA and NCCL on every GPU


def launch(script: str, extra: str = "", nproc: int | None = None) -> str:
    """The README's torchrun line for `script` on `nproc` (default G) GPUs with --device cuda; its stdout."""
    line = readme_command(script)
    line, replaced = re.subn(r"--nproc_per_node[= ](\d+)", f"--nproc_per_node={nproc or GPUS}", line)
    assert replaced == 1, line
    return run_torchrun(line, f"--device cuda {extra}", timeout=LAUNCH_TIMEOUT).stdout


def _made_on(make, device: torch.device):
    """`make` whose result (a module, a tensor or a tuple of tensors) is moved to `device`."""
    @functools.wraps(make)
    def made(*args, **kwargs):
        out = make(*args, **kwargs)
        return tuple(t.to(device) for t in out) if isinstance(out, tuple) else out.to(device)
    return made


def _on_gpu(script: str, makers: tuple, trainers: tuple, body, *args):
    """On one rank of run_distributed(backend="nccl"): the script's model builders and batch makers (`makers`) give
    results on this rank's GPU, its `trainers` default to device=that GPU; then the CPU test's `body` runs unchanged."""
    mod, device = importlib.import_module(script), torch.device("cuda", torch.cuda.current_device())
    # float32 attention by the math kernel: the fused kernels' backward may add in a varying order, and the CPU
    # tests compare some gradients bit for bit (the same calls in the same order must give the same bits)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    for name in makers:
        setattr(mod, name, _made_on(getattr(mod, name), device))
    for name in trainers:
        setattr(mod, name, functools.partial(getattr(mod, name), device=device))
    return body(*args)


# --- collectives.py: ring = built-in -----------------------------------------------------------------------------

@needs_two
def test_ring_collectives_equal_nccl_builtins_and_bytes_equal_formula():
    out = launch("collectives.py", "--repeats 3")  # the default 4 MiB: chunks beyond NCCL's small-message buffers
    assert "(nccl)" in out, out
    rows = re.findall(r"^(ring_\w+|naive_all_reduce)\s+(\d)\s+([\d,]+)\s+([\d,]+)\s.*ms\s+(\S+)$", out, re.M)
    assert len(rows) == 3 + GPUS, out  # three ring rows (rank 0), the naive row of every rank
    # randn values: |x| < 8 on every rank (P(|z| > 8) ~ 1e-15 per element). The ring and NCCL add the same N
    # numbers in different orders: at most N·eps·N·max|x| apart (tests/test_collectives.py's bound).
    bound = GPUS * GPUS * torch.finfo(torch.float32).eps * 8
    for name, rank, measured, formula, error in rows:
        assert measured == formula, (name, rank)
        assert float(error) <= bound, (name, rank, error)


# --- zero.py: every stage = single-process AdamW -------------------------------------------------------------------

@needs_two
def test_zero_every_stage_equals_single_process_adamw():
    out = launch("zero.py", "--stage 0,1,2,3 --steps 3 --check")
    diffs = re.findall(r"^stage (\d): largest \|parameter difference\| from single-process torch\.optim\.AdamW "
                       r"after 3 steps: (\S+)", out, re.M)
    assert [s for s, _ in diffs] == ["0", "1", "2", "3"], out
    # the CPU test's bound: float32 sums reordered by the collectives, then 3 Adam steps (each about lr = 3e-3)
    assert all(float(d) < 1e-4 for _, d in diffs), diffs


# --- tensor_parallel.py: TP = dense ---------------------------------------------------------------------------------

@needs_two
def test_tensor_parallel_equals_dense_model():
    n = 4 if GPUS >= 4 else 2  # the default --n-head 4 must divide over the ranks
    out = launch("tensor_parallel.py", "--steps 3", nproc=n)
    diff = float(out.split("difference ")[1].split()[0])
    # float32 without TF32 (PyTorch's default for CUDA matmuls): the sharded matmuls only reorder the sums
    assert diff < 1e-5, out
    # 2 + 2 all-reduces per layer, each of B·T·d·4 = 8·64·64·4 bytes (the README line's default sizes)
    assert re.search(r"all_reduce +forward +2 \| 2 calls, +131,072 \| +131,072 bytes each", out), out
    assert re.search(r"all_reduce +backward +2 \| 2 calls, +131,072 \| +131,072 bytes each", out), out
    assert f"= 1/{n}.00 (formula 1/N = 1/{n})" in out, out


# --- pipeline_parallel.py: pipeline = single process ------------------------------------------------------------------

@needs_two
def test_pipeline_launch_reports_bubble_memory_and_bytes():
    out = launch("pipeline_parallel.py", "--steps 3")
    p, m = GPUS, 8
    assert f"(p-1)/(m+p-1) = {(p - 1) / (m + p - 1):.3f}" in out, out
    for r in range(p):
        row = next(line for line in out.splitlines() if line.startswith(f"   {r} |"))
        cells = row.split("|")
        assert cells[2].split() == [str(p - r)] * 2, row  # peak live micro-batches = p - rank (1F1B)
        measured, formula_kib = map(float, cells[3].split())
        assert measured == formula_kib > 0, row


def _pipelines_on_gpus() -> list[int]:
    """tests/test_pipeline_parallel.py's bodies for p = 2 .. G: gradients of every schedule, and training, equal to
    TinyGPT in one process (here on the same GPU)."""
    import torch.distributed as dist
    import pipeline_parallel as pp
    from test_pipeline_parallel import _grads_equal_single_process, _training_equals_single_process
    cfg = pp.GPTConfig(n_layer=4, d_model=32, n_head=4, seq_len=16)
    data, done = pp.load_text(max_bytes=100_000), []
    for p in range(2, dist.get_world_size() + 1):
        group = dist.new_group(list(range(p)))  # every rank joins the call; the first p are the pipeline
        if dist.get_rank() < p:
            _grads_equal_single_process(cfg, data, group)
            for kind in pp.SCHEDULES:
                _training_equals_single_process(cfg, data, group, kind)
            done.append(p)
    return done


@needs_two
def test_every_pipeline_schedule_over_nccl_equals_single_process():
    results = run_distributed(_on_gpu, GPUS, "pipeline_parallel", ("TinyGPT", "get_batch"), ("train",),
                              _pipelines_on_gpus, backend="nccl", timeout=LAUNCH_TIMEOUT)
    assert results == [list(range(max(2, r + 1), GPUS + 1)) for r in range(GPUS)]


# --- parallel_3d.py: DP × PP × TP = single process ----------------------------------------------------------------

LAYOUTS = {4: [(1, 2, 2), (2, 2, 1)], 3: [(3, 1, 1)], 2: [(1, 2, 1), (1, 1, 2)], 1: [(1, 1, 1)]}  # (dp, pp, tp)


@pytest.mark.parametrize("dp, pp, tp", LAYOUTS[SHOWN])
def test_parallel_3d_step0_loss_equals_single_process(dp, pp, tp):
    out = launch("parallel_3d.py", f"--dp {dp} --pp {pp} --tp {tp} --steps 2", nproc=dp * pp * tp)
    ours, ref = (float(v) for v in re.findall(r"step-0 loss ([\d.]+) \| single-process model, same seed: ([\d.]+)",
                                              out)[0])
    # the CPU test asks 1e-6; on a GPU the sharded and whole matmuls may take different cuBLAS kernels (fp32, no
    # TF32), whose sums differ by a few ulp per layer: 1e-5 relative still catches a missing or doubled term
    assert ours == pytest.approx(ref, rel=1e-5), out
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if re.match(r"\s+\d \|\s+\(", line)]
    assert len(rows) == dp * pp * tp and all(r[5].split("/")[0].strip() == r[7] for r in rows), out  # TP = 6·L·m


# --- expert_parallel.py: MoE over all-to-all = single process --------------------------------------------------------

def _experts_on_gpus() -> bool:
    """tests/test_expert_parallel.py's comparison: expert parallelism over all G ranks (2 experts each), and, on 4,
    EP 2 × DP 2; forward, gradients and 3 AdamW steps equal to the single-process MoE (here on the same GPU)."""
    import torch.distributed as dist
    from test_expert_parallel import _compare_with_single_process
    world = dist.get_world_size()
    figures = _compare_with_single_process(world, 2 * world, "softmax")
    # two all-to-alls per layer each way (dispatch and combine), as the CPU test counts them
    assert figures["forward"]["all_to_all_single"][0] == 4 and figures["backward"]["all_to_all_single"][0] == 4
    if world == 4:
        _compare_with_single_process(2, 4, "sigmoid")
    return True


@needs_two
def test_expert_parallel_over_nccl_equals_single_process():
    assert run_distributed(_on_gpu, GPUS, "expert_parallel", ("moe_gpt", "get_batch"), (), _experts_on_gpus,
                           backend="nccl", timeout=LAUNCH_TIMEOUT) == [True] * GPUS


@needs_two
def test_expert_parallel_launch_counts_all_to_alls():
    n = GPUS if 8 % GPUS == 0 else 2  # the default 8 experts must divide over the ranks
    out = launch("expert_parallel.py", "--steps 3 --batch-size 2 --compare", nproc=n)
    assert "4 forward + 4 backward | 2 per layer each way = 4 + 4" in out, out
    assert "dense with the same active parameters" in out, out


# --- fsdp_train.py: the loss falls ----------------------------------------------------------------------------------

def test_fsdp_loss_falls_on_gpus():
    out = launch("fsdp_train.py", "--steps 30 --eval-every 0 --sample-len 20 --log-every 1")
    losses = [float(x) for x in re.findall(r"^step \d+/30 \| loss ([\d.]+)", out, re.M)]
    assert len(losses) == 30, out
    # the CPU test's bar: from ln 256 = 5.55 down by 2 nats in 30 steps (it measured 5.48 -> 2.99 on 2 ranks;
    # G ranks see G times the tokens per step, so this is no harder here)
    assert losses[-1] < losses[0] - 2.0, losses
    assert "sample after training" in out


# --- muon.py: the all-gathers counted = the formula -------------------------------------------------------------------

def test_muon_all_gathers_equal_formula_on_gpus():
    batch = 16 if 16 % GPUS == 0 else 4 * GPUS  # the batch splits over the ranks
    out = launch("muon.py", f"--steps 5 --batch-size {batch}")
    assert "validation loss" in out, out
    counted = re.search(r"counted: (\S+) calls, (\S+) KiB .* formula .*: (\S+) calls, (\S+) KiB", out)
    if GPUS == 1:  # one process orthogonalises every matrix itself: nothing to gather, and the line is not printed
        assert counted is None, out
        return
    assert counted and counted[1] == counted[3] and counted[2] == counted[4], out


# --- mixed_precision.py: the FP8 GEMM is the path taken -------------------------------------------------------------

FP8_GPU = GPUS > 0 and torch.cuda.get_device_capability(0) >= (8, 9)
needs_fp8 = pytest.mark.skipif(GPUS > 0 and not FP8_GPU,
                               reason="FP8 GEMMs (torch._scaled_mm) need compute capability 8.9+")


@needs_fp8
def test_mixed_precision_recipes_run_and_fp8_takes_the_fp8_gemm():
    import mixed_precision as mp
    out = launch("mixed_precision.py", "--steps 3 --batch-size 4")
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"^(fp32|bf16|fp16|fp8)\s+\|", line)}
    assert set(rows) == set(mp.RECIPES), out
    assert re.search(r"\|\s+2\.00\s+4\.00\s+12\.00\s+18\.00\s+\|", rows["fp16"]), rows["fp16"]  # counted, not typed
    assert re.search(r"fp8 \(current scaling\) ran its matmuls with torch\._scaled_mm on cuda", out), out


@needs_fp8
def test_fp8_gemm_equals_its_emulation_and_refuses_bad_shapes():
    import mixed_precision as mp
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(s, device="cuda", generator=g) for s in ((64, 256), (128, 256)))
    sa, sb = (torch.finfo(mp.E4M3).max / t.abs().max() for t in (a, b))
    aq, bq = mp.quantize(a, mp.E4M3, sa), mp.quantize(b, mp.E4M3, sb)
    gemm = mp.fp8_matmul(aq, bq.t(), sa, sb)  # (64, 256) @ (256, 128): the FP8 GEMM
    emulated = mp.fp8_matmul(aq, bq.t(), sa, sb, emulate=True)  # the same FP8 numbers, multiplied in fp32
    # the same products of the same FP8 values; only the GEMM's accumulation differs (Hopper's FP8 tensor cores
    # keep fewer than fp32's bits while they add: about 2^-14 relative per partial sum, so 1e-3 over K = 256)
    assert ((gemm - emulated).norm() / emulated.norm()).item() < 1e-3
    with pytest.raises(ValueError, match="multiples of 16"):
        mp.fp8_matmul(aq[:, :24], bq[:, :24].t(), sa, sb)  # K = 24: the GEMM's shape rule, said, not emulated
