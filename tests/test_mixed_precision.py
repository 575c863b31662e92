import copy
import re
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import mixed_precision as mp
from harness import cli_error, readme_command, run_script, run_torchrun

# A small model keeps 16-bit math, which has no fast path on a CPU, cheap; it still trains (see the recipes test).
SMALL = mp.GPTConfig(d_model=32, n_layer=1, n_head=2, seq_len=32)
STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads cost more than they save, and on a shared CPU their spin-waits cost
    10 to 30 times the work (20 steps of the small model: 0.4 s on one thread, 9 to 29 s on two, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs():
    """Every recipe trained once, same seed and batches; the tests below read these results."""
    data = mp.load_text(max_bytes=300_000)
    return {r: mp.train(r, STEPS, SMALL, batch_size=8, data=data) for r in mp.RECIPES}


def test_format_table_matches_ieee_and_ocp():
    t = {r["format"]: r for r in mp.format_table()}
    # IEEE 754 binary32/binary16, bfloat16, and the OCP 8-bit floating point specification (E4M3 "fn": no inf)
    expect = {"float32": (32, 8, 23, 3.4028234663852886e38, 2.0 ** -126, 2.0 ** -149, 2.0 ** -23),
              "float16": (16, 5, 10, 65504.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -10),
              "bfloat16": (16, 8, 7, 3.3895313892515355e38, 2.0 ** -126, 2.0 ** -133, 2.0 ** -7),
              "float8_e4m3fn": (8, 4, 3, 448.0, 2.0 ** -6, 2.0 ** -9, 2.0 ** -3),
              "float8_e5m2": (8, 5, 2, 57344.0, 2.0 ** -14, 2.0 ** -16, 2.0 ** -2)}
    for name, (bits, e, m, mx, normal, sub, eps) in expect.items():
        r = t[name]
        assert (r["bits"], r["exponent_bits"], r["mantissa_bits"]) == (bits, e, m), name
        assert (r["max"], r["smallest_normal"], r["smallest_subnormal"], r["eps"]) == (mx, normal, sub, eps), name
    d = mp.demonstrations()
    assert d["1 + 2^-8"]["float16"] == 1 + 2 ** -8 and d["1 + 2^-8"]["bfloat16"] == 1.0
    assert d["gradient 1e-8"]["float16"] == 0 and d["gradient 1e-8"]["bfloat16"] == pytest.approx(1e-8, rel=1e-2)
    assert d["fp16 65504 -> 65520"] == float("inf")


def test_dynamic_loss_scaler_behaves_like_grad_scaler():
    script = [1, 1, 1, float("inf"), 1, 1, 1, 1, float("nan"), 1, 1, 1, 1, 1, 1, 1]  # gradient value per step
    ours_p, theirs_p = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    ours_opt, theirs_opt = torch.optim.SGD([ours_p], lr=0.1), torch.optim.SGD([theirs_p], lr=0.1)
    ours = mp.DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    seq_ours, seq_theirs = [], []
    for g in script:
        before_o, before_t = ours_p.detach().clone(), theirs_p.detach().clone()
        ours_p.grad = torch.full((3,), g * ours.scale_value)  # what backward of a scaled loss would give
        theirs.scale(torch.ones(()))  # GradScaler creates its scale tensor on first use
        theirs_p.grad = torch.full((3,), g * theirs.get_scale())
        ours.step(ours_opt)
        ours.update()
        theirs.step(theirs_opt)
        theirs.update()
        seq_ours.append((ours.scale_value, not torch.equal(before_o, ours_p.detach())))
        seq_theirs.append((theirs.get_scale(), not torch.equal(before_t, theirs_p.detach())))
    assert seq_ours == seq_theirs
    assert [took for _, took in seq_ours].count(False) == 2 and ours.overflows == 2 and ours.growths == 4


def test_loss_scaling_saves_small_gradients_from_fp16_underflow():
    cfg = mp.GPTConfig()
    torch.manual_seed(0)
    model = mp.TinyGPT(cfg)
    x, y = mp.get_batch(mp.load_text(max_bytes=300_000), 16, cfg.seq_len, torch.Generator().manual_seed(0))
    model(x, y).backward()
    nonzero = torch.cat([p.grad.flatten() for p in model.parameters()]) != 0
    flushed = {}
    for scale in (1.0, 2.0 ** 16):
        half = copy.deepcopy(model).half()
        half.zero_grad()
        (half(x, y) * scale).backward()
        g = torch.cat([p.grad.float().flatten() / scale for p in half.parameters()])
        flushed[scale] = ((g == 0) & nonzero).float().sum().item() / nonzero.sum().item()
    # measured: 1.6e-4 of the gradient elements flush to zero without scaling, 8e-6 with a scale of 2^16
    assert flushed[1.0] > 5 * flushed[2.0 ** 16]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fp8_linear_agrees_with_linear_within_fp8_precision():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    for scaling in ("current", "delayed", "block"):
        f8 = mp.Fp8Linear.from_linear(lin, scaling=scaling)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = lin(xa), f8(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        # E4M3 rounds each operand to within half an ulp, 2^-4 relative: a product of two such is within 2·2^-4.
        assert rel(yb, ya) < 2 * 2 ** -4, scaling
        # The gradients multiply an E5M2 tensor (half-ulp 2^-3) with an E4M3 one (2^-4): within 2^-3 + 2^-4.
        assert rel(xb.grad, xa.grad) < 2 ** -3 + 2 ** -4, scaling
        assert rel(f8.weight.grad, lin.weight.grad) < 2 ** -3 + 2 ** -4, scaling
        lin.zero_grad()


class MatmulOperands(TorchFunctionMode):
    """Records the operands of every matrix product run while active (torch._scaled_mm, @, mm, linear, addmm)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("_scaled_mm", "matmul", "__matmul__", "mm", "linear", "addmm"):
            self.calls.append((func.__name__, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def on_the_e4m3_grid(t: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether t·s is an E4M3 value for every (rows × cols) block, with s = 448 / the block's amax: what an
    operand quantised with block (or per-tensor) scales must satisfy. 1e-5 relative leaves room for the fp32
    rounding of the scale and of the dequantising division, far below E4M3's own spacing of 2^-3."""
    R, C = t.shape
    x = t.float().reshape(R // block[0], block[0], C // block[1], block[1])  # (row blocks, br, col blocks, bc)
    v = x * (448 / x.abs().amax(dim=(1, 3), keepdim=True))
    return bool(((v.to(mp.E4M3).float() - v).abs() <= 1e-5 * v.abs() + 1e-30).all())


def test_fp8_linear_quantises_what_reaches_the_matmul():
    """Issue 15 item 7: an Fp8Linear that did a plain fp32 matmul must fail, on the operands and on the error."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256)
    plain = MatmulOperands()
    with plain:
        lin(x)
    _, args, _ = plain.calls[0]  # the fp32 reference: its operands are not on the E4M3 grid, so the check can fail
    assert not on_the_e4m3_grid(args[0], (1, 128)) and not on_the_e4m3_grid(args[1], (128, 128))
    for scaling in ("current", "delayed", "block"):
        f8 = mp.Fp8Linear.from_linear(lin, scaling=scaling)
        with MatmulOperands() as seen:
            y = f8(x)
        assert len(seen.calls) == 1, (scaling, [c[0] for c in seen.calls])
        name, (a, b), kwargs = seen.calls[0]
        if scaling == "block":  # emulated: fp32 operands, each 1×128 tile of x and 128×128 block of w on the grid
            assert name == "matmul" and f8.gemm == mp.EMULATED
            assert on_the_e4m3_grid(a, (1, 128)) and on_the_e4m3_grid(b, (128, 128)), scaling
        else:  # the FP8 GEMM gets E4M3 tensors and the inverse scales; dequantised, they are x and w to E4M3 precision
            assert name == "_scaled_mm" and a.dtype == b.dtype == mp.E4M3, scaling
            assert rel(a.float() * kwargs["scale_a"], x) < 2 ** -4 and rel(b.float() * kwargs["scale_b"], lin.weight.t()) < 2 ** -4
        # A lower bound on the error: E4M3 rounding of both operands leaves about 3.5e-2 (measured); an fp32 matmul
        # leaves ~1e-7 and even bf16 operands ~4e-3, both below 2^-6.
        assert rel(y, lin(x)) > 2 ** -6, scaling


def test_fp8_backward_sends_e5m2_gradients_to_the_gemm(monkeypatch):
    calls, problems = [], []
    real = torch._scaled_mm

    def recording(a, b, **kwargs):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        problems.append(mp.scaled_mm_problem(a, b, (9, 0)))  # what cuBLASLt would say of these operands on a GPU
        return real(a, b, **kwargs)
    monkeypatch.setattr(torch, "_scaled_mm", recording)
    f8 = mp.Fp8Linear(64, 48)
    f8(torch.randn(32, 64, requires_grad=True)).sum().backward()
    # forward x @ w^T; backward gy @ w and gy^T @ x: M = 32 tokens, K = 64, N = 48
    assert calls == [(mp.E4M3, mp.E4M3, (32, 64), (64, 48)), (mp.E5M2, mp.E4M3, (32, 48), (48, 64)),
                     (mp.E5M2, mp.E4M3, (48, 32), (32, 64))]
    assert problems == [None] * 3  # in particular every second operand column-major, as the layout comments say


def test_scaled_mm_failures_are_errors_with_their_reason(monkeypatch):
    q = lambda r, c, fmt=mp.E4M3: torch.zeros(r, c).to(fmt)
    assert mp.scaled_mm_problem(q(32, 64), q(48, 64).t(), (9, 0)) is None
    assert "multiples of 16" in mp.scaled_mm_problem(q(32, 60), q(48, 60).t())
    assert "multiples of 16" in mp.scaled_mm_problem(q(32, 64), q(40, 64).t())
    assert "not both E5M2" in mp.scaled_mm_problem(q(32, 64, mp.E5M2), q(48, 64, mp.E5M2).t())
    assert "column-major" in mp.scaled_mm_problem(q(32, 64), q(64, 48))
    assert "8.9" in mp.scaled_mm_problem(q(32, 64), q(48, 64).t(), (8, 0))

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(torch, "_scaled_mm", broken)
    with pytest.raises(RuntimeError, match="no kernel"):  # never a quiet fallback to another path
        mp.fp8_matmul(q(32, 64), q(48, 64).t(), torch.tensor(1.0), torch.tensor(1.0))


def test_fp8_layers_are_built_on_the_model_device():
    with torch.device("meta"):  # a device other than the CPU, with no memory behind it
        model = mp.TinyGPT(SMALL)
    mp.convert_to_fp8(model)
    layers = [m for m in model.modules() if isinstance(m, mp.Fp8Linear)]
    assert len(layers) == 6 * SMALL.n_layer
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_recipes_end_close_to_fp32(runs):
    fp32 = runs["fp32"]
    assert fp32["losses"][0] - fp32["final_loss"] > 0.1  # it trains: the comparison is not between untrained models
    # lr 1e-3, same seed and batches: the recipes follow fp32 to ~1e-3 (measured); 1e-2 is ten times that
    for r in ("bf16", "fp16", "fp8"):
        assert abs(runs[r]["final_loss"] - fp32["final_loss"]) < 1e-2, (r, runs[r]["final_loss"], fp32["final_loss"])
    assert runs["fp8"]["fp8_gemm"] == f"{mp.SCALED_MM} on cpu"  # the path that ran, as printed


def test_fp16_peak_bytes_are_counted_from_the_tensors(runs):
    """Issue 15 item 2: the fp16 recipe's fp32 master gradients are counted, and the fp16 ones are freed."""
    torch.manual_seed(0)
    model = mp.TinyGPT(SMALL).half()
    opt = mp.MasterWeights(model, lr=1e-3)
    x, y = mp.get_batch(mp.load_text(max_bytes=10_000), 4, SMALL.seq_len, torch.Generator().manual_seed(0))
    model(x, y).backward()
    opt.copy_grads()
    assert all(p.grad is None for p in opt.params)  # freed: keeping them would make the peak 20 bytes
    assert all(m.grad.dtype == torch.float32 and m.grad.shape == m.shape for m in opt.master)
    opt.step()
    params = list(model.parameters())
    n, tensors = sum(p.numel() for p in params), len(params)
    # at the peak, after copy_grads: fp16 weights (2), fp32 master gradients (4), fp32 master weights, m and v
    # (4 + 4 + 4), and AdamW's step counters, one fp32 scalar per tensor
    expect = {"params": 2.0, "grads": 4.0, "optimizer": 12.0 + 4 * tensors / n}
    assert runs["fp16"]["bytes_per_param"] == pytest.approx(expect, rel=1e-9)
    for r in ("fp32", "bf16", "fp8"):  # fp32 weights, gradients, m and v
        assert runs[r]["bytes_per_param"] == pytest.approx({"params": 4.0, "grads": 4.0, "optimizer": 8.0 + 4 * tensors / n})


def test_readme_torchrun_line_compares_recipes():
    out = run_torchrun(readme_command("mixed_precision.py"), "--steps 3 --batch-size 4").stdout
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"^(fp32|bf16|fp16|fp8)\s+\|", line)}
    assert set(rows) == set(mp.RECIPES), out
    assert re.search(r"\|\s+2\.00\s+4\.00\s+12\.00\s+18\.00\s+\|", rows["fp16"]), rows["fp16"]  # counted, not typed
    assert "fp8 (current scaling) ran its matmuls with torch._scaled_mm on cpu" in out


def test_the_process_group_is_freed_when_main_returns():
    """The README line's rare SIGABRT at exit: torch.optim's first use imports torch.distributed.nn, which binds the
    live process group into default arguments; destroy_process_group could not free it, and a gloo thread that
    outlived main() died taking the GIL during interpreter shutdown. A fresh interpreter, as this one has long
    imported everything; a world of one is enough to see whether the group survives main()."""
    code = textwrap.dedent("""
        import gc, weakref
        import torch.distributed as dist
        import mixed_precision as mp
        groups, init = [], dist.init_process_group
        def recording_init(*args, **kwargs):
            init(*args, **kwargs)
            groups.append(weakref.ref(dist.group.WORLD))
        dist.init_process_group = recording_init
        mp.main("--recipe fp32 --steps 1 --batch-size 2 --d-model 16 --n-head 2 --n-layer 1 --seq-len 8".split())
        gc.collect()
        print("group", "freed" if groups[0]() is None else "alive")
    """)
    assert run_script(["-c", code]).stdout.strip().endswith("group freed")


def test_bad_input(capsys):
    assert "unknown recipe 'fp4'" in cli_error(mp.main, ["--recipe", "fp4"], capsys)
    assert "--n-head 3 does not divide --d-model 64" in cli_error(mp.main, ["--n-head", "3"], capsys)
    # refused before any work, even on a machine without CUDA: the FP8 GEMM's shape rule, named with the flags
    err = cli_error(mp.main, "--device cuda --recipe fp8 --d-model 40 --n-head 4".split(), capsys)
    assert "--d-model 40" in err and "multiples of 16" in err
