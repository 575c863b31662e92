import base64
import collections
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from datasketch import MinHash
from datasketch.lsh import _optimal_param

import data_pipeline as dp
from harness import cli_error, readme_command, run_distributed, run_torchrun

PROSE = ("The history of the city is long and it has been told many times. In the early years the people "
         "who lived there were farmers, and they traded with the towns along the river. Over the centuries the "
         "town grew into a centre of learning, with a university that was founded in the thirteenth century. "
         "Today it is known for its old buildings, its markets and the festivals that take place in summer. "
         "Visitors come from all over the world to walk along the walls and to see the cathedral.")


# --- part 1: extraction, rules, PII, exact dedup, the funnel ---------------------------------------

def test_extract_text_keeps_structure_and_drops_boilerplate():
    page = """<html><head><title>t</title><style>p{color:red}</style></head><body>
    <nav><a href="/">Home</a></nav><header>Site header</header>
    <h1>Caf&eacute; &amp; Bar</h1><p>First   paragraph
    with a <b>bold</b> word.</p><script>var x = 1;</script>
    <ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul>
    <table><tr><th>a</th><td>1</td></tr><tr><th>b</th><td>2</td></tr></table>
    <aside>ad</aside><form><input value="q"></form><footer>(c) 2024</footer></body></html>"""
    text = dp.extract_text(page)
    assert text.split("\n\n")[0] == "Café & Bar"
    assert "First paragraph with a bold word." in text
    for gone in ("color:red", "var x", "Home", "Site header", "ad", "(c) 2024"):
        assert gone not in text, gone
    lines = text.splitlines()
    assert "- one" in lines and "- two" in lines and "- nested" in lines
    assert "a | 1" in lines and "b | 2" in lines
    assert "\n\n\n" not in text


def test_each_rule_fails_alone_and_good_text_passes():
    assert dp.gopher_quality(PROSE) == [] and dp.gopher_repetition(PROSE) == []
    good = dp.Document("d", "s", PROSE)
    assert dp.c4_rules(good) == []
    assert dp.gopher_quality("word " * 20)[0].startswith("gopher: 20 words")
    assert dp.gopher_quality(PROSE + " #tag" * 12) == ["gopher: symbol-to-word ratio"]
    assert "gopher: mean word length" in dp.gopher_quality(" ".join(["incomprehensibilities"] * 60))
    assert dp.gopher_quality(" ".join(f"w{i} {i}" for i in range(60)) + " the and")  # words without letters
    no_stop = " ".join(["cat dog bird fish horse cow sheep goat"] * 8)
    assert "gopher: no stop words" in dp.gopher_quality(no_stop)
    bullets = "\n".join(f"- item number {i} of the list and more" for i in range(12))
    assert "gopher: bullet lines" in dp.gopher_quality(bullets)
    ellipsis = "\n".join(f"and so the story of the town goes on {i}..." for i in range(12))
    assert "gopher: ellipsis lines" in dp.gopher_quality(ellipsis)
    assert dp.gopher_repetition((PROSE + "\n") * 3)[0] in ("gopher: duplicate lines", "gopher: duplicate paragraphs")
    assert dp.c4_rules(dp.Document("d", "s", PROSE + " Lorem ipsum dolor.")) == ["c4: lorem ipsum"]
    assert dp.c4_rules(dp.Document("d", "s", PROSE + " {x}")) == ["c4: curly brace"]
    short = dp.Document("d", "s", "Please enable JavaScript to view this page.\nMenu\nHome")
    assert dp.c4_rules(short) == ["c4: fewer than 3 sentences"]
    cleaned = dp.Document("d", "s", PROSE + "\nThis site uses cookies to improve things.\nMenu")
    assert dp.c4_rules(cleaned) == [] and "cookies" not in cleaned.text and "Menu" not in cleaned.text
    assert dp.detect_language(PROSE) == "en"
    assert dp.detect_language("Die Stadt ist alt und die Geschichte der Stadt ist lang, und sie wird nicht vergessen.") == "de"
    assert dp.detect_language("这是一个关于城市历史的长篇文章，讲述了很多故事。") == "zh"
    assert dp.code_rules("def f(x):\n    return x + 1\n") == []
    assert "code: generated file" in dp.code_rules("# Auto-generated file. DO NOT EDIT.\nx = 1\n")
    assert "code: line over 1000 characters" in dp.code_rules("x = '" + "a" * 1200 + "'\n")


