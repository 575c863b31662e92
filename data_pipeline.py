"""From raw documents to training data: extraction, quality filters, PII scrubbing, dedup, mixing and curricula.

Pretraining data is mostly thrown away: a web crawl loses most of its documents to boilerplate, language, quality
and duplication filters before a model sees it. This script runs those stages one after another and prints the
funnel, stage by stage: documents in, documents out, what was removed and why. Near-duplicates are found with
MinHash and locality-sensitive hashing: two documents whose shingle sets have Jaccard similarity s share one of b
bands of r MinHash values with probability

    P(candidate) = 1 - (1 - s^r)^b,

an S-curve that rises around the threshold (1/b)^(1/r). The output JSONL is what every training script's --data
reads; the last part plans the mixture of sources, the curriculum, and post-training (SFT, preference) data.

Run:   python data_pipeline.py --output clean.jsonl                  (Python's standard library as the corpus)
       python data_pipeline.py pages/ notes.txt --output clean.jsonl --languages en --skip model
       torchrun --nproc_per_node=2 data_pipeline.py --output clean.jsonl    (fuzzy dedup shared by 2 ranks)
       python data_pipeline.py --plan --params 7e9 --tokens 2e12
"""
from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import html
import json
import os
import re
import struct
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# --- documents and the funnel ---------------------------------------------


@dataclass
class Document:
    id: str
    source: str  # file (and line, for JSONL)
    text: str
    kind: str = "prose"  # "code" for source files: they get code rules instead of prose rules


CODE_SUFFIXES = {".py"}
TEXT_SUFFIXES = {".html", ".htm", ".txt", ".md", ".py", ".jsonl"}


def read_documents(inputs: list[str], problems: collections.Counter, examples: dict) -> list[Document]:
    """Every readable document under the inputs. Binary files, bad UTF-8 and malformed JSONL lines are counted in
    `problems` (with an example location in `examples`), never dropped silently."""
    files = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise ValueError(f"input {item}: no such file or folder")
        files += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES
                                                and not skipped_by_default(f.relative_to(p)))

    def problem(reason, where):
        problems[reason] += 1
        examples.setdefault(reason, where)

    docs = []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            problem("unreadable file", f"{f}: {e.strerror}")
            continue
        if b"\x00" in raw[:8192]:
            problem("binary file", str(f))
            continue
        if f.suffix == ".jsonl":
            for i, line in enumerate(raw.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line.decode("utf-8"))["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except UnicodeDecodeError:
                    problem("bad utf-8", f"{f}:{i}")
                    continue
                except (json.JSONDecodeError, KeyError, TypeError):
                    problem("malformed jsonl line", f"{f}:{i}")
                    continue
                docs.append(Document(f"{f.stem}-{i}", f"{f}:{i}", text))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem("bad utf-8", f"{f} (byte {e.start})")
            continue
        if f.suffix in (".html", ".htm"):
            text = extract_text(text)
        docs.append(Document(str(len(docs)), str(f), text, "code" if f.suffix in CODE_SUFFIXES else "prose"))
    for i, d in enumerate(docs):
        d.id = f"doc{i:07d}"
    return docs


def default_inputs() -> list[str]:
    """Python's standard library source tree: real documents with real duplicates (vendored copies, tests)."""
    return [str(Path(os.__file__).parent)]


def skipped_by_default(path: Path) -> bool:
    """Third-party packages installed into the standard library's folder are not part of the default corpus."""
    return "site-packages" in path.parts or "dist-packages" in path.parts


@dataclass
class StageReport:
    stage: str
    docs_in: int
    docs_out: int
    mb_out: float
    reasons: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0


def progress(stage: str, done: int, total: int, t0: float) -> None:
    """A one-line progress bar on stderr for long stages."""
    if total >= 2000 and (done % 500 == 0 or done == total) and sys.stderr.isatty():
        bar = "#" * int(30 * done / total)
        sys.stderr.write(f"\r{stage:<10} [{bar:<30}] {done}/{total} {done / max(1e-9, time.perf_counter() - t0):.0f} docs/s")
        if done == total:
            sys.stderr.write("\n")


def run_filter(stage: str, docs: list[Document], check) -> tuple[list[Document], StageReport]:
    """Apply check(doc) -> list of reasons (empty: keep); may also rewrite doc.text. Records the funnel row."""
    t0 = time.perf_counter()
    kept, reasons = [], collections.Counter()
    for i, d in enumerate(docs, 1):
        why = check(d)
        if why:
            reasons.update(why)
        else:
            kept.append(d)
        progress(stage, i, len(docs), t0)
    return kept, StageReport(stage, len(docs), len(kept), mb(kept), reasons, time.perf_counter() - t0)


def mb(docs) -> float:
    return sum(len(d.text.encode("utf-8")) for d in docs) / 1e6


# --- stage 1: HTML to text -------------------------------------------------

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
            if tag == "pre":
                self.pre_depth += 1
            if tag in BLOCK_TAGS:
                self._newlines(2 if tag in PARAGRAPH_TAGS else 1)
            if tag == "li":
                self.parts.append("- ")
            if tag in ("td", "th"):
                self.parts.append(" | ")

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and not self.skip_depth:
            self._newlines(1)

    def handle_endtag(self, tag):
        if tag in SKIPPED_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif not self.skip_depth and tag in BLOCK_TAGS:
            if tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)
            self._newlines(2 if tag in PARAGRAPH_TAGS else 1)

    def handle_data(self, data):
        if not self.skip_depth:  # in HTML a newline in the source is a space, except inside <pre>
            self.parts.append(data if self.pre_depth else re.sub(r"\s+", " ", data))


