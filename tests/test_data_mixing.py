import collections
import json
import math

import pytest
import torch.distributed as dist

import data_mixing as dm
from harness import cli_error


def corpus(n, size, prefix):
    """n documents of exactly `size` bytes each, all different."""
    return [f"{prefix}{i:05d} ".ljust(size, "x") for i in range(n)]


def test_drawn_tokens_follow_the_weights_and_small_sources_are_upsampled():
    sources = {"web": corpus(400, 100, "w"), "code": corpus(100, 100, "c"), "books": corpus(20, 100, "b")}
    available = {k: sum(len(t) for t in v) for k, v in sources.items()}  # 40,000 / 10,000 / 2,000 bytes
    weights = {"web": 0.6, "code": 0.3, "books": 0.1}
    plan = dm.plan_mixture(available, weights, 20_000)
    stream = dm.draw_mixture(sources, plan, seed=1)
    drawn = collections.Counter()
    for name, text in stream:
        drawn[name] += len(text)
    total = sum(drawn.values())
    for name, w in weights.items():  # every document is 100 bytes: a share can be off by one document at most
        assert abs(drawn[name] / total - w) <= 100 / total, (name, drawn[name] / total)
        prefix = 0
        for i in range(1, len(stream) + 1, 50):  # the shares hold along the stream, not only at its end
            head = [n for n, _ in stream[:i]]
            prefix = max(prefix, abs(head.count(name) / i - w) * i)
        assert prefix <= 1.0 + 1e-9  # a smooth round-robin is never more than one document from its share
    # books: 2,000 tokens wanted from 2,000 available -> 1 epoch; code: 6,000 from 10,000; upsample books to 3x
    plan = dm.plan_mixture(available, {"web": 0.5, "books": 0.5}, 12_000)
    assert plan["books"]["epochs"] == pytest.approx(3.0)
    counts = collections.Counter(t for n, t in dm.draw_mixture(sources, plan) if n == "books")
    assert set(counts.values()) == {3} and len(counts) == 20  # every book exactly 3 times: whole epochs, reshuffled


def test_partial_epochs_repeat_each_document_floor_or_ceil_times():
    sources = {"a": corpus(30, 50, "a"), "b": corpus(30, 50, "b")}
    plan = dm.plan_mixture({"a": 1500, "b": 1500}, {"a": 0.75, "b": 0.25}, 5000)  # a: 2.5 epochs
    counts = collections.Counter(t for n, t in dm.draw_mixture(sources, plan) if n == "a")
    assert set(counts.values()) == {2, 3} and sum(counts.values()) == 75


def test_a_source_past_the_epoch_limit_is_refused():
    available = {"web": 1e12, "books": 2e10}
    with pytest.raises(ValueError, match=r"books would be repeated 5.0 times, past --max-epochs 4: give it a weight "
                                         r"of at most 0.08"):
        dm.plan_mixture(available, {"web": 0.9, "books": 0.1}, 1e12)
    plan = dm.plan_mixture(available, {"web": 0.9, "books": 0.1}, 1e12, max_epochs=5)
    assert plan["books"]["epochs"] == pytest.approx(5.0)
    plan = dm.plan_mixture(available, {"web": 0.92, "books": 0.08}, 1e12)  # the weight the message suggests fits
    assert plan["books"]["epochs"] == pytest.approx(4.0)


def test_plan_mixture_normalises_the_weights_and_counts_fractional_epochs():
    # weights 3:1 of 8,000 tokens, by hand: a gets 6,000 of its 4,000 (1.5 epochs), b 2,000 of its 4,000 (0.5)
    plan = dm.plan_mixture({"a": 4000, "b": 4000}, {"a": 3, "b": 1}, 8000)
    assert {k: (v["weight"], v["tokens"], v["epochs"]) for k, v in plan.items()} == {
        "a": (0.75, 6000.0, 1.5), "b": (0.25, 2000.0, 0.5)}  # exact in binary floating point
    with pytest.raises(ValueError, match="source a would be repeated 4.5 times"):  # 3 × 1.5: past the limit of 4
        dm.plan_mixture({"a": 4000, "b": 4000}, {"a": 3, "b": 1}, 24000)


def records(n):
    return [{"id": str(i), "source": f"f{i}.py" if i % 3 == 0 else f"f{i}.txt", "text": f"text {i} " * (i + 1)}
            for i in range(n)]


