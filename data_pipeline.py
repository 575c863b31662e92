"""From raw documents to clean, deduplicated text: extraction, quality rules, model filters, PII, exact and fuzzy dedup.

Pretraining data is mostly thrown away: a web crawl loses most of its documents to boilerplate, language, quality
and duplication filters. This script runs those stages in turn, prints the funnel (documents in, out, and why) and
writes the JSONL that every training script's --data reads and data_mixing.py mixes and orders. The model filters
learn what good text looks like from a high-quality reference (the documentation every Python install carries, as
CCNet used Wikipedia). Near-duplicates are found with MinHash and locality-sensitive hashing: two documents whose
shingle sets have Jaccard similarity s share one of b bands of r MinHash values with probability

    P(candidate) = 1 - (1 - s^r)^b,   an S-curve that rises around the threshold (1/b)^(1/r).

Run:   python data_pipeline.py --output clean.jsonl                  (Python's standard library as the corpus)
       python data_pipeline.py pages/ notes.txt --output clean.jsonl --languages en --skip perplexity
       torchrun --nproc_per_node=2 data_pipeline.py --output clean.jsonl    (fuzzy dedup shared by 2 ranks)
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import functools
import hashlib
import html
import json
import os
import random
import re
import struct
import time
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# --- stage 1: HTML to text --------------------------------------------------------------------------------------------
SKIPPED_TAGS = {"script", "style", "nav", "header", "footer", "aside", "form", "noscript", "head", "svg", "button"}
BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
              "article", "pre", "blockquote", "dd", "dt", "hr", "main", "figure", "figcaption"}
PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre", "blockquote"}

class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities (&amp;, &#233;) decoded by the parser
        self.parts, self.skip_depth, self.pre_depth = [], 0, 0
    def _newlines(self, k: int) -> None:
        """End the current line (k=1) or paragraph (k=2), without stacking blank lines."""
        tail = "".join(self.parts[-3:])
        have = len(tail) - len(tail.rstrip("\n")) if tail.strip(" ") else k
        self.parts.append("\n" * max(0, k - have))
    def handle_starttag(self, tag, attrs):
        if tag in SKIPPED_TAGS:
            self.skip_depth += 1
        elif not self.skip_depth:
            self.pre_depth += tag == "pre"
            if tag in BLOCK_TAGS:
                self._newlines(2 if tag in PARAGRAPH_TAGS else 1)
            self.parts.append({"li": "- ", "td": " | ", "th": " | "}.get(tag, ""))
    def handle_endtag(self, tag):
        if tag in SKIPPED_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif not self.skip_depth and tag in BLOCK_TAGS:
            self.pre_depth = max(0, self.pre_depth - (tag == "pre"))
            self._newlines(2 if tag in PARAGRAPH_TAGS else 1)
    def handle_data(self, data):
        if not self.skip_depth:  # in HTML a newline in the source is a space, except inside <pre>
            self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))

def extract_text(page: str) -> str:
    """Visible text of an HTML page: boilerplate elements dropped, blocks on their own lines, entities decoded."""
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    text = html.unescape("".join(parser.parts))  # a second pass for double-escaped entities
    lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip(" |").strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()

# --- stage 2: heuristic quality filters -------------------------------------------------------------------------------
# Gopher's rules (Rae et al. 2021, App. A), C4's (Raffel et al. 2020, section 2.2) and, for code, those The Stack /
# StarCoder (Li et al. 2023) used to drop generated and data-like files, each with the paper's threshold.
GOPHER_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
C4_TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")
C4_BOILERPLATE = re.compile(r"javascript|terms of use|privacy policy|cookie policy|uses cookies|use of cookies", re.I)

def gopher_quality(text: str) -> list[str]:
    words, lines = text.split(), [line.strip() for line in text.split("\n") if line.strip()]
    if not 50 <= (n := len(words)) <= 100_000:
        return [f"gopher: {n} words (keep 50-100000)"]
    failed = {  # shares of lines and of words: 50+ words, so neither list is empty
        "mean word length": not 3 <= sum(map(len, words)) / n <= 10,
        "symbol-to-word ratio": (text.count("#") + text.count("...") + text.count("…")) / n > 0.1,
        "bullet lines": np.mean([line.startswith(("-", "*", "•", "·")) for line in lines]) > 0.9,
        "ellipsis lines": np.mean([line.endswith(("...", "…")) for line in lines]) > 0.3,
        "words without letters": np.mean([any(c.isalpha() for c in w) for w in words]) < 0.8,  # 80 % need a letter
        "no stop words": len(GOPHER_STOP_WORDS & {w.lower().strip(".,;:!?") for w in words}) < 2}
    return [f"gopher: {rule}" for rule, bad in failed.items() if bad]

def gopher_repetition(text: str) -> list[str]:
    """Duplicate lines and paragraphs; the characters' share in the top n-gram (n = 2..4), in repeated ones (5..10)."""
    reasons = []
    for unit, items in (("lines", text.split("\n")), ("paragraphs", re.split(r"\n\s*\n", text))):
        counts = collections.Counter(x.strip() for x in items if x.strip())
        n, chars = sum(counts.values()), sum(len(x) * c for x, c in counts.items())
        dup_chars = sum(len(x) * (c - 1) for x, c in counts.items())  # every copy after the first
        if (n - len(counts)) / max(1, n) > 0.30 or dup_chars / max(1, chars) > 0.20:
            reasons.append(f"gopher: duplicate {unit}")
    words = text.split()
    total = sum(map(len, words)) or 1
    for k, limit in {2: 0.20, 3: 0.18, 4: 0.16}.items():
        gram, count = (collections.Counter(zip(*(words[j:] for j in range(k)))).most_common(1) or [((), 0)])[0]
        if count > 1 and count * sum(map(len, gram)) / total > limit:
            reasons.append(f"gopher: top {k}-gram share")
            break
    for k, limit in {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}.items():
        covered, first = np.zeros(len(words), dtype=bool), {}
        for i, gram in enumerate(zip(*(words[j:] for j in range(k)))):
            if gram in first:  # this n-gram and its first occurrence are both duplicated text
                covered[i:i + k] = covered[first[gram]:first[gram] + k] = True
            first.setdefault(gram, i)
        if sum(len(w) for w, c in zip(words, covered) if c) / total > limit:
            reasons.append(f"gopher: duplicated {k}-grams")
            break
    return reasons

