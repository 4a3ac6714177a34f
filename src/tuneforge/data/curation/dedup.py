"""Exact and near-duplicate detection that keeps hashes and compact signatures, never texts.

Exact duplicates: 64-bit BLAKE2b of the normalised text (lower-cased, whitespace collapsed).

Near duplicates: MinHash over word ``shingle``-grams, then LSH banding.

* Each word is hashed with CRC32; a shingle hash mixes ``shingle`` consecutive word hashes (uint64).
* ``num_perm`` hash functions h_i(x) = (a_i * x + b_i) mod 2^32 (a_i odd, so each is a permutation
  of the 32-bit shingle hashes; 32-bit arithmetic is 4x faster than 64-bit here); the signature is the
  per-function minimum over the shingles: shape ``(num_perm,)`` uint32.
  P[sig_A[i] == sig_B[i]] = Jaccard(shingles_A, shingles_B).
* LSH: the signature is cut in ``bands`` bands of ``rows`` values; each band is hashed to uint32.
  Two texts share at least one band hash with probability 1 - (1 - J^rows)^bands, an S-curve whose
  steepest point sits near ``threshold`` (``bands``/``rows`` are chosen to balance misses and false
  candidates around it, as datasketch does).
* Candidates (same band hash) are verified with the stored signatures, kept as the low 16 bits of
  each min-hash (b-bit MinHash: two unequal values collide with probability 2^-16).
* Short texts are compared on word 1- to 3-grams together. Word 3-grams alone see "Hi, " + a seven-word
  question with a one-word answer as 0.7 similar to the record without it (``user: hi, ...``: 7 of the 10
  3-grams shared). A record with fewer than ``short_words`` words of content (words not covered by a
  template shingle, see below) gets a MinHash of the 1-, 2- and 3-grams (``short_ngrams``) of its words
  instead (of its content words when the whole text is longer, as behind a shared preamble; the turn labels
  ``user:``/``assistant:`` left out; frequent phrases of short texts such as "how do I" are not a template
  there: the text as it is is compared). There the same insertion leaves 21 of 24 n-grams
  shared (0.875), while a word replaced in the middle leaves 15 of 27 (0.56), so distinct short questions
  one word apart stay apart (character 4-grams, tried first, put such pairs at 0.80-0.86; see
  ``benchmarks/curation_short_dups.py``). Such a record is only compared with other short records.
  Records with ``short_words`` to ``short_words / threshold`` content words get both signatures (a short
  and a longer record can only reach the threshold when their lengths differ by less than that factor), so
  the boundary loses no pair. A short text has ``short_ngrams`` n-grams a word, fewer than
  ``short_ngrams * short_words / threshold``: its cost is bounded like a long text's (whose shingles are
  capped at ``MAX_SHINGLES``), and the memory per record is one byte more (which signature), plus a second
  signature (~330 B) for the records in the boundary band only.
* Never by chaining: records are decided in stream order, and a record is dropped only for a *kept*
  record (or a reference) that it is itself similar to above the threshold. With A~B and B~C but A and C
  far apart, B goes (for A) and C stays: B is not kept, so it cannot take C with it.
* Template text does not count: shingles that occur in at least ``template_df`` of the records (a shared
  system prompt, tool description or instruction preamble) are left out of every signature
  (document-frequency filtering, estimated on a sample of the data by :func:`template_shingles`), so two
  records are near duplicates for the text that varies, not for what every record repeats. A record made
  only of template text keeps all its shingles.

Memory per record: 8 B exact hash + 4 B per band + 2 B per permutation + 1 B kind + 6 B location; with the
defaults (128 permutations, 14 bands) about 330 B, so 1M records need ~330 MB (records in the short/long
boundary band hold a second signature).

Records are added in stream order; "reference" records (a validation/test file passed with
``--against``) are never kept or dropped themselves: a training record in a cluster with one is a leak.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from typing import NamedTuple

import numpy as np

MAX_SHINGLES = 4096      # longer texts are sampled: their first MAX_SHINGLES shingles
_CHUNK = 8192            # candidate pairs verified per numpy step
_BLOCK = 4096            # shingles per (shingles x permutations) matrix
WORDS, SHORT, BOTH = 0, 1, 2   # which signatures a record has: word shingles, short-text n-grams, both
_ROLES = frozenset(f"{r}:".encode() for r in ("system", "user", "assistant", "tool"))   # turn labels of dedup texts


def exact_hash(normalised: str) -> int:
    """64-bit hash of an already normalised text (see :func:`tuneforge.data.curation.quality.normalise_text`)."""
    digest = hashlib.blake2b(normalised.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@lru_cache(maxsize=None)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising weighted false positives + false negatives.

    Candidates are verified against the signatures, so a false positive costs a comparison while a
    false negative loses a duplicate: misses weigh ``1 - fp_weight``. For 0.8 and 128 permutations
    this gives 14 bands of 9 rows: pairs at 0.8 / 0.85 / 0.9 similarity are found with probability
    0.87 / 0.97 / 0.999, pairs at 0.5 become candidates with probability 0.03.
    """
    xs = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows < 1:
            break
        p = 1.0 - (1.0 - xs ** rows) ** bands
        fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
        fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
        err = fp_weight * fp + (1 - fp_weight) * fn
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class SplitSignatures(NamedTuple):
    """Signatures of texts as :meth:`MinHasher.split_signatures` makes them, ``n`` texts.

    ``kind`` (n,) uint8: :data:`WORDS`, :data:`SHORT` or :data:`BOTH`. ``sig`` (n, num_perm) uint32 and ``bands``
    (n, bands) uint32: the word-shingle signature, or for :data:`SHORT` the short-text one. ``sig2``/``bands2``,
    same shapes: the short-text signature of :data:`BOTH` texts (zeros in other rows).
    """
    sig: np.ndarray
    bands: np.ndarray
    kind: np.ndarray
    sig2: np.ndarray
    bands2: np.ndarray


