"""expert_parallel.py against independent references: a per-token loop for the MoE layer, the Switch loss worked
out by hand, and the single-process MoE model for expert parallelism (forward, gradients, three AdamW steps) on 2, 3
and 4 gloo ranks and on EP 2 × DP 2."""
import copy

import pytest
import torch
import torch.distributed as dist

import expert_parallel as ep
from harness import cli_error, readme_command, run_distributed, run_torchrun

# Expert parallelism does the single-process arithmetic on other ranks: a row's matmul is the same, only the order in
# which gradient contributions are summed changes (per-rank partial sums, then the all-reduce). float32 sums of a few
# hundred terms agree to ~1e-6 relative; 1e-5 leaves room, with an absolute floor for gradients near zero.
TOL = dict(rtol=1e-5, atol=1e-6)
# After AdamW steps: Adam divides each gradient by its running RMS, so where a gradient is near zero its rounding
# noise becomes an update of up to lr (1e-3 here). 1e-5 absolute is 1 % of one step; a real error (a gradient left out
# or summed over the wrong ranks) moves parameters by about lr. (A missing 1/N, which Adam's scale invariance hides
# here, is caught by the step-0 gradient check.)
STEP_TOL = dict(rtol=1e-5, atol=1e-5)


def test_within_capacity_is_first_come_first_served():
    torch.manual_seed(0)
    experts = torch.randint(0, 4, (50, 2))
    kept = ep.within_capacity(experts, 4, capacity=11)
    used, want = [0] * 4, torch.zeros_like(kept)
    for t in range(50):  # token order, then slot order: the flattened (T·k) order
        for s in range(2):
            e = experts[t, s].item()
            want[t, s] = used[e] < 11
            used[e] += 1
    assert torch.equal(kept, want) and (~kept).sum() > 0  # the case drops something


def test_load_balancing_loss_by_hand():
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(8).remainder(4).view(8, 1)
    assert ep.load_balancing_loss(uniform, balanced, 4).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    everything_to_0 = torch.zeros(2, 1, dtype=torch.long)  # f = (1, 0), P = (0.85, 0.15): 2 · 0.85
    assert ep.load_balancing_loss(probs, everything_to_0, 2).item() == pytest.approx(1.7)
    both = torch.tensor([[0, 1], [0, 1]])  # top-2 of 2: f = (1/2, 1/2) of the k·T = 4 assignments, whatever P is
    assert ep.load_balancing_loss(probs, both, 2).item() == pytest.approx(1.0)


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
def test_moe_layer_equals_a_loop_over_tokens(gating):
    torch.manual_seed(0)
    cfg = ep.GPTConfig(d_model=16, n_head=2)
    moe = ep.MoE(cfg, n_experts=4, top_k=2, capacity_factor=0.8, gating=gating)
    x = torch.randn(3, 10, 16)
    out = moe(x)
    tokens, logits = x.reshape(-1, 16), moe.router.gate(x.reshape(-1, 16))
    used, want = [0] * 4, torch.zeros_like(tokens)
    capacity = ep.expert_capacity(30, 2, 4, 0.8)
    for t in range(30):
        scores = logits[t] if gating == "softmax" else logits[t].sigmoid()
        chosen = scores.topk(2).indices
        w = logits[t][chosen].softmax(-1) if gating == "softmax" else scores[chosen] / scores[chosen].sum()
        for s, e in enumerate(chosen.tolist()):
            if used[e] < capacity:
                want[t] += w[s] * moe.experts[e](tokens[t])
            used[e] += 1
    torch.testing.assert_close(out.reshape(-1, 16), want, **TOL)
    assert moe.stats["dropped"] == sum(max(0, u - capacity) for u in used) > 0


def _batches(cfg, world, steps, seed=1):
    data = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    return [[ep.get_batch(data, 2, cfg.seq_len, gen) for _ in range(world)] for _ in range(steps)]