def c4_rules(doc: Document) -> list[str]:
    """C4's line rules: keep the lines that end in terminal punctuation, have 3+ words and no javascript or policy
    boilerplate (the document is rewritten); drop it for 'lorem ipsum', a curly brace or fewer than 3 sentences."""
    for marker, reason in (("lorem ipsum", "lorem ipsum"), ("{", "curly brace")):
        if marker in doc.text.lower():
            return [f"c4: {reason}"]
    kept = [line for line in map(str.strip, doc.text.split("\n")) if line.endswith(C4_TERMINAL_PUNCTUATION)
            and len(line.split()) >= 3 and not C4_BOILERPLATE.search(line)]
    if len(re.findall(r"[.!?](?:\s|$)", " ".join(kept))) < 3:
        return ["c4: fewer than 3 sentences"]
    doc.text = "\n".join(kept)
    return []

def code_rules(text: str) -> list[str]:
    lines = text.split("\n")
    failed = {"mean line length": sum(map(len, lines)) / len(lines) > 100,
              "line over 1000 characters": max(map(len, lines)) > 1000,
              "alphanumeric fraction": sum(c.isalnum() for c in text) / max(1, len(text)) < 0.25,
              "generated file": bool(re.search(r"auto-?generated|do not edit|generated by", text[:2000], re.I)),
              "empty": not text.strip()}
    return [f"code: {rule}" for rule, bad in failed.items() if bad]

# Language identification from scripts and stop words (a small, dependency-free stand-in for fastText's lid.176).
STOP_WORDS = {
    "en": {"the", "and", "of", "to", "is", "in", "that", "it", "for", "with", "as", "was", "on", "this", "are"},
    "de": {"der", "die", "und", "das", "ist", "nicht", "ein", "eine", "zu", "mit", "den", "von", "sich", "auch"},
    "fr": {"le", "la", "les", "et", "des", "est", "une", "un", "du", "que", "pour", "dans", "pas", "sur"},
    "es": {"el", "la", "los", "las", "y", "es", "una", "un", "que", "por", "para", "con", "del", "se"}}
SCRIPTS = {"zh": (0x4E00, 0x9FFF), "ja": (0x3040, 0x30FF), "ko": (0xAC00, 0xD7AF), "ru": (0x0400, 0x04FF),
           "ar": (0x0600, 0x06FF)}

def detect_language(text: str) -> str:
    """The language whose script covers most letters; among Latin-script languages, the most stop words."""
    letters = [c for c in text if c.isalpha()]
    for lang, (lo, hi) in SCRIPTS.items():
        if letters and sum(lo <= ord(c) <= hi for c in letters) / len(letters) > 0.3:
            return lang
    words = [w.lower().strip(".,;:!?()\"'") for w in text.split()]
    hits = {lang: sum(w in sw for w in words) for lang, sw in STOP_WORDS.items()}
    best = max(hits, key=hits.get)
    return best if letters and hits[best] >= max(2, 0.02 * len(words)) else "unknown"

def quality_check(doc: Document, languages: list[str] | None = None) -> list[str]:
    """Reasons to drop a document: code rules for source files; language, Gopher and C4 rules for prose."""
    if doc.kind == "code":
        return code_rules(doc.text)
    if languages and (lang := detect_language(doc.text)) not in languages:
        return [f"language: {lang}"]
    return gopher_quality(doc.text) or gopher_repetition(doc.text) or c4_rules(doc)

