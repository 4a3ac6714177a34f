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
* Never by chaining: records are decided in stream order, and a record is dropped only for a *kept*
  record (or a reference) that it is itself similar to above the threshold. With A~B and B~C but A and C
  far apart, B goes (for A) and C stays: B is not kept, so it cannot take C with it.
* Template text does not count: shingles that occur in at least ``template_df`` of the records (a shared
  system prompt, tool description or instruction preamble) are left out of every signature
  (document-frequency filtering, estimated on a sample of the data by :func:`template_shingles`), so two
  records are near duplicates for the text that varies, not for what every record repeats. A record made
  only of template text keeps all its shingles.

Memory per record: 8 B exact hash + 4 B per band + 2 B per permutation + 6 B location; with the
defaults (128 permutations, 14 bands) about 330 B, so 1M records need ~330 MB.

Records are added in stream order; "reference" records (a validation/test file passed with
``--against``) are never kept or dropped themselves: a training record in a cluster with one is a leak.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import numpy as np

MAX_SHINGLES = 4096      # longer texts are sampled: their first MAX_SHINGLES shingles
_CHUNK = 8192            # candidate pairs verified per numpy step
_BLOCK = 4096            # shingles per (shingles x permutations) matrix


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


class MinHasher:
    """Signatures and LSH band hashes for texts; deterministic across runs and machines.

    ``stop``: sorted uint32 shingle hashes left out of signatures (template text; see
    :func:`template_shingles`), as an array or its ``tobytes()``.
    """

    def __init__(self, num_perm: int = 128, shingle: int = 3, threshold: float = 0.8, seed: int = 1,
                 stop: np.ndarray | bytes | None = None):
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
        words = [self._words(t) for t in texts]
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
        starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        total = int(per_text.sum())
        first = np.repeat(starts - np.r_[0, np.cumsum(per_text)[:-1]], per_text)
        positions = np.arange(total, dtype=np.int64) + first
        return (mixed[positions] >> np.uint64(32)).astype(np.uint32), per_text

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """MinHash signatures ``(n, num_perm)`` uint32 and band hashes ``(n, bands)`` uint32 of normalised texts."""
        n = len(texts)
        if not n:
            return np.zeros((0, self.num_perm), np.uint32), np.zeros((0, self.bands), np.uint32)
        allsh, lengths = self._without_template(*self._shingles(texts))
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
        sig = np.ascontiguousarray(sig_t.T)
        return sig, self.band_hashes(sig)

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


@dataclass
class DuplicateResult:
    duplicates: dict[int, Duplicate] = field(default_factory=dict)   # entry index -> why (kept entries absent)
    clusters: list[list[int]] = field(default_factory=list)          # entry indices, first = kept/reference
    cluster_kinds: list[str] = field(default_factory=list)


class DuplicateIndex:
    """Collect hashes of a stream of records, then find exact/near duplicate clusters in one pass.

    ``add`` takes normalised texts (training records) and ``add_reference`` those of records that must
    not leak into training (validation/test). Entry indices count both, in call order.
    """

    def __init__(self, near: bool = True, threshold: float = 0.8, num_perm: int = 128, shingle: int = 3,
                 stop: np.ndarray | bytes | None = None):
        self.near, self.threshold = near, threshold
        self.hasher = MinHasher(num_perm=num_perm, shingle=shingle, threshold=threshold, stop=stop) if near else None
        self._exact = _Grow(np.uint64)
        self._ref = _Grow(np.bool_)
        if near:
            self._bands = _Grow(np.uint32, self.hasher.bands)
            self._sig = _Grow(np.uint16, num_perm)

    def __len__(self) -> int:
        return self._exact.n

    def add(self, normalised: list[str], reference: bool = False) -> range:
        """Add normalised texts (training records, or references); their entry indices."""
        return self.add_hashes(*self.hashes(normalised), reference=reference)

    def hashes(self, normalised: list[str]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(exact uint64, signature uint16, bands uint32) of texts: what :meth:`add_hashes` stores.

        Safe to compute in another process with an index of the same settings.
        """
        exact = np.array([exact_hash(t) for t in normalised], dtype=np.uint64)
        if not self.near:
            return exact, None, None
        sig, bands = self.hasher.signatures(normalised)
        return exact, (sig & np.uint32(0xFFFF)).astype(np.uint16), bands

    def add_hashes(self, exact: np.ndarray, sig: np.ndarray | None, bands: np.ndarray | None,
                   reference: bool = False) -> range:
        start = self._exact.n
        self._exact.extend(exact)
        self._ref.extend(np.full(len(exact), reference))
        if self.near:
            self._bands.extend(bands)
            self._sig.extend(sig)
        return range(start, self._exact.n)

    def add_reference(self, normalised: list[str]) -> range:
        return self.add(normalised, reference=True)

    def nbytes(self) -> int:
        total = self._exact.buf.nbytes + self._ref.buf.nbytes
        if self.near:
            total += self._bands.buf.nbytes + self._sig.buf.nbytes
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
        idx = np.flatnonzero(alive)
        if len(idx) < 2:
            return
        bands, sig = self._bands.view(), self._sig.view()
        need = int(np.ceil(self.threshold * sig.shape[1]))
        pairs = []
        for b in range(bands.shape[1]):
            col = bands[idx, b]
            order = np.argsort(col, kind="stable")
            v = col[order]
            same = np.flatnonzero(v[1:] == v[:-1]) + 1          # positions equal to their predecessor
            if len(same) == 0:
                continue
            starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
            run_first = starts[np.searchsorted(starts, same, side="right") - 1]
            pairs.append(np.stack([idx[order[run_first]], idx[order[same]]], axis=1))
        if not pairs:
            return
        cand = np.unique(np.concatenate(pairs), axis=0)
        keep = []
        for lo in range(0, len(cand), _CHUNK):
            c = cand[lo:lo + _CHUNK]
            agree = (sig[c[:, 0]] == sig[c[:, 1]]).sum(axis=1)
            keep.append(c[agree >= need])
        verified = np.concatenate(keep)
        if len(verified) == 0:
            return

        # decide in entry order: a training entry goes only for a kept one (or a reference) it is itself
        # near; references are never dropped and always count as kept
        lo_hi = np.sort(verified, axis=1)
        agree = (sig[lo_hi[:, 0]] == sig[lo_hi[:, 1]]).mean(axis=1)
        neighbours: dict[int, list[tuple[int, float]]] = {}
        for (a, b), sim in zip(lo_hi.tolist(), agree.tolist(), strict=True):
            neighbours.setdefault(a, []).append((b, sim))
            neighbours.setdefault(b, []).append((a, sim))
        dropped: set[int] = set()
        for m in sorted(neighbours):
            if ref[m]:
                continue
            anchors = [(bool(ref[o]), sim, -o) for o, sim in neighbours[m]
                       if ref[o] or (o < m and o not in dropped)]
            if not anchors:
                continue
            is_ref, sim, neg = max(anchors)             # a reference first (a leak), then the most similar
            rep = -neg
            dropped.add(m)
            result.duplicates[m] = Duplicate(m, rep, "near", is_ref, sim)
            members = clusters.setdefault(rep, [rep])
            # m's own exact duplicates stay "exact duplicate of m" and join this cluster
            members.extend(clusters.pop(m, [m]))
            kinds[rep] = "near"