PII_POSITIVES = [("mail me at jane.doe+news@example.co.uk today", "<EMAIL>"),
                 ("server 192.168.10.254 is down", "<IP>"), ("ping 2001:db8:85a3::8a2e:370:7334 now", "<IP>"),
                 ("fe80:0:0:0:202:b3ff:fe1e:8329", "<IP>"), ("call +44 20 7946 0958 now", "<PHONE>"),
                 ("call (555) 123-4567 now", "<PHONE>"), ("call 555-123-4567 now", "<PHONE>"),
                 ("call +1 415 555 2671", "<PHONE>"), ("ring 020 7946 0958", "<PHONE>"),
                 ("card 4111 1111 1111 1111 exp", "<CARD>"), ("card 5500-0000-0000-0004", "<CARD>")]
PII_NEGATIVES = ["Python 3.11.7 was released", "version 1.2.3 and 10.4", "on 2024-01-15 at 12:30:45",
                 "ISBN 978-3-16-148410-0", "price $1,234.56 or €99.99", "card 4111 1111 1111 1112 (fails Luhn)",
                 "std::vector and x[::2]", "call me in 5 minutes", "error code 404", "the year 1999"]


def test_scrub_pii_replaces_positives_and_leaves_look_alikes():
    for text, tag in PII_POSITIVES:
        out, counts = dp.scrub_pii(text)
        assert tag in out and counts[tag] == 1, (text, out)
    for text in PII_NEGATIVES:
        out, counts = dp.scrub_pii(text)
        assert out == text and not counts, (text, out)


def test_exact_dedup_keeps_the_first_of_normalised_duplicates():
    docs = [dp.Document(str(i), "s", t) for i, t in
            enumerate(["Hello  World", "hello world", "ﬁne day", "fine   DAY", "other"])]
    kept, owner = dp.exact_dedup(docs)
    assert [d.id for d in kept] == ["0", "2", "4"] and owner == [0, 0, 2, 2, 4]


def test_cli_round_trips_a_folder_and_the_funnel_adds_up(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "page.html").write_text(f"<html><body><nav>menu</nav><p>{PROSE}</p></body></html>")
    (src / "copy.txt").write_text(PROSE)  # the same text again: exact duplicate
    (src / "short.md").write_text("too short")
    (src / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "near.txt").write_text(PROSE.replace("farmers", "fishermen"))  # near-duplicate of copy.txt
    other = ("A river runs through the valley and the farms on both of its banks. In spring the water rises and the "
             "fields turn green, while in autumn the harvest is brought to the market in the old town. The people "
             "of the valley have kept their songs and their stories for a very long time, and they tell them to "
             "every visitor who stops at the inn by the bridge. Many of the houses are made of stone and wood.")
    (src / "data.jsonl").write_text(json.dumps({"text": other}) + "\n{not json\n" + json.dumps({"other": 1}) + "\n")
    out = tmp_path / "clean.jsonl"
    dp.main([str(src), "--output", str(out), "--skip", "perplexity", "--skip", "classifier"])  # in-process: cheap
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == [PROSE, other]  # copy.txt first; page.html, near.txt removed
    assert all(set(r) == {"id", "source", "text"} for r in rows)
    stats = json.loads((tmp_path / "stats.json").read_text())
    stages = stats["stages"]
    for a, b in zip(stages, stages[1:]):
        assert a["docs_out"] == b["docs_in"]
    for s in stages:  # every document that left a stage has a reason (PII only rewrites)
        assert s["docs_in"] - s["docs_out"] == (0 if s["stage"] == "pii" else sum(s["reasons"].values())), s
    assert [s["stage"] for s in stages] == ["read", "quality", "pii", "exact", "fuzzy"]
    assert stages[0]["reasons"] == {"binary file": 1, "bad utf-8": 1, "malformed jsonl line": 2}
    assert "data.jsonl:2" in stats["examples"]["malformed jsonl line"]
    assert {s["stage"]: s["docs_in"] - s["docs_out"] for s in stages}["fuzzy"] == 1


def test_empty_input_is_reported_not_a_crash(tmp_path, capsys):
    dp.main([str(tmp_path), "--output", str(tmp_path / "o.jsonl")])  # in-process: cheaper than a new interpreter
    assert "no document could be read" in capsys.readouterr().out and not dist.is_initialized()


# --- part 2: the model filters, trained on a high-quality reference ---------------------------------

CODE = ("def moving_average(values, window):\n    \"\"\"The mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n        raise ValueError(\"window must be positive\")\n    total = sum(values[:window])\n"
        "    out = [total / window]\n    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n        out.append(total / window)\n    return out\n")


def garbage(text, seed=0):
    """Text no careful writer produced: characters scrambled, keyword spam, a base64 blob, mojibake."""
    rng = random.Random(seed)
    chars = list(text)
    rng.shuffle(chars)
    blob = base64.b64encode(bytes(rng.randrange(256) for _ in range(300))).decode()
    return ["".join(chars), "BUY CHEAP best price FREE shipping!!! click here $$$ " * 8, blob,
            "Café naïve façade — déjà vu à la carte, São Paulo, Zürich, Ærø.".encode("utf-8").decode("latin-1") * 4]


