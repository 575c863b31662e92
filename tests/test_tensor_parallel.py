import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tensor_parallel as tp
from harness import cli_error, readme_command, run_distributed, run_torchrun

# Each rank computes exactly the dense arithmetic on a slice; only the all-reduce changes the order of additions,
# so float32 results agree to a few ulp: 1e-5 relative (with a small absolute floor for values near zero).
TOL = dict(rtol=1e-5, atol=1e-6)


def shard(t, dim):
    return t.chunk(dist.get_world_size(), dim=dim)[dist.get_rank()]


def check_layer(dense, parallel, x, weight_dims, input_is_sharded=False):
    """Forward output, input gradient and weight gradients of a parallel layer equal the dense layer's."""
    dense.zero_grad()
    x_dense = x.clone().requires_grad_(True)
    x_par = (shard(x, -1) if input_is_sharded else x).clone().requires_grad_(True)
    y_dense, y_par = dense(x_dense), parallel(x_par)
    torch.testing.assert_close(y_par, y_dense if y_par.shape == y_dense.shape else shard(y_dense, -1), **TOL)
    g = torch.randn_like(y_dense)
    y_dense.backward(g)
    y_par.backward(g if y_par.shape == y_dense.shape else shard(g, -1))
    torch.testing.assert_close(x_par.grad, shard(x_dense.grad, -1) if input_is_sharded else x_dense.grad, **TOL)
    for (name, dim) in weight_dims:
        want = dict(dense.named_parameters())[name].grad
        got = dict(parallel.named_parameters())[name].grad
        torch.testing.assert_close(got, want if dim is None else shard(want, dim), **TOL, msg=name)


def _layers_equal_dense():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    lin = nn.Linear(16, 24)
    for gather in (False, True):
        check_layer(lin, tp.load_dense(tp.ColumnParallelLinear(16, 24, gather_output=gather), lin), x,
                    [("weight", 0), ("bias", 0)])
    for parallel_in in (True, False):
        check_layer(lin, tp.load_dense(tp.RowParallelLinear(16, 24, input_is_parallel=parallel_in), lin), x,
                    [("weight", 1), ("bias", None)], input_is_sharded=parallel_in)
    cfg = tp.GPTConfig(d_model=16, n_head=4, seq_len=8)
    mlp, attn = tp.MLP(cfg), tp.Attention(cfg)
    check_layer(mlp, tp.load_dense(tp.ParallelMLP(16, 64), mlp), x, [("fc1.weight", 0), ("fc2.weight", 1), ("fc2.bias", None)])
    par_attn = tp.load_dense(tp.ParallelSelfAttention(16, 4), attn)
    check_layer(attn, par_attn, x, [("o.weight", 1), ("o.bias", None)])
    # q, k, v live fused as [q_r; k_r; v_r] on rank r: compare each third with the dense rows of our heads
    for j, name in enumerate("qkv"):
        torch.testing.assert_close(par_attn.qkv.weight.grad.chunk(3)[j], shard(getattr(attn, name).weight.grad, 0), **TOL)
    return True


# The embedding and the loss have tests of their own, so that each classroom exercise is graded apart from the others
def _vocab_embedding_equals_dense():
    torch.manual_seed(0)  # the same dense weights and ids on every rank
    emb = nn.Embedding(32, 16)
    idx = torch.randperm(32).view(2, 16)  # every id once: both ends of every rank's range are looked up
    par_emb = tp.load_dense(tp.VocabParallelEmbedding(32, 16), emb)
    out_d, out_p = emb(idx), par_emb(idx)
    torch.testing.assert_close(out_p, out_d, **TOL)
    g = torch.randn_like(out_d)
    out_d.backward(g)
    out_p.backward(g)
    torch.testing.assert_close(par_emb.weight.grad, shard(emb.weight.grad, 0), **TOL)
    return True


def _vocab_cross_entropy_equals_dense():
    torch.manual_seed(0)  # the same logits and targets on every rank
    targets = torch.randint(0, 32, (2, 8))
    # Logits near 100 overflow exp in float32 (e^88.7 is its largest) unless the row's max is subtracted first
    for offset in (0.0, 100.0):
        logits = (torch.randn(2, 8, 32) * 3 + offset).requires_grad_(True)
        local = shard(logits.detach(), -1).clone().requires_grad_(True)
        ours = tp.vocab_parallel_cross_entropy(local, targets)
        ref = F.cross_entropy(logits.view(-1, 32), targets.view(-1))
        torch.testing.assert_close(ours, ref, **TOL)
        ours.backward()
        ref.backward()
        torch.testing.assert_close(local.grad, shard(logits.grad, -1), **TOL)
    return True


