import math

import pytest
import torch
import torch.nn as nn

import muon
from harness import cli_error, readme_command, run_distributed, run_torchrun


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (256, 256)])
def test_newton_schulz_flattens_singular_values_and_keeps_singular_vectors(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    X = muon.newton_schulz5(G).double()
    in_basis = U.T @ X @ Vh.T  # X written in G's singular vectors: diagonal if the vectors are kept
    # The iteration maps each normalised σ through the same odd polynomial, so G's singular vectors are X's:
    # off-diagonal mass is rounding (float32: ~1e-6).
    assert (in_basis - torch.diag(torch.diagonal(in_basis))).abs().max() < 1e-5
    # Its polar factor is exactly UVᵀ (same tolerance).
    Ux, _, Vxh = torch.linalg.svd(X, full_matrices=False)
    assert ((Ux @ Vxh) - U @ Vh).norm() / (U @ Vh).norm() < 1e-5
    # The quintic's band: every σ that is not vanishingly small (σ/‖G‖_F ≥ 3e-3; 5 steps multiply small σ by at
    # most 3.4445⁵ ≈ 490) ends in [0.68, 1.21]. A square Gaussian matrix has a few σ below that; they stay small.
    s = torch.diagonal(in_basis)[(S / G.double().norm()) >= 3e-3]
    assert len(s) >= 0.95 * min(shape) and s.min() > 0.68 and s.max() < 1.21


def test_scale_factors_follow_their_formulas():
    expect = {("none", 3, 5): 1, ("none", 5, 3): 1,
              ("keller", 3, 5): 1, ("keller", 5, 3): math.sqrt(5 / 3),
              ("mup", 3, 5): math.sqrt(3 / 5), ("mup", 5, 3): math.sqrt(5 / 3),
              ("moonlight", 3, 5): 0.2 * math.sqrt(5), ("moonlight", 5, 3): 0.2 * math.sqrt(5)}
    for (scale, d_out, d_in), want in expect.items():
        assert muon.scale_factor(scale, d_out, d_in) == pytest.approx(want), (scale, d_out, d_in)


@pytest.mark.parametrize("scale, adjust", [("keller", "original"), ("moonlight", "match_rms_adamw")])
def test_two_steps_equal_torch_optim_muon(scale, adjust):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(48, 96) * 0.1), nn.Parameter(torch.randn(96, 48) * 0.1)]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    a = muon.Muon(ours, lr=0.02, weight_decay=0.1, scale=scale, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for _ in range(2):  # the second step goes through the momentum buffer
        before = [p.detach().clone() for p in ours]
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        for p, q, p0 in zip(ours, theirs, before):
            # Both run Newton-Schulz in bf16 (8 bits of mantissa). Measured against a float64 Newton-Schulz, either
            # implementation's update is off by about 1.6 % of its norm (rounding compounded over 5 steps), so two
            # correct ones can differ by up to about twice that: 4 %. A wrong scale or momentum is off by far more.
            du, dv = p.detach() - p0, q.detach() - p0
            assert (du - dv).norm() / dv.norm() < 0.04


def _distributed_equals_single():
    torch.manual_seed(0)
    shapes = [(16, 32), (32, 16), (24, 24), (8, 40), (40, 8)]
    ps = [nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    opt, ref_opt = muon.Muon(ps, lr=0.05, distributed=True), muon.Muon(ref, lr=0.05)
    for step in range(3):
        for p, q in zip(ps, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ps, ref):
        # the same arithmetic on another rank; the BLAS may block a matmul differently for differently aligned
        # buffers, so allow float32 rounding (a wrong owner or a missing broadcast would be off by whole updates)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    return opt.ns_calls


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_muon_equals_single_process_and_divides_the_work(world_size):
    calls = run_distributed(_distributed_equals_single, world_size)
    # 5 matrices × 3 steps, matrix i on rank i mod N
    assert calls == [3 * len(range(r, 5, world_size)) for r in range(world_size)]


def test_split_params_gives_matrices_to_muon_and_the_rest_to_adamw():
    model = muon.TinyGPT(muon.GPTConfig(n_layer=2))
    m, a = muon.split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".", 2)[-1] for p in m) == sorted(
        [f"{k}.weight" for k in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc1", "mlp.fc2")] * 2)
    assert {names[id(p)] for p in a} >= {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "blocks.0.mlp.fc1.bias"}


def test_muon_beats_adamw_on_the_default_corpus():
    cfg = muon.GPTConfig(n_layer=2, d_model=64, seq_len=64)
    data = muon.load_text()
    r_muon = muon.train("muon", 60, cfg=cfg, data=data)
    r_adam = muon.train("adamw", 60, cfg=cfg, data=data)
    # each at its learning rate from the benchmark's sweep (muon.BEST_LR); measured gap ≈ 0.3 nats at 60 steps
    assert r_muon["val_loss"] < r_adam["val_loss"] - 0.05


def test_readme_torchrun_line_runs():
    out = run_torchrun(readme_command("muon.py"), "--steps 5").stdout
    assert "validation loss" in out


def test_bad_input(capsys):
    with pytest.raises(ValueError, match="give embeddings' rows, biases and norms to AdamW"):
        muon.Muon([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="not one"):
        muon.Muon([nn.Parameter(torch.zeros(2, 3, 4, 5))])
    assert "--scale big: choose one of none, keller, mup, moonlight" in cli_error(muon.main, ["--scale", "big"], capsys)
    assert "--lr -1.0: the learning rate must be positive" in cli_error(muon.main, ["--lr", "-1"], capsys)
