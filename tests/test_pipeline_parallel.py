import os
import statistics
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
    with pytest.raises(ValueError, match="not a multiple of the 4 stages"):
        pp.schedule("interleaved", 4, 6, 0)


# --- NCCL's rules, checked on paper ---------------------------------------------------------------------------

def _completes(batches: list[list[list[tuple]]]) -> bool:
    """batches[r]: rank r's posts in order, each a list of ops ("send" | "recv", peer); the k-th send r -> q matches
    the k-th recv of q from r. The strictest reading of NCCL's rules: a rank stays at a batch until all its ops are
    done; an op is done once its peer has posted the match and that peer's batch has started, i.e. every op of the
    peer's batch has found its own match posted. True if every rank gets through, False on a deadlock."""
    p, where = len(batches), {}
    for r in range(p):
        count = {}
        for b, ops in enumerate(batches[r]):
            for op, q in ops:
                k = count[op, q] = count.get((op, q), -1) + 1
                where[(r, q, k, op) if op == "send" else (q, r, k, op)] = (r, b)
    assert sorted(k[:3] for k in where if k[3] == "send") == sorted(k[:3] for k in where if k[3] == "recv")
    partners = {}  # (rank, batch) -> the (rank, batch) posting the match of each of its ops
    for (src, dst, k, op), at in where.items():
        partners.setdefault(at, []).append(where[src, dst, k, "recv" if op == "send" else "send"])
    pos = [0] * p
    posted = lambda q, b: pos[q] >= b
    started = lambda at: all(posted(*x) for x in partners.get(at, []))
    while not all(pos[r] == len(batches[r]) for r in range(p)):
        ready = [r for r in range(p) if pos[r] < len(batches[r])
                 and all(posted(*x) and started(x) for x in partners.get((r, pos[r]), []))]
        if not ready:
            return False
        for r in ready:
            pos[r] += 1
    return True


def _posts(plan: list[tuple], rank: int, p: int) -> list[list[tuple]]:
    """The batches a comm_plan posts: each ("post", send, recv) step, directions without a neighbour dropped."""
    peer = {"prev": rank - 1, "next": rank + 1, None: -1}
    out = []
    for step in plan:
        if step[0] == "post":
            ops = [("send", peer[step[1]])] + [("recv", peer[d]) for d in step[2]]
            out.append([(op, q) for op, q in ops if 0 <= q < p])
    return out


def test_runner_never_deadlocks_under_nccl_rules_and_the_old_order_does():
    for kind in pp.SCHEDULES:
        for p in range(1, 9):
            for m in range(1, 17):
                assert _completes([_posts(pp.comm_plan(kind, p, m, r), r, p) for r in range(p)]), (kind, p, m)
    # the checker can fail: the old runner posted each op alone in program order (receive, compute, send): in
    # 1F1B's steady state both neighbours send first and wait for the other's receive forever
    old = lambda p, m, r: [[op] for ops in _posts(pp.comm_plan("1f1b", p, m, r), r, p) for op in ops]
    assert not _completes([old(2, 4, r) for r in range(2)])
    # and what the plan avoids: at every point between two actions, one batch of the send just made and the
    # receive the next action needs. At GPipe's turn from forwards to backwards rank r then batches activation m-1
    # with gradient 0, while rank r+1 posts their counterparts in two different batches: a deadlock
    assert not _completes([_every_point_one_batch("gpipe", 3, 2, r) for r in range(3)])


def _every_point_one_batch(kind: str, p: int, m: int, r: int) -> list[list[tuple]]:
    acts = pp.schedule(kind, p, m, r)
    peer = {"prev": r - 1, "next": r + 1}
    points = [[]] + [[("send", peer[pp.SEND[a[0]]])] for a in acts]  # points[k]: between actions k-1 and k
    for k, a in enumerate(acts):
        points[k] += [("recv", peer[d]) for d in pp.RECV[a[0]]]
    return [[(op, q) for op, q in ops if 0 <= q < p] for ops in points]


# --- the runner on gloo with NCCL's rules emulated, against the single-process model -----------------------------

