"""The evaluation report: ``report.json`` (everything: :class:`~tuneforge.runs.records.EvalReport`), ``report.md``
and a self-contained ``report.html``.

The HTML has no external reference (inline CSS, a few lines of inline JS, the loss curve as inline SVG),
so it opens offline and can be mailed as one file. The folder is written atomically: the three files go
to a hidden temporary folder next to the destination, which is renamed into place only when all are
written (a previous report is replaced in one rename), so a failure leaves no half-written ``eval/``.
"""

from __future__ import annotations

import difflib
import html
import math
import os
import shutil
from pathlib import Path
from typing import Any

from tuneforge.runs import EvalReport
from tuneforge.runs.layout import REPORT

PERCENT_METRICS = ("label", "valid_label", "label_named", "exact", "normalised", "token_f1", "rouge_l", "chrf",
                   "json_valid", "schema_valid", "regex", "user")
METRIC_NAMES = {"label": "label acc", "valid_label": "valid label",
                "label_named": "label named", "exact": "exact", "normalised": "normalised",
                "token_f1": "token F1", "rouge_l": "ROUGE-L", "chrf": "chrF", "json_valid": "JSON valid",
                "schema_valid": "schema valid", "regex": "regex", "user": "user metric"}


# ------------------------------------------------------------------------------------------ formatting


def _pct(iv: dict, digits: int = 1) -> str:
    if iv is None or iv.get("value") is None or math.isnan(iv["value"]):
        return "n/a"
    return f"{100 * iv['value']:.{digits}f}% [{100 * iv['low']:.{digits}f}, {100 * iv['high']:.{digits}f}]"


def _num(iv: dict, digits: int = 3) -> str:
    if iv is None or iv.get("value") is None or math.isnan(iv["value"]):
        return "n/a"
    return f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def _signed_pct(iv: dict, sign: float = 1.0) -> str:
    """A difference in points; ``sign=-1`` shows the negated difference (its bounds swap)."""
    lo, hi = sorted((sign * iv["low"], sign * iv["high"]))
    return f"{100 * sign * iv['value'] + 0.0:+.1f} pts [{100 * lo + 0.0:+.1f}, {100 * hi + 0.0:+.1f}]"


def metric_order(report: dict, set_name: str) -> list[str]:
    cols = report["sets"][set_name]["columns"]
    names = list(next(iter(cols.values()))["metrics"]) if cols else []
    first = [m for m in (report.get("main_metric"),) if m in names]
    return first + [m for m in PERCENT_METRICS if m in names and m not in first]


def main_table_rows(report: dict, set_name: str) -> tuple[list[str], list[list[str]]]:
    entry = report["sets"][set_name]
    metrics = metric_order(report, set_name)
    header = ["column", *(METRIC_NAMES.get(m, m) for m in metrics), "prompt tokens", "gen tok/s"]
    rows = []
    for name, col in entry["columns"].items():
        rows.append([name, *(_pct(col["metrics"][m]) for m in metrics), f"{col['prompt_tokens']:.0f}",
                     f"{col['tokens_per_s']:.1f}"])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table_md(report: dict, set_name: str = "test") -> str:
    return _md_table(*main_table_rows(report, set_name))


def _loss_rows(entry: dict) -> list[list[str]]:
    return [[name, _num(v["loss"], 4), _num(v["perplexity"], 3), str(v["tokens"])] for name, v in entry["loss"].items()]


def _paired_rows(report: dict, entry: dict) -> list[list[str]]:
    main = report.get("main_metric")
    rows = []
    for pair, metrics in entry["paired"].items():
        for m in [main, *[x for x in ("token_f1", "chrf") if x != main]]:
            if m in metrics:
                iv = metrics[m]
                rows.append([pair, METRIC_NAMES.get(m, m), _signed_pct(iv), f"{iv['p_not_better']:.3f}"])
    return rows


TOOL_METRIC_NAMES = {"call_rate": "call rate", "tool_name": "tool name", "args_exact": "args exact",
                     "args_valid": "args valid", "args_f1": "args F1"}