# --- stage 3: model-based filters, trained on a high-quality reference ------------------------------------------------
@functools.lru_cache(maxsize=1)
def reference_texts(path: str | None = None, min_words: int = 20) -> tuple[str, ...]:
    """The documents under `path` or, by default, high-quality text every Python install carries (as CCNet used
    Wikipedia): the documentation help() shows (pydoc_data.topics) and stdlib docstrings of 20+ words, not tests."""
    if path is not None:
        return tuple(d.text for d in read_documents([path], collections.Counter(), {}))
    from pydoc_data.topics import topics  # half a megabyte of text: loaded only when a reference is needed
    texts, lib, docstring = list(topics.values()), Path(STDLIB), re.compile(r'"""(.*?)"""', re.S)
    for f in sorted(lib.rglob("*.py")):
        if not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(f.relative_to(lib).parts):
            texts += [s for s in docstring.findall(f.read_text("utf-8", "replace")) if len(s.split()) >= min_words]
    return tuple(texts)

class CharNgramLM:
    """A byte n-gram language model with add-k smoothing, the cheap cousin of CCNet's KenLM filter: text unlike its
    training text (boilerplate, keyword lists, mangled encodings) gets a high perplexity."""
    def __init__(self, order: int = 3, k: float = 0.01):
        self.order, self.k = order, k
    def _indices(self, text: str) -> np.ndarray:
        """Every (context bytes, next byte) of the text as one integer."""
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        idx = np.zeros(max(0, len(b) - self.order + 1), dtype=np.int64)
        for j in range(self.order if len(idx) else 0):
            idx = (idx << 8) | b[j: len(b) - self.order + 1 + j]
        return idx
    def fit(self, texts) -> "CharNgramLM":
        idx = np.concatenate([self._indices(t) for t in texts] + [np.zeros(0, dtype=np.int64)])
        self.counts = np.bincount(idx, minlength=1 << (8 * self.order))
        self.context_counts = self.counts.reshape(-1, 256).sum(axis=1)
        return self
    def perplexity(self, text: str) -> float:
        idx = self._indices(text)
        p = (self.counts[idx] + self.k) / (self.context_counts[idx >> 8] + 256 * self.k)
        return float(np.exp(-np.log(p).mean())) if len(idx) else float("inf")

def perplexity_filter(docs: list[Document], reference: list[str], quantile: float) -> tuple[list[Document], str]:
    """Keep prose no more perplexing than `quantile` of held-out reference documents under a model of the reference
    (a model of the corpus would drop 1 - quantile of any corpus). Code is left to the code rules."""
    lm = CharNgramLM().fit(t for i, t in enumerate(reference) if i % 10)
    cut = float(np.quantile([lm.perplexity(t) for t in reference[::10]], quantile))  # the held-out tenth
    for d in docs:
        d.scores["perplexity"] = lm.perplexity(d.text)
    kept = [d for d in docs if d.kind == "code" or d.scores["perplexity"] <= cut]
    return kept, f"perplexity > {cut:.1f} (q{quantile:g} of the reference)"

class QualityClassifier(torch.nn.Linear):
    """fastText-style (Joulin et al. 2017): a text is the bag of its word and word-bigram features, hashed into
    `buckets` and averaged, and one linear layer (this module) gives the logit of P(high quality)."""
    def __init__(self, buckets: int = 1 << 14):
        super().__init__(buckets, 1)
    def features(self, texts: list[str]) -> torch.Tensor:
        """(n_texts, buckets): the share of each text's features that falls into each bucket."""
        x = np.zeros((len(texts), self.in_features), dtype=np.float32)
        for i, t in enumerate(texts):
            w = word_hashes(t)
            bigrams = w[:-1] * np.uint64(1_000_003) + w[1:] + np.uint64(1)  # array products wrap silently
            ids = (np.concatenate([w, bigrams]) % np.uint64(self.in_features)).astype(np.int64)
            x[i] = np.bincount(ids, minlength=self.in_features) / max(1, len(ids))
        return torch.from_numpy(x)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)  # (n_texts,) logits
    @torch.no_grad()
    def score(self, texts: list[str], batch: int = 256) -> np.ndarray:
        """P(high quality) of each text (a few hundred at a time: the features are dense)."""
        return np.concatenate([torch.sigmoid(self(self.features(texts[i:i + batch]))).numpy()
                               for i in range(0, len(texts), batch)] + [np.zeros(0, dtype=np.float32)])

def chunks(texts, words: int = 100) -> list[str]:
    """Texts cut into pieces of `words` words (20 at least), so that both classes are seen at the same lengths."""
    split = [t.split() for t in texts]
    return [" ".join(w[i:i + words]) for w in split for i in range(0, len(w), words) if len(w[i:i + words]) >= 20]

def train_classifier(good: list[str], bad: list[str], steps=30, seed=0) -> tuple[QualityClassifier, float]:
    """Train on 80 % of good (label 1) and bad (label 0) texts, full batch; return the model and held-out accuracy."""
    torch.manual_seed(seed)
    n = min(len(good), len(bad))  # balanced classes, so 0.5 is the threshold of a model that knows nothing
    texts, labels = good[:n] + bad[:n], torch.tensor([1.0] * n + [0.0] * n)
    train, test = torch.randperm(2 * n).tensor_split([int(1.6 * n)])  # 80 % to learn from, 20 % held out
    model = QualityClassifier()
    x = model.features([texts[i] for i in train])
    opt = torch.optim.Adam(model.parameters(), lr=0.2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), labels[train]).backward()
        opt.step()
    return model, float(((model.score([texts[i] for i in test]) >= 0.5) == labels[test].numpy()).mean())

