import functools
import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import parallel_3d as p3d
import zero
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
    # each group: the ranks that share the other two coordinates, ordered by its own (first stage first, ...)
    at = {(d, p, t): (d * pp + p) * tp + t for d in range(dp) for p in range(pp) for t in range(tp)}
    want = {"dp": [[at[d, p, t] for d in range(dp)] for p in range(pp) for t in range(tp)],
            "pp": [[at[d, p, t] for p in range(pp)] for d in range(dp) for t in range(tp)],
            "tp": [[at[d, p, t] for t in range(tp)] for d in range(dp) for p in range(pp)]}
    for kind, groups in want.items():
        assert sorted(m[f"{kind}_groups"]) == sorted(groups), kind


def _single_process(cfg, data, steps, batch):
    torch.manual_seed(0)
    ref = p3d.TinyGPT(cfg)
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = ref(*p3d.get_batch(data, batch, cfg.seq_len, gen))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, dict(ref.named_parameters())


def _check_against_single_process(out, cfg, data, steps, batch):
    losses, want = _single_process(cfg, data, steps, batch)
    # the same sums in other orders (micro-batches, TP partial sums, DP averages): float32, 1e-5 relative
    assert out["losses"] == pytest.approx(losses, rel=1e-5)
    assert out["losses"][0] == pytest.approx(out["reference_step0_loss"], rel=1e-6)
    for name, q in out["params"].items():
        # Adam normalises updates to about lr: near-zero gradient elements may differ by a fraction of lr
        torch.testing.assert_close(q, want[name].detach(), rtol=1e-4, atol=3e-4, msg=name)


