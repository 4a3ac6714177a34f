"""Every measured number in the docs names its source, and appears in it.

The convention (docs/testing.md, "Where the numbers come from"): a measured figure names its source where a reader
sees it, in one greppable form, ``source:`` followed by code spans:

- in a sentence or a list item: ``(source: `benchmarks/results/x.json`)``, or the test that asserts or computes it:
  ``(source: `tests/test_x.py::test_y`)``;
- under a table or a printed-output block, a line of its own: ``Source: `benchmarks/results/x.json` (...).``;
- a table whose header has a ``source`` column names each row's sources in that column.

A source is a text file under ``benchmarks/results/`` or a test file (``tests/*.py``; with ``::test_name``, only
that test's text, its decorators included, counts). Every figure of a block that names sources must appear in one
of them. A figure is a number with a unit (``%``, ``x``, ``tok/s``, ``s``, ``min``, ``MiB``, ...) or with
decimals, and in a table every number but the row labels' (the first column). It appears when a number of the
source rounds to it (within half a unit of its last digit, so half-up and half-even rounding both pass), with the
obvious normalisations: thousands separators, ``k`` for thousands, a percentage against a fraction, minutes
against seconds, GiB against MiB. Code spans, dates, times of day, version numbers, numbers like 1e-3 and
numbers glued to letters (SmolLM2, Q8_0) are not figures. A ratio or a share the docs compute from a result is in
``test_derived_figures`` below, which recomputes it; the page names that test beside the results file.

A block (paragraph, list item, table or printed output) with a number with a unit of measurement names a source,
unless that number is in ``NOT_MEASUREMENTS`` (a default, a limit, a tolerance: with why) or its block is in
``PENDING`` (a measurement being redone).
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "reference" not in p.parts)]
SOURCE_DIRS = ("benchmarks/results/", "tests/")

# Numbers with units that are no measurement: (page, the phrase that holds them, what they are). The phrase's
# numbers are neither required to have a source nor checked against one. A phrase that is no longer on its page
# fails the test.
NOT_MEASUREMENTS = [
    ("README.md", "validates on 10% of your file", "data.val_fraction's default"),
    ("docs/guides/own-data.md", "validates on 10% of your file", "data.val_fraction's default"),
    ("docs/guides/own-data.md", "4x the training micro-batch", "eval_batch_size's default"),
    ("docs/guides/own-data.md", "`eval_share` (10%)", "eval_share's default"),
    ("docs/guides/training.md", "at most ~10% of training compute", "eval_share's default"),
    ("docs/guides/training.md", "when the logits would pass 256 MiB", "chunked_loss: auto's threshold"),
    ("docs/guides/training.md", "more than 1% worse", "regression_tolerance's default"),
    ("docs/guides/data.md", "Inputs over 16 MB", "the size from which --workers auto starts a pool"),
    ("docs/guides/data.md", "(default 10%)", "template_share's default"),
    ("docs/guides/evaluation.md", "`eval.forgetting.max_drop` (2 points)", "max_drop's default"),
    ("docs/guides/memory.md", "under 90% of the budget", "the plan's margin for the estimator's error"),
    ("docs/guides/serving.md", "`--max-body-bytes` (1 MiB, 413)", "a limit's default"),
    ("docs/guides/serving.md", "`--graceful-timeout` (60 s)", "a limit's default"),
    ("docs/guides/serving.md", "targets (a) >= 4x (b), (a) >= 0.8x (c)", "the benchmark's targets"),
    ("docs/guides/serving.md", "(targets 4x and 0.8x)", "the benchmark's targets"),
]

# Blocks whose figures are being measured again: (page, words of the block or table row, why). Temporary.
PENDING: list[tuple[str, str, str]] = []


# ---------------------------------------------------------------------------------------------------- the page
@dataclass
class Block:
    page: str
    line: int                  # 1-based line of the block's first line
    kind: str                  # "paragraph", "item", "table", "output"
    text: str
    sources: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)      # a table's cells, header first, no separator row


FENCE = re.compile(r"^\s*```(\w*)")
ITEM = re.compile(r"^\s*(?:[-*]|\d+\.)\s")
SOURCE = re.compile(r"\bsources?:\s*((?:`[^`\s][^`\n]*`[\s,;]*(?:and\s+)?)+)", re.I)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def parse_blocks(text: str, page: str = "page.md") -> list[Block]:
    """A Markdown page as paragraphs, list items, tables and printed outputs (fenced blocks without a language;
    commands are not figures), each with the sources it names; a paragraph that starts with "Source:" names the
    sources of the table or output right above it too."""
    blocks: list[Block] = []
    current: Block | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        fence = FENCE.match(line)
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), len(lines))
            if not fence.group(1):
                blocks.append(Block(page, i + 1, "output", "\n".join(lines[i + 1:end])))
            current, i = None, end + 1
            continue
        if not stripped or stripped.startswith(("#", "<!--", "--8<--")):
            current = None
        elif stripped.startswith("|"):
            if current is None or current.kind != "table":
                current = Block(page, i + 1, "table", "")
                blocks.append(current)
            current.text += line + "\n"
            if not re.fullmatch(r"\|?[\s:|-]+\|?", stripped):
                current.rows.append(_cells(stripped))
        elif ITEM.match(line) or current is None or current.kind not in ("paragraph", "item"):
            current = Block(page, i + 1, "item" if ITEM.match(line) else "paragraph", line + "\n")
            blocks.append(current)
        else:
            current.text += line + "\n"
        i += 1
    for k, block in enumerate(blocks):
        block.sources = named_sources(block.text)
        if k and block.kind == "paragraph" and block.text.startswith("Source:") and blocks[k - 1].kind in (
                "table", "output"):
            blocks[k - 1].sources += block.sources
    return blocks


def named_sources(text: str) -> list[str]:
    return [path for m in SOURCE.finditer(text) for path in re.findall(r"`([^`]+)`", m.group(1))]


def source_column(block: Block) -> int | None:
    header = [c.lower() for c in block.rows[0]] if block.kind == "table" and block.rows else []
    return header.index("source") if "source" in header else None


# ------------------------------------------------------------------------------------------------ the figures
@dataclass(frozen=True)
class Figure:
    text: str                  # as the page writes it
    value: float
    decimals: int              # digits after the point as written
    unit: str                  # "" for a bare number

    def matches(self, number: float) -> bool:
        tolerance = 0.5 * 10 ** -self.decimals * (1000 if self.unit.startswith("k") else 1) + 1e-9
        scales = {"%": (1, 100), "min": (1, 1 / 60), "minutes": (1, 1 / 60), "GiB": (1, 1 / 1024),
                  "GB": (1, 1 / 1024)}.get(self.unit, (1,))       # a fraction, seconds, MiB in the source
        return any(abs(number * scale - self.value) <= tolerance for scale in scales)


UNITS = sorted(["tok/s", "tokens/s", "pairs/s", "questions/s", "prompts/s", "records/s", "GFLOP/s", "s/step", "ms",
                "us", "s", "seconds", "min", "minutes", "h", "hours", "KB", "KiB", "MB", "MiB", "GB", "GiB", "%",
                "points"], key=len, reverse=True)
END = r"(?!\w)(?!\.\d)"                          # not glued to a letter, not the start of a longer number
FIGURE = re.compile(
    r"(?<![\w.,/])(?P<sign>(?<=[\s(\[])[-+−]|^[-+−])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<dec>\d+))?"
    r"(?:(?P<x>x)" + END                                                               # 3.6x
    + r"|(?P<k>k)? ?(?P<unit>" + "|".join(map(re.escape, UNITS)) + r")(?![\w/])"     # 224 tok/s, 11.6k records/s
    + "|" + END + ")", re.M)
NOT_FIGURES = [
    r"`[^`]*`",                                  # code spans: commands, paths, keys
    r"\]\([^)]*\)",                              # link targets
    r"\d{4}-\d{2}-\d{2}",                        # dates
    r"\b\d{1,2}:\d{2}(?:-\d{1,2}:\d{2})?",       # times of day
    r"\d+(?:\.\d+){2,}",                         # versions
    r"\d+(?:\.\d+)?e[-+]?\d+",                   # 1e-3, 5e-5: settings and tolerances
    r"95% (?:bootstrap |confidence )?intervals?",  # the intervals' level, a setting
    r"\b\d+(?: x \d+)+\b",                       # 256 x 4, 15 x 4: a shape or a batch, set not measured
]


def figures(text: str, bare: bool = False) -> list[Figure]:
    """The figures of ``text``: numbers with a unit or an ``x``, numbers with decimals, and with ``bare`` every
    number."""
    text = " ".join(text.split())
    for pattern in NOT_FIGURES:
        text = re.sub(pattern, " ", text)
    found = []
    for m in FIGURE.finditer(text.replace("**", "")):
        dec = m.group("dec") or ""
        value = float(m.group("int").replace(",", "") + ("." + dec if dec else ""))
        value *= -1 if m.group("sign") in ("-", "−") else 1
        unit = "x" if m.group("x") else (m.group("k") or "") + (m.group("unit") or "")
        value *= 1000 if unit.startswith("k") else 1
        if unit or dec or bare:
            found.append(Figure(m.group(0).strip(), value, len(dec), unit))
    return found


def exempt(text: str, page: str) -> str:
    """``text`` with whitespace normalised and its ``NOT_MEASUREMENTS`` phrases left out."""
    text = " ".join(text.split())
    for where, phrase, _ in NOT_MEASUREMENTS:
        if where == page:
            text = text.replace(phrase, " ")
    return text


def pending(text: str, page: str) -> bool:
    return any(where == page and words in " ".join(text.split()) for where, words, _ in PENDING)


def units_to_check(block: Block) -> list[tuple[str, list[str], list[Figure]]]:
    """(what, sources, figures): the block's, or one per row of a table with a source column."""
    at = source_column(block)
    if at is not None:
        return [(f"row {row[0]!r}", re.findall(r"`([^`]+)`", row[at]) if at < len(row) else [],
                 [f for j, cell in enumerate(row) if j not in (0, at) for f in figures(exempt(cell, block.page), True)])
                for row in block.rows[1:] if not pending(" | ".join(row), block.page)]
    if pending(block.text, block.page):
        return []
    if block.kind == "table":
        return [("table", block.sources,
                 [f for row in block.rows[1:] for cell in row[1:] for f in figures(exempt(cell, block.page), True)])]
    return [("block", block.sources, figures(exempt(block.text, block.page)))]