def _grads_equal_single_process(cfg, data, group, m: int = 3) -> None:
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    x, y = pp.get_batch(data, 2 * m, cfg.seq_len, torch.Generator().manual_seed(m))  # m micro-batches of 2
    torch.manual_seed(0)
    reference = pp.TinyGPT(cfg)
    reference(x, y).backward()
    grads = {}
    for kind in pp.SCHEDULES + ("1f1b written out",):
        torch.manual_seed(0)
        model = pp.TinyGPT(cfg)
        stage = pp.PipelineStage(model, rank, p, group)
        runner = pp.StageRunner(stage, (2, cfg.seq_len, cfg.d_model), group)
        inputs, targets = list(x.split(2)), list(y.split(2))
        if kind in pp.SCHEDULES:
            loss = runner.run(kind, inputs, targets)
        else:
            loss = runner.one_f_one_b(inputs, targets)
        if stage.last:  # the m scaled micro-batch losses add up to the batch's mean loss
            assert loss == pytest.approx(reference(x, y).item(), rel=1e-5)
        stage.all_reduce_tied_grad()
        to_reference = dict(zip(map(id, model.parameters()), reference.parameters()))
        for q in stage.parameters():
            # summing m micro-batch gradients (each loss scaled 1/m) reorders float additions: 1e-5 relative
            torch.testing.assert_close(q.grad, to_reference[id(q)].grad, rtol=1e-5, atol=1e-7, msg=f"{kind} p={p}")
        grads[kind] = [q.grad for q in stage.parameters()]
    # the loop written out makes the same calls in the same order as run() on 1F1B's actions: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(grads["1f1b"], grads["1f1b written out"]))