def test_perplexity_filter_keeps_clean_prose_and_code_and_drops_garbage():
    # The reference (the stdlib's documentation), not the corpus, defines what is likely: a corpus of clean prose and
    # code loses nothing, and every garbage document is dropped (the old corpus-trained filter dropped 10 % of any
    # corpus, whatever it held).
    reference = list(dp.reference_texts())
    assert len(reference) > 1000 and sum(map(len, reference)) > 1e6
    clean = [PROSE, PROSE.replace("city", "village"), CODE]
    docs = [dp.Document(str(i), "s", t) for i, t in enumerate(clean + garbage(PROSE) + garbage(CODE, 1))]
    kept, reason = dp.perplexity_filter(docs, reference, 0.99)
    assert [d.text for d in kept] == clean, reason
    lm = dp.CharNgramLM().fit(reference)
    assert max(lm.perplexity(t) for t in clean) < min(lm.perplexity(t) for t in garbage(PROSE) + garbage(CODE, 1))


def test_quality_classifier_learns_reference_against_corpus_and_ranks_clean_above_scrambled(capsys):
    rng = random.Random(0)
    good = dp.chunks(dp.reference_texts())
    rng.shuffle(good)
    held_out, good = good[:60], good[60:]  # never seen in training
    corpus = dp.read_documents([str(Path(os.__file__).parent / p) for p in ("json", "email", "asyncio")],
                               collections.Counter(), {})
    model, accuracy = dp.train_classifier(rng.sample(good, 600), dp.chunks(d.text for d in corpus)[:600])
    with capsys.disabled():
        print(f"\nquality classifier: held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.8  # on 20 % held out; a model that learnt nothing scores 0.5
    def scramble(text):  # every word's letters shuffled: the words, and so the features, are gone
        return " ".join("".join(rng.sample(w, len(w))) for w in text.split())
    clean_scores, scrambled_scores = model.score(held_out), model.score([scramble(t) for t in held_out])
    # held-out chunks are short (100 words), so a few clean ones score low: demand it on average and for most pairs
    assert clean_scores.mean() > scrambled_scores.mean() + 0.2, (clean_scores.mean(), scrambled_scores.mean())
    assert (clean_scores > scrambled_scores).mean() >= 0.9


# --- part 3: MinHash, LSH, fuzzy dedup -----------------------------------------------------------

def test_sha1_minhash_equals_datasketch_bit_for_bit():
    for text in (PROSE, PROSE[:200], "a b c"):
        m = MinHash(num_perm=128, seed=3, scheme="legacy")  # datasketch's mod-(2^61 - 1) permutations
        for sh in set(dp.shingles(text, 5)):
            m.update(sh.encode("utf-8"))
        assert np.array_equal(dp.minhash(set(dp.shingles(text, 5)), 128, seed=3), m.hashvalues)
    assert (dp.minhash(set(), 128) == dp.MAX_HASH).all()


def test_lsh_params_equal_datasketch():
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.9):
        for num_perm in (64, 128, 256):
            assert dp.lsh_params(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5), (threshold, num_perm)
    for fp_weight in (0.9, 0.1):  # unequal weights move the optimum, so each weight must land on its own area
        assert dp.lsh_params(0.7, 64, fp_weight, 1 - fp_weight) == _optimal_param(0.7, 64, fp_weight, 1 - fp_weight)


def exact_jaccard(a, b, n=5):
    sa, sb = set(dp.shingles(a, n)), set(dp.shingles(b, n))
    return len(sa & sb) / len(sa | sb)


def test_fast_hash_estimates_jaccard_within_the_minhash_error():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    hasher = dp.MinHasher(256, 5)
    errors = []
    for _ in range(40):
        a = [rng.choice(vocab) for _ in range(200)]
        b = a[:]
        for i in rng.sample(range(200), rng.randint(0, 120)):
            b[i] = rng.choice(vocab)
        sa, sb = hasher.signatures([" ".join(a), " ".join(b)])
        errors.append(dp.estimated_jaccard(sa, sb) - exact_jaccard(" ".join(a), " ".join(b)))
    # each estimate is a mean of 256 Bernoulli trials: standard error ≤ 1/(2·16) = 0.031; 3 of them bound it
    assert max(map(abs, errors)) < 3 / np.sqrt(256)
    assert abs(np.mean(errors)) < 0.02  # and it is unbiased