def classifier_filter(docs: list[Document], reference: list[str], threshold: float, seed: int = 0,
                      samples: int = 1000) -> tuple[list[Document], str]:
    """Train on reference text against samples of the corpus, score every document, drop the prose below threshold."""
    rng = random.Random(seed)
    good, bad = chunks(reference), chunks(d.text for d in rng.sample(docs, min(samples, len(docs))))
    if min(len(good), len(bad)) < 5:
        return docs, "classifier: too little text to train on, nothing dropped"
    model, accuracy = train_classifier(rng.sample(good, min(samples, len(good))),
                                       rng.sample(bad, min(samples, len(bad))), seed=seed)
    for d, s in zip(docs, model.score([d.text for d in docs])):
        d.scores["quality"] = float(s)
    kept = [d for d in docs if d.kind == "code" or d.scores["quality"] >= threshold]
    return kept, f"classifier score < {threshold:g} (held-out accuracy {accuracy:.3f})"

# --- stage 4: PII -----------------------------------------------------------------------------------------------------
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.])")
IPV6 = re.compile(r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
                  r"|(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4})(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"  # international
                   r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4}"  # North American
                   r"|0\d{2,4} \d{3,4} \d{3,4})(?![\w-])")  # national with a trunk 0 (UK, DE, FR ...)
CARD = re.compile(r"(?<![\d-])(?:\d{4}[ -]?){3}\d{1,7}(?![\d-])")

def luhn_valid(number: str) -> bool:
    """The check digit of payment cards: double every second digit from the right, sum the digits, mod 10."""
    digits = [int(c) for c in number if c.isdigit()][::-1]
    doubled = [d * 2 - 9 if d > 4 else d * 2 for d in digits[1::2]]
    return 13 <= len(digits) <= 19 and (sum(digits[::2]) + sum(doubled)) % 10 == 0

PII = [(EMAIL, "<EMAIL>", lambda s: True), (CARD, "<CARD>", luhn_valid), (IPV4, "<IP>", lambda s: True),
       (IPV6, "<IP>", lambda s: any(c.isalpha() for c in s) or s.count(":") >= 7 or "::" in s),
       (PHONE, "<PHONE>", lambda s: 7 <= sum(c.isdigit() for c in s) <= 15)]  # in this order: e-mails first

def scrub_pii(text: str) -> tuple[str, collections.Counter]:
    """Replace e-mail addresses, card numbers (Luhn-valid), IP addresses and phone numbers by placeholders.
    Versions (3.11.7), dates (2024-01-15), ISBNs and prices stay: each pattern demands a shape they lack."""
    counts = collections.Counter()
    for pattern, tag, valid in PII:
        def replace(m, tag=tag, valid=valid):
            ok = valid(m.group(0))
            counts[tag] += ok
            return tag if ok else m.group(0)
        text = pattern.sub(replace, text)
    return text, +counts

def blocklist_check(words: list[str], max_share: float):
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.I)
    def check(doc: Document) -> list[str]:
        hits = len(pattern.findall(doc.text))
        return [f"blocklist: {hits} hits"] if hits and hits / max(1, len(doc.text.split())) > max_share else []
    return check

# --- stage 5: exact dedup ---------------------------------------------------------------------------------------------
def exact_dedup(docs: list[Document]) -> tuple[list[Document], list[int]]:
    """Keep the first of each normalised text; also return, per document, the index of the one it copies."""
    first = {}  # the normal form is what two copies of one document still share: NFKC, case folded, spaces collapsed
    keys = (" ".join(unicodedata.normalize("NFKC", d.text).casefold().split()).encode("utf-8") for d in docs)
    owner = [first.setdefault(hashlib.sha1(key).digest(), i) for i, key in enumerate(keys)]
    return [d for i, d in enumerate(docs) if owner[i] == i], owner

# --- stage 6: fuzzy dedup with MinHash and LSH ------------------------------------------------------------------------
MERSENNE_PRIME = (1 << 61) - 1
MAX_HASH = (1 << 32) - 1
_P = np.uint64(0x100000001B3)  # FNV's 64-bit prime; odd, so invertible modulo 2^64: the word hash's base
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_POWERS: dict[str, np.ndarray] = {}  # P^(i+1) and P^-(i+1), computed once for the longest text so far

def shingles(text: str, ngram: int = 5) -> list[str]:
    """Word n-grams (lower-cased, split on whitespace); a text shorter than n words is one shingle."""
    words = text.lower().split()  # max(1, ...): n words or fewer make the one window from the first word
    return [" ".join(words[i:i + ngram]) for i in range(max(1, len(words) - ngram + 1))] if words else []