def tool_call_rows(entry: dict) -> tuple[list[str], list[list[str]]] | None:
    """The tool-call table of a set (columns x metrics with intervals, then failure counts), or None."""
    from tuneforge.evaluation.tool_calls import CATEGORIES, METRICS

    blocks = {n: c["tool_calls"] for n, c in entry["columns"].items() if c.get("tool_calls")}
    if not blocks:
        return None
    header = ["column", "examples", "needing a call", *(TOOL_METRIC_NAMES[m] for m in METRICS), *CATEGORIES]
    rows = [[n, str(b["examples"]), str(b["needing_a_call"]), *(_pct(b[m]) for m in METRICS),
             *(str(b["failures"][c]) for c in CATEGORIES)] for n, b in blocks.items()]
    return header, rows


def _paired_tool_rows(entry: dict) -> list[list[str]]:
    return [[pair, TOOL_METRIC_NAMES.get(m, m), _signed_pct(iv), f"{iv['p_not_better']:.3f}"]
            for pair, metrics in entry.get("paired_tool_calls", {}).items() for m, iv in metrics.items()
            if iv["n"]]


TOOL_NOTE = ("Tool calls (records with tools; the answer's calls in the built-in format against the reference's; "
             "tool name, args exact and args F1 over the examples needing a call, args valid over those that call; "
             "then wrong examples by failure category):")


def _forgetting_rows(f: dict) -> list[list[str]]:
    gt = f["general_text"]
    return [["MMLU cloze acc", _pct(f["base"]), _pct(f["tuned"]),
             _signed_pct(f["drop"], -1.0)],
            ["MMLU cloze acc_norm", _pct(f["base_norm"]), _pct(f["tuned_norm"]), ""],
            ["general text perplexity", _num(gt["base"]["perplexity"], 2), _num(gt["tuned"]["perplexity"], 2), ""]]


SOURCES_NOTE = ("Held-out loss by source (the run's mixture: each source's validation examples, answer tokens, "
                "token-weighted):")


def source_loss_rows(report: dict) -> list[list[str]]:
    """A mixture's held-out loss of each source: base, tuned, change, examples and tokens."""
    return [[name, _num(v["base"]["loss"], 4), _num(v["tuned"]["loss"], 4),
             f"{v['tuned']['loss']['value'] - v['base']['loss']['value']:+.4f}", str(v["n"]), str(v["tuned"]["tokens"])]
            for name, v in (report.get("sources") or {}).items()]


SOURCE_HEAD = ["source", "base loss", "tuned loss", "change", "examples", "tokens"]