def _compare_with_single_process(ep_size, n_experts, gating):
    """Every rank builds the same MoE model; the reference trains it in one process on all ranks' batches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ep.GPTConfig(d_model=16, n_head=2, seq_len=16, n_layer=2)
    reference = ep.moe_gpt(cfg, n_experts, top_k=2, capacity_factor=1.0, gating=gating, seed=0)
    ep_group, replica_group = ep.make_groups(world, ep_size)
    model = ep.expert_parallel(copy.deepcopy(reference), ep_group)
    first = (rank % ep_size) * (n_experts // ep_size)  # this rank's first expert
    ref_params = dict(reference.named_parameters())

    def twin(name):  # the reference parameter that `name` on this rank holds
        parts = name.split(".")
        if len(parts) > 4 and parts[3] == "experts":
            parts[4] = str(int(parts[4]) + first)
        return ref_params[".".join(parts)]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    figures = {}
    for step, batch in enumerate(_batches(cfg, world, 3)):
        x, y = batch[rank]
        with ep.CommCounter() as counter:
            counter.phase = "forward"
            loss = ep.moe_loss(model, x, y)
            counter.phase = "backward"
            loss.backward()
        ep.sync_gradients(model, replica_group, world)
        ref_loss = sum(ep.moe_loss(reference, bx, by) for bx, by in batch) / world
        ref_loss.backward()
        if step == 0:
            torch.testing.assert_close(loss, ep.moe_loss(reference, x, y).detach(), **TOL)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, twin(name).grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")
            assert sum(b.mlp.stats["dropped"] for b in model.blocks) > 0  # the capacity path is exercised
            figures = {"forward": counter.totals("forward"), "backward": counter.totals("backward")}
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, twin(name), **STEP_TOL, msg=lambda m, n=name: f"{n}: {m}")
    return figures


@pytest.mark.parametrize("world,n_experts,gating", [(2, 4, "softmax"), (3, 6, "sigmoid"), (4, 8, "softmax")])
def test_expert_parallel_equals_single_process(world, n_experts, gating):
    figures = run_distributed(_compare_with_single_process, world, world, n_experts, gating)
    for f in figures:  # two all-to-alls per layer each way: dispatch and combine, and their conjugates
        assert f["forward"]["all_to_all_single"][0] == 4 and f["backward"]["all_to_all_single"][0] == 4


def test_expert_parallel_with_data_parallel():
    run_distributed(_compare_with_single_process, 4, 2, 4, "softmax")  # EP 2 × DP 2


def _dispatch_bytes():
    """With room for every token, one dispatch hands k·T·d·4 bytes to the all-to-all (1/N of it to itself)."""
    cfg = ep.GPTConfig(d_model=16, n_head=2, seq_len=16, n_layer=1)
    model = ep.expert_parallel(ep.moe_gpt(cfg, 4, top_k=2, capacity_factor=4.0), None)
    x, _ = _batches(cfg, 1, 1, seed=dist.get_rank())[0][0]
    with ep.CommCounter() as counter:
        model(x)
    sizes = [b for _, op, b in counter.events if op == "all_to_all_single"]
    return sizes, model.blocks[0].mlp.stats["dropped"]


def test_all_to_all_bytes_equal_the_formula():
    results = run_distributed(_dispatch_bytes, 2)
    for (dispatch, combine), dropped in results:
        assert dropped == 0 and dispatch == 2 * 32 * 16 * 4  # k·T·d·4: k = 2, T = 2 sequences · 16, d = 16, fp32
    # what the experts send back is what they received: the combines add up to the dispatches over the ranks
    assert sum(s[1] for s, _ in results) == sum(s[0] for s, _ in results)


def test_readme_torchrun_line():
    out = run_torchrun(readme_command("expert_parallel.py"), "--steps 3 --batch-size 2 --compare").stdout
    assert "4 forward + 4 backward | 2 per layer each way = 4 + 4" in out
    assert "dense with the same active parameters" in out


def test_bad_input_gets_one_line(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "--experts 4 is not divisible by the expert-parallel size 3" in cli_error(ep.main, ["--experts", "4"], capsys)
    assert "--top-k 9 is above --experts 6" in cli_error(ep.main, ["--experts", "6", "--top-k", "9"], capsys)
    assert "--capacity-factor" in cli_error(ep.main, ["--experts", "6", "--capacity-factor", "-0.5"], capsys)