def permutation_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of num_perm permutations h -> (a·h + b) mod (2^61 - 1), drawn as datasketch draws them."""
    gen = np.random.RandomState(seed)
    ab = np.array([(gen.randint(1, MERSENNE_PRIME, dtype=np.uint64), gen.randint(0, MERSENNE_PRIME, dtype=np.uint64))
                   for _ in range(num_perm)], dtype=np.uint64)
    return ab[:, 0], ab[:, 1]

def minhash(shingle_set: set[str], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """Classic MinHash, the simplest correct version: hash each shingle with SHA-1, permute the hash num_perm times,
    keep the minimum per permutation: P(two signatures agree at a position) = Jaccard(A, B). The product wraps
    mod 2^64 in uint64 as in datasketch, so this equals datasketch.MinHash(scheme="legacy") bit for bit."""
    # BEGIN SOLUTION
    a, b = permutation_params(num_perm, seed)
    sig = np.full(num_perm, MAX_HASH, dtype=np.uint64)
    for s in shingle_set:  # datasketch's hash: the first 4 bytes of SHA-1, little-endian
        h = np.uint64(struct.unpack("<I", hashlib.sha1(s.encode("utf-8")).digest()[:4])[0])
        with np.errstate(over="ignore"):
            sig = np.minimum(sig, ((a * h + b) % np.uint64(MERSENNE_PRIME)) & np.uint64(MAX_HASH))
    return sig
    # END SOLUTION

def word_hashes(text: str) -> np.ndarray:
    """A 32-bit hash of every word, all words of the text at once: words are runs of non-whitespace bytes (ASCII
    whitespace and case), and word [s, e) hashes to Σ code_i·P^(e-1-i) mod 2^64 (code = byte + 1), read off prefix
    sums of code_i·P^-(i+2) as (S[e] - S[s])·P^(e+1). Array products wrap mod 2^64 silently."""
    b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    inside = np.concatenate([[False], (b != 32) & (b - np.uint8(9) > 4), [False]])  # 9-13 and 32 are whitespace
    edges = np.flatnonzero(inside[1:] != inside[:-1])  # word starts and ends alternate
    if len(_POWERS.get("pow", ())) <= len(b):
        _POWERS["inv"], _POWERS["pow"] = (np.cumprod(np.full(max(len(b) + 1, 1 << 16), p)) for p in (_P_INV, _P))
    code = b + (b - np.uint8(65) < 26) * np.uint8(32) + np.uint8(1)  # A-Z to a-z; UTF-8 has no byte 255 to wrap
    S = np.concatenate([np.zeros(1, np.uint64), code], dtype=np.uint64)  # S[i + 1] = code_i, then in place:
    S = np.cumsum(np.multiply(S, _POWERS["inv"][: len(S)], out=S), out=S)  # S[i] = Σ_{j<i} code_j·P^-(j+2)
    h = (S[edges[1::2]] - S[edges[::2]]) * _POWERS["pow"][edges[1::2]]
    return (h ^ (h >> np.uint64(32))) & np.uint64(MAX_HASH)

class MinHasher:
    """The optimised MinHash, many documents at once: words hashed in array operations, a shingle's n word hashes
    combined, and ONE permutation per shingle instead of num_perm: its value's low bits pick one of num_perm bins,
    the rest is kept, the minimum per bin (one-permutation hashing, Li, Owen and Zhang 2012). Empty bins, in short
    documents, are filled from their neighbours (densification, Shrivastava and Li 2014)."""
    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        self.num_perm, self.ngram = num_perm, ngram
        self.a, self.b = (x[0] for x in permutation_params(1, seed))  # the one permutation
    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes (uint64) of all documents' shingles, repeats included (they cannot change a minimum), and
        each one's document. A text shorter than n words is one shingle: the window from its first word."""
        words, n = [word_hashes(t) for t in texts], self.ngram
        pad, k = np.zeros(n - 1, np.uint64), np.array([len(w) for w in words], dtype=np.int64)  # k: words per document
        wh = np.concatenate([pad] + [x for w in words for x in (w, pad)])  # n-1 zeros before every document
        h = np.zeros(len(wh) - n + 1, dtype=np.uint64)  # h[i]: the window of n word hashes that ends at wh[i + n - 1]
        for j in range(n):  # leading zeros change no polynomial: a window reaching into the zeros is a shorter one
            h = h * np.uint64(1_000_003) + wh[j: j + len(h)]  # (& MAX_HASH at the end: the same as mod 2^32 throughout)
        doc = np.repeat(np.arange(len(texts)), k)
        t = np.arange(len(doc)) - np.repeat(np.cumsum(k) - k, k)  # each word's place in its document
        keep = t >= np.minimum(k, n)[doc] - 1  # windows of n words, and the one window of a shorter document
        return h[np.arange(len(doc)) + (n - 1) * doc][keep] & np.uint64(MAX_HASH), doc[keep]
    def signatures(self, texts: list[str]) -> np.ndarray:
        """(n_docs, num_perm) uint64 signatures; a document without shingles gets all MAX_HASH."""
        k, (h, doc) = self.num_perm, self.shingle_hashes(texts)
        out = np.full((len(texts), k), MAX_HASH, dtype=np.uint64)
        v = (h * self.a + self.b) % np.uint64(MERSENNE_PRIME)  # the one permutation, wrapping mod 2^64 as datasketch
        bin_, val = v % np.uint64(k), (v // np.uint64(k)) & np.uint64(MAX_HASH)
        np.minimum.at(out.reshape(-1), doc * k + bin_.astype(np.int64), val)  # the minimum per (doc, bin)
        for row in np.flatnonzero((out == MAX_HASH).any(axis=1) & (np.bincount(doc, minlength=len(texts)) > 0)):
            # rotation densification: an empty bin takes the value of the next filled bin to its right, circularly,
            # so two documents fill a bin alike exactly when they agree nearby
            filled = np.flatnonzero(out[row] != MAX_HASH)
            out[row] = out[row, filled[np.searchsorted(filled, np.arange(k)) % len(filled)]]
        return out

def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))

