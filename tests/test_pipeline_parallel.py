import time

import pytest
import torch
import torch.distributed as dist

import pipeline_parallel as pp
from harness import cli_error, readme_command, run_distributed, run_torchrun


def test_partition_layers_is_balanced_and_covers_every_layer():
    for n_layers in range(1, 13):
        for p in range(1, n_layers + 1):
            parts = pp.partition_layers(n_layers, p)
            assert [i for r in parts for i in r] == list(range(n_layers))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="4 pipeline stages but only 2 layers"):
        pp.partition_layers(2, 4)


@pytest.mark.parametrize("kind", pp.SCHEDULES)
def test_schedules_are_complete_ordered_and_deadlock_free(kind):
    for p in range(1, 9):
        for m in range(1, 17):
            for rank in range(p):
                acts = pp.schedule(kind, p, m, rank)
                pieces = ("F", "B", "W") if kind == "zb-h1" else ("F", "B")
                assert sorted(acts) == sorted((a, i) for a in pieces for i in range(m)), (kind, p, m, rank)
                where = {a: i for i, a in enumerate(acts)}
                assert all(where["F", i] < where["B", i] for i in range(m))
                if kind == "zb-h1":
                    assert all(where["B", i] < where["W", i] for i in range(m))
                # live activations counted from the order itself: a micro-batch is alive from F to its last piece
                alive = peak = 0
                for a, _ in acts:
                    alive += 1 if a == "F" else (-1 if a == ("W" if kind == "zb-h1" else "B") else 0)
                    peak = max(peak, alive)
                assert peak == (m if kind == "gpipe" else min(m, p - rank)), (kind, p, m, rank, peak)
            t = pp.simulate(kind, p, m)  # raises if the ranks' orders wait on each other in a cycle
            assert t["peak_activations"] == [m if kind == "gpipe" else min(m, p - r) for r in range(p)]
            if kind != "zb-h1":
                for tf, tb in ((1.0, 1.0), (1.0, 2.0)):
                    assert pp.simulate(kind, p, m, tf, tb)["bubble"] == pytest.approx(pp.bubble_formula(p, m))
            else:  # zero-bubble's point: never worse than 1F1B, strictly better when there is a cool-down to fill
                one = pp.simulate("1f1b", p, m)["bubble"]
                assert t["bubble"] <= one + 1e-12 and (p == 1 or t["bubble"] < one)


def test_render_draws_one_row_per_rank():
    text = pp.render(pp.simulate("gpipe", 3, 2, 1.0, 1.0))
    # worked out by hand: B0 starts on the last rank once its F1 is done, then travels back one rank per slot
    assert text.splitlines() == ["rank 0 | F0  F1  .   .   .   .   B0  B1 ",
                                 "rank 1 | .   F0  F1  .   .   B0  B1  .  ",
                                 "rank 2 | .   .   F0  F1  B0  B1  .   .  "]


