import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import zero
from harness import cli_error, readme_command, run_distributed, run_torchrun


class Toy(nn.Module):
    """Small, but with every awkward case: tied weights (embedding = output), biases of 7 elements (not divisible by
    2 or 3), a frozen parameter, and blocks in a ModuleList so stage 3 shards them as units."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 5)) for _ in range(3))
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(5, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = x + b(x)
        return F.cross_entropy(self.out(self.frozen(x)).float().view(-1, 11), targets.view(-1))


def assert_near(got, want, rtol, atol, msg=""):
    """torch.testing.assert_close's rule |got - want| <= atol + rtol·|want|, without its import of DTensor, which
    costs a worker process seconds."""
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{msg}: {got.shape}, {got.dtype}"
    assert torch.allclose(got, want, rtol=rtol, atol=atol), f"{msg}: largest difference {(got - want).abs().max():.2e}"


def batches(steps, n, per_rank=4):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 11, (n * per_rank, 6), generator=g), torch.randint(0, 11, (n * per_rank, 6), generator=g))
            for _ in range(steps)]


def mine(batch):
    r = dist.get_rank()
    return [t[r * 4:(r + 1) * 4] for t in batch]


def reference(optimizer_cls, kw, data):
    """One process, the global batch, the plain optimizer: what every stage must reproduce."""
    torch.manual_seed(0)
    model = Toy()
    opt = optimizer_cls([p for p in model.parameters() if p.requires_grad], **kw)
    for x, y in data:
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    return {k: p.detach() for k, p in model.named_parameters()}


def trained(stage, optimizer_cls, kw, data, offload=None):
    r = dist.get_rank()
    torch.manual_seed(0 if r == 0 else 100 + r)  # other ranks start elsewhere: construction must broadcast
    # 1e-4 MiB buckets: several per model, so bucket boundaries and padding are exercised
    model, opt, finish = zero.build(stage, Toy(), None, offload, optimizer_cls, 1e-4, **kw)
    for batch in data:
        model(*mine(batch)).backward()
        finish()
        opt.step()
        opt.zero_grad()
    return zero.full_params(model)


OPTIMIZERS = {"adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
              "sgd+momentum": (torch.optim.SGD, dict(lr=0.5, momentum=0.9))}


def check_every_stage(data):
    """Every stage vs the single-process optimizer. SGD catches a sum-instead-of-mean bug that Adam's
    scale-invariance hides. Ranks sum gradients in another order than one process (last-bit differences), which
    Adam's division by sqrt(v) passes on as relative error: 1e-5 relative holds."""
    for name, (cls, kw) in OPTIMIZERS.items():
        want = reference(cls, kw, data)
        for stage in range(4):
            got = trained(stage, cls, kw, data)
            for k, p in want.items():
                assert_near(got[k], p, rtol=1e-5, atol=1e-6, msg=f"{name} stage {stage} {k}")
    # ZeRO-Offload, a smoke test here: with the model on the CPU both runs do the same computation, so this cannot
    # catch a wrong copy between devices; that needs a GPU (the offload path runs, and gives the same parameters)
    for stage in (1, 2):
        cls, kw = OPTIMIZERS["adamw"]
        got, base = trained(stage, cls, kw, data, offload="cpu"), trained(stage, cls, kw, data)
        assert all(torch.equal(got[k], base[k]) for k in base), f"offload differs at stage {stage}"


def check_overlap(data):
    """The all-reduces start inside backward: when the last gradient of backward is produced (the embedding's,
    which the tied output also feeds), every other bucket has already been launched."""
    torch.manual_seed(0)
    toy = Toy()
    launched_before_last = []
    with zero.CommCounter() as counter:
        toy.emb.weight.register_post_accumulate_grad_hook(lambda p: launched_before_last.append(len(counter.events)))
        model = zero.DataParallel(toy, bucket_mb=0)  # one parameter per bucket
        counter.events.clear()
        loss = model(*mine(data[0]))
        counter.phase = "backward"
        loss.backward()
        counter.phase = "after"
        model.finish_gradient_synchronization()
    buckets = len(model.buckets)
    assert buckets == len(zero.trainable(toy.parameters())) > 2
    assert launched_before_last == [buckets - 1]
    assert counter.totals("backward")["all_reduce"][0] == buckets and "all_reduce" not in counter.totals("after")
    baseline = zero.DataParallel(Toy(), bucket_mb=0, overlap=False)
    with zero.CommCounter() as counter:
        counter.phase = "backward"
        baseline(*mine(data[0])).backward()
        counter.phase = "after"
        baseline.finish_gradient_synchronization()
    assert "all_reduce" not in counter.totals("backward") and counter.totals("after")["all_reduce"][0] == buckets