def _training_equals_single_process(cfg, data, group, kind: str, steps: int = 2) -> None:
    out = pp.train(kind, 4, steps=steps, batch_size=8, cfg=cfg, data=data, group=group)
    torch.manual_seed(0)
    reference = pp.TinyGPT(cfg)
    opt = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        xb, yb = pp.get_batch(data, 8, cfg.seq_len, gen)
        loss = reference(xb, yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert out["losses"] == pytest.approx(losses, rel=1e-5)
    ref = dict(reference.named_parameters())  # tied: the head's weight is named tok_emb.weight, on both end stages
    for name, q in out["params"].items():
        # Adam normalises every update to about lr (3e-3): where a gradient element is almost zero, rounding in
        # the micro-batch sums can change its update by a fraction of lr (seen: 2.8e-5 on 1 element in 4096).
        # lr/10 bounds that; a wrong gradient (an embedding that missed the head's part) moves by whole lr's.
        torch.testing.assert_close(q, ref[name].detach(), rtol=1e-4, atol=3e-4, msg=f"{kind} {name}")
    # bytes counted by CommCounter: m activations to the next stage, m gradients to the previous, per step
    p, r = dist.get_world_size(group), dist.get_rank(group)
    assert out["sent_bytes"] == 4 * (8 // 4) * cfg.seq_len * cfg.d_model * 4 * ((r < p - 1) + (r > 0))


def _pipelines() -> tuple[list[int], dict | None]:
    """Pipelines of p = 2, 3 and 4 stages, each on the first p ranks of one job (a group of them), one after the
    other: gradients of one step for every schedule (m = 3: rank 0 of p = 4 has no steady state, the others do),
    and training with a tied embedding and head (one schedule per p), against TinyGPT in one process. At p = 2,
    the bubble measurements that test_measured_bubble_is_a_measurement checks (one job for both saves a start)."""
    cfg = pp.GPTConfig(n_layer=4, d_model=32, n_head=4, seq_len=16)  # ties embedding and head, as by default
    data = pp.load_text(max_bytes=100_000)
    done, bubbles = [], None
    for p, kind in zip((2, 3, 4), pp.SCHEDULES):
        group = dist.new_group(list(range(p)))  # every rank joins the call; the first p are the pipeline
        if dist.get_rank() < p:
            bubbles = _bubbles(group) if p == 2 else bubbles
            _grads_equal_single_process(cfg, data, group)
            _training_equals_single_process(cfg, data, group, kind)
            done.append(p)
    return done, bubbles


@pytest.fixture(scope="module")
def pipelines():
    return run_distributed(_pipelines, 4, nccl_rules=True, timeout=300)


def test_every_schedule_under_nccl_rules_equals_single_process(pipelines):
    assert [done for done, _ in pipelines] == [[2, 3, 4], [2, 3, 4], [3, 4], [4]]


# --- the measured bubble is a measurement ---------------------------------------------------------------------

def _bubbles(group, steps: int = 3, mb: int = 8) -> dict:
    """Timeline's measurements of m = 1 and m = 4 micro-batches of the same size, steps alternating so that both
    meet the same load on a shared machine. Per schedule and m: each step's (bubble, events, window). A micro-batch
    of 8 × 128 tokens computes long enough that a message's latency (milliseconds on a busy machine) stays small."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    if hasattr(os, "sched_setaffinity"):  # a core each (Linux): two ranks computing at once do not share one
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    cfg = pp.GPTConfig(n_layer=2, d_model=128, n_head=4, seq_len=128)
    data, gen = pp.load_text(max_bytes=100_000), torch.Generator().manual_seed(0)
    out = {}
    for kind in pp.SCHEDULES:
        torch.manual_seed(0)
        stage = pp.PipelineStage(pp.TinyGPT(cfg), rank, p, group)
        runner = pp.StageRunner(stage, (mb, cfg.seq_len, cfg.d_model), group)
        timeline = pp.Timeline(runner)
        for _ in range(steps):
            for m in (1, 4):
                x, y = pp.get_batch(data, mb * m, cfg.seq_len, gen)
                runner.run(kind, list(x.split(mb)), list(y.split(mb)))
                stage.zero_grad(set_to_none=True)
                out.setdefault((kind, m), []).append((timeline.bubbles[-1], timeline.events, timeline.windows[-1]))
    return out


def test_measured_bubble_is_a_measurement(pipelines):
    per_rank = [bubbles for _, bubbles in pipelines[:2]]  # p = 2, under NCCL's rules as it would run on GPUs
    for kind in pp.SCHEDULES:
        mean = {}
        for m in (1, 4):
            steps = list(zip(per_rank[0][kind, m], per_rank[1][kind, m]))[1:]  # the first step warms up
            for ranks in steps:
                assert all(0 <= bubble < 1 for bubble, _, _ in ranks), (kind, m)
                # The simulator, given this step's own compute times, places the same actions as early as their
                # dependencies allow, with free communication: no real run can idle less. The only noise is at
                # the step's two ends: each rank reads its clock on leaving a barrier, a little apart from the
                # other. That spread, read from the absolute timestamps (one host, one clock), is the margin, as a
                # share of the step.
                sim = pp.simulate(kind, 2, m, durations={(a, i, r): end - start for r, (_, events, _) in
                                                         enumerate(ranks) for a, i, start, end in events})
                starts, ends = zip(*(window for _, _, window in ranks))
                skew = (max(ends) - min(ends) + max(starts) - min(starts)) / min(e - s for s, e in zip(starts, ends))
                measured = statistics.mean(bubble for bubble, _, _ in ranks)
                assert measured >= sim["bubble"] - skew - 1e-9, (kind, m, measured, sim["idle"], skew)
            mean[m] = statistics.median(statistics.mean(bubble for bubble, _, _ in ranks) for ranks in steps)
        # fewer micro-batches, more idle: 1/2 vs 1/5 by the formula (zb-h1: 0.4 vs 0.14)
        assert mean[1] > mean[4], (kind, mean)


def _rank_1_dies():
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 died")
    pp.train("1f1b", 4, steps=1, batch_size=8, cfg=pp.GPTConfig(n_layer=2, d_model=16, n_head=2, seq_len=8))


def test_a_dead_peer_does_not_hang_the_others():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank"):
        run_distributed(_rank_1_dies, 2, timeout=60, pg_timeout=5)
    assert time.monotonic() - t0 < 45


def test_readme_torchrun_line_trains_and_reports_the_bubble():
    out = run_torchrun(readme_command("pipeline_parallel.py"), "--steps 2").stdout
    assert "(p-1)/(m+p-1) = 0.273" in out
    for r, formula in enumerate((4, 3, 2, 1)):
        row = next(line for line in out.splitlines() if line.startswith(f"   {r} |"))
        cells = row.split("|")
        assert cells[2].split() == [str(formula), str(formula)], row  # peak live micro-batches = p - rank
        measured, formula_kib = map(float, cells[3].split())
        assert measured == formula_kib > 0, row  # bytes sent, counted, = m activations and/or gradients


@pytest.mark.parametrize("args, env, message", [
    (["--n-layer", "2"], {"WORLD_SIZE": "4"}, "4 pipeline stages but only 2 layers: use --n-layer 4"),
    (["--batch-size", "10", "--microbatches", "4"], {}, "--batch-size 10 is not divisible by --microbatches 4"),
    (["--simulate", "--schedule", "interleaved", "--microbatches", "6"], {}, "--microbatches 6 is not a multiple"),
    (["--schedule", "interleaved"], {}, "--schedule interleaved runs in the simulator only"),
    (["--seq-len", "100000", "--data", __file__], {}, "lower --seq-len"),
    (["--schedule", "interleaved-x"], {}, "invalid choice: 'interleaved-x'")])
def test_bad_input_is_one_line_before_any_communication(args, env, message, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert message in cli_error(pp.main, args, capsys)
    assert not dist.is_initialized()
