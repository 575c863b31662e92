"""Fuzzy dedup (data_pipeline.py) against datasketch on the default corpus, Python's standard library: MinHash
signatures and the whole dedup (signatures, LSH, clusters) timed in interleaved runs (medians), the same dedup
shared by 2 gloo processes, where the time of our fast path goes, and both methods' recall and precision against
exact Jaccard on a sample.

Run:   python benchmarks/data_pipeline_bench.py
       python benchmarks/data_pipeline_bench.py --sample 600 --threshold 0.7
"""
import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
from datasketch import MinHash, MinHashLSH

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import data_pipeline as dp  # noqa: E402
from harness import run_distributed  # noqa: E402  (the tests' launcher: N gloo processes, results by value)


def datasketch_dedup(texts, threshold, num_perm, ngram):
    """The usual datasketch recipe: MinHash.bulk over the shingle sets, MinHashLSH insert and query, and the first
    document of each connected group kept."""
    t0 = time.perf_counter()
    sets = [[s.encode("utf-8") for s in set(dp.shingles(t, ngram))] for t in texts]
    hashes = MinHash.bulk(sets, num_perm=num_perm)
    t_sig = time.perf_counter() - t0
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, m in enumerate(hashes):
        lsh.insert(i, m)
    pairs = {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}
    keep, _ = dp.clusters_from_pairs(len(texts), pairs, None, threshold)  # no verification: datasketch has none
    return keep, t_sig, time.perf_counter() - t0


def quality(texts, keep, threshold, ngram, margin=0.05):
    """Against exact Jaccard: link every pair with J >= threshold; in each connected group all but the first
    document must go. Documents with a pair within ±margin of the threshold count neither way."""
    sets = [set(dp.shingles(t, ngram)) for t in texts]
    n = len(texts)
    linked, unclear = set(), set()
    for i in range(n):
        for j in range(i + 1, n):
            v = len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j]))
            if v >= threshold:
                linked.add((i, j))
            if abs(v - threshold) <= margin:
                unclear.update((i, j))
    first, _ = dp.clusters_from_pairs(n, linked, None, threshold)  # every linked pair joined: the connected groups
    decided = [i for i in range(n) if i not in unclear]
    truth = {i for i in decided if not first[i]}
    removed = {i for i in decided if not keep[i]}
    recall = len(removed & truth) / len(truth) if truth else float("nan")
    precision = len(removed & truth) / len(removed) if removed else float("nan")
    return recall, precision, len(truth)


def _ranked_dedup(texts, args):
    """One rank of the distributed dedup (run by tests/harness.py's run_distributed): seconds, documents removed."""
    dist.barrier()
    t0 = time.perf_counter()
    keep, _ = dp.fuzzy_dedup(texts, args.threshold, args.num_perm, args.ngram)
    dist.barrier()
    return time.perf_counter() - t0, int((~keep).sum())


def distributed_dedup(texts, args, world=2):
    """The same fuzzy dedup on `world` gloo processes (each signs 1/world of the documents): rank 0's figures."""
    return run_distributed(_ranked_dedup, world, texts, args, timeout=1800, pg_timeout=1800)[0]