def _pipeline_equals_single_process():
    rank, p = dist.get_rank(), dist.get_world_size()
    cfg = pp.GPTConfig(n_layer=4, d_model=32, n_head=4, seq_len=16, tie_weights=False)
    data = pp.load_text(max_bytes=100_000)
    checked = 0
    for m in (4, 8):
        x, y = pp.get_batch(data, 8, cfg.seq_len, torch.Generator().manual_seed(m))
        torch.manual_seed(0)
        reference = pp.TinyGPT(cfg)
        reference(x, y).backward()
        want = dict(reference.named_parameters())
        for kind in pp.SCHEDULES:
            torch.manual_seed(0)
            model = pp.TinyGPT(cfg)
            stage = pp.PipelineStage(model, rank, p)
            runner = pp.StageRunner(stage, rank, p, split_backward=kind == "zb-h1")
            runner.run(pp.schedule(kind, p, m, rank), list(x.split(8 // m)), list(y.split(8 // m)),
                       (8 // m, cfg.seq_len, cfg.d_model))
            names = {id(q): n for n, q in model.named_parameters()}
            for q in stage.parameters():
                # summing m micro-batch gradients (each loss scaled 1/m) reorders float additions: 1e-5 relative
                torch.testing.assert_close(q.grad, want[names[id(q)]].grad, rtol=1e-5, atol=1e-7,
                                           msg=f"{kind} m={m} {names[id(q)]}")
                checked += 1
    # five training steps against single-process AdamW on the same batches
    for kind in ("gpipe", "1f1b"):
        out = pp.train(kind, 4, steps=5, batch_size=8, cfg=cfg, data=data)
        torch.manual_seed(0)
        reference = pp.TinyGPT(cfg)
        opt = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(5):
            xb, yb = pp.get_batch(data, 8, cfg.seq_len, gen)
            loss = reference(xb, yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert out["losses"] == pytest.approx(losses, rel=1e-5)
        ref = dict(reference.named_parameters())
        for name, q in out["params"].items():
            # Adam normalises every update to about lr (3e-3): where a gradient element is almost zero, rounding in
            # the micro-batch sums can change its update by a fraction of lr (seen: 2.8e-5 on 1 element in 4096).
            # lr/10 bounds that; a wrong gradient moves parameters by whole multiples of lr. The losses above
            # already agree to 1e-5 relative at every step.
            torch.testing.assert_close(q, ref[name].detach(), rtol=1e-4, atol=3e-4, msg=f"{kind} {name}")
    return checked


@pytest.mark.parametrize("world_size", [2, 4])
def test_gradients_and_training_equal_single_process(world_size):
    checked = run_distributed(_pipeline_equals_single_process, world_size)
    assert all(c > 0 for c in checked)


def _rank_1_dies():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 died")
    pp.train("1f1b", 4, steps=1, batch_size=8, cfg=pp.GPTConfig(n_layer=2, d_model=16, n_head=2, seq_len=8,
                                                                   tie_weights=False))


def test_a_dead_peer_does_not_hang_the_others():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank"):
        run_distributed(_rank_1_dies, 2, timeout=60, pg_timeout=5)
    assert time.monotonic() - t0 < 45


def test_readme_torchrun_line_trains_and_reports_the_bubble():
    out = run_torchrun(readme_command("pipeline_parallel.py"), "--steps 3").stdout
    assert "(p-1)/(m+p-1) = 0.273" in out
    for r, formula in enumerate((4, 3, 2, 1)):
        row = next(line for line in out.splitlines() if line.startswith(f"   {r} |"))
        assert row.split()[-2:] == [str(formula), str(formula)], row  # peak live micro-batches = p - rank


@pytest.mark.parametrize("args, env, message", [
    (["--n-layer", "2"], {"WORLD_SIZE": "4"}, "4 pipeline stages but only --n-layer 2"),
    (["--batch-size", "10", "--microbatches", "4"], {}, "--batch-size 10 is not divisible by --microbatches 4"),
    (["--schedule", "interleaved-x"], {}, "invalid choice: 'interleaved-x'")])
def test_bad_input_is_one_line_before_any_communication(args, env, message, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert message in cli_error(pp.main, args, capsys)
    assert not dist.is_initialized()


def test_interleaved_schedule_is_complete_and_shrinks_the_bubble_by_v():
    for p in range(1, 9):
        for m in range(p, 17, p):
            for v in (2, 3):
                for rank in range(p):
                    acts = pp.schedule("interleaved", p, m, rank, virtual=v)
                    assert sorted(acts) == sorted((a, i, c) for a in "FB" for i in range(m) for c in range(v))
                    where = {x: k for k, x in enumerate(acts)}
                    assert all(where["F", i, c] < where["B", i, c] for i in range(m) for c in range(v))
                t = pp.simulate("interleaved", p, m, virtual=v)  # raises on a deadlock
                # v chunks per rank cut each fill/drain step to 1/v: (p-1)/(v·m+p-1), exactly with uniform costs
                assert t["bubble"] == pytest.approx(pp.bubble_formula(p, m, v))
    with pytest.raises(ValueError, match="multiple of the stages"):
        pp.schedule("interleaved", 4, 6, 0)