def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """The (bands, rows) with b·r ≤ num_perm that minimise fp_weight·(area under the S-curve below the threshold:
    false positives) + fn_weight·(area above it that the curve misses: false negatives)."""
    def integrate(f, lo, hi, n=2000):  # Simpson's rule: ~1e-12 here, so the optimum matches scipy's quad
        y = f(np.linspace(lo, hi, 2 * n + 1))
        return (hi - lo) / (6 * n) * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    # BEGIN SOLUTION
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = integrate(lambda s: (1 - s ** r) ** b, threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best:
                best, opt = err, (b, r)
    return opt
    # END SOLUTION

def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) 64-bit bucket keys: the rows of band i hashed together, seeded with the band number."""
    banded = sigs[:, : bands * rows].reshape(len(sigs), bands, rows)  # (n_docs, bands, rows)
    keys = np.tile(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15), (len(sigs), 1))
    for j in range(rows):  # array products wrap mod 2^64 silently
        keys = (keys ^ banded[:, :, j]) * np.uint64(0x100000001B3)
    return keys

def candidate_pairs(keys: np.ndarray, doc_ids: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of documents that share a bucket in some band. Each document is paired with the bucket's first
    member (and small buckets with every member), which keeps clusters connected without n² pairs."""
    found = []
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        new = np.diff(keys[order, band], prepend=keys[order[:1], band] + np.uint64(1)) != 0  # a bucket starts
        run, start = np.cumsum(new) - 1, np.flatnonzero(new)  # each position's bucket; each bucket's first position
        small = np.diff(np.append(start, len(order)))[run] <= 20
        pos = np.flatnonzero(~small & ~new)  # big buckets: each member with the first
        found.append((order[start[run[pos]]], order[pos]))
        for d in range(1, 20):  # small buckets: the members d places apart, for every d
            pos = np.flatnonzero((run[d:] == run[:-d]) & small[d:])
            found.append((order[pos], order[pos + d]))
    a, b = (doc_ids[np.concatenate(x)] for x in zip(*found))  # found has one entry per band at least
    return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))

def clusters_from_pairs(n: int, pairs, sigs: np.ndarray | None, threshold: float) -> tuple[np.ndarray, list[list[int]]]:
    """Union-find over the pairs whose signatures agree on at least `threshold` of their values (all if sigs=None)."""
    parent, pairs = list(range(n)), np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving: each node visited skips to its grandparent
            x = parent[x]
        return x
    agree = (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1) if sigs is not None else np.ones(len(pairs))
    for a, b in pairs[agree >= threshold].tolist():  # agree: estimated_jaccard of every pair at once
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)  # the smaller index is the root: the first document is kept
    groups = collections.defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return np.array([i in groups for i in range(n)], dtype=bool), [g for g in groups.values() if len(g) > 1]

