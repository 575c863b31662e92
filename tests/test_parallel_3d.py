import re

import pytest
import torch
import torch.distributed as dist

import parallel_3d as p3d
from harness import cli_error, readme_command, run_distributed, run_torchrun


@pytest.mark.parametrize("shape", [(8, 2, 2, 2), (16, 1, 2, 8), (12, 3, 2, 2), (4, 4, 1, 1), (6, 1, 3, 2)])
def test_mesh_coordinates_groups(shape):
    world, dp, pp, tp = shape
    m = p3d.mesh_coordinates(world, dp, pp, tp)
    for kind, size, n_groups in (("tp", tp, dp * pp), ("pp", pp, dp * tp), ("dp", dp, pp * tp)):
        groups = m[f"{kind}_groups"]
        assert len(groups) == n_groups and all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))  # every rank in exactly one group
    for g in m["tp_groups"]:
        assert g == list(range(g[0], g[0] + tp))  # TP groups are consecutive ranks: one node
    for r, (d, p, t) in enumerate(m["coords"]):
        assert r == (d * pp + p) * tp + t


def _three_d_equals_single_process():
    cfg = p3d.GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, tie_weights=False)
    data = p3d.load_text(max_bytes=100_000)
    out = p3d.train(2, 2, 2, steps=3, cfg=cfg, batch_size=4, n_microbatches=2, data=data)
    torch.manual_seed(0)
    ref = p3d.TinyGPT(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        x, y = p3d.get_batch(data, 8, cfg.seq_len, gen)
        loss = ref(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # the same sums in other orders (micro-batches, TP partial sums, DP averages): float32, 1e-5 relative
    assert out["losses"] == pytest.approx(losses, rel=1e-5)
    assert out["losses"][0] == pytest.approx(out["reference_step0_loss"], rel=1e-6)
    want = dict(ref.named_parameters())
    for name, q in out["params"].items():
        # Adam normalises updates to about lr: near-zero gradient elements may differ by a fraction of lr
        torch.testing.assert_close(q, want[name].detach(), rtol=1e-4, atol=3e-4, msg=name)
    return out["params_held"], out["traffic"]["tp_collectives"]


def test_dp2_pp2_tp2_on_8_processes_equals_single_process_training():
    results = run_distributed(_three_d_equals_single_process, 8, timeout=240)
    held = [h for h, _ in results]
    assert held[0] == held[1] and held[0] != held[2]  # TP peers hold the same share; the stages differ
    assert all(c == 8 for _, c in results)  # 1 layer × 2 row-parallel layers × 2 micro-batches, fwd + bwd


def test_planner_reproduces_the_known_configurations():
    gpt3 = p3d.plan(175e9, 1024, 8, 80)["choice"]
    assert (gpt3["tp"], gpt3["pp"], gpt3["dp"]) == (8, 8, 16)
    llama = p3d.plan(70e9, 64, 8, 80, layers=80)["choice"]
    assert (llama["tp"], llama["pp"], llama["dp"]) == (8, 2, 4)
    assert p3d.plan(1e9, 8, 8, 80)["choice"]["strategy"] == "DDP"  # 16 GB of states fit on one GPU
    assert p3d.plan(7e9, 8, 8, 80)["choice"]["strategy"] == "FSDP / ZeRO-3"
    for params, gpus in ((7e9, 8), (70e9, 64), (175e9, 1024), (30e9, 32)):
        r = p3d.plan(params, gpus, 8, 80)
        c = r["choice"]
        assert c["tp"] * c["pp"] * c["dp"] == gpus and c["tp"] <= 8
        assert c["gb"] <= 80, (params, gpus, c)  # whatever the strategy, its memory per GPU fits
    with pytest.raises(ValueError, match="do not fit"):
        p3d.plan(1e12, 8, 8, 80)


@pytest.mark.parametrize("args, message", [
    (["--dp", "2", "--pp", "2", "--tp", "1"], "= 4, but the world size is 8"),
    (["--dp", "1", "--pp", "1", "--tp", "8", "--n-head", "4"], "must be divisible by --tp 8"),
    (["--dp", "1", "--pp", "8", "--tp", "1"], "--pp 8 stages but only --n-layer 2")])
def test_bad_input_fails_before_any_communication(args, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert message in cli_error(p3d.main, args, capsys)
    assert not dist.is_initialized()


def test_readme_torchrun_line_runs_and_matches_step_0():
    out = run_torchrun(readme_command("parallel_3d.py"), "--steps 1", timeout=240).stdout
    ours, ref = (float(v) for v in re.findall(r"step-0 loss ([\d.]+) \| single-process model, same seed: ([\d.]+)", out)[0])
    assert ours == pytest.approx(ref, rel=1e-6)
    assert len(re.findall(r"^\s+\d \|\s+\(\d, \d, \d\)", out, re.M)) == 8  # a row per rank