def to_markdown(report: dict) -> str:
    meta = report.get("metadata", {})
    out = [f"# Evaluation of `{report['run']}`", ""]
    out += [f"- base model: `{meta.get('base_model')}`, method: `{meta.get('method')}`, trainable parameters: "
            f"{meta.get('trainable_params')}, steps: {meta.get('steps')}, "
            f"training time: {meta.get('train_wall_time_s')} s",
            f"- evaluation: {meta.get('eval_wall_time_s')} s, peak RSS {meta.get('eval_peak_rss_mib')} MiB, greedy, "
            f"at most {meta.get('max_new_tokens')} new tokens; intervals are 95% bootstrap intervals over examples",
            ""]
    for name, entry in report["sets"].items():
        out += [f"## `{name}`: {entry['n']} examples from `{entry['file']}`", "", main_table_md(report, name), ""]
        out += ["Held-out loss (answer tokens, token-weighted) and perplexity:", "",
                _md_table(["model", "loss", "perplexity", "tokens"], _loss_rows(entry)), ""]
        if entry["paired"]:
            out += ["Paired bootstrap (same prompts):", "",
                    _md_table(["comparison", "metric", "difference", "P(not better)"], _paired_rows(report, entry)), ""]
        tool_table = tool_call_rows(entry)
        if tool_table:
            out += [TOOL_NOTE, "", _md_table(*tool_table), ""]
            if _paired_tool_rows(entry):
                out += [_md_table(["comparison", "metric", "difference", "P(not better)"], _paired_tool_rows(entry)),
                        ""]
        out += ["Failures (wrong answers by category):", ""]
        cats = sorted({c for col in entry["columns"].values() for c in col["failures"]["counts"]})
        out += [_md_table(["column", "wrong", *cats],
                          [[n, str(c["failures"]["wrong"]), *(str(c["failures"]["counts"].get(k, 0)) for k in cats)]
                           for n, c in entry["columns"].items()]), ""]
        for col_name, col in entry["columns"].items():
            for cat, examples in col["failures"]["examples"].items():
                ex = examples[0]
                out.append(f"- {col_name} / {cat}: `{_short(ex['prompt'])}` expected `{_short(ex['reference'])}`, "
                           f"got `{_short(ex['answer'])}`")
        out.append("")
    if report.get("sources"):
        out += ["## Sources", "", SOURCES_NOTE, "", _md_table(SOURCE_HEAD, source_loss_rows(report)), ""]
    if "forgetting" in report:
        f = report["forgetting"]
        verdict = "passed" if f["passed"] else "FAILED"
        out += [f"## Forgetting: MMLU cloze, {f['questions']} questions ({f['subset']}), {f['subjects']} subjects", "",
                _md_table(["check", "base", "tuned", "change"], _forgetting_rows(f)), "",
                f"Accuracy drop {100 * f['drop']['value']:.1f} points vs the allowed {100 * f['max_drop']:.1f}: "
                f"{verdict}.", ""]
    if "variability" in report:
        v = report["variability"]
        out += [f"## Output variability: {v['tuned']['samples']} samples at temperature {v['tuned']['temperature']}, "
                f"{v['tuned']['prompts']} prompts", "",
                _md_table(["model", "distinct answers / samples", "agreement with majority"],
                          [[k, _pct(x["distinct"]), _pct(x["majority_agreement"])] for k, x in v.items()]), ""]
    if "judge" in report:
        j = report["judge"]
        out += ["## LLM-as-judge (pairwise, both orders; a flip counts as a tie)", "",
                _md_table(["win", "tie", "loss", "position consistency", "unparseable"],
                          [[_pct(j["win"]), _pct(j["tie"]), _pct(j["loss"]), f"{100 * j['consistency']:.1f}%",
                            f"{100 * j['unparseable']:.1f}%"]]), "",
                f"Judge `{j['model']}` at `{j['url']}`, tuned vs {j['against']}, {j['n']} prompts. {j['note']}", ""]
    return "\n".join(out)