def read_everything(model):
    for p in model.parameters():
        p.detach().sum().item()
    torch.save(model.state_dict(), io.BytesIO())
    return True


def check_stage3_gradients_and_reads(data):
    """fp32 .grad of the shard's shape, equal to the shard of the single-process gradient; parameters, state_dict
    and torch.save readable at every moment (between uses the parameters are the shards, never freed memory)."""
    r, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = Toy()
    ref(*data[0]).backward()
    ref_grads = {id_: p.grad for id_, p in enumerate(ref.parameters()) if p.requires_grad}
    torch.manual_seed(0)
    model = zero.FullyShardedDataParallel(Toy())
    during = []
    model.module.blocks[1].register_forward_hook(lambda m, a, o: during.append(read_everything(model)))
    read_everything(model)
    loss = model(*mine(data[0]))
    read_everything(model)
    loss.backward()
    read_everything(model)
    model.finish_gradient_synchronization()
    read_everything(model)
    assert during == [True]
    for i, p in enumerate(model.module.parameters()):
        if p.requires_grad:
            s = math.ceil(ref_grads[i].numel() / n)
            assert p.shape == p.grad.shape == (s,) and p.grad.dtype == torch.float32
            padded = torch.cat([ref_grads[i].reshape(-1), torch.zeros(n * s - ref_grads[i].numel())])
            assert_near(p.grad, padded[r * s:(r + 1) * s], rtol=1e-5, atol=1e-7, msg=str(i))
    return ref_grads


def check_fp16(data, ref_grads):
    """fp16 without a loss scaler gives the gradients themselves (to fp16's precision: relative error well under
    1 %), at stage 0 and stage 3; with the scaler, an overflow on one rank makes every rank skip the step."""
    r, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ddp = zero.DataParallel(Toy().half())
    ddp(*mine(data[0])).backward()
    ddp.finish_gradient_synchronization()
    torch.manual_seed(0)
    fsdp = zero.FullyShardedDataParallel(Toy(), compute_dtype=torch.float16)
    fsdp(*mine(data[0])).backward()
    fsdp.finish_gradient_synchronization()
    trainable = [p for p in ddp.module.parameters() if p.requires_grad]
    for (i, want), p, q in zip(ref_grads.items(), trainable, zero.trainable(fsdp.module.parameters())):
        assert (p.grad.float() - want).norm() < 5e-3 * want.norm(), f"stage 0 fp16 gradient {i}"
        s = q.grad.numel()
        shard = torch.cat([want.reshape(-1), torch.zeros(n * s - want.numel())])[r * s:(r + 1) * s]
        assert (q.grad - shard).norm() < 5e-3 * want.norm(), f"stage 3 fp16 gradient {i}"
    model, opt, finish = zero.build(2, Toy().half(), None, None, torch.optim.AdamW, 1e-4, lr=1e-2)
    scaler = zero.DynamicLossScaler()
    before = zero.full_params(model)
    scaler.scale(model(*mine(data[0]))).backward()
    finish()
    if r == 1:
        opt.grad_shards[0][0] = float("inf")
    skipped = not scaler.step(opt)
    after = zero.full_params(model)
    scaler.scale(model(*mine(data[0]))).backward()
    finish()
    stepped = scaler.step(opt)
    return skipped, scaler.loss_scale, all(torch.equal(before[k], after[k]) for k in before), stepped


def loss_scales(pattern):
    """DynamicLossScaler's scale after each step of a pattern of overflows (True) and good steps."""
    scaler, p = zero.DynamicLossScaler(init_scale=4.0, growth_interval=3), nn.Parameter(torch.zeros(2))
    opt, scales = torch.optim.SGD([p], lr=0.0), []
    for overflow in pattern:
        p.grad = torch.full((2,), float("inf") if overflow and dist.get_rank() == 0 else 1.0)  # one rank overflows
        scaler.step(opt)
        scales.append(scaler.loss_scale)
    return scales


