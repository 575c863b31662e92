import copy
import re

import pytest
import torch
import torch.nn as nn

import mixed_precision as mp
from harness import cli_error, readme_command, run_torchrun


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
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()
        # E4M3 rounds each operand to within half an ulp, 2^-4 relative: a product of two such is within 2·2^-4.
        assert rel(yb, ya) < 2 * 2 ** -4, scaling
        # The gradients multiply an E5M2 tensor (half-ulp 2^-3) with an E4M3 one (2^-4): within 2^-3 + 2^-4.
        assert rel(xb.grad, xa.grad) < 2 ** -3 + 2 ** -4, scaling
        assert rel(f8.weight.grad, lin.weight.grad) < 2 ** -3 + 2 ** -4, scaling
        lin.zero_grad()


def test_delayed_scaling_uses_the_history_not_the_current_amax():
    for algo, used in (("max", 4.0), ("most_recent", 3.0)):
        t = mp.ScaleTracker(mp.E4M3, "delayed", history_len=3, algo=algo)
        for amax in (1.0, 4.0, 2.0, 3.0):  # the history keeps the last 3: 4, 2, 3
            t.scale(torch.tensor([amax]))
        assert t.scale(torch.tensor([100.0])).item() == pytest.approx(448 / used)
    assert mp.ScaleTracker(mp.E4M3, "current").scale(torch.tensor([100.0])).item() == pytest.approx(4.48)


def test_block_scaling_beats_per_tensor_scaling_on_an_outlier():
    torch.manual_seed(0)
    x = torch.randn(4, 512) * 1e-3
    x[0, 0] = 1e3  # one outlier: a per-tensor scale of 448/1000 sends every other value into the subnormals
    per_tensor = mp.quantize(x, mp.E4M3, torch.tensor(448 / 1e3)).float() / (448 / 1e3)
    block = mp.block_quantize(x, mp.E4M3, (1, 128))
    small = x.abs() < 1
    err = lambda d, where: ((d - x)[where].norm() / x[where].norm()).item()
    assert err(per_tensor, small) > 0.9  # nearly everything flushed to zero
    assert err(block, small) < err(per_tensor, small) / 3  # only the outlier's own 1×128 tile suffers
    others = small.clone()
    others[0, :128] = False
    assert err(block, others) < 2 ** -4  # elsewhere: E4M3's own precision


def test_recipes_end_close_to_fp32_on_the_default_corpus():
    data = mp.load_text()
    losses = {r: mp.train(r, 20, batch_size=8, data=data)["final_loss"] for r in mp.RECIPES}
    # lr 1e-3, same seed and batches: the recipes follow fp32 to ~1e-3 (measured); 0.05 leaves room for rounding
    for r in ("bf16", "fp16", "fp8"):
        assert abs(losses[r] - losses["fp32"]) < 0.05, (r, losses)


def test_readme_torchrun_line_compares_recipes():
    out = run_torchrun(readme_command("mixed_precision.py"), "--steps 3 --batch-size 4").stdout
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"^(fp32|bf16|fp16|fp8)\s+\|", line)}
    assert set(rows) == set(mp.RECIPES), out
    fp16_row = rows["fp16"]
    assert "2.00   2.00     12.00  16.00" in fp16_row  # the 2 + 2 + 12 bytes per parameter, counted


def test_bad_input(capsys):
    assert "unknown recipe 'fp4'" in cli_error(mp.main, ["--recipe", "fp4"], capsys)