def test_word_hashes_equal_the_polynomial_written_out():
    """The vectorised prefix-sum hash against Σ code_i·P^(e-1-i) mod 2^64 computed one word at a time in Python;
    bytes.split() splits on exactly the ASCII whitespace the fast path uses."""
    P = 0x100000001B3
    def reference(word: bytes) -> int:
        h = 0
        for c in word:
            h = (h * P + (c + 32 if 65 <= c <= 90 else c) + 1) % (1 << 64)
        return (h ^ (h >> 32)) & 0xFFFFFFFF
    long = "z" * 70_000 + " q"  # longer than the first table of powers (2^16)
    for text in ("", " \t\n", "Hello,  WORLD\tcafé\u00a0Crème\x0bx\x1fy " + PROSE, long):
        assert dp.word_hashes(text).tolist() == [reference(w) for w in text.encode("utf-8").split()]


def planted_corpus(n_base=60, seed=0):
    """Random 300-word documents, and copies of some with a contiguous 2-10 % of their words rewritten (a changed
    paragraph, a different footer): exact 5-shingle Jaccard with the original from about 0.93 down to 0.79."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    texts = []
    for _ in range(n_base):
        base = [rng.choice(vocab) for _ in range(300)]
        texts.append(" ".join(base))
        for _ in range(rng.randint(0, 2)):
            copy = base[:]
            k = int(300 * rng.uniform(0.02, 0.10))
            start = rng.randrange(0, 300 - k)
            copy[start:start + k] = [rng.choice(vocab) for _ in range(k)]
            texts.append(" ".join(copy))
    rng.shuffle(texts)
    return texts


def test_fuzzy_dedup_recall_and_precision_on_planted_near_duplicates():
    texts = planted_corpus()
    keep, clusters = dp.fuzzy_dedup(texts, threshold=0.8)
    # Ground truth from exact Jaccard: link every pair with J >= 0.8; in each connected group all but the first
    # document must go (that is what keeping the first of each cluster means). Documents with a pair within ±0.05
    # of the threshold are too close to call for 128 permutations (the estimate's standard error there is
    # √(0.8·0.2/128) = 0.035) and count neither way.
    n = len(texts)
    jac = {(i, j): exact_jaccard(texts[i], texts[j]) for i in range(n) for j in range(i + 1, n)}
    root = list(range(n))  # union-find written out here, so that the truth does not rest on the code under test

    def find(i):
        while root[i] != i:
            i = root[i]
        return i
    for (i, j), v in jac.items():
        if v >= 0.8:
            ri, rj = find(i), find(j)
            root[max(ri, rj)] = min(ri, rj)  # the smallest index is the root: the first document is kept
    unclear = {i for (a, b), v in jac.items() if abs(v - 0.8) <= 0.05 for i in (a, b)}
    decided = [i for i in range(n) if i not in unclear]
    truth = {i for i in decided if find(i) != i}
    removed = {i for i in decided if not keep[i]}
    recall, precision = len(removed & truth) / len(truth), len(removed & truth) / len(removed)
    assert len(truth) >= 20 and recall >= 0.95 and precision >= 0.95, (len(truth), recall, precision)
    assert all(keep[min(c)] and not keep[sorted(c)[1:]].any() for c in clusters)


def _distributed_dedup():
    texts = planted_corpus(40, seed=1) + ["", " ", "a"]  # empty documents are never anyone's duplicate
    keep, clusters = dp.fuzzy_dedup(texts, threshold=0.8)
    return keep.tolist(), sorted(map(sorted, clusters))


def test_two_ranks_give_the_single_process_result():
    texts = planted_corpus(40, seed=1) + ["", " ", "a"]
    keep, clusters = dp.fuzzy_dedup(texts, threshold=0.8)
    assert keep[-3:].all()
    results = run_distributed(_distributed_dedup, 2)
    assert results[0] == results[1] == (keep.tolist(), sorted(map(sorted, clusters)))


@pytest.mark.parametrize("args, message", [(["--threshold", "1.5"], "--threshold 1.5: must lie strictly between 0 and 1"),
                                           (["/no/such/dir"], "input /no/such/dir: no such file or folder"),
                                           (["--num-perm", "4"], "--num-perm 4: too few permutations"),
                                           (["--classifier-threshold", "1.5"], "--classifier-threshold 1.5: a probability"),
                                           (["--reference", "/no/such.txt"], "input /no/such.txt: no such file")])
def test_bad_input(args, message, capsys):
    assert message in cli_error(dp.main, args, capsys)
    assert not dist.is_initialized()


def test_readme_torchrun_line_runs_on_a_small_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"a{i}.txt").write_text(PROSE.replace("farmers", f"farmers {i}"))  # near-duplicates of each other
    line = readme_command("data_pipeline.py").replace("clean.jsonl", str(tmp_path / "clean.jsonl"))
    out = run_torchrun(line, f"{src} --skip perplexity --skip classifier").stdout
    assert "wrote 1 documents" in out