class CollectiveCount(TorchDispatchMode):
    """An independent count: every c10d operator dispatched while active, with its first tensor's bytes. DTensor's
    all-reduces arrive as _c10d_functional.all_reduce, pipelining's p2p as c10d.send / c10d.recv_."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("_c10d_functional.all_reduce", "c10d.send", "c10d.recv_", "c10d.allreduce_"):
            first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            calls, nbytes = self.calls.get(name, (0, 0))
            self.calls[name] = (calls + 1, nbytes + first.nbytes)
        return func(*args, **(kwargs or {}))


def _three_d_equals_single_process():
    cfg = p3d.GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, tie_weights=True)
    data = p3d.load_text(max_bytes=100_000)
    out = p3d.train(2, 2, 2, steps=3, cfg=cfg, batch_size=4, n_microbatches=2, data=data)
    # the tied embedding and head live on two stages: this fails if their copies drift apart
    _check_against_single_process(out, cfg, data, 3, 8)
    # a pipeline step of a fresh build, counted by a dispatch mode instead of the profiler
    mesh = p3d.init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "pp", "tp"))
    torch.manual_seed(0)
    stage, schedule = p3d.build_3d(p3d.TinyGPT(cfg), mesh, 2, torch.device("cpu"))
    x, y = p3d.get_batch(data, 4, cfg.seq_len, torch.Generator().manual_seed(1))
    p3d.run_pipeline(stage, schedule, x, y)  # the first step also infers shapes: count the second, as train does
    with CollectiveCount() as counted:
        p3d.run_pipeline(stage, schedule, x, y)
    return out["params_held"], out["traffic"], len(out["params"]), counted.calls


def test_dp2_pp2_tp2_on_8_processes_equals_single_process_training_with_tied_weights():
    results = run_distributed(_three_d_equals_single_process, 8, timeout=240)
    held = [h for h, *_ in results]
    assert held[0] == held[1] and held[0] != held[2]  # TP peers hold the same share; the stages differ
    for held_numel, traffic, n_tensors, counted in results:
        # DP: one all-reduce per parameter tensor of this rank, 4 bytes per float32 element it holds
        assert traffic["dp"] == (n_tensors, 4 * held_numel)
        # TP: the profiler's count equals the dispatch mode's, and it is 12, not 8: q, k, v, fc1 backward and
        # o, fc2 forward, × 1 block × 2 micro-batches of (2, 16, 32) float32
        assert traffic["tp"] == counted["_c10d_functional.all_reduce"] == (12, 12 * 2 * 16 * 32 * 4)
        # PP: 2 micro-batches forward (stage 0 sends) and their gradients back (stage 1 sends)
        p2p = [counted.get(k, (0, 0)) for k in ("c10d.send", "c10d.recv_")]
        assert traffic["pp"] == (p2p[0][0] + p2p[1][0], p2p[0][1] + p2p[1][1]) == (4, 4 * 2 * 16 * 32 * 4)
        assert traffic["tied"] == (1, 256 * 32 * 4)  # the (vocab, d) embedding's gradient, once


def _foreach_update_equals_single_process():
    cfg = p3d.GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, tie_weights=False)
    data = p3d.load_text(max_bytes=100_000)
    adamw = torch.optim.AdamW
    torch.optim.AdamW = functools.partial(adamw, foreach=True)  # CUDA's default; CPU's is a per-tensor loop
    try:
        out = p3d.train(1, 1, 2, steps=3, cfg=cfg, batch_size=4, n_microbatches=2, data=data)
    finally:
        torch.optim.AdamW = adamw
    _check_against_single_process(out, cfg, data, 3, 4)
    return True


def test_foreach_adamw_as_on_cuda_trains_like_one_process():
    # a foreach update over DTensor and plain parameters together is refused by DTensor (found on a GPU)
    assert run_distributed(_foreach_update_equals_single_process, 2) == [True, True]


def _tied_gradients_after_sync():
    rank = dist.get_rank()
    d, p = rank // 2, rank % 2  # (dp, pp, tp) = (2, 2, 1): rank = d·2 + p
    cfg = p3d.GPTConfig(n_layer=2, d_model=8, n_head=2, seq_len=4, tie_weights=True)
    stage = p3d.Stage(p3d.TinyGPT(cfg), p, 2)  # the embedding on stage 0, the head on stage 1: one weight, two copies
    grad = lambda r: torch.randn(stage.tied_weight.shape, generator=torch.Generator().manual_seed(r))
    stage.tied_weight.grad = grad(rank)  # this copy's use: rank 2d the embedding's, rank 2d + 1 the head's
    p3d.allreduce_tied_grads(stage, p3d.tied_weight_groups(2, 2, 1))
    with p3d.CommCounter() as counter:  # one stage holds both uses of the weight: nothing to send
        p3d.allreduce_tied_grads(p3d.Stage(p3d.TinyGPT(cfg), 0, 1), None)
    # numpy arrays travel back by value (a tensor's storage is shared by a file descriptor that dies with the rank)
    return stage.tied_weight.grad.numpy(), (grad(2 * d) + grad(2 * d + 1)).numpy(), counter.totals()


def test_tied_gradients_are_summed_between_first_and_last_stage_of_each_replica():
    for got, want, untied_traffic in run_distributed(_tied_gradients_after_sync, 4):
        # the single model's gradient of a tied weight is the sum of both uses, within this DP replica only (the
        # replicas are averaged later); a sum of two float32 tensors is exact, whatever the order
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=0, atol=0)
        assert untied_traffic == {}


# --- the planner -------------------------------------------------------------------------------------------------

def test_planner_known_layouts_come_out_on_top():
    gpt3 = p3d.plan(p3d.gpt_shape(175e9), 1024, "a100")[0]
    assert (gpt3["tp"], gpt3["pp"], gpt3["dp"]) == (8, 8, 16)
    llama = p3d.plan(p3d.gpt_shape(70e9, layers=80), 64, "a100")[0]
    assert (llama["tp"], llama["pp"], llama["dp"]) == (8, 2, 4)
    assert (p3d.plan(p3d.gpt_shape(1e9), 8)[0]["tp"], p3d.plan(p3d.gpt_shape(1e9), 8)[0]["dp"]) == (1, 8)  # DDP


def test_tensor_parallelism_never_crosses_a_node():
    shape = p3d.Shape(100e9, 2, 65536, 512)  # at most 2 stages: 16Φ/(8·2) = 100 GB needs TP 16 to fit in 80
    with pytest.raises(ValueError, match="fits no layout"):
        p3d.plan(shape, 32, gpus_per_node=8)
    assert p3d.plan(shape, 32, gpus_per_node=16)[0]["tp"] == 16  # the same model on 16-GPU nodes
    assert all(r["tp"] <= 8 for r in p3d.plan(p3d.gpt_shape(175e9), 1024))


def test_memory_forces_pipeline_stages():
    shape = p3d.gpt_shape(70e9, layers=80)
    assert min(r["pp"] for r in p3d.plan(shape, 64, gpu_mem=80)) == 2  # TP 8 alone holds 140 GB of states per GPU
    assert min(r["pp"] for r in p3d.plan(shape, 64, gpu_mem=160)) == 1


@pytest.mark.parametrize("params, gpus", [(175e9, 1024), (70e9, 64), (13e9, 16)])
def test_more_memory_never_needs_more_model_parallelism(params, gpus):
    shape, used = p3d.gpt_shape(params), []
    for mem in range(40, 241, 20):
        try:
            best = p3d.plan(shape, gpus, gpu_mem=mem)[0]
        except ValueError:
            continue
        used.append(best["tp"] * best["pp"])
    assert used and used == sorted(used, reverse=True)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_plan_memory_is_zero_accounting_plus_korthikanti(stage):
    shape = p3d.gpt_shape(175e9)
    for r in p3d.plan(shape, 1024, gpu_mem=1e6, zero_stage=stage):
        # zero.py's estimate for the parameters this GPU holds after TP × PP, sharded over its DP group
        assert r["states"] * 1e9 == pytest.approx(zero.estimate_memory(shape.params / (r["tp"] * r["pp"]), r["dp"], stage)["total"])
        # 1F1B's first stage: p micro-batches in flight through L/p layers; selective recomputation, sequence
        # parallel: 34·s·h/t bytes per layer per sequence (Korthikanti et al. 2022, eq. for TP + SP + selective)
        layers = shape.layers / r["pp"] * min(r["pp"], r["microbatches"])
        assert r["activations"] * 1e9 == pytest.approx(layers * 34 * shape.seq * shape.hidden / r["tp"])


# Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
# arXiv:2104.04473, Table 1 (GPT, V = 51,200, s = 2,048, A100 80GB, full recomputation; its TFLOP/s count the
# recomputed forward): params (B), heads, hidden, layers, TP, PP, GPUs, batch, published TFLOP/s per GPU.
NARAYANAN_2021 = [(1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
                  (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
                  (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
                  (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
                  (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163)]
MEGATRON_2021 = dict(recompute="full", overlap_tp=False, overlap_dp=False)  # 2021 Megatron overlapped neither


def narayanan_prediction(row, efficiency=p3d.EFFICIENCY):
    params, heads, hidden, layers, tp, pp, gpus, batch, _ = row
    shape = p3d.Shape(params * 1e9, layers, hidden, heads)
    return p3d.step_time(shape, "a100", tp, pp, gpus // (tp * pp), batch, efficiency=efficiency, **MEGATRON_2021)


def fit_efficiency(row) -> float:
    lo, hi = 0.05, 1.0  # bisection: predicted throughput grows with η
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if narayanan_prediction(row, mid)["tflops_per_gpu"] > row[-1] else (mid, hi)
    return (lo + hi) / 2


def test_efficiency_is_fitted_on_one_row_only():
    assert fit_efficiency(NARAYANAN_2021[6]) == pytest.approx(p3d.EFFICIENCY, abs=5e-4)  # the 145.6B row


@pytest.mark.parametrize("row", NARAYANAN_2021, ids=[f"{r[0]}B" for r in NARAYANAN_2021])
def test_predicted_tflops_within_15_percent_of_narayanan_2021(row):
    assert narayanan_prediction(row)["tflops_per_gpu"] == pytest.approx(row[-1], rel=0.15)


def test_predicted_mfu_of_llama3_405b_on_h100():
    # Dubey et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783, Table 4: 8,192 H100s, TP 8, PP 16, DP 64,
    # sequence 8,192, 16M tokens per batch (2,048 sequences), 430 TFLOP/s per GPU, BF16 MFU 43%. Shape: 126 layers,
    # hidden 16,384, 128 heads, vocabulary 128,256. Assumed (not in the table): interleaving v = 2, no recomputation.
    shape = p3d.Shape(405e9, 126, 16384, 128, seq=8192, vocab=128256)
    got = p3d.step_time(shape, "h100", 8, 16, 64, 2048, v=2, recompute="none")
    assert got["mfu"] == pytest.approx(0.43, rel=0.15)


def test_activation_bytes_follow_korthikanti_table_2():
    # Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198,
    # Table 2, bytes per layer: GPT-3 175B's layer, one sequence, t = 8
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh, scores = s * b * h, 5 * a * s / h
    table = {(False, "none"): sbh * (10 + 24 / t + scores / t),  # tensor parallel
             (True, "none"): sbh * (34 / t + scores / t),  # tensor + sequence parallel
             (False, "selective"): sbh * (10 + 24 / t),  # tensor parallel + selective recomputation
             (True, "selective"): sbh * 34 / t,  # tensor + sequence parallel + selective recomputation
             (False, "full"): sbh * 2,  # full recomputation: the layer's input only
             (True, "full"): sbh * 2 / t}  # ... which sequence parallelism splits over the t ranks
    for (sp, recompute), want in table.items():
        assert p3d.activation_bytes(s, b, h, a, t, sp, recompute) == pytest.approx(want, rel=1e-12), (sp, recompute)
    assert p3d.activation_bytes(s, b, h, a) == pytest.approx(sbh * (34 + scores))  # no parallelism


def test_bubble_follows_the_schedule_formula():
    shape = p3d.gpt_shape(175e9)
    for v in (1, 2):
        r = p3d.step_time(shape, "a100", 8, 8, 16, 1536, v=v)
        pipeline = r["step_time_s"] - r["dp_exposed_s"]
        assert r["bubble_s"] / pipeline == pytest.approx(7 / (v * 96 + 7))  # (p−1)/(v·m + p−1)


def dropout(x, p=0.1):
    """Dropout that keeps a 1-byte mask, as Megatron's fused kernel does (PyTorch's CPU dropout keeps a 16-bit one)."""
    return x * (torch.rand_like(x) > p) / (1 - p)


class MegatronLayer(nn.Module):
    """A GPT layer as Korthikanti et al. count it: dropout after the softmax and after each residual branch."""

    def __init__(self, h, a):
        super().__init__()
        self.a, self.ln1, self.ln2 = a, nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):  # (s, b, h)
        s, b, h = x.shape
        y = self.ln1(x)
        q, k, v = (lin(y).view(s, b * self.a, h // self.a).transpose(0, 1) for lin in (self.q, self.k, self.v))
        probs = dropout(torch.softmax(q @ k.transpose(1, 2) * (h // self.a) ** -0.5, dim=-1), 0.1)  # (b·a, s, s)
        context = (probs @ v).transpose(0, 1).reshape(s, b, h)
        x = x + dropout(self.o(context))
        return x + dropout(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


def saved_activation_bytes(fn, module, x) -> int:
    """Bytes autograd keeps for backward while fn runs: saved tensors deduplicated by storage, parameters excluded."""
    params = {q.untyped_storage().data_ptr() for q in module.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_korthikanti_activations_match_the_saved_tensors_counted_here(recompute):
    s, b, h, a = 64, 2, 128, 4
    torch.manual_seed(0)
    layer = MegatronLayer(h, a).to(torch.bfloat16)
    x = torch.randn(s, b, h, dtype=torch.bfloat16, requires_grad=True)
    run = layer if recompute == "none" else lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=True)
    counted = saved_activation_bytes(run, layer, x)
    # each LayerNorm also saves its mean and 1/std (2 bf16 values per token), which the formula leaves out
    extra = 0 if recompute == "full" else 2 * 2 * 2 * s * b
    assert counted == p3d.activation_bytes(s, b, h, a, recompute=recompute) + extra


# --- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--dp", "2", "--pp", "2", "--tp", "1"], "= 4, but the world size is 8"),
    (["--dp", "1", "--pp", "1", "--tp", "8", "--n-head", "4"], "be divisible by --tp 8"),
    (["--dp", "1", "--pp", "8", "--tp", "1"], "--pp 8 stages but only --n-layer 2"),
    (["--plan", "--params", "1e12", "--gpus", "8"], "fits no layout"),
    (["--plan", "--gpu", "v100"], "--gpu"),
    (["--plan", "--hidden", "1000", "--heads", "7"], "--hidden 1000 is not divisible by --heads 7"),
    (["--plan", "--hidden", "1536", "--heads", "12", "--tp", "8"], "cannot be split by --tp 8"),
    (["--plan", "--tp", "16"], "would cross nodes"),
    (["--plan", "--gpus", "0"], "--gpus 0 must be positive")])
def test_bad_input_fails_in_one_line_before_any_communication(args, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert message in cli_error(p3d.main, args, capsys)
    assert not dist.is_initialized()


def test_plan_command_prints_the_split_and_writes_json(tmp_path, capsys):
    p3d.main(["--plan", "--params", "175e9", "--gpus", "1024", "--json", str(tmp_path / "best.json")])
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["tp"], best["pp"], best["dp"]) == (8, 8, 16)
    assert set(best) == {"tp", "pp", "dp", "tflops_per_gpu", "mfu", "step_time_s", "memory_gb_per_gpu"}
    assert "compute / TP / PP sends / bubble / exposed DP" in capsys.readouterr().out


def test_readme_torchrun_line_runs_and_matches_step_0():
    out = run_torchrun(readme_command("parallel_3d.py"), "--steps 2", timeout=240).stdout
    ours, ref = (float(v) for v in re.findall(r"step-0 loss ([\d.]+) \| single-process model, same seed: ([\d.]+)", out)[0])
    assert ours == pytest.approx(ref, rel=1e-6)
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if re.match(r"\s+\d \|\s+\(", line)]
    assert len(rows) == 8 and all(r[5].split("/")[0].strip() == r[7] for r in rows)  # TP calls measured = 6·L·m