PATTERN = (False, False, True, False, False, False, True, False)


def memory_and_traffic():
    cfg = zero.GPTConfig(n_layer=2, d_model=24, n_head=4, seq_len=16)
    data = zero.load_text(max_bytes=100_000)
    return {stage: zero.train(stage, steps=2, batch_size=2, cfg=cfg, compute_dtype=torch.bfloat16, data=data)
            for stage in range(4)}


def _everything():
    data = batches(3, dist.get_world_size())
    check_every_stage(data)
    check_overlap(data)
    ref_grads = check_stage3_gradients_and_reads(data)
    return {"fp16": check_fp16(data, ref_grads), "scales": loss_scales(PATTERN), "table": memory_and_traffic()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_stage_and_its_figures(world_size):
    n = world_size
    every_rank = run_distributed(_everything, n, timeout=240)
    assert [o["fp16"] for o in every_rank] == [(True, 2.0 ** 15, True, True)] * n
    # torch.amp.GradScaler's scale sequence for the same pattern: growth after growth_interval consecutive good steps
    p, torch_scaler, want = nn.Parameter(torch.zeros(2)), torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=3), []
    for overflow in PATTERN:
        torch_scaler.scale(torch.ones(()))
        p.grad = torch.full((2,), float("inf") if overflow else 1.0)
        torch_scaler.step(torch.optim.SGD([p], lr=0.0))
        torch_scaler.update()
        want.append(torch_scaler.get_scale())
    assert [o["scales"] for o in every_rank] == [want] * n
    table = every_rank[0]["table"]
    torch.manual_seed(0)
    params = zero.trainable(zero.TinyGPT(zero.GPTConfig(n_layer=2, d_model=24, n_head=4, seq_len=16)).parameters())
    phi = sum(p.numel() for p in params)
    per_param_shards = sum(math.ceil(p.numel() / n) for p in params)  # stage 3 pads each parameter
    for stage, res in table.items():
        mem = res["memory"]
        assert res["num_params"] == phi
        # The ZeRO paper's table, bf16 = 2 bytes, written out here (not taken from zero.estimate_memory).
        want = {0: (2 * phi, 2 * phi, 12 * phi), 1: (2 * phi, 2 * phi, 12 * phi / n),
                2: (2 * phi, 2 * phi / n, 12 * phi / n), 3: (4 * phi / n, 4 * phi / n, 8 * phi / n)}[stage]
        for key, w in zip(("params", "grads", "optimizer"), want):
            assert w <= mem[key] < w * 1.01 + 64, (stage, key, mem[key], w)  # padding to N only
        assert mem["total"] < (16 * phi / n if stage == 3 else 16 * phi) * 1.01 + 64
    # Traffic against the formulas, 2 bytes a bf16 element; 1 %: padding to N (stage 3: each parameter). Stage 1 sends
    # 3Φ (all-reduce, then all-gather), not the paper's 2Φ.
    assert table[3]["sent"] == pytest.approx(3 * phi * 2 * (n - 1) / n, rel=0.01)
    assert table[0]["sent"] == pytest.approx(2 * phi * 2 * (n - 1) / n)
    assert table[1]["sent"] == pytest.approx(3 * phi * 2 * (n - 1) / n, rel=0.01)
    assert table[2]["sent"] == pytest.approx(2 * phi * 2 * (n - 1) / n, rel=0.01)
    ops = lambda stage, phase: {(op, b) for ph, op, b in table[stage]["events"] if ph == phase}
    assert {op for op, _ in ops(0, "backward")} == {"all_reduce"}  # stage 0 overlaps with backward in training too
    gathered = sum(b for ph, op, b in table[3]["events"] if op == "all_gather_single" and ph == "forward")
    assert gathered == per_param_shards * 2  # bf16 shards, once for forward ...
    assert sum(b for ph, op, b in table[3]["events"] if op == "all_gather_single" and ph == "backward") == gathered
    assert sum(b for ph, op, b in table[3]["events"] if op == "reduce_scatter_single") == n * gathered  # ... 3Φ