class MinHasher:
    """Signatures and LSH band hashes for texts; deterministic across runs and machines.

    ``stop``: sorted uint32 shingle hashes left out of signatures (template text; see
    :func:`template_shingles`), as an array or its ``tobytes()``. ``short_words`` (0: off) and
    ``short_ngrams``: texts with fewer content words get signatures of their word 1- to ``short_ngrams``-grams
    (:meth:`split_signatures`).
    """

    def __init__(self, num_perm: int = 128, shingle: int = 3, threshold: float = 0.8, seed: int = 1,
                 stop: np.ndarray | bytes | None = None, short_words: int = 0, short_ngrams: int = 3):
        rng = np.random.default_rng(seed)
        self.num_perm, self.shingle = num_perm, shingle
        if isinstance(stop, bytes):
            stop = np.frombuffer(stop, dtype=np.uint32)
        self.stop = np.zeros(0, np.uint32) if stop is None else np.unique(np.asarray(stop, dtype=np.uint32))
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self._a = rng.integers(0, 2**32, num_perm, dtype=np.uint32) | np.uint32(1)
        self._b = rng.integers(0, 2**32, num_perm, dtype=np.uint32)
        self._band_mix = (rng.integers(0, 2**63, self.rows, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        # shingle hashes depend on the seed and shingle width only (template shingles are found with them)
        mix_rng = np.random.default_rng([seed, shingle])
        self._mix = (mix_rng.integers(0, 2**63, shingle, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.short_words, self.short_ngrams = short_words, short_ngrams
        # texts with short_words .. both_below content words get both signatures
        self.both_below = math.ceil(short_words / threshold) if short_words > 0 else 0
        short_rng = np.random.default_rng([seed, 1000 + short_ngrams])
        self._smix = (short_rng.integers(0, 2**63, (short_ngrams, short_ngrams), dtype=np.uint64) << np.uint64(1)
                      ) | np.uint64(1)

    def _words(self, normalised: str) -> list[bytes]:
        words = normalised.encode("utf-8", "surrogatepass").split()
        if len(words) < self.shingle:                      # too short for one n-gram: the whole text is one
            return [b" ".join(words)] * self.shingle
        return words[: MAX_SHINGLES + self.shingle - 1]

    def shingles(self, normalised: str) -> np.ndarray:
        """uint32 hashes of the word n-grams of a normalised text (at least one)."""
        return self._shingles([normalised])[0]

    def _shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' shingle hashes concatenated (uint32) and the number per text (int64)."""
        allsh, per_text, _ = self._word_shingles([self._words(t) for t in texts])
        return allsh, per_text

    def _word_shingles(self, words: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Word n-gram hashes of texts given as word lists (uint32, concatenated), the number per text (int64)
        and the position of each n-gram's first word in the concatenated word lists (int64)."""
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        h = np.fromiter(map(zlib.crc32, chain.from_iterable(words)), dtype=np.uint64, count=int(counts.sum()))
        k = self.shingle
        m = len(h) - k + 1
        mixed = np.zeros(m, dtype=np.uint64)
        for j in range(k):
            mixed += h[j:j + m] * self._mix[j]
        mixed ^= mixed >> np.uint64(29)
        per_text = counts - k + 1
        # keep the n-grams that start and end inside one text
        starts = np.zeros(len(words), dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        total = int(per_text.sum())
        first = np.repeat(starts - np.r_[0, np.cumsum(per_text)[:-1]], per_text)
        positions = np.arange(total, dtype=np.int64) + first
        return (mixed[positions] >> np.uint64(32)).astype(np.uint32), per_text, positions

    def short_shingles(self, words: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of the word 1- to ``short_ngrams``-grams of texts given as word lists (uint32, concatenated) and
        the number per text (int64): a text of w >= 1 words has about ``short_ngrams * w`` of them."""
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        h = np.fromiter(map(zlib.crc32, chain.from_iterable(words)), dtype=np.uint64, count=int(counts.sum()))
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        parts, owners = [], []
        for k in range(1, self.short_ngrams + 1):
            m = len(h) - k + 1
            if m <= 0:
                break
            mixed = np.full(m, np.uint64(k))                # the n-gram's length too: "a b" never equals "a"
            for j in range(k):
                mixed += h[j:j + m] * self._smix[k - 1, j]
            mixed ^= mixed >> np.uint64(29)
            per_text = np.maximum(counts - k + 1, 0)
            first = np.repeat(starts - np.r_[0, np.cumsum(per_text)[:-1]], per_text)
            positions = np.arange(int(per_text.sum()), dtype=np.int64) + first
            parts.append((mixed[positions] >> np.uint64(32)).astype(np.uint32))
            owners.append(np.repeat(np.arange(len(words)), per_text))
        owner = np.concatenate(owners)
        order = np.argsort(owner, kind="stable")            # grouped by text, as the other shingle arrays are
        return np.concatenate(parts)[order], np.bincount(owner, minlength=len(words)).astype(np.int64)

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """MinHash signatures ``(n, num_perm)`` uint32 and band hashes ``(n, bands)`` uint32 of normalised texts
        (word n-grams, template shingles left out)."""
        if not texts:
            return np.zeros((0, self.num_perm), np.uint32), np.zeros((0, self.bands), np.uint32)
        sig = self._minhash(*self._without_template(*self._shingles(texts)))
        return sig, self.band_hashes(sig)

    def split_signatures(self, texts: list[str]) -> SplitSignatures:
        """Word-shingle signatures of texts with at least ``short_words`` content words, short-text signatures
        (:meth:`short_shingles`) of the others, both for texts with ``short_words`` to ``short_words / threshold``
        content words.

        Content words: the words not covered by a template (stop) n-gram; a text all template keeps all its
        words. The short-text n-grams are those of every word of a text under ``short_words`` words, and of
        the content words of a longer one (a shared preamble before a short question); turn labels
        (``user:``...) are left out.
        """
        n = len(texts)
        empty = np.zeros((n, self.num_perm), np.uint32), np.zeros((n, self.bands), np.uint32)
        if self.short_words <= 0 or not n:
            sig, bands = self.signatures(texts) if n else empty
            return SplitSignatures(sig, bands, np.full(n, WORDS, np.uint8), *empty)
        words = [self._words(t) for t in texts]
        allsh, per_text, positions = self._word_shingles(words)
        counts = np.fromiter(map(len, words), dtype=np.int64, count=n)
        covered = np.zeros(int(counts.sum()), dtype=bool)
        if len(self.stop):
            at = positions[np.isin(allsh, self.stop)]
            for j in range(self.shingle):
                covered[at + j] = True
        owner = np.repeat(np.arange(n), counts)
        content = counts - np.bincount(owner, weights=covered, minlength=n).astype(np.int64)
        real = np.array([t.count(" ") + 1 if t else 0 for t in texts], dtype=np.int64)   # texts are normalised
        content = np.where(real < self.shingle, real, np.where(content == 0, counts, content))
        kind = np.where(content < self.short_words, SHORT,
                        np.where(content < self.both_below, BOTH, WORDS)).astype(np.uint8)

        sig, bands = np.zeros_like(empty[0]), np.zeros_like(empty[1])
        sig2, bands2 = np.zeros_like(empty[0]), np.zeros_like(empty[1])
        by_words = np.flatnonzero(kind != SHORT)
        if len(by_words):
            keep = np.repeat(kind != SHORT, per_text)
            sig[by_words] = self._minhash(*self._without_template(allsh[keep], per_text[by_words]))
            bands[by_words] = self.band_hashes(sig[by_words])
        by_short = np.flatnonzero(kind != WORDS)
        if len(by_short):
            starts = np.r_[0, np.cumsum(counts)[:-1]]
            content_words = []
            for i in by_short.tolist():
                if real[i] < self.short_words:             # short as it is: every word counts
                    ws = texts[i].encode("utf-8", "surrogatepass").split()
                else:                                      # short without its template text: that text goes
                    cov = covered[starts[i]:starts[i] + counts[i]].tolist()
                    ws = [w for w, c in zip(words[i], cov, strict=True) if not c]
                content_words.append([w for w in ws if w not in _ROLES] or ws)
            csig = self._minhash(*self.short_shingles(content_words))
            cbands = self.band_hashes(csig)
            primary = kind[by_short] == SHORT
            sig[by_short[primary]], bands[by_short[primary]] = csig[primary], cbands[primary]
            sig2[by_short[~primary]], bands2[by_short[~primary]] = csig[~primary], cbands[~primary]
        return SplitSignatures(sig, bands, kind, sig2, bands2)

    def _minhash(self, allsh: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per-text minimum of each permutation over its shingles: ``(n, num_perm)`` uint32 (``lengths`` >= 1)."""
        n = len(lengths)
        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        sig_t = np.empty((self.num_perm, n), dtype=np.uint32)
        # one (permutations x shingles) matrix per slice of records, min-reduced per record
        start = 0
        while start < n:
            stop, total = start + 1, int(lengths[start])
            while stop < n and total + lengths[stop] <= _BLOCK:
                total += int(lengths[stop])
                stop += 1
            lo = offsets[start]
            vals = self._a[:, None] * allsh[None, lo:lo + total]
            vals += self._b[:, None]
            sig_t[:, start:stop] = np.minimum.reduceat(vals, offsets[start:stop] - lo, axis=1)
            start = stop
        return np.ascontiguousarray(sig_t.T)

    def _without_template(self, allsh: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop the stop (template) shingles; a text left with none keeps all of its own."""
        if not len(self.stop):
            return allsh, lengths
        keep = ~np.isin(allsh, self.stop, assume_unique=False)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        kept = np.bincount(owner, weights=keep, minlength=len(lengths)).astype(np.int64)
        keep |= (kept == 0)[owner]                      # template-only texts: compare them on everything
        return allsh[keep], np.where(kept == 0, lengths, kept)

    def band_hashes(self, sig: np.ndarray) -> np.ndarray:
        used = sig[:, : self.bands * self.rows].astype(np.uint64).reshape(len(sig), self.bands, self.rows)
        h = (used * self._band_mix).sum(axis=2)
        return ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def template_shingles(texts: list[str], min_share: float, shingle: int = 3, min_records: int = 20) -> np.ndarray:
    """Sorted uint32 hashes of the shingles found in at least ``min_share`` of ``texts`` (normalised),
    and in at least ``min_records`` of them: the text a template repeats in every record. Empty when
    ``min_share`` is 0 or above 1 (off)."""
    if not texts or not 0 < min_share <= 1:
        return np.zeros(0, np.uint32)
    hasher = MinHasher(num_perm=16, shingle=shingle)
    allsh, lengths = hasher._shingles(texts)
    owner = np.repeat(np.arange(len(texts)), lengths)
    pairs = np.unique(np.stack([allsh.astype(np.int64), owner]), axis=1)     # each shingle once per text
    values, counts = np.unique(pairs[0], return_counts=True)
    need = max(min_records, int(np.ceil(min_share * len(texts))))
    return values[counts >= need].astype(np.uint32)


class _Grow:
    """An append-only numpy column (amortised O(1) appends, compact)."""

    def __init__(self, dtype, width: int | None = None):
        self.dtype, self.width, self.n = dtype, width, 0
        shape = (1024,) if width is None else (1024, width)
        self.buf = np.empty(shape, dtype=dtype)

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.dtype)
        need = self.n + len(values)
        if need > len(self.buf):
            cap = max(need, 2 * len(self.buf))
            new = np.empty((cap,) + self.buf.shape[1:], dtype=self.dtype)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n:need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


@dataclass
class Duplicate:
    """Why entry ``index`` is a duplicate: of entry ``of`` (kept, or a reference record for leaks)."""
    index: int
    of: int
    kind: str          # "exact" | "near"
    leak: bool         # True when ``of`` is a reference (validation/test) record
    similarity: float  # 1.0 for exact
    short: bool = False  # near: the similarity is of short-text n-grams (word 1- to 3-grams), not word shingles


@dataclass
class DuplicateResult:
    duplicates: dict[int, Duplicate] = field(default_factory=dict)   # entry index -> why (kept entries absent)
    clusters: list[list[int]] = field(default_factory=list)          # entry indices, first = kept/reference
    cluster_kinds: list[str] = field(default_factory=list)


class Hashes(NamedTuple):
    """What :meth:`DuplicateIndex.add_hashes` stores of ``n`` texts: ``exact`` (n,) uint64; with near duplicates
    ``sig`` (n, num_perm) uint16 and ``bands`` (n, bands) uint32 (word-shingle or, for short texts, short-text
    signature), ``kind`` (n,) uint8 and the second (short-text) signature ``sig2``/``bands2`` of the texts of
    kind :data:`BOTH` (same shapes; other rows unused)."""
    exact: np.ndarray
    sig: np.ndarray | None = None
    bands: np.ndarray | None = None
    kind: np.ndarray | None = None
    sig2: np.ndarray | None = None
    bands2: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Hashes:
        """The hashes of texts ``rows`` (int64 positions)."""
        return Hashes(*(None if a is None else a[rows] for a in self))


class DuplicateIndex:
    """Collect hashes of a stream of records, then find exact/near duplicate clusters in one pass.

    ``add`` takes normalised texts (training records) and ``add_reference`` those of records that must
    not leak into training (validation/test). Entry indices count both, in call order. ``short_words`` > 0
    compares texts with fewer content words on their word 1- to ``short_ngrams``-grams (see the module docstring).
    """

    def __init__(self, near: bool = True, threshold: float = 0.8, num_perm: int = 128, shingle: int = 3,
                 stop: np.ndarray | bytes | None = None, short_words: int = 0, short_ngrams: int = 3):
        self.near, self.threshold = near, threshold
        self.hasher = MinHasher(num_perm=num_perm, shingle=shingle, threshold=threshold, stop=stop,
                                short_words=short_words, short_ngrams=short_ngrams) if near else None
        self._exact = _Grow(np.uint64)
        self._ref = _Grow(np.bool_)
        if near:
            self._bands = _Grow(np.uint32, self.hasher.bands)
            self._sig = _Grow(np.uint16, num_perm)
            self._kind = _Grow(np.uint8)
            self._bands2 = _Grow(np.uint32, self.hasher.bands)     # second signature of BOTH entries
            self._sig2 = _Grow(np.uint16, num_perm)
            self._at2 = _Grow(np.int64)                            # their entry indices

    def __len__(self) -> int:
        return self._exact.n

    def add(self, normalised: list[str], reference: bool = False) -> range:
        """Add normalised texts (training records, or references); their entry indices."""
        return self.add_hashes(self.hashes(normalised), reference=reference)

    def hashes(self, normalised: list[str]) -> Hashes:
        """What :meth:`add_hashes` stores of texts. Safe to compute in another process with an index of the
        same settings."""
        exact = np.array([exact_hash(t) for t in normalised], dtype=np.uint64)
        if not self.near:
            return Hashes(exact)
        s = self.hasher.split_signatures(normalised)
        low16 = np.uint32(0xFFFF)
        return Hashes(exact, (s.sig & low16).astype(np.uint16), s.bands, s.kind,
                      (s.sig2 & low16).astype(np.uint16), s.bands2)

    def add_hashes(self, hashes: Hashes, reference: bool = False) -> range:
        start = self._exact.n
        self._exact.extend(hashes.exact)
        self._ref.extend(np.full(len(hashes.exact), reference))
        if self.near:
            self._bands.extend(hashes.bands)
            self._sig.extend(hashes.sig)
            self._kind.extend(hashes.kind)
            both = np.flatnonzero(hashes.kind == BOTH)
            if len(both):
                self._bands2.extend(hashes.bands2[both])
                self._sig2.extend(hashes.sig2[both])
                self._at2.extend(both + start)
        return range(start, self._exact.n)

    def add_reference(self, normalised: list[str]) -> range:
        return self.add(normalised, reference=True)

    def nbytes(self) -> int:
        total = self._exact.buf.nbytes + self._ref.buf.nbytes
        if self.near:
            total += sum(g.buf.nbytes for g in (self._bands, self._sig, self._kind, self._bands2, self._sig2,
                                                self._at2))
        return total

    def find(self) -> DuplicateResult:
        """Cluster the entries; in each cluster keep the first training entry (or none if a reference is in it)."""
        n = len(self)
        result = DuplicateResult()
        if n == 0:
            return result
        exact = self._exact.view()
        ref = self._ref.view()
        parent = np.arange(n, dtype=np.int64)   # representative of the exact group (smallest index, refs first)

        # exact groups: sort by (hash, not-reference, index) so the representative comes first
        order = np.lexsort((np.arange(n), ~ref, exact))
        h = exact[order]
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
        sizes = np.diff(np.r_[starts, n])
        group_first = np.repeat(order[starts], sizes)
        parent[order] = group_first
        alive = parent == np.arange(n)
        clusters: dict[int, list[int]] = {}
        for i in np.flatnonzero(~alive):
            rep = int(parent[i])
            if ref[i]:
                continue
            result.duplicates[int(i)] = Duplicate(int(i), rep, "exact", bool(ref[rep]), 1.0)
            clusters.setdefault(rep, [rep]).append(int(i))
        kinds = {rep: "exact" for rep in clusters}

        if self.near:
            self._near(alive, ref, result, clusters, kinds)
        result.clusters = list(clusters.values())
        result.cluster_kinds = [kinds[c[0]] for c in result.clusters]
        return result

    def _near(self, alive: np.ndarray, ref: np.ndarray, result: DuplicateResult,
              clusters: dict[int, list[int]], kinds: dict[int, str]) -> None:
        kind = self._kind.view()
        words = np.flatnonzero(alive & (kind != SHORT))
        short = np.flatnonzero(alive & (kind == SHORT))
        at2 = self._at2.view()
        second = np.flatnonzero(alive[at2])                 # BOTH entries' short-text signatures that count
        found = [self._verified([(self._sig.view(), self._bands.view(), words, words)], short=False),
                 self._verified([(self._sig.view(), self._bands.view(), short, short),
                                 (self._sig2.view(), self._bands2.view(), second, at2[second])], short=True)]
        pairs = np.concatenate([f[0] for f in found])
        if len(pairs) == 0:
            return
        sims = np.concatenate([f[1] for f in found])
        by_short = np.concatenate([np.full(len(f[0]), i == 1) for i, f in enumerate(found)])

        # decide in entry order: a training entry goes only for a kept one (or a reference) it is itself
        # near; references are never dropped and always count as kept
        neighbours: dict[int, dict[int, tuple[float, bool]]] = {}
        for (a, b), sim, ch in zip(pairs.tolist(), sims.tolist(), by_short.tolist(), strict=True):
            for x, y in ((a, b), (b, a)):
                mine = neighbours.setdefault(x, {})
                if y not in mine or sim > mine[y][0]:       # found by both signatures: the higher similarity
                    mine[y] = (sim, ch)
        dropped: set[int] = set()
        for m in sorted(neighbours):
            if ref[m]:
                continue
            anchors = [(bool(ref[o]), sim, -o, ch) for o, (sim, ch) in neighbours[m].items()
                       if ref[o] or (o < m and o not in dropped)]
            if not anchors:
                continue
            is_ref, sim, neg, ch = max(anchors)         # a reference first (a leak), then the most similar
            rep = -neg
            dropped.add(m)
            result.duplicates[m] = Duplicate(m, rep, "near", is_ref, sim, ch)
            members = clusters.setdefault(rep, [rep])
            # m's own exact duplicates stay "exact duplicate of m" and join this cluster
            members.extend(clusters.pop(m, [m]))
            kinds[rep] = "near"

    def _verified(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], short: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Pairs of entries that share a band hash and whose signatures agree on at least ``threshold`` of the
        permutations, within one kind of signature: ``(m, 2)`` int64 entry indices (smaller first) and their
        similarity ``(m,)``. ``parts``: (signatures, band hashes, their rows that count, the rows' entry
        indices), concatenated into one set of signatures."""
        ids = np.concatenate([p[3] for p in parts])
        nothing = np.zeros((0, 2), np.int64), np.zeros(0)
        if len(ids) < 2:
            return nothing

        def rows(pos: np.ndarray) -> np.ndarray:           # signatures at positions of the concatenation
            out = np.empty((len(pos), self._sig.width), np.uint16)
            lo = 0
            for sig, _, sel, _ in parts:
                m = (pos >= lo) & (pos < lo + len(sel))
                out[m] = sig[sel[pos[m] - lo]]
                lo += len(sel)
            return out

        need = int(np.ceil(self.threshold * self._sig.width))
        pairs = []
        for b in range(self.hasher.bands):
            col = np.concatenate([bands[sel, b] for _, bands, sel, _ in parts])
            order = np.argsort(col, kind="stable")
            v = col[order]
            same = np.flatnonzero(v[1:] == v[:-1]) + 1          # positions equal to their predecessor
            if len(same) == 0:
                continue
            starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
            run_first = starts[np.searchsorted(starts, same, side="right") - 1]
            pairs.append(np.stack([order[run_first], order[same]], axis=1))
        if not pairs:
            return nothing
        cand = np.unique(np.concatenate(pairs), axis=0)
        keep, sims = [], []
        for lo in range(0, len(cand), _CHUNK):
            c = cand[lo:lo + _CHUNK]
            agree = (rows(c[:, 0]) == rows(c[:, 1])).sum(axis=1)
            ok = agree >= need
            keep.append(ids[c[ok]])
            sims.append(agree[ok] / self._sig.width)
        verified = np.sort(np.concatenate(keep), axis=1)
        return verified, np.concatenate(sims)