def test_curriculum_stages_take_their_share_and_anneal_on_the_best_tenth(tmp_path):
    recs = records(30)
    scores = [(i * 7) % 30 for i in range(30)]  # a permutation of 0..29: higher is better
    plan = dm.plan_curriculum(recs, scores, 1e6)
    assert [s["stage"] for s in plan] == ["general", "high-quality", "code-and-math", "annealing"]
    for stage, (_, share) in zip(plan, dm.CURRICULUM):
        assert stage["tokens"] == pytest.approx(1e6 * share)
        assert stage["epochs"] == pytest.approx(1e6 * share / sum(len(r["text"]) for r in stage["pool"]))
    best = sorted(range(30), key=lambda i: -scores[i])[:3]
    assert sorted(r["id"] for r in plan[-1]["pool"]) == sorted(str(i) for i in best)
    assert all(r["source"].endswith(".py") for r in plan[2]["pool"])
    with pytest.raises(ValueError, match="annealing stage holds 10 %"):
        dm.plan_curriculum(recs, scores, 1e6, (("general", 0.9), ("annealing", 0.1)))
    paths = dm.write_curriculum(plan, str(tmp_path / "cur"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["stage_00_general.jsonl", "stage_01_high-quality.jsonl",
                                                    "stage_02_code-and-math.jsonl", "stage_03_annealing.jsonl"]
    stages = dm.read_curriculum(str(tmp_path / "cur"))
    assert [name for name, _ in stages] == [s["stage"] for s in plan]
    for (name, recs_read), stage in zip(stages, plan):
        assert [r["text"] for r in recs_read] == [r["text"] for r in stage["pool"]]
        assert {r["stage"] for r in recs_read} == {name} and set(recs_read[0]) == {"id", "source", "stage", "text"}


def test_a_directory_without_stages_is_refused_in_one_line(tmp_path):
    (tmp_path / "clean.jsonl").write_text(json.dumps({"id": "1", "source": "s", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match="no stage shards") as info:
        dm.read_curriculum(str(tmp_path))
    assert "\n" not in str(info.value)
    (tmp_path / "stage_00_general.jsonl").write_text(json.dumps({"id": "1", "source": "s", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match="not tagged with its shard's stage 'general'"):
        dm.read_curriculum(str(tmp_path))


def test_post_training_formats():
    good = {"instruction": "Add.", "input": "2 2", "output": "4"}
    assert dm.validate_sft(good) == [] and dm.validate_sft({"instruction": " ", "output": "x"}) == ["empty instruction"]
    assert dm.to_chat(good) == [{"role": "user", "content": "Add.\n\n2 2"}, {"role": "assistant", "content": "4"}]
    assert dm.validate_preference({"prompt": "p", "chosen": "a", "rejected": "a"}) == ["chosen equals rejected"]
    stats = dm.post_training_stats([good, good, {"instruction": "x"}], "sft")
    assert stats["duplicates"] == 1 and stats["valid"] == 2 and stats["problems"] == {"missing output": 1}


def test_plan_prints_tokens_per_parameter_beside_chinchilla_and_known_models(capsys):
    rows = dm.main(["--plan", "--params", "7e9", "--tokens", "2e12"])
    out = capsys.readouterr().out
    by_name = {name: ratio for name, _, _, ratio in rows}
    assert by_name["your plan"] == pytest.approx(2e12 / 7e9)  # 286 tokens per parameter
    assert by_name["Chinchilla-optimal for your N"] == 20
    assert by_name["Llama 2 7B (Touvron et al. 2023b)"] == pytest.approx(2e12 / 7e9)
    assert len([r for r in rows if r[0].startswith(("LLaMA", "Llama"))]) >= 6 and any("Qwen" in r[0] for r in rows)
    assert "14.3x Chinchilla" in out and f"{6 * 7e9 * 2e12:.3g} FLOP" in out
    for name, n, d, ratio in rows:  # every printed row carries D / N of its own numbers
        assert ratio == pytest.approx(d / n) and f"{ratio:.0f}" in out


def test_cli_mixes_real_folders_and_writes_the_stream(tmp_path, capsys):
    out = tmp_path / "mix.jsonl"
    dm.main(["--mix", "code=0.15,docs=0.85", "--source", "code=json", "--source", "docs=email", "--tokens", "1e6",
             "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    share = sum(len(r["text"].encode()) for r in rows if r["source"] == "code") / sum(len(r["text"].encode()) for r in rows)
    assert abs(share - 0.15) < 0.03 and "drawn share" in capsys.readouterr().out  # within one file (15 kB at most)
    assert not dist.is_initialized()


@pytest.mark.parametrize("args, message", [
    (["--params", "-1"], "--params -1: must be positive"),
    (["--mix", "a=1"], "--mix names sources without a --source: a"),
    (["--mix", "a=x", "--source", "a=json"], "--mix a=x: 'x' is not a number"),
    (["--mix", "a=1", "--source", "a=/no/such"], "/no/such: no such file or folder"),
    (["--curriculum", "out"], "--curriculum DIR and --data clean.jsonl (the pipeline's output) go together"),
    (["--mix", "code=0.5,docs=0.5", "--source", "code=json", "--source", "docs=email", "--tokens", "1e9"],
     "source code would be repeated"),
])
def test_bad_input(args, message, capsys):
    assert message in cli_error(dm.main, args, capsys)
    assert not dist.is_initialized()


def test_curriculum_cli_needs_the_pipeline_scores(tmp_path, capsys):
    data = tmp_path / "clean.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "source": "s.txt", "text": f"doc {i}"}) + "\n" for i in range(5)))
    assert "records need the pipeline's quality score" in cli_error(dm.main, ["--data", str(data), "--curriculum",
                                                                                str(tmp_path / "c")], capsys)
    data.write_text("".join(json.dumps({"id": str(i), "source": "s.txt", "text": f"doc {i} " * 50, "quality": i / 50})
                            + "\n" for i in range(50)))
    plan = dm.main(["--data", str(data), "--curriculum", str(tmp_path / "c")])
    assert [r["id"] for r in dm.read_curriculum(str(tmp_path / "c"))[-1][1]] == ["49", "48", "47", "46", "45"]
    assert math.isclose(sum(s["share"] for s in plan), 1.0)