class TwoBranches(nn.Module):
    """Two branches of equal size whose forward order is an argument: a rank that runs `a` first gets `b`'s gradients
    first in backward, so the ranks' gradients become ready in different orders."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x, a_first: bool):
        ya, yb = (self.a(x), self.b(x)) if a_first else reversed((self.b(x), self.a(x)))
        return (ya * yb).mean()


def _data_parallel_averages_in_bucket_order():
    """Stage 0's hook: p.grad is the single-process gradient (the mean over ranks), every bucket launched inside
    backward, in bucket order on every rank, even when the ranks' gradients become ready in different orders."""
    r, n = dist.get_rank(), dist.get_world_size()
    data = batches(1, n)
    check_overlap(data)
    x = torch.randn(4 * n, 5, generator=torch.Generator().manual_seed(3))
    cases = [(Toy, data[0], mine(data[0]), 1e-4),  # several buckets; tied, frozen and odd-sized parameters
             (TwoBranches, (x, True), (x[4 * r:4 * r + 4], r == 0), 120 / 2 ** 20)]  # 120 B: one Linear per bucket
    for make, inputs, local, bucket_mb in cases:
        torch.manual_seed(0)
        ref = make()
        ref(*inputs).backward()
        torch.manual_seed(0 if r == 0 else 100 + r)
        model, launched = zero.DataParallel(make(), bucket_mb=bucket_mb), []
        launch = model._launch
        model._launch = lambda i: (launched.append(i), launch(i))[1]  # record the order, then launch
        model(*local).backward()
        assert launched == list(range(len(model.buckets))) and len(launched) > 1, (make.__name__, launched)
        model.finish_gradient_synchronization()
        for (k, want), p in zip(ref.named_parameters(), model.module.parameters()):
            if p.requires_grad:  # 1e-5: the ranks sum the batch in another order than one process
                assert_near(p.grad, want.grad, rtol=1e-5, atol=1e-7, msg=f"{make.__name__} {k}")
    model = zero.DataParallel(Toy(), bucket_mb=1e-4)  # two backwards before one finish would lose the first's gradients
    model(*mine(data[0])).backward()
    with pytest.raises(RuntimeError, match="finish_gradient_synchronization\\(\\) after every backward"):
        model(*mine(data[0])).backward()
    model.finish_gradient_synchronization()


def _stage2_keeps_only_its_averaged_gradient_shard():
    """Stage 2 trains like one process with SGD + momentum (a sum instead of a mean fails), and after
    finish_gradient_synchronization() a rank holds no full gradient, only its 1/N shard of each bucket. The optimizer's
    state_dict() carries the momentum: a new optimizer loaded with it takes the third step as one process does.
    Two micro-batches, finished after each, step on the sum of their gradients."""
    r, n = dist.get_rank(), dist.get_world_size()
    data = batches(3, n)
    cls, kw = OPTIMIZERS["sgd+momentum"]
    want = reference(cls, kw, data)
    torch.manual_seed(0 if r == 0 else 100 + r)
    model = Toy()
    opt = zero.ShardedGradientOptimizer(model.parameters(), cls, None, 1e-4, **kw)
    for batch in data[:2]:
        model(*mine(batch)).backward()
        opt.finish_gradient_synchronization()
        assert [p for p in model.parameters() if p.grad is not None] == []
        assert [s.shape for s in opt.grad_shards] == [(b.shard_numel,) for b in opt.buckets]
        opt.step()
        opt.zero_grad()
    assert opt.state_dict()["state"], "the inner optimizer's momentum is this rank's state"
    resumed = Toy()  # a new model and optimizer (the first one's hooks stay on the first model), resumed after 2 steps
    resumed.load_state_dict(model.state_dict())
    saved, opt = opt.state_dict(), zero.ShardedGradientOptimizer(resumed.parameters(), cls, None, 1e-4, **kw)
    opt.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="at construction"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    resumed(*mine(data[2])).backward()
    opt.finish_gradient_synchronization()
    opt.step()
    opt.zero_grad()
    got = zero.full_params(resumed)
    for k, p in want.items():  # without the momentum the third step differs by lr·0.9·(the second's momentum)
        assert_near(got[k], p, rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(0)  # accumulation: one SGD step on two micro-batches equals one process's on their sum
    ref, model = Toy(), Toy()
    model.load_state_dict(ref.state_dict())
    opt = zero.ShardedGradientOptimizer(model.parameters(), torch.optim.SGD, None, 1e-4, lr=0.5)
    for batch in data[:2]:
        ref(*batch).backward()
        model(*mine(batch)).backward()
        opt.finish_gradient_synchronization()  # after every backward; the shards add up
    opt.step()
    torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5).step()
    got = zero.full_params(model)
    for k, p in ref.named_parameters():
        assert_near(got[k], p.detach(), rtol=1e-5, atol=1e-6, msg=f"accumulated {k}")