def extract_text(page: str) -> str:
    """Visible text of an HTML page: no scripts, styles, navigation, headers, footers, asides or forms; paragraphs
    and list items on their own lines; entities decoded; runs of spaces and blank lines collapsed."""
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    text = html.unescape("".join(parser.parts))  # a second pass for double-escaped entities
    lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip(" |") for line in text.split("\n")]
    lines = [line.strip() for line in lines]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- stage 2: heuristic quality filters ----------------------------------------
# Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher", App. A.
GOPHER_MIN_WORDS, GOPHER_MAX_WORDS = 50, 100_000
GOPHER_MEAN_WORD_LENGTH = (3, 10)
GOPHER_MAX_SYMBOL_RATIO = 0.1  # '#' and '...' per word
GOPHER_MAX_BULLET_LINES = 0.9  # share of lines starting with a bullet
GOPHER_MAX_ELLIPSIS_LINES = 0.3  # share of lines ending with an ellipsis
GOPHER_MIN_ALPHA_WORDS = 0.8  # share of words with at least one letter
GOPHER_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # at least 2 must appear
GOPHER_MIN_STOP_WORDS = 2
# Gopher repetition rules (same appendix): duplicate lines / paragraphs, and the share of characters in the most
# frequent n-gram (n = 2, 3, 4) and in duplicated n-grams (n = 5..10).
GOPHER_MAX_DUP_LINE_FRAC, GOPHER_MAX_DUP_PARA_FRAC = 0.30, 0.30
GOPHER_MAX_DUP_LINE_CHARS, GOPHER_MAX_DUP_PARA_CHARS = 0.20, 0.20
GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
# C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning ...", section 2.2.
C4_TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")
C4_MIN_WORDS_PER_LINE = 3
C4_MIN_SENTENCES = 3
C4_JAVASCRIPT = re.compile(r"javascript", re.I)
C4_POLICY = re.compile(r"terms of use|privacy policy|cookie policy|uses cookies|use of cookies", re.I)
# Code: the rules The Stack / StarCoder (Li et al. 2023) used to drop generated and data-like files.
CODE_MAX_MEAN_LINE_LENGTH, CODE_MAX_LINE_LENGTH, CODE_MIN_ALNUM_FRACTION = 100, 1000, 0.25
CODE_GENERATED = re.compile(r"auto-?generated|do not edit|generated by", re.I)


def gopher_quality(text: str) -> list[str]:
    words = text.split()
    n = len(words)
    if not GOPHER_MIN_WORDS <= n <= GOPHER_MAX_WORDS:
        return [f"gopher: {n} words (keep {GOPHER_MIN_WORDS}-{GOPHER_MAX_WORDS})"]
    reasons = []
    mean_len = sum(map(len, words)) / n
    if not GOPHER_MEAN_WORD_LENGTH[0] <= mean_len <= GOPHER_MEAN_WORD_LENGTH[1]:
        reasons.append("gopher: mean word length")
    if (text.count("#") + text.count("...") + text.count("…")) / n > GOPHER_MAX_SYMBOL_RATIO:
        reasons.append("gopher: symbol-to-word ratio")
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(line.lstrip().startswith(("-", "*", "•", "·")) for line in lines) / len(lines) > GOPHER_MAX_BULLET_LINES:
        reasons.append("gopher: bullet lines")
    if lines and sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > GOPHER_MAX_ELLIPSIS_LINES:
        reasons.append("gopher: ellipsis lines")
    if sum(any(c.isalpha() for c in w) for w in words) / n < GOPHER_MIN_ALPHA_WORDS:
        reasons.append("gopher: words without letters")
    if len(GOPHER_STOP_WORDS & {w.lower().strip(".,;:!?") for w in words}) < GOPHER_MIN_STOP_WORDS:
        reasons.append("gopher: no stop words")
    return reasons