# ---------------------------------------------------------------------------------------------------- sources
def source_text(source: str, root: Path = ROOT) -> str:
    """A source's text: a results file, a test file, or one test (from its decorators to its last line)."""
    path, _, test = source.partition("::")
    if not path.startswith(SOURCE_DIRS):
        raise ValueError(f"{source}: a source is a file under {' or '.join(SOURCE_DIRS)}")
    if not (root / path).is_file():
        raise ValueError(f"{source}: no such file")
    try:
        text = (root / path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{source}: not a text file (name the results file the figure is in)") from None
    if not test:
        return text
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if re.match(rf"(async )?def {re.escape(test)}\(", line)), None)
    if at is None:
        raise ValueError(f"{source}: no such test")
    start = at
    while start and lines[start - 1].strip():
        start -= 1
    end = next((i for i in range(at + 1, len(lines)) if re.match(r"[^\s)#]", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def source_numbers(text: str) -> list[float]:
    """Every number of a source, as written and, for "4,884,480" or "1,2", with and without its commas; a negative
    one also as its absolute value ("256-1024" is a range)."""
    numbers = []
    for negative, token in re.findall(r"(-?)(\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?)", text):
        token = token.rstrip(",")
        parts = token.split(",")
        if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", token):
            parts.append(token.replace(",", ""))
        for part in filter(None, parts):
            numbers += [float(part), -float(part)] if negative else [float(part)]
    return numbers


@dataclass
class Problem:
    block: Block
    message: str

    def __str__(self) -> str:
        return f"{self.block.page}:{self.block.line}: {self.message}"


def check_sourced(blocks: list[Block], root: Path = ROOT) -> list[Problem]:
    """Every figure of a block (or table row) that names sources appears in one of them."""
    problems = []
    for block in blocks:
        for what, sources, figs in units_to_check(block):
            if not sources:
                continue
            try:
                numbers = [n for source in sources for n in source_numbers(source_text(source, root))]
            except ValueError as e:
                problems.append(Problem(block, str(e)))
                continue
            missing = [f.text for f in figs if not any(f.matches(n) for n in numbers)]
            if missing:
                problems.append(Problem(block, f"{what}: {missing} not in {sources}"))
    return problems


def check_named(blocks: list[Block]) -> list[Problem]:
    """Every block (or table row) with a number with a unit names a source."""
    problems = []
    for block in blocks:
        for what, sources, figs in units_to_check(block):
            measured = [f.text for f in figs if f.unit]
            if measured and not sources:
                problems.append(Problem(block, f"{what}: {measured[:6]} and no source named"))
    return problems


def page_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse_blocks(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))]


# ------------------------------------------------------------------------------------------ the checker itself
def test_the_checker_finds_a_figure_missing_from_its_source(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "run.json").write_text(json.dumps({"tok_s": 223.96, "peak_mib": 2916.4, "acc": 0.98}))
    page = ("It trains at 224 tok/s in 2,916 MiB, 98.0% right (source: `benchmarks/results/run.json`).\n\n"
            "It trains at 230 tok/s (source: `benchmarks/results/run.json`).\n\n"
            "| recipe | tok/s | MiB |\n|---|---|---|\n| tuneforge | 224 | 2917 |\n\n"
            "Source: `benchmarks/results/run.json`.\n\n"
            "An unsourced 3.6x.\n\n"
            "A source that is not a result (source: `README.md`).\n")
    blocks = parse_blocks(page)
    assert [str(p) for p in check_sourced(blocks, tmp_path)] == [
        "page.md:3: block: ['230 tok/s'] not in ['benchmarks/results/run.json']",
        "page.md:5: table: ['2917'] not in ['benchmarks/results/run.json']",
        "page.md:13: README.md: a source is a file under benchmarks/results/ or tests/"]
    assert [str(p) for p in check_named(blocks)] == ["page.md:11: block: ['3.6x'] and no source named"]


def test_figures_and_their_normalisations():
    assert [(f.value, f.unit) for f in figures("a 3.6x speed-up, -7.5% to +1.4%, 11.6k records/s, 4,394 MiB, 24.5\n"
                                               "min, 0.725 pairs/s, 2 steps, 256-1024 tokens, 0.6932 -> 0.6876")] == [
        (3.6, "x"), (-7.5, "%"), (1.4, "%"), (11600.0, "krecords/s"), (4394.0, "MiB"), (24.5, "min"),
        (0.725, "pairs/s"), (0.6932, ""), (0.6876, "")]
    assert figures("`--steps 30` 2026-12-03 16:11-16:26 llama.cpp 0.3.36 SmolLM2-135M Q8_0 LR 1e-3 95% intervals") == []
    numbers = source_numbers('{"acc": 0.98, "s": 1472.09, "peak": 2268.5, "n": "4,884,480", "mib": 7578, "d": -2.9}')
    for text in ("98.0%", "24.5 min", "2268", "2269", "4,884,480", "7.4 GiB", "-2.9%"):
        assert all(any(f.matches(n) for n in numbers) for f in figures(text, bare=True)), text
    for text in ("97.9%", "24.6 min", "2267", "4,884,481", "-2.8%"):
        assert not any(figures(text, bare=True)[0].matches(n) for n in numbers), text


def test_a_named_test_is_its_own_text_only(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "LIMIT = 9.5\n\n\n@pytest.mark.parametrize('n', [\n    1.25,\n])\ndef test_a(n):\n    assert n < 2.0\n"
        "    # 3.5\n\n\ndef test_b():\n    assert 7.5\n")
    assert source_numbers(source_text("tests/test_x.py::test_a", tmp_path)) == [1.25, 2.0, 3.5]
    with pytest.raises(ValueError, match="no such test"):
        source_text("tests/test_x.py::test_c", tmp_path)


# ------------------------------------------------------------------------------------------------ the docs
def test_every_figure_appears_in_the_source_it_names():
    problems = check_sourced(page_blocks())
    assert not problems, "\n".join(map(str, problems))


def test_every_measured_figure_names_a_source():
    blocks = page_blocks()
    problems = check_named(blocks)
    assert not problems, "\n".join(map(str, problems))
    texts = [(b.page, " ".join(b.text.split())) for b in blocks]
    stale = [(page, words) for page, words, _ in NOT_MEASUREMENTS + PENDING
             if not any(where == page and words in text for where, text in texts)]
    assert not stale, f"NOT_MEASUREMENTS or PENDING entries no longer on their page: {stale}"


@pytest.mark.parametrize("page", [p.relative_to(ROOT) for p in PAGES], ids=str)
def test_sources_are_named_in_the_one_form(page):
    """``source:`` then code spans: a link or a bare path after ``source:`` would not be checked."""
    text = re.sub(r"`[^`\n]*sources?:[^`\n]*`", "", (ROOT / page).read_text(encoding="utf-8"), flags=re.I)
    loose = [m.group(0) for m in re.finditer(r"\bsources?:\s*(?!`)\S+", text, re.I)]
    assert not loose, loose


# ------------------------------------------------------------------------------- figures derived from results
def _rows(name: str, key: str = "recipe") -> dict:
    return {row[key]: row for row in json.loads((RESULTS / name).read_text())["rows"]}


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]


