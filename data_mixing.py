"""What to train on, in what proportion and in what order: mixtures, upsampling, curricula, post-training formats.

A mixture gives source i a weight w_i (Σ w_i = 1). A run of D tokens draws w_i·D tokens from it; a source that holds
only A_i tokens is repeated (upsampled) for

    epochs_i = w_i·D / A_i,

and past about 4 epochs repeated data stops paying (Muennighoff et al. 2023), so a plan that asks for more is refused.
A curriculum orders the tokens in stages; the last one, the annealing stage, spends 1-5 % of them on the best data
while the learning rate decays. How many tokens at all: compute-optimal is D ≈ 20·N for N parameters (Hoffmann et al.
2022, "Chinchilla"); models meant to be served are over-trained far beyond it, and `--plan` prints by how much.

Run:   python data_mixing.py --plan --params 7e9 --tokens 2e12
       python data_mixing.py --mix code=0.15,docs=0.85 --source code=json --source docs=email --tokens 1e6
       python data_pipeline.py --output clean.jsonl && python data_mixing.py --data clean.jsonl --curriculum stages/
       torchrun --nproc_per_node=2 data_mixing.py --plan          (planning is one process's work: rank 0 prints)
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# --- mixtures and upsampling ----------------------------------------------------------------------

# Published mixtures (sampling weights of the training tokens):
MIXTURE_PRESETS = {
    # GPT-3, Brown et al. 2020, table 2.2
    "gpt3": {"common_crawl": 0.60, "webtext2": 0.22, "books1": 0.08, "books2": 0.08, "wikipedia": 0.03},
    # LLaMA, Touvron et al. 2023, table 1
    "llama": {"common_crawl": 0.670, "c4": 0.150, "github": 0.045, "wikipedia": 0.045, "books": 0.045,
              "arxiv": 0.025, "stack_exchange": 0.020},
    # DeepSeek-Coder, Guo et al. 2024, section 2: 87 % code, 10 % code-related English, 3 % Chinese
    "deepseek-coder": {"code": 0.87, "code_related_english": 0.10, "chinese": 0.03},
}
MAX_USEFUL_EPOCHS = 4.0  # Muennighoff et al. 2023: up to ~4 epochs of repeated data are almost as good as new data


def plan_mixture(available: dict[str, float], weights: dict[str, float], total_tokens: float,
                 max_epochs: float = MAX_USEFUL_EPOCHS) -> dict[str, dict]:
    """Tokens and epochs per source for a run of total_tokens: w_i·D tokens, w_i·D / A_i epochs. A source that
    would be repeated more than max_epochs times is refused, with the largest weight it can carry."""
    if set(weights) - set(available):
        raise ValueError(f"weights for unknown sources {sorted(set(weights) - set(available))}: add them with --source")
    norm = sum(weights.values())
    if norm <= 0:
        raise ValueError("the mixture weights must add up to more than 0")
    plan = {}
    for name, w in weights.items():
        # BEGIN SOLUTION
        tokens = total_tokens * w / norm
        epochs = tokens / available[name] if available[name] else float("inf")
        # END SOLUTION
        if epochs > max_epochs:
            raise ValueError(f"source {name} would be repeated {epochs:.1f} times, past --max-epochs {max_epochs:g}: "
                             f"give it a weight of at most {max_epochs * available[name] / total_tokens:.3g} "
                             f"or find more of it")
        plan[name] = {"weight": w / norm, "available": available[name], "tokens": tokens, "epochs": epochs}
    return plan


def draw_mixture(sources: dict[str, list[str]], plan: dict[str, dict], seed: int = 0) -> list[tuple[str, str]]:
    """The training stream, (source, text) in order, until the plan's tokens are spent. At every draw the source
    furthest below its share of what has been drawn gives its next document (a smooth weighted round-robin, so the
    shares hold at every point of the stream, not only at its end); each source runs through its documents in a
    fresh random order every epoch, so an upsampled source repeats each document ⌊epochs⌋ or ⌈epochs⌉ times."""
    rng = random.Random(seed)
    queues = {name: [] for name in plan}
    drawn = dict.fromkeys(plan, 0)
    total_goal = sum(p["tokens"] for p in plan.values())
    stream, total = [], 0
    while total < total_goal:
        # deficit of each source that still has tokens to give: its share of the total so far, minus its draws
        open_ = [n for n in plan if drawn[n] < plan[n]["tokens"]]
        name = max(open_, key=lambda n: plan[n]["weight"] * (total + 1) - drawn[n])
        if not queues[name]:  # a new epoch of this source
            queues[name] = rng.sample(sources[name], len(sources[name]))
        text = queues[name].pop()
        stream.append((name, text))
        drawn[name] += len(text.encode("utf-8"))  # bytes are our tokens (vocab 256)
        total += len(text.encode("utf-8"))
    return stream


# --- curricula and annealing --------------------------------------------------------------------

CURRICULUM = (("general", 0.60), ("high-quality", 0.25), ("code-and-math", 0.12), ("annealing", 0.03))
MATH = re.compile(r"\\(frac|sum|int)|\$[^$]+\$")


def is_code(record: dict) -> bool:
    return record.get("kind") == "code" or str(record.get("source", "")).split(":")[0].endswith(".py")


def plan_curriculum(records: list[dict], scores: list[float], total_tokens: float,
                    stages: tuple = CURRICULUM) -> list[dict]:
    """Order the training tokens in stages: all the data first, then more of its best third, then code and math,
    and last an annealing stage (1-5 % of the tokens) on the best tenth only, for the decay of a WSD learning-rate
    schedule. `scores` rank quality (higher = better: the pipeline's classifier score)."""
    if not 0.01 <= stages[-1][1] <= 0.05:
        raise ValueError(f"the annealing stage holds {100 * stages[-1][1]:g} % of the tokens: give it 1-5 %")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    pools = {"general": records,
             "high-quality": [records[i] for i in order[: max(1, len(order) // 3)]],
             "code-and-math": [r for r in records if is_code(r) or MATH.search(r["text"])] or records,
             "annealing": [records[i] for i in order[: max(1, len(order) // 10)]]}
    plan = []
    for name, share in stages:
        pool_tokens = sum(len(r["text"].encode("utf-8")) for r in pools[name])
        plan.append({"stage": name, "share": share, "tokens": total_tokens * share, "docs": len(pools[name]),
                     "epochs": total_tokens * share / max(1, pool_tokens), "pool": pools[name]})
    return plan


def write_curriculum(plan: list[dict], out_dir: str) -> list[str]:
    """One JSONL shard per stage, each record tagged with its stage (`stage_00_general.jsonl`, ...)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stage in enumerate(plan):
        path = Path(out_dir) / f"stage_{i:02d}_{stage['stage']}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for d in stage["pool"]:
                f.write(json.dumps({"id": d["id"], "source": d["source"], "stage": stage["stage"],
                                    "text": d["text"]}) + "\n")
        paths.append(str(path))
    return paths


STAGE_FILE = re.compile(r"stage_(\d+)_(.+)\.jsonl$")


def read_curriculum(out_dir: str) -> list[tuple[str, list[dict]]]:
    """The stages of a curriculum directory in order, as (stage, records); a directory without stage shards, or a
    record whose tag is not its shard's stage, is refused with one line."""
    shards = sorted((int(m.group(1)), m.group(2), p) for p in Path(out_dir).glob("stage_*.jsonl")
                    if (m := STAGE_FILE.search(p.name)))
    if not shards:
        raise ValueError(f"{out_dir}: no stage shards (stage_00_<name>.jsonl, ...): write them with "
                         f"`python data_mixing.py --data clean.jsonl --curriculum {out_dir}`")
    stages = []
    for _, name, path in shards:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if any(r.get("stage") != name for r in records):
            raise ValueError(f"{path}: a record is not tagged with its shard's stage {name!r}")
        stages.append((name, records))
    return stages


# --- post-training data: SFT and preference formats ----------------------------------------------------


def validate_sft(record: dict) -> list[str]:
    """Problems of an instruction-tuning record {instruction, input (optional), output}."""
    problems = [f"missing {k}" for k in ("instruction", "output") if k not in record]
    problems += [f"empty {k}" for k in ("instruction", "output") if k in record and not str(record[k]).strip()]
    problems += [f"{k} is not text" for k in ("instruction", "input", "output")
                 if k in record and not isinstance(record[k], str)]
    return problems


def validate_preference(record: dict) -> list[str]:
    """Problems of a preference record {prompt, chosen, rejected} (the DPO / reward-model format)."""
    problems = [f"missing {k}" for k in ("prompt", "chosen", "rejected") if k not in record]
    problems += [f"empty {k}" for k in ("prompt", "chosen", "rejected") if k in record and not str(record[k]).strip()]
    if not problems and record["chosen"].strip() == record["rejected"].strip():
        problems.append("chosen equals rejected")
    return problems


def to_chat(record: dict) -> list[dict]:
    """An SFT record as role/content messages: the instruction (and its input) from the user, the output from the
    assistant."""
    if validate_sft(record):
        raise ValueError(f"not a valid SFT record: {', '.join(validate_sft(record))}")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input", "").strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def post_training_stats(records: list[dict], kind: str) -> dict:
    """Counts, problems, exact duplicates and lengths (characters) of SFT or preference records."""
    validate = validate_sft if kind == "sft" else validate_preference
    problems = collections.Counter(p for r in records for p in validate(r))
    keys = [json.dumps(r, sort_keys=True) for r in records]
    field_name = "output" if kind == "sft" else "chosen"
    lengths = [len(r.get(field_name, "")) for r in records if isinstance(r.get(field_name, ""), str)]
    return {"records": len(records), "valid": sum(not validate(r) for r in records), "problems": dict(problems),
            "duplicates": len(keys) - len(set(keys)),
            "mean_length": float(np.mean(lengths)) if lengths else 0.0, "max_length": max(lengths, default=0)}


# --- how many tokens: Chinchilla and over-training ---------------------------------------------------

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: D ≈ 20·N minimises loss for a compute budget 6·N·D
# Published (parameters, training tokens). Mixture-of-experts models count their active parameters.
KNOWN_MODELS = [
    ("GPT-3 175B (Brown et al. 2020)", 175e9, 300e9),
    ("Chinchilla 70B (Hoffmann et al. 2022)", 70e9, 1.4e12),
    ("LLaMA 1 7B (Touvron et al. 2023a)", 6.7e9, 1.0e12),
    ("LLaMA 1 65B", 65.2e9, 1.4e12),
    ("Llama 2 7B (Touvron et al. 2023b)", 7e9, 2e12),
    ("Llama 2 70B", 70e9, 2e12),
    ("Llama 3 8B (Meta 2024)", 8e9, 15e12),
    ("Llama 3 70B", 70e9, 15e12),
    ("Llama 3.1 405B (Dubey et al. 2024)", 405e9, 15.6e12),
    ("Qwen2.5 7B (Qwen team 2024)", 7.6e9, 18e12),
    ("Qwen2.5 72B", 72.7e9, 18e12),
    ("Gemma 2 9B (Gemma team 2024)", 9e9, 8e12),
    ("DeepSeek-V3, 37B active (DeepSeek-AI 2024)", 37e9, 14.8e12),
]


def chinchilla_tokens(n_params: float) -> float:
    """Compute-optimal training tokens, about 20 per parameter (Hoffmann et al. 2022)."""
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def token_plan(n_params: float, n_tokens: float) -> list[tuple[str, float, float, float]]:
    """Rows (model, parameters, tokens, tokens per parameter): the known models, Chinchilla's rule, and yours."""
    rows = [(name, n, d, d / n) for name, n, d in KNOWN_MODELS]
    rows.append(("Chinchilla-optimal for your N", n_params, chinchilla_tokens(n_params), CHINCHILLA_TOKENS_PER_PARAM))
    rows.append(("your plan", n_params, n_tokens, n_tokens / n_params))
    return rows


# --- demo --------------------------------------------------------------------------------------------


def print_plan(n_params: float, n_tokens: float) -> list[tuple[str, float, float, float]]:
    rows = token_plan(n_params, n_tokens)
    print(f"{'model':<44} {'params':>8} {'tokens':>8} {'tokens/param':>12} {'× Chinchilla':>12}")
    for name, n, d, ratio in rows:
        print(f"{name:<44} {n:>8.3g} {d:>8.3g} {ratio:>12.0f} {ratio / CHINCHILLA_TOKENS_PER_PARAM:>12.1f}")
    ratio = n_tokens / chinchilla_tokens(n_params)
    print(f"your plan: {ratio:.1f}x Chinchilla's 20 tokens per parameter "
          f"({'over-trained: more compute now, a cheaper model to serve' if ratio > 1 else 'under-trained'}); "
          f"training compute 6·N·D = {6 * n_params * n_tokens:.3g} FLOP")
    return rows


def resolve(path: str) -> Path:
    """A path, or the name of a standard-library package (`json`, `email`); one line if it is neither."""
    for p in (Path(path), Path(os.__file__).parent / path):
        if p.exists():
            return p
    raise ValueError(f"{path}: no such file or folder")


def read_records(path: str) -> list[dict]:
    """Documents as {id, source, text, ...}: data_pipeline.py's JSONL, a text file, or every .py/.txt/.md file
    under a folder (a name like `json` means that package of Python's standard library)."""
    p = resolve(path)
    if p.suffix == ".jsonl":
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in (".py", ".txt", ".md"))
    return [{"id": f"doc{i:07d}", "source": str(f), "text": f.read_text(encoding="utf-8", errors="replace")}
            for i, f in enumerate(files)]


def mixture_demo(weights: dict[str, float], paths: dict[str, str], total_tokens: float, max_epochs: float,
                 output: str | None, seed: int) -> dict:
    """Plan the mixture over the given sources, draw the stream, print planned and drawn shares and epochs."""
    sources = {name: [r["text"] for r in read_records(path) if r["text"]] for name, path in paths.items()}
    plan = plan_mixture({n: sum(len(t.encode("utf-8")) for t in sources[n]) for n in weights}, weights,
                        total_tokens, max_epochs)
    stream = draw_mixture({n: sources[n] for n in plan}, plan, seed)
    drawn = collections.Counter()
    for name, text in stream:
        drawn[name] += len(text.encode("utf-8"))
    total = sum(drawn.values())
    print(f"{'source':<22} {'weight':>7} {'available':>11} {'planned':>11} {'drawn':>11} {'drawn share':>11} "
          f"{'epochs':>7}")
    for name, s in plan.items():
        print(f"{name:<22} {s['weight']:>7.3f} {s['available']:>11.3g} {s['tokens']:>11.3g} {drawn[name]:>11.3g} "
              f"{drawn[name] / total:>11.3f} {drawn[name] / s['available']:>7.2f}")
    if output:
        with open(output, "w", encoding="utf-8") as f:
            for i, (name, text) in enumerate(stream):
                f.write(json.dumps({"id": f"mix{i:08d}", "source": name, "text": text}, ensure_ascii=False) + "\n")
        print(f"wrote {len(stream)} documents ({total:.3g} tokens) to {output}")
    return {"plan": plan, "drawn": dict(drawn)}


def curriculum_demo(data: str, out_dir: str, total_tokens: float | None) -> list[dict]:
    """Stages from the pipeline's output, ranked by its classifier score, written as stage-tagged shards."""
    records = read_records(data)
    if not records or not all("quality" in r for r in records):
        raise ValueError(f"--data {data}: records need the pipeline's quality score: write them with "
                         f"`python data_pipeline.py --output clean.jsonl` (its classifier stage on)")
    total = total_tokens or sum(len(r["text"].encode("utf-8")) for r in records)
    plan = plan_curriculum(records, [r["quality"] for r in records], total)
    for path, stage in zip(write_curriculum(plan, out_dir), plan):
        print(f"curriculum {stage['stage']:<14} {100 * stage['share']:>5.1f}% of {total:.3g} tokens, "
              f"{stage['docs']} docs, {stage['epochs']:.2f} epochs -> {path}")
    return plan


def parse_pairs(items: list[str], flag: str, convert=str) -> dict:
    """`a=1,b=2` (repeatable) as a dict; a malformed item is a one-line error naming the flag."""
    out = {}
    for item in ",".join(items).split(","):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{flag} {item}: write name=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = convert(v)
        except ValueError:
            raise ValueError(f"{flag} {item}: {v!r} is not a number") from None
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true",
                        help="print the token plan for --params and --tokens beside published models (the default "
                             "when neither --mix nor --curriculum is given)")
    parser.add_argument("--params", type=float, default=7e9, help="parameters N of the model to plan for")
    parser.add_argument("--tokens", type=float, default=2e12, help="training tokens D (of the plan or the mixture)")
    parser.add_argument("--mix", action="append", default=[],
                        help="name=weight,... or a preset: " + ", ".join(MIXTURE_PRESETS))
    parser.add_argument("--source", action="append", default=[],
                        help="name=PATH of a source for --mix (a folder, a file, data_pipeline's JSONL, or a "
                             "standard-library package such as json)")
    parser.add_argument("--max-epochs", type=float, default=MAX_USEFUL_EPOCHS,
                        help="refuse a mixture that repeats a source more often than this")
    parser.add_argument("--output", help="--mix: write the drawn stream here as JSONL")
    parser.add_argument("--seed", type=int, default=0, help="order of the drawn documents (any integer)")
    parser.add_argument("--data", help="--curriculum: data_pipeline.py's output JSONL")
    parser.add_argument("--curriculum", metavar="DIR", help="write stage-tagged curriculum shards of --data here")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag in ("params", "tokens", "max_epochs"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag):g}: must be positive (e.g. "
                         f"{parser.get_default(flag):g})")
    try:
        if args.mix:
            preset = len(args.mix) == 1 and args.mix[0] in MIXTURE_PRESETS
            weights = MIXTURE_PRESETS[args.mix[0]] if preset else parse_pairs(args.mix, "--mix", float)
            paths = parse_pairs(args.source, "--source")
            missing = sorted(set(weights) - set(paths))
            if missing:
                raise ValueError(f"--mix names sources without a --source: {', '.join(missing)} (add --source "
                                 f"{missing[0]}=PATH)")
            for path in paths.values():
                resolve(path)  # a missing source is refused here, before any work
        if bool(args.curriculum) != bool(args.data):
            raise ValueError("--curriculum DIR and --data clean.jsonl (the pipeline's output) go together")
        if args.data and not Path(args.data).is_file():
            raise ValueError(f"--data {args.data}: no such file")
    except ValueError as e:
        parser.error(str(e))
    rank, _, _ = setup_distributed("cpu")
    try:
        if rank != 0:
            return None
        if args.mix:
            return mixture_demo(weights, paths, args.tokens, args.max_epochs, args.output, args.seed)
        if args.curriculum:
            return curriculum_demo(args.data, args.curriculum, None)
        return print_plan(args.params, args.tokens)
    except ValueError as e:  # a plan past the epoch limit, data without scores: one line, exit status 2
        cleanup()
        parser.error(str(e))
    finally:
        cleanup()


# --- common core: identical in every file (tests/test_common.py checks) -----------------------------------
# Process-group setup, a timer that synchronises, the communication counter and, in the training scripts, the
# tiny GPT and the text loader. Read them once; every file that needs them carries the same lines.


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun job (or make a job of one process): nccl on CUDA, gloo on CPU. CUDA is touched only after
    set_device, so every process works on its own GPU."""
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but this machine has no CUDA GPU (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                             f"(launch at most that many processes per node with --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if not dist.is_initialized():
        # torch.optim imports this lazily; imported after init it pins the group past cleanup and gloo aborts at exit
        import torch.distributed.nn as _  # noqa: F401
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("DIST_TIMEOUT", 300)))
        if "MASTER_ADDR" in os.environ:  # launched by torchrun (one node or many): everything comes from its env
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # plain `python X.py`: a world of one, no network needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), dev


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # free garbage that holds collective work now, not from gloo's threads during interpreter shutdown


if __name__ == "__main__":
    main()