def _stage3_frees_after_forward_and_gathers_for_backward():
    """Stage 3 holds a unit's full parameters only while it runs: after a block's forward its parameters are shards
    and its gathered buffer holds no memory; backward all-gathers what forward did. Gradients as in one process."""
    n = dist.get_world_size()
    data = batches(1, n)
    check_stage3_gradients_and_reads(data)
    torch.manual_seed(0)
    model, after_block = zero.FullyShardedDataParallel(Toy()), []
    unit = next(u for u in model.units if u.module is model.module.blocks[1])
    shapes_and_bytes = lambda: ([tuple(p.shape) for p in unit.params], unit.full.untyped_storage().nbytes())
    # registered after the wrapper's own forward hook, so it runs after it
    model.module.blocks[1].register_forward_hook(lambda m, a, o: after_block.append(shapes_and_bytes()))
    with zero.CommCounter() as counter:
        counter.phase = "forward"
        loss = model(*mine(data[0]))
        held = [u.full.untyped_storage().nbytes() for u in model.units]
        counter.phase = "backward"
        loss.backward()
    assert after_block == [([(math.ceil(p.numel() / n),) for p in unit.views], 0)]
    assert held == [0] * len(model.units)
    assert counter.totals("backward")["all_gather_single"] == counter.totals("forward")["all_gather_single"]
    model.finish_gradient_synchronization()  # a second micro-batch before step() and zero_grad(): a clear error
    with pytest.raises(RuntimeError, match="does not accumulate micro-batches"):
        model(*mine(data[0]))


@pytest.mark.parametrize("check", [_data_parallel_averages_in_bucket_order,
                                   _stage2_keeps_only_its_averaged_gradient_shard,
                                   _stage3_frees_after_forward_and_gathers_for_backward],
                         ids=["stage0", "stage2", "stage3"])
def test_one_stage_on_two_ranks(check):
    """One small launch per stage, so that a mistake in one stage's mechanism is named by its own test."""
    run_distributed(check, 2, timeout=120)


def test_estimate_memory_follows_the_papers():
    gb = {s: zero.estimate_memory(7e9, 8, s)["total"] / 1e9 for s in range(4)}
    assert gb == pytest.approx({0: 112.0, 1: 38.5, 2: 26.25, 3: 14.0})
    off = zero.estimate_memory(13e9, 1, 2, offload="cpu")  # ZeRO-Offload: 13B on one 32 GB V100
    assert off["total"] == pytest.approx(26e9) and off["cpu"] == pytest.approx(14 * 13e9)
    inf = zero.estimate_memory(7e9, 8, 3, offload="nvme")
    assert inf["total"] == 0 and inf["nvme"] == pytest.approx(16 * 7e9 / 8)
    fp32 = zero.estimate_memory(1e6, 4, 2, param_bytes=4)  # 4-byte parameters and gradients, the latter sharded
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == pytest.approx((4e6, 1e6, 3e6))


def test_readme_torchrun_line_trains_and_reports():
    line = readme_command("zero.py")
    out = run_torchrun(line, "--steps 3 --check").stdout
    assert "Per-rank memory and traffic on N = 4" in out
    diff = float(out.split("from single-process torch.optim.AdamW after 3 steps: ")[1].split()[0])
    assert diff < 1e-4


def test_estimate_cli_prints_112_gb_for_ddp(capsys):
    zero.main(["--estimate", "--params", "7e9", "--world-size", "8"])
    assert "112.0" in capsys.readouterr().out.splitlines()[2]


@pytest.mark.parametrize("args, message", [(["--stage", "4"], "ZeRO has stages 0 (DDP), 1, 2 and 3"),
                                           (["--data", "/no/such/file"], "no such file or folder"),
                                           (["--estimate", "--params", "-7"], "--params -7.0: must be positive"),
                                           (["--offload", "cpu", "--stage", "3"], "--offload cpu")])
def test_bad_input_is_one_line(args, message, capsys):
    assert message in cli_error(zero.main, args, capsys)