def profile_fast_path(texts, args):
    """Where our fast dedup spends its time: word hashing, the rest of signing (shingles, the one permutation, the
    minimum per bin, densification), choosing the bands, LSH, verification and union-find (CPU seconds)."""
    hasher, t = dp.MinHasher(args.num_perm, args.ngram), {}
    t0 = time.process_time()
    for text in texts:
        dp.word_hashes(text)
    t["hash the words"] = time.process_time() - t0
    t0 = time.process_time()
    sigs = hasher.signatures(texts)
    t["signatures: shingles, permutation, bins"] = time.process_time() - t0 - t["hash the words"]
    t0 = time.process_time()
    bands, rows = dp.lsh_params(args.threshold, args.num_perm, 0.1, 0.9)
    t["LSH: choose bands and rows"] = time.process_time() - t0
    t0 = time.process_time()
    signed = np.flatnonzero((sigs != dp.MAX_HASH).any(axis=1))
    pairs = dp.candidate_pairs(dp.band_keys(sigs[signed], bands, rows), signed)
    t["LSH: band keys and candidate pairs"] = time.process_time() - t0
    t0 = time.process_time()
    dp.clusters_from_pairs(len(texts), pairs, sigs, args.threshold)
    t["verify pairs and union-find"] = time.process_time() - t0
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash values per document")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--sample", type=int, default=400, help="documents for the exact-Jaccard quality check")
    p.add_argument("--sha1-docs", type=int, default=200, help="documents for the slow, classic SHA-1 MinHash")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each dedup (medians reported)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: time each dedup at least once (try --repeats 3)")
    docs = dp.read_documents([dp.STDLIB], collections.Counter(), {})
    texts = [d.text for d in docs if d.text.strip()]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts)} documents, {mb:.1f} MB (Python's standard library); threshold {args.threshold}, "
          f"{args.num_perm} permutations, {args.ngram}-word shingles")

    dp.MinHasher(args.num_perm, args.ngram).signatures(texts)  # warm-up: tables of powers, first allocations
    few = texts[: args.sha1_docs]
    t0 = time.perf_counter()
    for t in few:
        dp.minhash(set(dp.shingles(t, args.ngram)), args.num_perm)
    t_sha1 = (time.perf_counter() - t0) * len(texts) / len(few)  # extrapolated from the first documents
    runs = collections.defaultdict(list)
    for _ in range(args.repeats):  # interleaved, so that on a shared machine both methods see the same load
        t0 = time.perf_counter()
        dp.MinHasher(args.num_perm, args.ngram).signatures(texts)
        runs["fast"].append(time.perf_counter() - t0)
        c0, t0 = time.process_time(), time.perf_counter()
        keep_ours, _ = dp.fuzzy_dedup(texts, args.threshold, args.num_perm, args.ngram)
        runs["ours"].append(time.perf_counter() - t0)
        runs["ours cpu"].append(time.process_time() - c0)
        c0 = time.process_time()
        keep_ds, t_ds_sig, t_ds = datasketch_dedup(texts, args.threshold, args.num_perm, args.ngram)
        runs["ds cpu"].append(time.process_time() - c0)
        runs["ds sig"].append(t_ds_sig)
        runs["ds"].append(t_ds)
    med = {k: statistics.median(v) for k, v in runs.items()}
    t_fast, t_ours, t_ds_sig, t_ds = med["fast"], med["ours"], med["ds sig"], med["ds"]
    print(f"\n{'':<34} {'signatures s':>12} {'docs/s':>8} {'whole dedup s':>14} {'docs/s':>8} {'removed':>8}"
          f"   (wall-clock medians of {args.repeats} interleaved runs)")
    print(f"{'ours, fast path':<34} {t_fast:>12.2f} {len(texts) / t_fast:>8.0f} {t_ours:>14.2f} "
          f"{len(texts) / t_ours:>8.0f} {(~keep_ours).sum():>8}")
    print(f"{'ours, classic SHA-1 (datasketch bits)':<34} {t_sha1:>12.2f} {len(texts) / t_sha1:>8.0f}"
          f"   (extrapolated from {len(few)} documents)")
    print(f"{'datasketch MinHash.bulk + LSH':<34} {t_ds_sig:>12.2f} {len(texts) / t_ds_sig:>8.0f} {t_ds:>14.2f} "
          f"{len(texts) / t_ds:>8.0f} {(~keep_ds).sum():>8}")
    per_run = sorted(d / o for d, o in zip(runs["ds"], runs["ours"]))
    print(f"speed-up, ours (fast) over datasketch: signatures {t_ds_sig / t_fast:.1f}x, "
          f"whole dedup {t_ds / t_ours:.1f}x (per run {per_run[0]:.1f}x to {per_run[-1]:.1f}x; in CPU seconds {med['ds cpu'] / med['ours cpu']:.1f}x)")
    t_2, removed_2 = distributed_dedup(texts, args)
    print(f"ours on 2 gloo processes: whole dedup {t_2:.2f} s ({len(texts) / t_2:.0f} docs/s), {removed_2} removed "
          f"(1 process: {(~keep_ours).sum()})")
    print("\nwhere our fast dedup spends its time (CPU seconds):")
    for stage, seconds in profile_fast_path(texts, args).items():
        print(f"  {stage:<48} {seconds:>6.3f} s")

    rng = random.Random(0)
    sample = [texts[i] for i in sorted(rng.sample(range(len(texts)), min(args.sample, len(texts))))]
    # near-duplicates are rare in a random sample: add edited copies of some of its documents
    planted = []
    for t in sample[: len(sample) // 4]:
        w = t.split()
        if len(w) > 60:
            k = max(1, int(len(w) * rng.uniform(0.01, 0.05)))
            s = rng.randrange(0, len(w) - k)
            planted.append(" ".join(w[:s] + ["edited"] * k + w[s + k:]))
    sample += planted
    keep_o, _ = dp.fuzzy_dedup(sample, args.threshold, args.num_perm, args.ngram)
    keep_d, _, _ = datasketch_dedup(sample, args.threshold, args.num_perm, args.ngram)
    print(f"\nquality on {len(sample)} documents ({len(planted)} of them edited copies), against exact Jaccard:")
    for name, keep in (("ours", keep_o), ("datasketch", keep_d)):
        r, p_, n = quality(sample, keep, args.threshold, args.ngram)
        print(f"  {name:<11} recall {r:.3f}  precision {p_:.3f}  ({n} true duplicates)")


if __name__ == "__main__":
    main()
