"""Near duplicates among short records: recall of planted "Hi, " copies and false positives on distinct questions.

    python benchmarks/curation_short_dups.py              # every data set, word n-grams only vs the short path
    python benchmarks/curation_short_dups.py --seed 1

Each data set is a file of distinct short questions with short answers (Alpaca records), followed by planted
copies: "Hi, " + one of its 5-9-word questions, with the same answer. ``tuneforge data clean`` runs on it (the
whole pipeline: template discount, MinHash/LSH, decisions in file order) and its ``rejects.jsonl`` is read:

* recall: planted copies rejected as a near (or exact) duplicate of their original;
* false positives: distinct questions rejected as duplicates (of anything);

once with word 3-grams for every record (``short_text_words: 0``, the behaviour before the short path) and once
with the defaults (records under 40 content words compared on their word 1- to 3-grams).

Data sets (deterministic from ``--seed``):

* ``generated``: 1,200 questions from 14 sentence templates with slots (``how do I {verb} a {adj} {noun}``...),
  answers one of 8 intent labels: many pairs differ in one slot word, the hard case for false positives;
* ``generated + preamble``: the same questions behind one shared 60-word tool preamble, answers tool calls (the
  template discount leaves the question);
* ``MMLU``: the real questions of ../shared/data/mmlu under 40 words, distinct after normalisation, answer =
  the correct choice's text (11k questions; copies of 5-9-word ones);
* ``GPTeacher`` (long records, as they are): the number of near duplicates found with and without the short path
  (the same: its records are long).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

TEMPLATES = [
    "how do i {verb} a {adj} {noun}",
    "what is the best way to {verb} {noun}s",
    "can you help me {verb} my {noun}",
    "where can i buy a {adj} {noun} {place}",
    "why does my {noun} keep {ving}",
    "is it safe to {verb} a {noun} {place}",
    "when should i {verb} the {adj} {noun}",
    "who can {verb} a {noun} {place}",
    "how much does it cost to {verb} a {noun}",
    "should i {verb} my {adj} {noun} every week",
    "what happens if i {verb} a {noun} {place}",
    "tell me how to {verb} an old {noun}",
    "is a {adj} {noun} worth it",
    "which {noun} is easiest to {verb}",
]
VERBS = ["clean", "fix", "paint", "sell", "store", "replace", "wash", "repair", "move", "insure", "rent", "build",
         "measure", "polish", "recycle", "charge", "upgrade", "heat", "cool", "protect", "label", "ship", "borrow",
         "test", "sharpen", "fold", "assemble", "unlock", "tune", "dry"]
ADJS = ["red", "cheap", "wooden", "broken", "heavy", "small", "vintage", "electric", "leather", "plastic", "noisy",
        "rusty", "folding", "portable", "second hand", "waterproof", "tiny", "huge", "glass", "metal"]
NOUNS = ["bike", "laptop", "sofa", "kettle", "guitar", "window", "printer", "tent", "fridge", "phone", "boat",
         "lamp", "ladder", "drone", "carpet", "piano", "camera", "oven", "scooter", "mattress", "clock", "desk",
         "stroller", "helmet", "suitcase", "heater", "router", "blender", "kayak", "mirror", "toaster", "chair",
         "watch", "tablet", "backpack", "grill", "fan", "jacket", "saw", "drill"]
PLACES = ["at home", "in winter", "near me", "online", "in the rain", "at night", "indoors", "abroad",
          "in a small flat", "without tools"]
VING = ["beeping", "breaking", "leaking", "overheating", "rattling", "shutting down", "squeaking", "flickering"]
INTENTS = ["how_to", "purchase", "troubleshoot", "safety", "pricing", "maintenance", "service", "comparison"]

TOOLS_PREAMBLE = (
    "You are an assistant with access to these tools. calculator: evaluates arithmetic expressions such as "
    "square roots, powers and percentages and returns the numeric result. search: looks up facts about people, "
    "places, history and science in an encyclopedia and returns a short summary. weather: returns the forecast "
    "for a city and a date. Answer with the name of the tool to call and its argument. Question: ")


def generated_questions(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (question, intent) pairs of 5-9 words from the templates."""
    rng = random.Random(seed)
    out: dict[str, str] = {}
    while len(out) < n:
        t = rng.randrange(len(TEMPLATES))
        q = TEMPLATES[t].format(verb=rng.choice(VERBS), adj=rng.choice(ADJS), noun=rng.choice(NOUNS),
                                place=rng.choice(PLACES), ving=rng.choice(VING))
        if 5 <= len(q.split()) <= 9:
            q = q[0].upper() + q[1:] + "?"
            out.setdefault(q, INTENTS[t % len(INTENTS)])
    return list(out.items())