def fuzzy_dedup(texts: list[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, verify: bool = True,
                seed: int = 1, group=None, fn_weight: float = 0.9) -> tuple[np.ndarray, list[list[int]]]:
    """MinHash signatures, LSH bands, candidate pairs (verified by their estimated Jaccard), union-find clusters; the
    first document of each cluster is kept. Verification is cheap, so the bands are chosen to miss few true pairs
    (fn_weight 0.9: with 0.5/0.5 a pair at Jaccard 0.85 becomes a candidate only 69 % of the time). With N ranks,
    rank r signs documents r, r+N, ... and an all-gather gives every rank every signature: all return one result."""
    bands, rows = lsh_params(threshold, num_perm, 1 - fn_weight, fn_weight)
    hasher = MinHasher(num_perm, ngram, seed)
    n_ranks = dist.get_world_size(group) if dist.is_initialized() else 1
    if n_ranks == 1:
        sigs = hasher.signatures(texts)
    else:
        mine = hasher.signatures(texts[dist.get_rank(group)::n_ranks]).view(np.int64)  # (len(mine), num_perm)
        padded = torch.zeros((-(-len(texts) // n_ranks), num_perm), dtype=torch.int64)  # equal shapes to gather
        padded[: len(mine)] = torch.from_numpy(mine)
        parts = [torch.empty_like(padded) for _ in range(n_ranks)]
        dist.all_gather(parts, padded, group=group)  # parts[r][i] is document i·N + r: interleave, drop the padding
        sigs = torch.stack(parts, dim=1).reshape(-1, num_perm)[: len(texts)].numpy().view(np.uint64)
    signed = np.flatnonzero((sigs != MAX_HASH).any(axis=1))  # an empty document has no shingles: never a match
    pairs = candidate_pairs(band_keys(sigs[signed], bands, rows), signed)
    return clusters_from_pairs(len(texts), pairs, sigs if verify else None, threshold)

# --- demo: documents, the pipeline and its funnel ---------------------------------------------------------------------
@dataclass
class Document:
    id: str
    source: str  # file (and line, for JSONL)
    text: str
    kind: str = "prose"  # "code" for source files: they get code rules instead of prose rules
    scores: dict = field(default_factory=dict)  # what the model filters measured: perplexity, quality

StageReport = collections.namedtuple("StageReport", "stage docs_in docs_out mb_out seconds reasons")  # a funnel row
TEXT_SUFFIXES = {".html", ".htm", ".txt", ".md", ".py", ".jsonl"}
STDLIB = str(Path(os.__file__).parent)  # the default corpus: real documents with real duplicates (vendored copies)
STAGES = ("quality", "perplexity", "classifier", "pii", "blocklist", "exact", "fuzzy")

def read_documents(inputs: list[str], problems: collections.Counter, examples: dict) -> list[Document]:
    """Every readable document under the inputs (third-party site-packages left out). Binary files, bad UTF-8 and
    malformed JSONL lines are counted in `problems` (an example location in `examples`), never dropped silently."""
    docs = []
    for p in map(Path, inputs):
        files = [p] if p.is_file() else sorted(
            f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES
            and not {"site-packages", "dist-packages"} & set(f.relative_to(p).parts))
        for f in files:
            for where, text, why in read_file(f):
                if why:
                    problems[why] += 1
                    examples.setdefault(why, where)
                else:
                    docs.append(Document(f"doc{len(docs):07d}", where, text, "code" if f.suffix == ".py" else "prose"))
    return docs

def read_file(f: Path) -> list[tuple[str, str, str | None]]:
    """(where, text, problem or None) for each document of one file: a JSONL line is a document, a file otherwise."""
    try:
        raw = f.read_bytes()
        if b"\x00" in raw[:8192]:
            return [(str(f), "", "binary file")]
        if f.suffix != ".jsonl":
            text = raw.decode("utf-8")
            return [(str(f), extract_text(text) if f.suffix in (".html", ".htm") else text, None)]
    except OSError as e:
        return [(f"{f}: {e.strerror}", "", "unreadable file")]
    except UnicodeDecodeError as e:
        return [(f"{f} (byte {e.start})", "", "bad utf-8")]
    out = []
    for i, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                text = json.loads(line.decode("utf-8"))["text"]
                why = None if isinstance(text, str) else "malformed jsonl line"
            except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                why = "bad utf-8" if isinstance(e, UnicodeDecodeError) else "malformed jsonl line"
            out.append((f"{f}:{i}", "" if why else text, why))
    return out

def mb(docs: list[Document]) -> float:
    return sum(len(d.text.encode("utf-8")) for d in docs) / 1e6

def filter_each(docs: list[Document], check) -> tuple[list[Document], collections.Counter]:
    """Apply check(doc) -> reasons (empty: keep; it may rewrite doc.text) to each document; count the reasons."""
    verdicts = [check(d) for d in docs]
    return [d for d, why in zip(docs, verdicts) if not why], collections.Counter(r for why in verdicts for r in why)

def run_pipeline(args: argparse.Namespace) -> tuple[list[Document], list[StageReport], dict]:
    """Read args.inputs, then run each stage (args: make_parser()'s flags); the survivors, the funnel, examples."""
    problems, examples, t = collections.Counter(), {}, time.perf_counter()
    docs = read_documents(args.inputs, problems, examples)
    report = [StageReport("read", len(docs) + problems.total(), len(docs), mb(docs), time.perf_counter() - t, problems)]
    blocklist = args.blocklist and [w.strip() for w in Path(args.blocklist).read_text("utf-8", "replace").splitlines()
                                    if w.strip()]  # one word or phrase a line, any case
    fuzzy, pii = (args.threshold, args.num_perm, args.ngram), collections.Counter()
    def scrub(doc: Document) -> list[str]:  # PII is rewritten, not removed: the row counts the replacements
        doc.text, found = scrub_pii(doc.text)
        pii.update({f"replaced {k}": v for k, v in found.items()})
        return []
    stages = {  # survivors of the stage before -> (kept, reasons), or one reason for all it dropped
        "quality": lambda d: filter_each(d, lambda doc: quality_check(doc, args.languages)),
        "perplexity": lambda d: perplexity_filter(d, reference_texts(args.reference), args.ppl_quantile),
        "classifier": lambda d: classifier_filter(d, reference_texts(args.reference), args.classifier_threshold),
        "pii": lambda d: (filter_each(d, scrub)[0], pii),
        "blocklist": lambda d: filter_each(d, blocklist_check(blocklist, args.blocklist_share)),
        "exact": lambda d: (exact_dedup(d)[0], "exact duplicate"),
        "fuzzy": lambda d: ([x for x, keep in zip(d, fuzzy_dedup([x.text for x in d], *fuzzy)[0]) if keep],
                            f"near-duplicate (Jaccard >= {args.threshold})")}
    for name in STAGES:
        if name not in args.skip and docs and (name != "blocklist" or blocklist):
            t = time.perf_counter()
            kept, why = stages[name](docs)
            if isinstance(why, str):  # counted even when 0 are dropped: the reason may carry a measurement
                why = collections.Counter({why: len(docs) - len(kept)})
            report.append(StageReport(name, len(docs), len(kept), mb(kept), time.perf_counter() - t, why))
            docs = kept
    return docs, report, examples

def print_funnel(report: list[StageReport], examples: dict) -> None:
    row = "{:<10} | {:>8} | {:>8} | {:>8} | {:>7} | {:>8} | {}".format
    print(row("stage", "docs in", "docs out", "MB out", "time", "docs/s", "top reasons"))
    for r in report:
        rate = r.docs_in / r.seconds if r.seconds > 0 else float("inf")
        print(row(r.stage, r.docs_in, r.docs_out, f"{r.mb_out:.2f}", f"{r.seconds:.2f}s", f"{rate:.0f}",
                  ", ".join(f"{k} ({v})" for k, v in r.reasons.most_common(3)) or "-"))
    for reason, where in examples.items():
        print(f"  {reason}: e.g. {where}")
    if report and report[0].docs_out == 0:
        print("warning: no document could be read from the input")

def write_output(docs: list[Document], report: list[StageReport], examples: dict, output: str) -> None:
    with open(output, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "source": d.source, "text": d.text, **d.scores}, ensure_ascii=False) + "\n")
    stats = Path(output).with_name("stats.json")
    stats.write_text(json.dumps({"stages": [r._asdict() for r in report], "examples": examples}, indent=1))
    print(f"wrote {len(docs)} documents to {output} and the funnel to {stats}")

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="*", default=[STDLIB], help="files, folders (.html .htm .txt .md .py .jsonl); default: stdlib")
    add("--output", default="clean.jsonl", help="where the clean documents go (JSONL), with stats.json beside it")
    add("--skip", action="append", default=[], choices=STAGES, help="switch a stage off (repeatable)")
    add("--languages", type=lambda s: s.split(","), help="keep prose in these languages, e.g. en,zh")
    add("--reference", help="high-quality text the model filters learn from (default: Python's docs and docstrings)")
    add("--ppl-quantile", type=float, default=0.99, help="drop prose above this quantile of the reference's perplexity")
    add("--classifier-threshold", type=float, default=0.5,
        help="drop prose whose classifier score P(high quality) is below this (0 means keep all)")
    add("--blocklist", help="a file of blocked words or phrases, one per line")
    add("--blocklist-share", type=float, default=0.01,
        help="drop a document when blocked words exceed this share of its words (0 means one hit is enough)")
    add("--threshold", type=float, default=0.8, help="fuzzy dedup: Jaccard similarity of duplicates")
    add("--num-perm", type=int, default=128, help="fuzzy dedup: MinHash values per document")
    add("--ngram", type=int, default=5, help="fuzzy dedup: words per shingle")
    return parser

def main(argv: list[str] | None = None) -> tuple[list[Document], list[StageReport]]:
    parser = make_parser()
    args = parser.parse_args(argv)
    for bad, flag, fix in [
            (not 0 < args.threshold < 1, "threshold", "must lie strictly between 0 and 1 (try 0.8)"),
            (args.num_perm < 16, "num_perm", "too few permutations to band (try 128)"),
            (args.ngram < 1, "ngram", "a shingle needs at least one word (try 5)"),
            (not 0 < args.ppl_quantile <= 1, "ppl_quantile", "must be in (0, 1] (try 0.99)"),
            (not 0 <= args.classifier_threshold <= 1, "classifier_threshold", "a probability, in [0, 1] (try 0.5)"),
            (args.blocklist_share < 0, "blocklist_share", "a share, at least 0 (try 0.01)"),
            (args.blocklist and not Path(args.blocklist).is_file(), "blocklist", "no such file")]:
        if bad:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {fix}")
    for path in args.inputs + ([args.reference] if args.reference else []):
        if not Path(path).exists():
            parser.error(f"input {path}: no such file or folder")
    rank, _, _ = setup_distributed("cpu")
    try:
        docs, report, examples = run_pipeline(args)
        if rank == 0:
            print_funnel(report, examples)
            write_output(docs, report, examples, args.output)
        return docs, report
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