def _tpgpt_trains_like_dense(sequence_parallel):
    cfg = tp.GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16)
    torch.manual_seed(0)
    dense = tp.TinyGPT(cfg)
    model = tp.TPGPT.from_dense(dense, sequence_parallel=sequence_parallel)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=1e-2, weight_decay=0.1)
    opt_p = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = tp.load_text(max_bytes=100_000)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x, y = tp.get_batch(data, 4, cfg.seq_len, gen)
        ld, lp = dense(x, y), model(x, y)
        torch.testing.assert_close(lp, ld, **TOL, msg=f"loss at step {step}")
        ld.backward()
        lp.backward()
        if sequence_parallel:
            tp.allreduce_sequence_parallel_grads(model)
        for o in (opt_d, opt_p):
            o.step()
            o.zero_grad()
    full = model.full_state_dict()
    for name, p in dense.state_dict().items():
        if name.endswith("attn.k.bias"):
            # Adding b_k to every key shifts each row of scores by q·b_k, which softmax ignores: the gradient is 0
            # in exact arithmetic and rounding noise in practice, which Adam normalises into steps of up to ±lr.
            torch.testing.assert_close(full[name], p, rtol=0, atol=5 * 1e-2 + 1e-6, msg=name)
            continue
        # 5 Adam steps amplify last-bit differences in the gradients (Adam normalises them): 1e-4 relative
        torch.testing.assert_close(full[name], p, rtol=1e-4, atol=1e-5, msg=name)
    return tp.count_layer_collectives(cfg, sequence_parallel, batch_size=2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_layer_equals_the_dense_layer(world_size):
    assert run_distributed(_layers_equal_dense, world_size) == [True] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_embedding_equals_dense(world_size):
    assert run_distributed(_vocab_embedding_equals_dense, world_size) == [True] * world_size


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_cross_entropy_equals_dense(world_size):
    assert run_distributed(_vocab_cross_entropy_equals_dense, world_size) == [True] * world_size


def _both_modes():
    return _tpgpt_trains_like_dense(False), _tpgpt_trains_like_dense(True)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tpgpt_trains_like_dense_and_counts_collectives(world_size):
    plain, sp = run_distributed(_both_modes, world_size)[0]
    # One layer of B = 2, T = 16, d = 32 in fp32: every all-reduce carries the whole activation, D = B·T·d·4 bytes;
    # with sequence parallelism a reduce-scatter takes the whole D in and an all-gather hands in its T/N slice.
    D, n = 2 * 16 * 32 * 4, world_size
    assert plain == {"forward": {"all_reduce": (2, 2 * D)}, "backward": {"all_reduce": (2, 2 * D)}}
    assert sp == {"forward": {"all_gather": (2, 2 * D // n), "reduce_scatter": (2, 2 * D)},
                  "backward": {"reduce_scatter": (2, 2 * D), "all_gather": (2, 2 * D // n)}}


def test_readme_torchrun_line_checks_step0_and_counts():
    out = run_torchrun(readme_command("tensor_parallel.py"), "--steps 3").stdout
    diff = float(out.split("difference ")[1].split()[0])
    assert diff < 1e-5
    # 2 + 2 all-reduces per layer, each of B·T·d·4 = 8·64·64·4 bytes (the README line's default sizes)
    assert re.search(r"all_reduce +forward +2 \| 2 calls, +131,072 \| +131,072 bytes each", out), out
    assert re.search(r"all_reduce +backward +2 \| 2 calls, +131,072 \| +131,072 bytes each", out), out
    assert "= 1/2.00 (formula 1/N = 1/2)" in out
    # the whole model's step, counted from outside, against the formulas printed beside (L = 2 layers)
    assert "whole model per step: 8 all-reduces forward (2L + 1 embedding + 3 in the cross-entropy = 8), " \
           "5 backward (2L + 1 at the head = 5)" in out, out


@pytest.mark.parametrize("args, message", [
    (["--n-head", "6"], "--n-head 6 is not divisible by the tensor-parallel size 4 (try --n-head 8)"),
    (["--d-model", "66", "--n-head", "4"], "--d-model 66 is not divisible"),
    (["--n-head", "0"], "--n-head 0: must be at least 1"),
    (["--sequence-parallel", "--seq-len", "30"], "--seq-len 30 is not divisible by the tensor-parallel size 4")])
def test_indivisible_sizes_fail_before_any_communication(args, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun would set it; no process group is ever joined
    monkeypatch.setenv("RANK", "2")
    assert message in cli_error(tp.main, args, capsys)
    assert not dist.is_initialized()