def _bench(recipe: str, column: str) -> float:
    return _rows("bench_cpu_2026-11-22.json")[recipe][column]


def _pref(recipe: str, column: str) -> float:
    return _rows("preference_cpu_2026-12-02.json")[recipe][column]


def _serve(config: str) -> float:
    runs = {**json.loads((RESULTS / "serve_cpu_2026-12-02.json").read_text()),
            **json.loads((RESULTS / "serve_cpu_stacked_2026-12-02.json").read_text())}
    return runs[config]["tokens_per_s"]      # (f) is the stacked kernel: the docs' (a); the file's (a) is peft's


LEARNING_RATES = ("3e-4", "1e-3", "3e-3")      # own_data_defaults.py's grid


def _eval_share(**keys) -> float:
    """Validation time over training wall time of the own-data run with these keys."""
    row = next(r for r in _jsonl("own_data_defaults.jsonl") if r.items() >= keys.items())
    return row["eval_time_s"] / row["train_wall_s"]


@pytest.mark.parametrize("figure, compute", [
    # docs/guides/performance.md: tuneforge against each recipe of the 2026-11-22 bench
    ("4.4x", lambda: _bench("tuneforge", "real_tok_s") / _bench("seeds", "real_tok_s")),
    ("2.5x", lambda: _bench("tuneforge", "real_tok_s") / _bench("trl", "real_tok_s")),
    ("1.66x", lambda: _bench("tuneforge", "real_tok_s") / _bench("llamafactory", "real_tok_s")),
    ("1.66x", lambda: _bench("tuneforge", "real_tok_s") / _bench("llamafactory-neat", "real_tok_s")),
    ("0.58x", lambda: _bench("tuneforge", "peak_mem_mib") / _bench("llamafactory", "peak_mem_mib")),
    ("0.30x", lambda: _bench("tuneforge", "peak_mem_mib") / _bench("trl", "peak_mem_mib")),
    ("0.34x", lambda: _bench("tuneforge", "peak_mem_mib") / _bench("seeds", "peak_mem_mib")),
    ("0.81x", lambda: _bench("tuneforge-ckpt", "peak_mem_mib") / _bench("llamafactory-defaults", "peak_mem_mib")),
    ("1.7x", lambda: _bench("tuneforge-ckpt", "real_tok_s") / _bench("llamafactory-defaults", "real_tok_s")),
    # docs/guides/preference.md: tuneforge against TRL's DPOTrainer
    ("3.6x", lambda: _pref("tuneforge", "pairs_per_s") / _pref("trl", "pairs_per_s")),
    ("0.31x", lambda: _pref("tuneforge", "peak_mem_mib") / _pref("trl", "peak_mem_mib")),
    ("0.6941", lambda: statistics.mean(_pref("tuneforge", "loss_curve"))),
    ("0.006", lambda: statistics.stdev(_pref("tuneforge", "loss_curve"))),
    ("0.6931", lambda: statistics.mean(_pref("trl", "loss_curve"))),
    ("0.005", lambda: statistics.stdev(_pref("trl", "loss_curve"))),
    # docs/guides/serving.md: tokens/s of the configurations against each other
    ("1.3x", lambda: _serve("f") / _serve("a")),
    ("10.9x", lambda: _serve("f") / _serve("b")),
    ("0.87x", lambda: _serve("f") / _serve("c")),
    ("8.4x", lambda: _serve("a") / _serve("b")),
    ("0.66x", lambda: _serve("a") / _serve("c")),
    ("1.27x", lambda: _serve("e") / _serve("d")),
    # docs/guides/own-data.md: validation's share of the training wall time
    ("23%", lambda: _eval_share(task="tools", recipe="own-data", max_steps="40")),
    ("13%", lambda: _eval_share(task="tools", recipe="own-data", max_steps="100")),
    ("10%", lambda: _eval_share(task="roleplay", recipe="own-data", learning_rate="3e-4")),
    ("10%", lambda: _eval_share(task="roleplay", recipe="own-data", learning_rate="1e-3")),
    ("10%", lambda: _eval_share(task="roleplay", recipe="own-data", learning_rate="3e-3")),
    ("16%", lambda: min(_eval_share(task="tools", max_steps="15", learning_rate=lr) for lr in LEARNING_RATES)),
    ("17%", lambda: max(_eval_share(task="tools", max_steps="15", learning_rate=lr) for lr in LEARNING_RATES)),
])
def test_derived_figures(figure, compute):
    """A ratio, share or mean the docs compute from committed results rounds to what they print."""
    [parsed] = figures(figure)
    assert parsed.matches(compute()), (figure, compute())