def _short(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split()).replace("`", "'")
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------------------------------------- HTML


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #dde1e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#4a5263;margin:0 0 12px}.meta b{color:#1d2330}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
th,td{border:1px solid #dde1e8;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#eefaf0}
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:10px 14px;margin:8px 0}
.ok{color:#17803d;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#6b7385}
.viewer td{max-width:330px;word-wrap:break-word}.viewer td.p{max-width:380px;color:#333}
ins{background:#d7f5dd;text-decoration:none}del{background:#fbd9d7;text-decoration:none}
.tag{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#eef1f5;color:#4a5263;
margin-left:4px}
.tag.w{background:#fbd9d7;color:#8a1c12}.tag.r{background:#d7f5dd;color:#135e2c}
button{font:inherit;padding:3px 10px;margin-right:6px;border:1px solid #c5cbd6;background:#fff;border-radius:4px;
cursor:pointer}
button.on{background:#1d2330;color:#fff}
svg text{font:11px system-ui,sans-serif;fill:#4a5263}
.scroll{overflow-x:auto}table.main td{white-space:nowrap}.ci{font-size:11px;color:#6b7385}
"""

_JS = """
function show(setId, mode, btn){
  document.querySelectorAll('#'+setId+' tr[data-row]').forEach(function(tr){
    var t=tr.dataset; var v = mode=='all' || (mode=='wrong' && t.tw=='1') || (mode=='diff' && t.diff=='1');
    tr.style.display = v ? '' : 'none';});
  btn.parentNode.querySelectorAll('button').forEach(function(b){b.classList.remove('on')}); btn.classList.add('on');
}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _main_table_html(report: dict, set_name: str, best: int | None) -> str:
    """The main table for the page: cost columns first, each metric's value over its interval (narrow)."""
    entry = report["sets"][set_name]
    metrics = metric_order(report, set_name)
    head = "".join(f"<th>{_e(h)}</th>" for h in ["column", "prompt tokens", "gen tok/s",
                                                   *(METRIC_NAMES.get(m, m) for m in metrics)])
    body = []
    for i, (name, col) in enumerate(entry["columns"].items()):
        cells = [f"<td>{_e(name)}</td>", f"<td class='num'>{col['prompt_tokens']:.0f}</td>",
                 f"<td class='num'>{col['tokens_per_s']:.1f}</td>"]
        for m in metrics:
            iv = col["metrics"][m]
            cells.append(f"<td class='num'><b>{100 * iv['value']:.1f}%</b><br><span class='ci'>"
                         f"[{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]</span></td>")
        body.append(f"<tr class='{'best' if i == best else ''}'>{''.join(cells)}</tr>")
    return f"<table class='main'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_table(header: list[str], rows: list[list[str]], cls: str = "", best_row: int | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td class='{'num' if j else ''}'>{_e(c)}</td>" for j, c in enumerate(row))
        body.append(f"<tr class='{'best' if i == best_row else ''}'>{cells}</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def word_diff(answer: str, reference: str) -> str:
    """``answer`` as HTML, its words that are not in the reference's place marked with <del>."""
    a, r = answer.split(), reference.split()
    if not a:
        return "<span class='muted'>(empty)</span>"
    out = []
    for op, i1, i2, _, _ in difflib.SequenceMatcher(None, a, r, autojunk=False).get_opcodes():
        words = _e(" ".join(a[i1:i2]))
        if i2 > i1:
            out.append(words if op == "equal" else f"<del>{words}</del>")
    return " ".join(out)


def loss_curve_svg(rows: list[dict], width: int = 560, height: int = 220) -> str:
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "step" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None and "step" in r]
    points = train + val
    if not points:
        return "<p class='muted'>no metrics.jsonl in the run</p>"
    pad_l, pad_b, pad_t, pad_r = 48, 26, 10, 12
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = 0.0, max(p[1] for p in points) * 1.05 or 1.0
    sx = (width - pad_l - pad_r) / max(x1 - x0, 1)
    sy = (height - pad_t - pad_b) / (y1 - y0)

    def xy(p: tuple[float, float]) -> str:
        return f"{pad_l + (p[0] - x0) * sx:.1f},{height - pad_b - (p[1] - y0) * sy:.1f}"

    # viewBox + max-width: the curve shrinks to a narrower column (the studio's Train tab) instead of being cut off
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' style='max-width:100%;height:auto' role='img' "
             f"aria-label='loss curve'><rect width='100%' height='100%' fill='#fff'/>"]
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        py = height - pad_b - (y - y0) * sy
        parts.append(f"<line x1='{pad_l}' x2='{width - pad_r}' y1='{py:.1f}' y2='{py:.1f}' stroke='#eef1f5'/>"
                     f"<text x='{pad_l - 6}' y='{py + 4:.1f}' text-anchor='end'>{y:.2f}</text>")
    parts.append(f"<text x='{pad_l}' y='{height - 6}'>step {x0}</text>"
                 f"<text x='{width - pad_r}' y='{height - 6}' text-anchor='end'>step {x1}</text>")
    if train:
        parts.append(f"<polyline fill='none' stroke='#3b6fd8' stroke-width='1.5' points='{' '.join(map(xy, train))}'/>")
    if val:
        parts.append(f"<polyline fill='none' stroke='#d8663b' stroke-width='2' points='{' '.join(map(xy, val))}'/>")
        parts += [f"<circle cx='{xy(p).split(',')[0]}' cy='{xy(p).split(',')[1]}' r='3' fill='#d8663b'/>" for p in val]
    parts.append("</svg>")
    legend = ("<div class='muted'><span style='color:#3b6fd8'>━ train loss</span> &nbsp; "
              "<span style='color:#d8663b'>━● validation loss</span></div>")
    return "".join(parts) + legend


def metric_chart_svg(entry: dict, metric: str, label: str, width: int = 560, bar: int = 18) -> str:
    """The set's ``metric`` per column as horizontal bars on a 0-100% axis, each with its 95% interval as a whisker
    (inline SVG: the page still opens offline). Each bar and whisker carries its numbers as ``data-`` attributes."""
    columns = [(name, col["metrics"][metric]) for name, col in entry["columns"].items() if metric in col["metrics"]]
    if not columns:
        return ""
    pad_l, pad_r, pad_t, gap = 96, 56, 18, 10
    plot = width - pad_l - pad_r
    height = pad_t + len(columns) * (bar + gap) + 22

    def x(v: float) -> float:
        return pad_l + max(0.0, min(1.0, v)) * plot

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' class='metric-chart' width='{width}' height='{height}' "
             f"role='img' aria-label='{_e(label)} per column'><rect width='100%' height='100%' fill='#fff'/>"]
    for k in range(5):
        px = x(k / 4)
        parts.append(f"<line x1='{px:.1f}' x2='{px:.1f}' y1='{pad_t - 6}' y2='{height - 20}' stroke='#eef1f5'/>"
                     f"<text x='{px:.1f}' y='{height - 6}' text-anchor='middle'>{25 * k}%</text>")
    for i, (name, iv) in enumerate(columns):
        y = pad_t + i * (bar + gap)
        mid = y + bar / 2
        lo, hi = x(iv["low"]), x(iv["high"])
        parts.append(f"<text x='{pad_l - 6}' y='{mid + 4:.1f}' text-anchor='end'>{_e(name)}</text>"
                     f"<rect class='bar' data-column='{_e(name)}' data-value='{iv['value']}' x='{pad_l}' y='{y}' "
                     f"width='{x(iv['value']) - pad_l:.1f}' height='{bar}' fill='#9db7ea'/>"
                     f"<g class='whisker' data-low='{iv['low']}' data-high='{iv['high']}' stroke='#1d2230'>"
                     f"<line x1='{lo:.1f}' x2='{hi:.1f}' y1='{mid:.1f}' y2='{mid:.1f}'/>"
                     f"<line x1='{lo:.1f}' x2='{lo:.1f}' y1='{mid - 5:.1f}' y2='{mid + 5:.1f}'/>"
                     f"<line x1='{hi:.1f}' x2='{hi:.1f}' y1='{mid - 5:.1f}' y2='{mid + 5:.1f}'/></g>"
                     f"<text x='{max(hi, x(iv['value'])) + 4:.1f}' y='{mid + 4:.1f}'>{100 * iv['value']:.1f}%</text>")
    parts.append("</svg>")
    return "".join(parts)


def _viewer(report: dict, name: str, entry: dict, limit: int) -> str:
    cols = entry["columns"]
    left = "base" if "base" in cols else next(iter(cols))
    right = "tuned" if "tuned" in cols else list(cols)[-1]
    main = report.get("main_metric")
    set_id = f"viewer-{name}"
    rows = []
    for i in range(min(limit, entry["n"])):
        ref = entry["references"][i]
        a, b = cols[left]["answers"][i], cols[right]["answers"][i]
        cat_a, cat_b = cols[left]["categories"][i], cols[right]["categories"][i]
        tags = "".join(f"<span class='tag {'w' if c else 'r'}'>{_e(c or 'right')}</span>" for c in (cat_a,))
        tags_b = "".join(f"<span class='tag {'w' if c else 'r'}'>{_e(c or 'right')}</span>" for c in (cat_b,))
        rows.append(f"<tr data-row='1' data-tw='{1 if cat_b else 0}' data-diff='{1 if a != b else 0}'>"
                    f"<td class='num'>{i}</td><td class='p'>{_e(entry['prompts'][i])}</td><td>{_e(ref)}</td>"
                    f"<td>{word_diff(a, ref)}{tags}</td><td>{word_diff(b, ref)}{tags_b}</td></tr>")
    buttons = (f"<button class='on' onclick=\"show('{set_id}','all',this)\">all</button>"
               f"<button onclick=\"show('{set_id}','wrong',this)\">{_e(right)} wrong</button>"
               f"<button onclick=\"show('{set_id}','diff',this)\">{_e(left)} ≠ {_e(right)}</button>")
    return (f"<h3>Side by side: first {min(limit, entry['n'])} prompts ({_e(left)} vs {_e(right)} vs reference; "
            f"<del>words not in the reference</del> marked; scored by {_e(main)})</h3>"
            f"<div>{buttons}</div><table class='viewer' id='{set_id}'><thead><tr><th>#</th><th>prompt</th>"
            f"<th>reference</th><th>{_e(left)}</th><th>{_e(right)}</th></tr></thead><tbody>{''.join(rows)}"
            "</tbody></table>")


def to_html(report: dict, sections: list[tuple[str, str]] | None = None) -> str:
    """The self-contained HTML report; ``sections``: (title, HTML) pairs appended after the report's own (the
    pipeline adds its stages and gates this way; their HTML is the caller's, escaped by it)."""
    meta = report.get("metadata", {})
    settings = meta.get("settings", {})
    body = [f"<h1>Evaluation of {_e(report['run'])}</h1>",
            f"<p class='meta'>base model <b>{_e(meta.get('base_model'))}</b> · method <b>{_e(meta.get('method'))}</b>"
            f" · trainable parameters <b>{_e(meta.get('trainable_params'))}</b> · steps {_e(meta.get('steps'))}"
            f" · training {_e(meta.get('train_wall_time_s'))} s · evaluation {_e(meta.get('eval_wall_time_s'))} s"
            f" · peak RSS {_e(meta.get('eval_peak_rss_mib'))} MiB</p>",
            "<p class='meta'>Greedy decoding, the run's chat template. Every number has its 95% bootstrap interval "
            "over examples in brackets.</p>"]
    hp = meta.get("hyperparameters") or {}
    if hp:
        body.append("<details class='card'><summary>hyperparameters, data and versions</summary>"
                    + _html_table(["key", "value"], [[k, str(v)] for k, v in hp.items()])
                    + _html_table(["data file", "sha256"], [[d.get("path"), d.get("sha256", "")[:16]]
                                                            for d in meta.get("data") or []])
                    + _html_table(["package", "version"],
                                  [[k, str(v)] for k, v in (meta.get("versions") or {}).items()])
                    + "</details>")
    for name, entry in report["sets"].items():
        main = report.get("main_metric")
        scores = [c["metrics"][main]["value"] for c in entry["columns"].values()] if main else []
        best = max(range(len(scores)), key=lambda i: scores[i]) if scores else None
        body.append(f"<h2>{_e(name)}: {entry['n']} examples <span class='muted'>({_e(entry['file'])})</span></h2>")
        body.append("<div class='scroll'>" + _main_table_html(report, name, best) + "</div>")
        if main:
            label = METRIC_NAMES.get(main, main)
            body.append(f"<h3>{_e(label)} per column, with its 95% interval</h3>"
                        + metric_chart_svg(entry, main, label))
        body.append("<h3>Held-out loss and perplexity</h3>"
                    + _html_table(["model", "loss", "perplexity", "tokens"], _loss_rows(entry)))
        if entry["paired"]:
            body.append("<h3>Paired bootstrap: tuned minus each baseline, same prompts</h3>"
                        + _html_table(["comparison", "metric", "difference", "P(not better)"],
                                      _paired_rows(report, entry)))
        tool_table = tool_call_rows(entry)
        if tool_table:
            body.append(f"<h3>Tool calls</h3><p class='meta'>{_e(TOOL_NOTE)}</p><div class='scroll'>"
                        + _html_table(*tool_table, cls="tools") + "</div>")
            if _paired_tool_rows(entry):
                body.append(_html_table(["comparison", "metric", "difference", "P(not better)"],
                                        _paired_tool_rows(entry), cls="tools-paired"))
        if "confusion" in entry["columns"].get("tuned", {}):
            table = entry["columns"]["tuned"]["confusion"]
            labels = list(next(iter(table.values())))
            body.append("<h3>Confusion (tuned): rows are the reference, columns the answer</h3>"
                        + _html_table(["reference", *labels], [[r, *(str(table[r][c]) for c in labels)]
                                                               for r in table]))
        cats = sorted({c for col in entry["columns"].values() for c in col["failures"]["counts"]})
        body.append("<h3>Failures by category</h3>" + _html_table(
            ["column", "wrong", *cats], [[n, str(c["failures"]["wrong"]), *(str(c["failures"]["counts"].get(k, 0))
                                                                          for k in cats)]
                                         for n, c in entry["columns"].items()]))
        examples = []
        for col_name, col in entry["columns"].items():
            for cat, exs in col["failures"]["examples"].items():
                for ex in exs[:2]:
                    examples.append([col_name, cat, _short(ex["prompt"], 120), ex["reference"],
                                     _short(ex["answer"], 120)])
        if examples:
            body.append("<details class='card'><summary>failure examples</summary>"
                        + _html_table(["column", "category", "prompt", "expected", "got"], examples) + "</details>")
        body.append(_viewer(report, name, entry, settings.get("viewer_examples", 80)))
    if report.get("sources"):
        body.append(f"<h2>Sources</h2><p class='meta'>{_e(SOURCES_NOTE)}</p>"
                    + _html_table(SOURCE_HEAD, source_loss_rows(report)))
    body.append("<h2>Loss curve</h2>" + loss_curve_svg(report.get("loss_curve") or []))
    if "forgetting" in report:
        f = report["forgetting"]
        verdict = ("<span class='ok'>passed</span>" if f["passed"] else "<span class='bad'>FAILED</span>")
        body.append(f"<h2>Forgetting</h2><p class='meta'>MMLU as a cloze task, {f['questions']} questions "
                    f"({_e(f['subset'])}, {f['subjects']} subjects); general-text perplexity on "
                    f"{_e(f['general_text']['file'])}</p>"
                    + _html_table(["check", "base", "tuned", "change"], _forgetting_rows(f))
                    + f"<p>Accuracy drop {100 * f['drop']['value']:.1f} points, allowed "
                      f"{100 * f['max_drop']:.1f}: {verdict}</p>")
    if "variability" in report:
        v = report["variability"]
        body.append(f"<h2>Output variability</h2><p class='meta'>{v['tuned']['samples']} samples per prompt at "
                    f"temperature {v['tuned']['temperature']}, {v['tuned']['prompts']} prompts</p>"
                    + _html_table(["model", "distinct answers / samples", "agreement with majority"],
                                  [[k, _pct(x["distinct"]), _pct(x["majority_agreement"])] for k, x in v.items()]))
    if "judge" in report:
        j = report["judge"]
        body.append("<h2>LLM-as-judge</h2>" + _html_table(
            ["win", "tie", "loss", "position consistency", "unparseable"],
            [[_pct(j["win"]), _pct(j["tie"]), _pct(j["loss"]), f"{100 * j['consistency']:.1f}%",
              f"{100 * j['unparseable']:.1f}%"]]) + f"<p class='meta'>{_e(j['note'])}</p>")
    for title, section in sections or []:
        body.append(f"<h2>{_e(title)}</h2>{section}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tuneforge eval: {_e(report['run'])}"
            f"</title><style>{_CSS}</style><script>{_JS}</script></head><body><main>{''.join(body)}</main></body></html>")


# ------------------------------------------------------------------------------------------------ writing


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write report.json, report.md and report.html into ``out_dir`` atomically (see the module docstring)."""
    record = EvalReport.model_validate(report)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        record.write(tmp / REPORT)
        (tmp / "report.md").write_text(to_markdown(report))
        (tmp / "report.html").write_text(to_html(report))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
