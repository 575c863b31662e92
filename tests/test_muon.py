import math
import re

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


def test_adamw_equals_torch_optim_adamw_bit_for_bit_and_keeps_8_bytes_per_parameter():
    torch.manual_seed(0)
    for foreach in (False, True):  # torch's per-tensor loop and its fused-list path: both agree with ours
        ours = [nn.Parameter(torch.randn(48, 96)), nn.Parameter(torch.randn(96)), nn.Parameter(torch.randn(7, 5))]
        theirs = [nn.Parameter(p.detach().clone()) for p in ours]
        a = muon.AdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        b = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=foreach)
        for _ in range(10):  # past the first steps, where the bias corrections matter most
            for p, q in zip(ours, theirs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            a.step()
            b.step()
            # Same operations in the same order in float32: equal to the last bit.
            assert all(torch.equal(p, q) for p, q in zip(ours, theirs)), foreach
    # m and v in float32: 8 bytes per parameter (the fp32 master copy of mixed precision makes zero.py's 12)
    state_bytes = sum(t.nbytes for s in a.state.values() for t in s.values() if torch.is_tensor(t))
    assert state_bytes == 2 * 4 * sum(p.numel() for p in ours)


@pytest.mark.parametrize("scale, adjust", [("keller", "original"), ("moonlight", "match_rms_adamw")])
def test_three_steps_equal_torch_optim_muon_bit_for_bit(scale, adjust):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(48, 96) * 0.1), nn.Parameter(torch.randn(96, 48) * 0.1)]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    a = muon.Muon(ours, lr=0.02, weight_decay=0.1, scale=scale, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for _ in range(3):  # the later steps go through the momentum buffer
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
        # The same bf16 Newton-Schulz (addmm-fused), momentum lerp and scale: equal to the last bit; a 0.5 %
        # learning-rate error or a momentum off by one ulp would not be.
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


# Equal-sized groups: numel 512 (four matrices, two shapes), 576 (two), 320 (one): rounds of N, with padding.
SHAPES = [(16, 32), (32, 16), (24, 24), (16, 32), (8, 40), (24, 24), (16, 32)]
GROUP_SIZES = {512: 4, 576: 2, 320: 1}
TINY = dict(n_layer=1, n_head=2, d_model=32, seq_len=16)


def _distributed_equals_single():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(*s)) for s in SHAPES]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    opt, ref_opt = muon.Muon(ps, lr=0.05, distributed=True), muon.Muon(ref, lr=0.05)
    with muon.CommCounter() as counter:
        for step in range(3):
            for p, q in zip(ps, ref):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            opt.step()
            ref_opt.step()
    # The same arithmetic on the same numbers, whichever rank did it: equal to the last bit (a wrong owner, a
    # missing gather or a row put in the wrong place would be off by whole updates).
    equal = all(torch.equal(p, q) for p, q in zip(ps, ref))
    losses = muon.train("adamw", 3, cfg=muon.GPTConfig(**TINY), batch_size=6, data=muon.load_text(max_bytes=100_000))
    return opt.ns_calls, counter.totals(), equal, losses["losses"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_muon_equals_single_process_and_divides_the_work(world_size):
    results = run_distributed(_distributed_equals_single, world_size)
    assert all(equal for _, _, equal, _ in results)
    # in each group of k matrices, rank r takes the r-th, (r+N)-th, ...; 3 steps
    assert [calls for calls, _, _, _ in results] == [
        3 * sum(len(range(r, k, world_size)) for k in GROUP_SIZES.values()) for r in range(world_size)]
    # per step, ⌈k/N⌉ all-gathers per group, each sending one float32 matrix of the group's size
    rounds = {numel: -(-k // world_size) for numel, k in GROUP_SIZES.items()}
    want = (3 * sum(rounds.values()), 3 * sum(r * numel * 4 for numel, r in rounds.items()))
    assert all(totals == {"all_gather": want} for _, totals, _, _ in results)
    # The logged loss is the whole batch's (the mean over the ranks' slices), the same on every rank, and equals
    # a single process's on the whole batch; float32 sums in another order: 1e-5. A rank's own loss (2 or 3
    # sequences) is not the batch's: it differs from the mean far beyond rounding.
    single = muon.train("adamw", 3, cfg=muon.GPTConfig(**TINY), batch_size=6, data=muon.load_text(max_bytes=100_000))
    for _, _, _, losses in results:
        assert losses == results[0][3]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single["losses"]), rtol=1e-5, atol=0)


def test_lr_transfer_prints_the_best_rate_per_width_from_its_own_runs(capsys):
    tiny = ["--n-layer", "1", "--n-head", "2", "--seq-len", "16", "--batch-size", "4", "--data", muon.os.__file__]
    t = muon.main(["--lr-transfer", "--widths", "16,32", "--steps", "2"] + tiny)
    out = capsys.readouterr().out
    # one cell recomputed by a plain training run at that width, scale and rate (a sweep that ignored the width,
    # the scale or the rate would not match it)
    cfg = muon.GPTConfig(n_layer=1, n_head=2, seq_len=16, d_model=32)
    lr = muon.LR_GRID["moonlight"][1]
    cell = muon.train("muon", 2, lr, "moonlight", cfg, batch_size=4, data=muon.load_text(muon.os.__file__))
    assert t["val_loss"][("moonlight", 32)][1] == cell["val_loss"]
    assert len(set(map(tuple, t["val_loss"].values()))) == 4  # four different sweeps
    for scale in ("none", "moonlight"):
        for d in (16, 32):  # the best is the argmin of the measured losses
            losses = t["val_loss"][(scale, d)]
            assert t["best"][(scale, d)] == muon.LR_GRID[scale][losses.index(min(losses))]
        best = ", ".join(f"d = {d}: {t['best'][(scale, d)]:g}" for d in (16, 32))
        assert f"best lr per width: {best}" in out


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


def test_readme_torchrun_line_runs_and_counts_the_all_gathers():
    out = run_torchrun(readme_command("muon.py"), "--steps 5").stdout
    assert "validation loss" in out
    # the all-gathers counted from outside (CommCounter) equal the formula Σ⌈k/N⌉·numel·bytes
    counted = re.search(r"counted: (\S+) calls, (\S+) KiB .* formula .*: (\S+) calls, (\S+) KiB", out)
    assert counted and counted[1] == counted[3] and counted[2] == counted[4], out


def test_bad_input(capsys):
    with pytest.raises(ValueError, match="give embeddings' rows, biases and norms to AdamW"):
        muon.Muon([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="not one"):
        muon.Muon([nn.Parameter(torch.zeros(2, 3, 4, 5))])
    assert "--scale big: choose one of none, keller, mup, moonlight" in cli_error(muon.main, ["--scale", "big"], capsys)
    assert "--lr -1.0: the learning rate must be positive" in cli_error(muon.main, ["--lr", "-1"], capsys)
    assert "--widths: 250 is not a positive multiple of --n-head 4 (try 248)" in cli_error(
        muon.main, ["--lr-transfer", "--widths", "64,250"], capsys)
    assert "--widths 64,x: give comma-separated integers" in cli_error(muon.main, ["--widths", "64,x"], capsys)