def mmlu_questions() -> list[tuple[str, str]]:
    """MMLU questions under 40 words with the correct choice's text, distinct after normalisation."""
    seen: dict[str, tuple[str, str]] = {}
    for f in sorted((SHARED / "mmlu").glob("*/*.csv")):
        with open(f, encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                q, answer = row[0].strip(), row[1 + "ABCD".index(row[5].strip())].strip()
                if q and answer and len(q.split()) < 40:
                    seen.setdefault(" ".join(q.lower().split()), (q, answer))
    return list(seen.values())


def with_copies(pairs: list[tuple[str, str]], copies: int, seed: int) -> tuple[list[tuple[str, str]], list[int]]:
    """``pairs`` followed by "Hi, " copies of ``copies`` of their 5-9-word questions; the originals' indices."""
    rng = random.Random(seed + 1)
    short = [i for i, (q, _) in enumerate(pairs) if 5 <= len(q.split()) <= 9]
    chosen = sorted(rng.sample(short, min(copies, len(short))))
    return pairs + [("Hi, " + pairs[i][0], pairs[i][1]) for i in chosen], chosen


def run(records: list[dict], short_words: int, tmp: Path) -> dict[int, tuple[str, int | None]]:
    """``tuneforge data clean`` on ``records``: 1-based line -> (check, line it duplicates) of each rejected one."""
    from tuneforge.data.curation.clean import clean_files
    from tuneforge.data.curation.config import CurationConfig

    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    clean_files(data, tmp / "out", CurationConfig(min_examples=0, max_length=None, short_text_words=short_words))
    out = {}
    for line in (tmp / "out" / "rejects.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        reason = r["reasons"][0]
        of = reason["message"].split(" duplicate of ")[-1].split(" ")[0] if " duplicate of " in reason["message"] \
            else ""
        out[r["line"]] = (reason["check"], int(of.rsplit(":", 1)[1]) if ":" in of else None)
    return out


def measure(name: str, pairs: list[tuple[str, str]], copies: int, seed: int, tmp: Path,
            preamble: str = "", answer=lambda a: a) -> list[tuple]:
    rows_all, originals = with_copies(pairs, copies, seed)
    records = [{"instruction": preamble + q, "input": "", "output": answer(a)} for q, a in rows_all]
    n = len(pairs)
    rows = []
    for method, short_words in (("word 3-grams (before)", 0), ("short path: words 1-3-grams", 40)):
        t = time.perf_counter()
        rejected = run(records, short_words, tmp)
        dt = time.perf_counter() - t
        caught = sum(1 for k, orig in enumerate(originals)
                     if rejected.get(n + k + 1, ("", None))[0] in ("near_duplicate", "exact_duplicate")
                     and rejected[n + k + 1][1] == orig + 1)
        fp = sum(1 for line in rejected if line <= n)
        rows.append((name, method, n, len(originals), caught / len(originals), fp, fp / n, dt))
    return rows


def long_records(tmp: Path) -> list[tuple]:
    """GPTeacher as it is (long records): near duplicates found with and without the short path."""
    src = SHARED / "gpteacher_roleplay.json"
    if not src.exists():
        return []
    records = json.loads(src.read_text(encoding="utf-8"))
    rows = []
    for method, short_words in (("word 3-grams (before)", 0), ("short path: words 1-3-grams", 40)):
        t = time.perf_counter()
        rejected = run(records, short_words, tmp)
        dt = time.perf_counter() - t
        near = sum(1 for c, _ in rejected.values() if c == "near_duplicate")
        rows.append(("GPTeacher (long, as is)", method, len(records), 0, float("nan"), near, near / len(records), dt))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", type=int, default=1200, help="generated distinct questions")
    p.add_argument("--copies", type=int, default=150, help="planted 'Hi, ' copies per data set")
    args = p.parse_args()
    load0 = "%.1f %.1f %.1f" % os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tf_short_dups_") as d:
        tmp = Path(d)
        gen = generated_questions(args.questions, args.seed)
        rows += measure("generated (intent labels)", gen, args.copies, args.seed, tmp)
        rows += measure("generated + preamble", gen, args.copies, args.seed, tmp, preamble=TOOLS_PREAMBLE,
                        answer=lambda a: json.dumps({"tool": "search", "intent": a}))
        if (SHARED / "mmlu").exists():
            rows += measure("MMLU questions < 40 words", mmlu_questions(), args.copies, args.seed, tmp)
        rows += long_records(tmp)
    print(f"# python benchmarks/curation_short_dups.py --seed {args.seed} --questions {args.questions} "
          f"--copies {args.copies}; {time.strftime('%Y-%m-%d %H:%M')}; near_dup_threshold 0.8")
    print(f"{'data':<28} {'method':<28} {'distinct':>8} {'planted':>8} {'recall':>7} {'flagged':>8} {'FP rate':>8} "
          f"{'seconds':>8}")
    for name, method, n, planted, recall, fp, rate, dt in rows:
        rec = "-" if planted == 0 else f"{recall:.3f}"
        print(f"{name:<28} {method:<28} {n:>8,} {planted:>8} {rec:>7} {fp:>8} {rate:>8.4f} {dt:>8.1f}")
    print("recall: planted 'Hi, ' copies rejected as a duplicate of their original; flagged: distinct questions "
          "rejected as duplicates (GPTeacher: near duplicates found among its long records)")
    print(f"cpu: {os.cpu_count()} cores visible, load average before/after {load0} / "
          f"{'%.1f %.1f %.1f' % os.getloadavg()}; python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
