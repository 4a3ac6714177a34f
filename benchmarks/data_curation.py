"""Throughput and memory of `tuneforge data check` (check + exact dedupe) and `data clean` (+ writing, near-dup).

    python benchmarks/data_curation.py                 # 100k records from gpteacher, both modes
    python benchmarks/data_curation.py --records 20000 # smaller
    python benchmarks/data_curation.py --memory 1000000  # peak RSS on 1M generated Alpaca-size records

The data set is ../shared/data/gpteacher_roleplay.json (3,146 Alpaca records) replicated with small
mutations to ``--records`` records: each copy changes a few words, its case or whitespace, so the
file holds exact duplicates (after normalisation), near duplicates and unique records. Each mode
runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. Records/s counts input records
over wall time for the whole command (read, check, clean, dedupe, write); rec/CPU-s over the CPU
time it used (itself and its workers), which does not depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPTEACHER = ROOT.parent / "shared" / "data" / "gpteacher_roleplay.json"


def _mutate(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    r = rng.random()
    if r < 0.15:
        return text.upper() if rng.random() < 0.5 else "  " + text + " "       # exact after normalisation
    for _ in range(rng.randint(1, 3)):                                         # near duplicate
        i = rng.randrange(len(words))
        words[i] = rng.choice(["quite", "very", "really", words[i][::-1], str(rng.randrange(1000))])
    if r > 0.6:                                                                 # far from the original
        rng.shuffle(words)
    return " ".join(words)


def make_replicated(n: int, path: Path, seed: int = 0) -> Path:
    base = json.loads(GPTEACHER.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = dict(base[i % len(base)])
            if i >= len(base):
                rec["output"] = _mutate(rng, rec["output"])
                if rng.random() < 0.3:
                    rec["instruction"] = _mutate(rng, rec["instruction"])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def make_synthetic(n: int, path: Path, seed: int = 0) -> Path:
    """``n`` unique Alpaca-size records (instruction ~25 words, output ~150 words), streamed to disk."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ta", "ko", "ri", "mu", "se", "lo", "vi", "ne") for b in range(400)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"instruction": f"Task {i}: " + " ".join(rng.choices(vocab, k=25)), "input": "",
                   "output": " ".join(rng.choices(vocab, k=150)) + "."}
            f.write(json.dumps(rec) + "\n")
    return path


def run_mode(data: Path, out: Path | None, near: bool, workers: int = 1) -> dict:
    """Run one check (``out`` None) or clean in a subprocess: wall time, CPU time (itself + its workers), peak RSS."""
    call = (f"check_files({str(data)!r}, cfg, workers={workers})" if out is None
            else f"clean_files({str(data)!r}, {str(out)!r}, cfg, workers={workers})")
    code = (
        "import json, resource, sys, time\n"
        "from tuneforge.data.curation.clean import check_files, clean_files\n"
        "from tuneforge.data.curation.config import CurationConfig\n"
        "def cpu():\n"
        "    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime\n"
        "if __name__ == '__main__':\n"
        f"    cfg = CurationConfig(near_dup={near}, min_examples=0)\n"
        "    t, c = time.perf_counter(), cpu()\n"
        f"    r = {call}\n"
        "    dt, dc = time.perf_counter() - t, cpu() - c\n"
        "    print(json.dumps({'records': r.records, 'clean': r.clean, 'rejected': r.rejected, 'seconds': dt,"
        " 'cpu_seconds': dc, 'rejected_by': r.rejected_by,"
        " 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--memory", type=int, default=0, metavar="N", help="measure peak RSS on N generated records")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to try")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    load0 = "%.1f %.1f %.1f" % os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tf_bench_"))
    rows = []
    try:
        if args.memory:
            data = make_synthetic(args.memory, tmp / "synthetic.jsonl")
            size = data.stat().st_size / 2**20
            for near in (False, True):
                r = run_mode(data, tmp / "out", near)
                rows.append((f"{args.memory:,} synthetic ({size:.0f} MB)", "check+clean+exact" + (" + near-dup" if near else ""), r))
        else:
            data = make_replicated(args.records, tmp / "replicated.jsonl")
            for workers in args.workers:
                for command, near in (("check", False), ("clean", False), ("clean", True)):
                    r = run_mode(data, None if command == "check" else tmp / "out", near, workers)
                    mode = (("check+exact" if command == "check" else "check+clean+exact") + (" + near-dup" if near else "")
                            + (f", {workers} workers" if workers > 1 else ""))
                    rows.append((f"{args.records:,} gpteacher x mutations", mode, r))
    finally:
        if not args.keep:
            for f in sorted(tmp.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            tmp.rmdir()
    print(f"{'data':<34} {'mode':<42} {'records/s':>10} {'rec/CPU-s':>10} {'seconds':>8} {'peak RSS MB':>12} "
          f"{'clean':>8} {'rejected':>9}")
    for data_name, mode, r in rows:
        print(f"{data_name:<34} {mode:<42} {r['records'] / r['seconds']:>10,.0f} {r['records'] / r['cpu_seconds']:>10,.0f} "
              f"{r['seconds']:>8.1f} {r['rss_mb']:>12,.0f} {r['clean']:>8,} {r['rejected']:>9,}")
    for data_name, mode, r in rows:
        print(f"{mode}: rejected by {r['rejected_by']}")
    print(f"cpu: {os.cpu_count()} cores visible, load average before/after {load0} / "
          f"{'%.1f %.1f %.1f' % os.getloadavg()} (other processes compete: compare rec/CPU-s); "
          f"python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