def _duplicate_share(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier one, and share of characters in them."""
    seen, dup, dup_chars = set(), 0, 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        seen.add(x)
    total_chars = sum(map(len, items)) or 1
    return dup / max(1, len(items)), dup_chars / total_chars


def gopher_repetition(text: str) -> list[str]:
    reasons = []
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    frac, chars = _duplicate_share(lines)
    if frac > GOPHER_MAX_DUP_LINE_FRAC or chars > GOPHER_MAX_DUP_LINE_CHARS:
        reasons.append("gopher: duplicate lines")
    frac, chars = _duplicate_share(paras)
    if frac > GOPHER_MAX_DUP_PARA_FRAC or chars > GOPHER_MAX_DUP_PARA_CHARS:
        reasons.append("gopher: duplicate paragraphs")
    words = text.split()
    total = sum(map(len, words)) or 1
    for k, limit in GOPHER_TOP_NGRAM.items():
        grams = collections.Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total > limit:
                reasons.append(f"gopher: top {k}-gram share")
                break
    for k, limit in GOPHER_DUP_NGRAM.items():
        covered = np.zeros(len(words), dtype=bool)
        seen = {}
        for i in range(len(words) - k + 1):
            g = tuple(words[i:i + k])
            if g in seen:
                covered[i:i + k] = True
                covered[seen[g]:seen[g] + k] = True
            else:
                seen[g] = i
        if sum(len(w) for w, c in zip(words, covered) if c) / total > limit:
            reasons.append(f"gopher: duplicated {k}-grams")
            break
    return reasons


def c4_rules(doc: Document) -> list[str]:
    """C4's line rules: keep only lines that end in terminal punctuation, have 3+ words and mention no javascript
    or policy boilerplate (the document is rewritten); drop documents with 'lorem ipsum', a curly brace, or fewer
    than 3 sentences left."""
    text = doc.text
    if "lorem ipsum" in text.lower():
        return ["c4: lorem ipsum"]
    if "{" in text:
        return ["c4: curly brace"]
    kept = [line for line in (l.strip() for l in text.split("\n"))
            if line.endswith(C4_TERMINAL_PUNCTUATION) and len(line.split()) >= C4_MIN_WORDS_PER_LINE
            and not C4_JAVASCRIPT.search(line) and not C4_POLICY.search(line)]
    if len(re.findall(r"[.!?](?:\s|$)", " ".join(kept))) < C4_MIN_SENTENCES:
        return ["c4: fewer than 3 sentences"]
    doc.text = "\n".join(kept)
    return []


def code_rules(text: str) -> list[str]:
    lines = text.split("\n") or [""]
    reasons = []
    if sum(map(len, lines)) / len(lines) > CODE_MAX_MEAN_LINE_LENGTH:
        reasons.append("code: mean line length")
    if max(map(len, lines)) > CODE_MAX_LINE_LENGTH:
        reasons.append("code: line over 1000 characters")
    if sum(c.isalnum() for c in text) / max(1, len(text)) < CODE_MIN_ALNUM_FRACTION:
        reasons.append("code: alphanumeric fraction")
    if CODE_GENERATED.search(text[:2000]):
        reasons.append("code: generated file")
    if not text.strip():
        reasons.append("code: empty")
    return reasons


# Language identification from scripts and stop words (a small, dependency-free stand-in for fastText's lid.176).
STOP_WORDS = {
    "en": {"the", "and", "of", "to", "is", "in", "that", "it", "for", "with", "as", "was", "on", "this", "are"},
    "de": {"der", "die", "und", "das", "ist", "nicht", "ein", "eine", "zu", "mit", "den", "von", "sich", "auch"},
    "fr": {"le", "la", "les", "et", "des", "est", "une", "un", "du", "que", "pour", "dans", "pas", "sur"},
    "es": {"el", "la", "los", "las", "y", "es", "una", "un", "que", "por", "para", "con", "del", "se"},
}
SCRIPTS = {"zh": (0x4E00, 0x9FFF), "ja": (0x3040, 0x30FF), "ko": (0xAC00, 0xD7AF), "ru": (0x0400, 0x04FF),
           "ar": (0x0600, 0x06FF)}


def detect_language(text: str) -> str:
    """The language whose script covers most letters; among Latin-script languages, the most stop words."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "unknown"
    for lang, (lo, hi) in SCRIPTS.items():
        if sum(lo <= ord(c) <= hi for c in letters) / len(letters) > 0.3:
            return lang
    words = [w.lower().strip(".,;:!?()\"'") for w in text.split()]
    hits = {lang: sum(w in sw for w in words) for lang, sw in STOP_WORDS.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] >= max(2, 0.02 * len(words)) else "unknown"


def quality_check(languages: set[str] | None):
    def check(doc: Document) -> list[str]:
        if doc.kind == "code":
            return code_rules(doc.text)
        if languages:
            lang = detect_language(doc.text)
            if lang not in languages:
                return [f"language: {lang}"]
        return gopher_quality(doc.text) or gopher_repetition(doc.text) or c4_rules(doc)
    return check


# --- stage 3: model-based filter -------------------------------------------------


class CharNgramLM:
    """A character (byte) n-gram language model with add-k smoothing, in numpy: the cheap cousin of CCNet's
    KenLM filter. Trained on reference text, it gives each document a perplexity; text unlike the reference
    (boilerplate, keyword lists, mangled encodings) scores high."""

    def __init__(self, order: int = 3, k: float = 0.01):
        self.order, self.k = order, k
        self.context_bits = 8 * (order - 1)

    def _indices(self, text: str) -> np.ndarray:
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if len(b) < self.order:
            return np.zeros(0, dtype=np.int64)
        idx = np.zeros(len(b) - self.order + 1, dtype=np.int64)
        for j in range(self.order):  # (context bytes, next byte) as one integer
            idx = (idx << 8) | b[j: len(b) - self.order + 1 + j]
        return idx

    def fit(self, texts, chunk_bytes: int = 1 << 23) -> "CharNgramLM":
        size = 1 << (8 * self.order)
        self.counts = np.zeros(size, dtype=np.int64)
        batch, n = [], 0
        for t in list(texts) + [None]:  # count n-grams a few MB at a time: one bincount per batch, not per text
            if t is not None:
                batch.append(self._indices(t))
                n += len(batch[-1])
            if batch and (t is None or n >= chunk_bytes):
                self.counts += np.bincount(np.concatenate(batch), minlength=size)
                batch, n = [], 0
        self.context_counts = self.counts.reshape(-1, 256).sum(axis=1)
        return self

    def perplexity(self, text: str) -> float:
        idx = self._indices(text)
        if len(idx) == 0:
            return float("inf")
        p = (self.counts[idx] + self.k) / (self.context_counts[idx >> 8] + 256 * self.k)
        return float(np.exp(-np.log(p).mean()))


# --- stage 4: PII --------------------------------------------------------------------

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
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub_pii(text: str) -> tuple[str, collections.Counter]:
    """Replace e-mail addresses, card numbers (Luhn-valid), IP addresses and phone numbers by placeholders.
    Versions (3.11.7), dates (2024-01-15), ISBNs and prices stay: each pattern demands a shape they lack."""
    counts = collections.Counter()

    def sub(pattern, tag, text, valid=lambda m: True):
        def repl(m):
            if not valid(m.group(0)):
                return m.group(0)
            counts[tag] += 1
            return tag
        return pattern.sub(repl, text)

    text = sub(EMAIL, "<EMAIL>", text)
    text = sub(CARD, "<CARD>", text, luhn_valid)
    text = sub(IPV4, "<IP>", text)
    text = sub(IPV6, "<IP>", text, lambda s: sum(c.isalpha() for c in s) > 0 or s.count(":") >= 7 or "::" in s)
    text = sub(PHONE, "<PHONE>", text, lambda s: 7 <= sum(c.isdigit() for c in s) <= 15)
    return text, counts


def load_blocklist(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--blocklist {path}: no such file")
    return [w.strip().lower() for w in p.read_text(encoding="utf-8", errors="replace").splitlines() if w.strip()]


def blocklist_check(words: list[str], max_share: float):
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.I) if words else None

    def check(doc: Document) -> list[str]:
        if pattern is None:
            return []
        n = max(1, len(doc.text.split()))
        hits = len(pattern.findall(doc.text))
        return [f"blocklist: {hits} hits"] if hits and hits / n > max_share else []
    return check


# --- stage 5: exact dedup ----------------------------------------------------------


def normalise(text: str) -> str:
    """What two copies of one document still share: Unicode NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_dedup(docs: list[Document]) -> tuple[list[Document], list[int]]:
    """Keep the first document of every normalised text; return the kept ones and, per document, the index of
    the one it duplicates (or its own index)."""
    first, kept, owner = {}, [], []
    for i, d in enumerate(docs):
        h = hashlib.sha1(normalise(d.text).encode("utf-8")).digest()
        owner.append(first.setdefault(h, i))
        if owner[-1] == i:
            kept.append(d)
    return kept, owner


# --- stage 6: fuzzy dedup with MinHash and LSH ------------------------------------------

MERSENNE_PRIME = (1 << 61) - 1
MAX_HASH = (1 << 32) - 1


def shingles(text: str, ngram: int = 5) -> list[str]:
    """Word n-grams (lower-cased, split on whitespace); a text shorter than n words is one shingle."""
    words = text.lower().split()
    if len(words) <= ngram:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]


def sha1_hash32(data: bytes) -> int:
    """The first 4 bytes of SHA-1, little-endian: datasketch's default hash, for bit-identical signatures."""
    return struct.unpack("<I", hashlib.sha1(data).digest()[:4])[0]


class MinHasher:
    """MinHash signatures for many documents at once; P(two signatures agree at a position) = Jaccard(A, B).

    hash="sha1" is classic MinHash: each shingle hashed with SHA-1, then num_perm permutations
    h -> (a·h + b) mod (2^61 - 1), truncated to 32 bits, with a and b drawn as datasketch draws them and numpy's
    uint64 arithmetic (its overflow included), so signatures equal datasketch.MinHash(scheme="legacy") bit for bit.

    hash="fast" hashes all words of a document in a few array operations (see word_hashes), combines a shingle's
    n word hashes, and applies
    ONE such permutation per shingle: its value's low bits pick one of num_perm bins and the rest is kept, the
    minimum per bin (one-permutation hashing, Li, Owen and Zhang 2012). Empty bins, in documents with few shingles,
    borrow a filled bin chosen by a fixed hash of the bin (optimal densification, Shrivastava 2017), the same choice
    in every document, so matches stay Jaccard-distributed. Work per shingle: 1 permutation instead of num_perm."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1, hash: str = "fast"):
        if hash not in ("fast", "sha1"):
            raise ValueError(f"unknown hash {hash!r}: fast or sha1")
        self.num_perm, self.ngram, self.hash = num_perm, ngram, hash
        gen = np.random.RandomState(seed)
        ab = np.array([(gen.randint(1, MERSENNE_PRIME, dtype=np.uint64), gen.randint(0, MERSENNE_PRIME, dtype=np.uint64))
                       for _ in range(num_perm)], dtype=np.uint64)
        self.a, self.b = ab[:, 0], ab[:, 1]
        self.borrow = np.random.RandomState(seed + 1).randint(0, num_perm, size=(num_perm, 64))  # densification

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes of the document's distinct shingles (uint64 array)."""
        if self.hash == "sha1":
            return np.array(sorted({sha1_hash32(s.encode("utf-8")) for s in shingles(text, self.ngram)}),
                            dtype=np.uint64)
        wh = self.word_hashes(text)
        if not len(wh):
            return np.zeros(0, dtype=np.uint64)
        n = min(self.ngram, len(wh))
        h = np.zeros(len(wh) - n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):  # polynomial combination of the n word hashes, kept to 32 bits
                h = (h * np.uint64(1_000_003) + wh[j: len(wh) - n + 1 + j]) & np.uint64(MAX_HASH)
        return np.unique(h)

    _P = np.uint64(0x100000001B3)  # FNV's 64-bit prime; odd, so invertible modulo 2^64
    _P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
    _LOWER = np.array([c + 32 if 65 <= c <= 90 else c for c in range(256)], dtype=np.uint64)
    _SPACE = np.isin(np.arange(256), [9, 10, 11, 12, 13, 32])

    def word_hashes(self, text: str) -> np.ndarray:
        """A 32-bit hash of every word, all words of the text at once: words are runs of non-whitespace bytes
        (ASCII whitespace and case), and word [s, e) hashes to Σ byte_i·P^(e-1-i) mod 2^64, read off prefix sums
        of byte_i·P^-i as (S[e-1] - S[s-1])·P^(e-1)."""
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        if not len(b):
            return np.zeros(0, dtype=np.uint64)
        inside = ~self._SPACE[b]
        edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if not len(starts):
            return np.zeros(0, dtype=np.uint64)
        if len(getattr(self, "_pow", ())) < len(b):  # P^i and P^-i, computed once for the longest text so far
            with np.errstate(over="ignore"):
                m = max(len(b), 1 << 16)
                self._inv_pow = np.cumprod(np.full(m, self._P_INV, dtype=np.uint64)) * self._P
                self._pow = np.cumprod(np.full(m, self._P, dtype=np.uint64)) * self._P_INV
        inv_pow, pow_ = self._inv_pow[: len(b)], self._pow
        with np.errstate(over="ignore"):
            S = np.cumsum((self._LOWER[b] + np.uint64(1)) * inv_pow)
            before = np.where(starts > 0, S[np.maximum(starts - 1, 0)], np.uint64(0))
            h = (S[ends - 1] - before) * pow_[ends - 1]
        return (h ^ (h >> np.uint64(32))) & np.uint64(MAX_HASH)

    @staticmethod
    def permute(h: np.ndarray, a, b) -> np.ndarray:
        """(a·h + b) mod (2^61 - 1) on uint64 (the product wraps mod 2^64, as in datasketch), without a division:
        2^61 ≡ 1 (mod p), so y ≡ (y >> 61) + (y & p), and one subtraction finishes the job."""
        with np.errstate(over="ignore"):
            y = h * a + b
        y = (y >> np.uint64(61)) + (y & np.uint64(MERSENNE_PRIME))
        return y - np.uint64(MERSENNE_PRIME) * (y >= np.uint64(MERSENNE_PRIME))

    def signatures(self, texts: list[str], chunk: int = 1 << 16) -> np.ndarray:
        """(n_docs, num_perm) uint64 signatures; a document without shingles gets all MAX_HASH."""
        hashes = [self.shingle_hashes(t) for t in texts]
        if self.hash == "fast":
            return self._one_permutation(hashes)
        out = np.full((len(texts), self.num_perm), MAX_HASH, dtype=np.uint64)
        i = 0
        while i < len(texts):  # permute a block of documents' shingles in one array operation
            j, total = i, 0
            while j < len(texts) and (total == 0 or total + len(hashes[j]) <= chunk):
                total += len(hashes[j])
                j += 1
            sizes = np.array([len(h) for h in hashes[i:j]])
            if sizes.sum():
                phv = self.permute(np.concatenate(hashes[i:j])[:, None], self.a[None, :], self.b[None, :]) \
                    & np.uint64(MAX_HASH)  # (shingles, num_perm)
                starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
                nonempty = sizes > 0
                out[np.arange(i, j)[nonempty]] = np.minimum.reduceat(phv, starts[nonempty], axis=0)
            i = j
        return out

    def _one_permutation(self, hashes: list[np.ndarray]) -> np.ndarray:
        k = self.num_perm
        out = np.full((len(hashes), k), MAX_HASH, dtype=np.uint64)
        sizes = np.array([len(h) for h in hashes])
        if sizes.sum() == 0:
            return out
        v = self.permute(np.concatenate(hashes), self.a[0], self.b[0])
        doc = np.repeat(np.arange(len(hashes), dtype=np.uint64), sizes)
        bin_, val = v % np.uint64(k), (v // np.uint64(k)) & np.uint64(MAX_HASH)
        np.minimum.at(out.reshape(-1), (doc * np.uint64(k) + bin_).astype(np.int64), val)  # min per (doc, bin)
        for row in np.flatnonzero((out == MAX_HASH).any(axis=1) & (sizes > 0)):  # densify the empty bins
            sig = out[row]
            filled = sig != MAX_HASH
            empty = np.flatnonzero(~filled)
            for t in range(self.borrow.shape[1]):
                src = self.borrow[empty, t]
                ok = filled[src]
                sig[empty[ok]] = sig[src[ok]]  # values of originally filled bins only
                empty = empty[~ok]
                if not len(empty):
                    break
            else:  # 64 unlucky draws: take the first filled bin
                sig[empty] = sig[np.flatnonzero(filled)[0]]
        return out


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def _integrate(f, lo: float, hi: float, n: int = 2000) -> float:
    """Simpson's rule: accurate to ~1e-12 for these smooth polynomials, so the optimum matches scipy's quad."""
    if hi <= lo:
        return 0.0
    x = np.linspace(lo, hi, 2 * n + 1)
    y = f(x)
    return float((hi - lo) / (6 * n) * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """The (bands, rows) with b·r ≤ num_perm that minimise fp_weight·(area under the S-curve below the threshold:
    false positives) + fn_weight·(area above it that the curve misses: false negatives)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} must lie strictly between 0 and 1")
    if num_perm < 2:
        raise ValueError(f"num_perm {num_perm} is too small for banding: use 64 or more")
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(lambda s: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = _integrate(lambda s: (1 - s ** r) ** b, threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best:
                best, opt = err, (b, r)
    return opt


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) 64-bit bucket keys: band i of a signature hashed with the band number."""
    n = len(sigs)
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(bands):
            k = np.full(n, np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for j in range(rows):
                k = (k ^ sigs[:, i * rows + j]) * np.uint64(0x100000001B3)
            keys[:, i] = k
    return keys


def candidate_pairs(keys: np.ndarray, doc_ids: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of documents that share a bucket in some band. Each document is paired with the bucket's first
    member (and small buckets with every member), which keeps clusters connected without n² pairs."""
    pairs = set()
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        k = keys[order, band]
        cut = np.flatnonzero(np.diff(k)) + 1
        for group in np.split(order, cut):
            if len(group) < 2:
                continue
            members = sorted(int(doc_ids[g]) for g in group)
            if len(members) <= 20:
                pairs.update((a, b) for ai, a in enumerate(members) for b in members[ai + 1:])
            else:
                pairs.update((members[0], b) for b in members[1:])
    return pairs


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smaller index is the root: the first document is kept


def clusters_from_pairs(n: int, pairs, sigs: np.ndarray | None, threshold: float) -> tuple[np.ndarray, list[list[int]]]:
    uf = UnionFind(n)
    for a, b in sorted(pairs):
        if sigs is None or estimated_jaccard(sigs[a], sigs[b]) >= threshold:
            uf.union(a, b)
    groups = collections.defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    keep = np.zeros(n, dtype=bool)
    keep[[min(g) for g in groups.values()]] = True
    return keep, [g for g in groups.values() if len(g) > 1]


def fuzzy_dedup(texts: list[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, verify: bool = True,
                hash: str = "fast", seed: int = 1, group=None, fn_weight: float = 0.9) -> tuple[np.ndarray, list[list[int]]]:
    """Near-duplicate removal: MinHash signatures, LSH banding into buckets, candidate pairs (optionally verified
    by their estimated Jaccard), union-find into clusters; the first document of each cluster is kept.

    Verification throws false candidates out cheaply, so the bands are chosen to miss few true pairs: fn_weight
    0.9 (with the even 0.5/0.5 split, a pair at Jaccard 0.85 becomes a candidate only 69 % of the time).

    Inside a process group of N ranks: rank r signs documents r, r+N, ...; each (band, bucket key) goes to rank
    key mod N in one all-to-all, so every rank finds the candidates of its own buckets; the pairs are then shared
    and every rank builds the same clusters. The result equals the single-process one."""
    bands, rows = lsh_params(threshold, num_perm, 1 - fn_weight, fn_weight)
    hasher = MinHasher(num_perm, ngram, seed, hash)
    n_ranks = dist.get_world_size(group) if dist.is_initialized() else 1
    if n_ranks == 1:
        sigs = hasher.signatures(texts)
        signed = np.flatnonzero((sigs != MAX_HASH).any(axis=1))  # an empty document has no shingles: never a match
        pairs = candidate_pairs(band_keys(sigs[signed], bands, rows), signed)
        return clusters_from_pairs(len(texts), pairs, sigs if verify else None, threshold)
    rank = dist.get_rank(group)
    mine = np.arange(rank, len(texts), n_ranks)
    my_sigs = hasher.signatures([texts[i] for i in mine])
    all_mine, signed = mine, (my_sigs != MAX_HASH).any(axis=1)
    mine, keys = mine[signed], band_keys(my_sigs[signed], bands, rows)
    # one row per (document, band): [band, key, document], sent to the rank that owns the key
    rows_out = np.stack([np.repeat(np.arange(bands, dtype=np.uint64)[None, :], len(mine), 0).ravel(),
                         keys.ravel(), np.repeat(mine.astype(np.uint64), bands)], axis=1) if len(mine) else \
        np.zeros((0, 3), dtype=np.uint64)
    dest = (rows_out[:, 1] % np.uint64(n_ranks)).astype(np.int64)
    order = np.argsort(dest, kind="stable")
    send = torch.from_numpy(rows_out[order].view(np.int64).copy())
    send_counts = torch.tensor(np.bincount(dest, minlength=n_ranks), dtype=torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv = torch.empty((int(recv_counts.sum()), 3), dtype=torch.int64)
    dist.all_to_all_single(recv, send, [int(c) for c in recv_counts], [int(c) for c in send_counts], group=group)
    got = recv.numpy().view(np.uint64)
    pairs = set()
    for band in np.unique(got[:, 0]):  # buckets are per band: a key only meets the same band's keys
        sel = got[got[:, 0] == band]
        pairs |= candidate_pairs(sel[:, 1:2], sel[:, 2].astype(np.int64))
    # signatures and pairs to everyone: every rank can then verify and build the same clusters
    all_sigs = np.zeros((len(texts), num_perm), dtype=np.uint64)
    parts = [None] * n_ranks
    dist.all_gather_object(parts, (all_mine, my_sigs, sorted(pairs)))
    all_pairs = set()
    for idx, s, p in parts:
        all_sigs[idx] = s
        all_pairs.update(map(tuple, p))
    return clusters_from_pairs(len(texts), all_pairs, all_sigs if verify else None, threshold)


# --- mixing, curricula, post-training data ------------------------------------------------

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
MAX_USEFUL_EPOCHS = 4  # Muennighoff et al. 2023: up to ~4 epochs of repeated data are almost as good as new data


def plan_mixture(sources: dict[str, float], weights: dict[str, float], total_tokens: float) -> dict:
    """Tokens to take from each source (available tokens in `sources`) for a run of total_tokens with the given
    sampling weights; a source whose share exceeds what it holds is repeated (upsampled): its epochs > 1."""
    if set(weights) - set(sources):
        raise ValueError(f"weights for unknown sources {sorted(set(weights) - set(sources))}: add them with --source")
    s = sum(weights.values())
    if s <= 0:
        raise ValueError("the mixture weights must add up to more than 0")
    plan, warnings = {}, []
    for name, w in weights.items():
        take = total_tokens * w / s
        epochs = take / sources[name] if sources[name] else float("inf")
        plan[name] = {"weight": w / s, "available": sources[name], "tokens": take, "epochs": epochs}
        if epochs > MAX_USEFUL_EPOCHS:
            warnings.append(f"{name}: {epochs:.1f} epochs, past the ~{MAX_USEFUL_EPOCHS} after which repeated data "
                            f"stops paying (lower its weight or find more of it)")
    return {"total_tokens": total_tokens, "sources": plan, "warnings": warnings}


def plan_curriculum(docs: list[Document], scores: list[float], total_tokens: float,
                    stages: tuple = (("general", 0.6), ("high-quality", 0.25), ("code-and-math", 0.12),
                                     ("annealing", 0.03))) -> list[dict]:
    """Order the training tokens in stages: general data first, then more of the high-quality part, then more
    code and math, and last an annealing stage (1-5 % of the tokens) on the highest-quality subset only, for the
    decay phase of a WSD learning-rate schedule. `scores` rank quality (lower = better, e.g. perplexity)."""
    if not 0.01 <= stages[-1][1] <= 0.05:
        raise ValueError("the annealing stage should hold 1-5 % of the tokens")
    order = np.argsort(scores)
    best = [docs[i] for i in order[: max(1, len(order) // 10)]]  # the top decile
    high = [docs[i] for i in order[: max(1, len(order) // 3)]]
    code_math = [d for d in docs if d.kind == "code" or re.search(r"\\(frac|sum|int)|\$[^$]+\$", d.text)] or docs
    pools = {"general": docs, "high-quality": high, "code-and-math": code_math, "annealing": best}
    plan = []
    for name, share in stages:
        pool = pools[name]
        pool_tokens = sum(len(d.text.encode("utf-8")) for d in pool)
        plan.append({"stage": name, "share": share, "tokens": total_tokens * share, "docs": len(pool),
                     "epochs": total_tokens * share / max(1, pool_tokens), "pool": pool})
    return plan


def write_curriculum(plan: list[dict], out_dir: str) -> list[str]:
    """One JSONL shard per stage, each record tagged with its stage (`stage_00_general.jsonl`, ...)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stage in enumerate(plan):
        path = Path(out_dir) / f"stage_{i:02d}_{stage['stage']}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for d in stage["pool"]:
                f.write(json.dumps({"id": d.id, "source": d.source, "stage": stage["stage"], "text": d.text}) + "\n")
        paths.append(str(path))
    return paths


def validate_sft(record: dict) -> list[str]:
    """Problems of an instruction-tuning record {instruction, input (optional), output}."""
    problems = [f"missing {k}" for k in ("instruction", "output") if k not in record]
    problems += [f"empty {k}" for k in ("instruction", "output") if k in record and not str(record[k]).strip()]
    problems += [f"{k} is not text" for k in ("instruction", "input", "output") if k in record and not isinstance(record[k], str)]
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


def chinchilla_tokens(n_params: float) -> float:
    """Compute-optimal training tokens, about 20 per parameter (Hoffmann et al. 2022)."""
    return 20.0 * n_params


# --- the pipeline -------------------------------------------------------------------------

STAGES = ("quality", "model", "pii", "blocklist", "exact", "fuzzy")


def run_pipeline(inputs: list[str], skip=(), languages=None, reference: str | None = None, ppl_quantile: float = 0.9,
                 blocklist: list[str] | None = None, blocklist_share: float = 0.01, threshold: float = 0.8,
                 num_perm: int = 128, ngram: int = 5) -> tuple[list[Document], list[StageReport], dict]:
    """Read, then each stage in turn; returns the surviving documents, the funnel and the problems' examples."""
    problems, examples = collections.Counter(), {}
    t0 = time.perf_counter()
    docs = read_documents(inputs, problems, examples)
    report = [StageReport("read", len(docs) + sum(problems.values()), len(docs), mb(docs), problems,
                          time.perf_counter() - t0)]
    if "quality" not in skip:
        docs, r = run_filter("quality", docs, quality_check(set(languages) if languages else None))
        report.append(r)
    if "model" not in skip and docs:
        t0 = time.perf_counter()
        ref_texts = [d.text for d in docs] if reference is None else \
            [d.text for d in read_documents([reference], collections.Counter(), {})]
        lm = CharNgramLM().fit(ref_texts)
        ppl = np.array([lm.perplexity(d.text) for d in docs])
        cut = float(np.quantile(ppl, ppl_quantile))
        kept = [d for d, p in zip(docs, ppl) if p <= cut]
        report.append(StageReport("model", len(docs), len(kept), mb(kept),
                                  collections.Counter({f"perplexity > {cut:.1f} (q{ppl_quantile:g})": len(docs) - len(kept)}),
                                  time.perf_counter() - t0))
        docs = kept
    if "pii" not in skip:
        found = collections.Counter()

        def scrub(d):
            d.text, counts = scrub_pii(d.text)
            found.update(counts)
            return []
        docs, r = run_filter("pii", docs, scrub)
        r.reasons = collections.Counter({f"replaced {k}": v for k, v in found.items()})  # rewritten, not removed
        report.append(r)
    if "blocklist" not in skip and blocklist:
        docs, r = run_filter("blocklist", docs, blocklist_check(blocklist, blocklist_share))
        report.append(r)
    if "exact" not in skip:
        t0 = time.perf_counter()
        kept, owner = exact_dedup(docs)
        report.append(StageReport("exact", len(docs), len(kept), mb(kept),
                                  collections.Counter({"exact duplicate": len(docs) - len(kept)}), time.perf_counter() - t0))
        docs = kept
    if "fuzzy" not in skip and docs:
        t0 = time.perf_counter()
        keep, clusters = fuzzy_dedup([d.text for d in docs], threshold, num_perm, ngram)
        kept = [d for d, k in zip(docs, keep) if k]
        report.append(StageReport("fuzzy", len(docs), len(kept), mb(kept),
                                  collections.Counter({f"near-duplicate (Jaccard >= {threshold})": len(docs) - len(kept)}),
                                  time.perf_counter() - t0))
        docs = kept
    return docs, report, examples


def print_funnel(report: list[StageReport], examples: dict) -> None:
    print(f"{'stage':<10} | {'docs in':>8} | {'docs out':>8} | {'MB out':>8} | {'time':>7} | {'docs/s':>8} | top reasons")
    for r in report:
        top = ", ".join(f"{k} ({v})" for k, v in r.reasons.most_common(3)) or "-"
        rate = r.docs_in / r.seconds if r.seconds > 0 else float("inf")
        print(f"{r.stage:<10} | {r.docs_in:>8} | {r.docs_out:>8} | {r.mb_out:>8.2f} | {r.seconds:>6.2f}s | "
              f"{rate:>8.0f} | {top}")
    for reason, where in examples.items():
        print(f"  {reason}: e.g. {where}")
    if report and report[0].docs_out == 0:
        print("warning: no document could be read from the input")


def write_output(docs: list[Document], report: list[StageReport], examples: dict, output: str) -> None:
    with open(output, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")
    stats = {"stages": [{"stage": r.stage, "docs_in": r.docs_in, "docs_out": r.docs_out, "mb_out": r.mb_out,
                         "seconds": r.seconds, "reasons": dict(r.reasons)} for r in report], "examples": examples}
    Path(output).with_name("stats.json").write_text(json.dumps(stats, indent=1))


def parse_pairs(items: list[str], flag: str, convert=str) -> dict:
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="*", help="files or folders (.html .htm .txt .md .py .jsonl); default: the stdlib")
    p.add_argument("--output", default="clean.jsonl")
    p.add_argument("--skip", action="append", default=[], choices=STAGES, help="switch a stage off (repeatable)")
    p.add_argument("--languages", help="keep prose in these languages, e.g. en,zh")
    p.add_argument("--reference", help="text the perplexity model learns from (default: what passed the rules)")
    p.add_argument("--ppl-quantile", type=float, default=0.9, help="drop documents above this perplexity quantile")
    p.add_argument("--blocklist", help="a file of blocked words or phrases, one per line")
    p.add_argument("--blocklist-share", type=float, default=0.01)
    p.add_argument("--threshold", type=float, default=0.8, help="fuzzy dedup: Jaccard similarity of duplicates")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--ngram", type=int, default=5)
    p.add_argument("--plan", action="store_true", help="print the token plan for --params and --tokens")
    p.add_argument("--params", type=float, default=7e9)
    p.add_argument("--tokens", type=float, default=2e12)
    p.add_argument("--mix", action="append", default=[], help="name=weight,... or a preset: " + ", ".join(MIXTURE_PRESETS))
    p.add_argument("--source", action="append", default=[], help="name=PATH of a source for --mix")
    p.add_argument("--curriculum", metavar="DIR", help="also write stage-tagged shards of the output here")
    args = p.parse_args(argv)
    if args.plan:
        opt = chinchilla_tokens(args.params)
        print(f"{args.params:.3g} parameters: compute-optimal ≈ 20 tokens per parameter = {opt:.3g} tokens; "
              f"planned {args.tokens:.3g} = {args.tokens / opt:.1f}x ({'over-trained: cheaper to serve' if args.tokens > opt else 'under-trained'})")
        return
    if not 0 < args.threshold < 1:
        p.error(f"--threshold {args.threshold}: must lie strictly between 0 and 1 (try 0.8)")
    if args.num_perm < 16:
        p.error(f"--num-perm {args.num_perm}: too few permutations to band (try 128)")
    if not 0 < args.ppl_quantile <= 1:
        p.error(f"--ppl-quantile {args.ppl_quantile}: must be in (0, 1]")
    try:
        blocklist = load_blocklist(args.blocklist) if args.blocklist else None
        if args.mix:
            if len(args.mix) == 1 and args.mix[0] in MIXTURE_PRESETS:
                weights = MIXTURE_PRESETS[args.mix[0]]
            else:
                weights = parse_pairs(args.mix, "--mix", float)
            paths = parse_pairs(args.source, "--source")
            sources = {}
            for name, path in paths.items():
                docs = read_documents([path], collections.Counter(), {})
                sources[name] = sum(len(d.text.encode("utf-8")) for d in docs)  # bytes are our tokens
            plan = plan_mixture(sources, weights, args.tokens)
            print(f"{'source':<22} {'weight':>7} {'available':>12} {'tokens':>12} {'epochs':>7}")
            for name, s in plan["sources"].items():
                print(f"{name:<22} {s['weight']:>7.3f} {s['available']:>12.3g} {s['tokens']:>12.3g} {s['epochs']:>7.2f}")
            for w in plan["warnings"]:
                print("warning:", w)
            return plan
        inputs = args.inputs or default_inputs()
        for i in inputs:
            if not Path(i).exists():
                raise ValueError(f"input {i}: no such file or folder")
    except ValueError as e:
        p.error(str(e))
    rank, n, _ = setup_distributed("cpu")
    try:
        languages = args.languages.split(",") if args.languages else None
        docs, report, examples = run_pipeline(inputs, args.skip, languages, args.reference, args.ppl_quantile,
                                              blocklist, args.blocklist_share, args.threshold, args.num_perm, args.ngram)
        if rank == 0:
            print_funnel(report, examples)
            write_output(docs, report, examples, args.output)
            print(f"wrote {len(docs)} documents to {args.output} and the funnel to "
                  f"{Path(args.output).with_name('stats.json')}")
            if args.curriculum:
                lm = CharNgramLM().fit(d.text for d in docs)
                plan = plan_curriculum(docs, [lm.perplexity(d.text) for d in docs], mb(docs) * 1e6)
                for path, stage in zip(write_curriculum(plan, args.curriculum), plan):
                    print(f"curriculum {stage['stage']:<14} {100 * stage['share']:>5.1f}% of tokens, "
                          f"{stage['docs']} docs, {stage['epochs']:.2f} epochs -> {path}")
        return docs, report
    finally:
        cleanup()


# --- common core: identical in every file (tests/test_common.py checks) -----------------------------------
# Process-group setup, a timer that synchronises, the communication counter and, in the training scripts, the
# tiny GPT and the text loader. Read them once; every file that needs them carries the same lines.


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun job (or make a job of one process): nccl on CUDA, gloo on CPU. CUDA is touched only after
    set_device, so every process works on its own GPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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


if __name__ == "__main__":
    main()
