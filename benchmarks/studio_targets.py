"""The studio's targets (issue 29): a run started from the UI trains as fast as from the CLI (within 5%), and the
page stays responsive while it trains (a request answers within 1 s).

    python benchmarks/studio_targets.py                          # SmolLM2-135M, the quickstart, 40 steps, A/B x3
    python benchmarks/studio_targets.py --steps 60 --rounds 4 --out benchmarks/results/studio_targets_cpu_DATE.txt
    python benchmarks/studio_targets.py --model tiny --steps 3 --rounds 1     # a smoke test (random tiny model)

One studio (``tuneforge ui``) runs as its own process for the whole measurement. Each round trains the same config
(the quickstart's, with ``--steps`` steps and no evaluation until the end) twice, alternating:

- **A, CLI**: ``tuneforge train CONFIG`` in a fresh process; the studio is up but no page polls it.
- **B, UI**: the Train tab's Start button (its endpoint ``/on_start``, called through ``gradio_client`` with the
  form's values: the studio itself starts ``tuneforge train``), while this script does what an open page does
  every second: a GET of the page and the Train tab's live-view tick (``/on_tick``: status, loss curve, log).

tokens/s is each run's last ``avg_tokens_per_s`` in ``metrics.jsonl`` (tokens trained / wall seconds since the
first step); the ratio is B's mean over A's. Latency is each poll's wall time (p50, p95, max) over every B run; the
studio process's CPU seconds per wall second during A and B (from ``/proc``) show what the UI itself takes.
The poller runs in this process and takes its own share of the cores, as a browser would.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "tuneforge" / "recipes" / "quickstart.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(RECIPE), help="run config to train (default: the quickstart's)")
    p.add_argument("--model", default=None, help="base model (default: the config's); 'tiny': a random tiny "
                                                 "SmolLM2-shaped model, for a smoke test")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=3, help="A/B alternations")
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between the page's polls during a UI run")
    p.add_argument("--out", help="also write the table (and the raw numbers, as JSON lines) to this file")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tuneforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", *args]


def config_tree(path: str, model: str | None, steps: int) -> dict[str, Any]:
    """The config with absolute data paths, ``steps`` steps, validation only at the end (``eval`` and
    ``output_dir`` left out: the form has neither)."""
    tree = yaml.safe_load(Path(path).read_text())
    base = Path(path).resolve().parent
    for key in ("train", "validation"):
        if isinstance(tree.get("data", {}).get(key), str):
            tree["data"][key] = str((base / tree["data"][key]).resolve())
    tree.pop("eval", None)
    tree.pop("output_dir", None)
    tree.update(max_steps=steps, eval_every=steps)
    if model:
        tree["model"] = model
    return tree


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def form_values(tree: dict[str, Any]) -> list[Any]:
    """The Start button's inputs after the run name: every form field, the config's value where it sets one."""
    from tuneforge.studio.form import _yaml_text
    from tuneforge.studio.train_tab import form_fields

    given = flat(tree)
    fields = form_fields()
    unknown = set(given) - {f.key for f in fields}
    if unknown:
        raise SystemExit(f"--config: keys the studio's form does not have: {sorted(unknown)}")
    values = []
    for f in fields:
        if f.key not in given:
            values.append(f.default)
        elif f.kind == "text":
            values.append(_yaml_text(given[f.key]))
        else:
            values.append(given[f.key] if f.kind == "bool" else str(given[f.key]))
    return values


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` itself, not its children (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("avg_tokens_per_s") is not None]
    if not rows:
        raise SystemExit(f"{run_dir}: no training rows in metrics.jsonl (see its log)")
    return float(rows[-1]["avg_tokens_per_s"])


def wait_finished(run_dir: Path, timeout_s: float = 3600) -> None:
    from tuneforge.studio import process

    deadline = time.monotonic() + timeout_s
    time.sleep(1)
    while process.read_pid(run_dir) is not None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{run_dir}: still training after {timeout_s:.0f} s")
        time.sleep(0.5)
    if not (run_dir / "run.json").is_file():
        raise SystemExit(f"{run_dir}: the run did not finish: {run_dir / 'studio.log'}")


class Poller(threading.Thread):
    """What an open page does while a run trains: every ``every_s`` a GET of the page and the live-view tick."""

    def __init__(self, url: str, client: Any, run_dir: str, every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.client, self.run_dir, self.every_s = url, client, run_dir, every_s
        self.page_s: list[float] = []
        self.tick_s: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.perf_counter()
            try:                        # a failed request counts as never answered (inf)
                with urllib.request.urlopen(self.url, timeout=30) as r:
                    r.read()
                t1 = time.perf_counter()
                self.page_s.append(t1 - t0)
            except OSError:
                t1 = time.perf_counter()
                self.page_s.append(float("inf"))
            try:
                self.client.predict(self.run_dir, api_name="/on_tick")
                self.tick_s.append(time.perf_counter() - t1)
            except Exception:
                self.tick_s.append(float("inf"))
            t2 = time.perf_counter()
            self.done.wait(max(0.0, self.every_s - (t2 - t0)))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gradio_client import Client

    work = Path(tempfile.mkdtemp(prefix="studio-targets-"))
    model = args.model
    if model == "tiny":
        from tuneforge.models.loading import build_tiny_model, load_tokenizer

        build_tiny_model("smollm2-135m-instruct", seed=0).save_pretrained(work / "tiny")
        load_tokenizer("smollm2-135m-instruct").save_pretrained(work / "tiny")
        model = str(work / "tiny")
    tree = config_tree(args.config, model, args.steps)
    values = form_values(tree)
    runs = work / "runs"
    runs.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    ui_log = open(work / "ui.log", "wb")
    ui = subprocess.Popen(tuneforge("ui", "--runs", str(runs), "--port", str(port), "--model", str(tree["model"])),
                          stdout=ui_log, stderr=subprocess.STDOUT)
    results: list[dict[str, Any]] = []
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if ui.poll() is not None:
                    raise SystemExit(f"tuneforge ui exited: {work / 'ui.log'}") from None
                time.sleep(0.5)
        client = Client(url, verbose=False)
        for i in range(args.rounds):
            # A: the command line
            run_dir = runs / f"cli-{i}"
            config = work / f"cli-{i}.yaml"
            config.write_text(yaml.safe_dump({**tree, "output_dir": str(run_dir)}, sort_keys=False))
            ui_cpu, t0 = cpu_s(ui.pid), time.monotonic()
            with open(work / f"cli-{i}.log", "wb") as log:
                rc = subprocess.run(tuneforge("train", str(config)), stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise SystemExit(f"tuneforge train exited {rc}: {work / f'cli-{i}.log'}")
            wall = time.monotonic() - t0
            results.append({"kind": "cli", "round": i, "tokens_per_s": tokens_per_s(run_dir), "wall_s": wall,
                            "ui_cpu_per_s": (cpu_s(ui.pid) - ui_cpu) / wall})
            # B: the studio's Start button, with the page polling
            name = f"ui-{i}"
            ui_cpu, t0 = cpu_s(ui.pid), time.monotonic()
            message = client.predict(name, *values, api_name="/on_start")[0]
            if "started" not in str(message):
                raise SystemExit(f"the studio did not start the run: {message}")
            poller = Poller(url, Client(url, verbose=False), str(runs / name), args.poll_s)
            poller.start()
            wait_finished(runs / name)
            poller.done.set()
            poller.join()
            wall = time.monotonic() - t0
            results.append({"kind": "ui", "round": i, "tokens_per_s": tokens_per_s(runs / name), "wall_s": wall,
                            "ui_cpu_per_s": (cpu_s(ui.pid) - ui_cpu) / wall, "page_s": poller.page_s,
                            "tick_s": poller.tick_s})
    finally:
        ui.terminate()
        ui.wait(30)
        ui_log.close()
    text = table(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n" + "".join(json.dumps(r) + "\n" for r in results))
    return 0


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cli = [r for r in results if r["kind"] == "cli"]
    ui = [r for r in results if r["kind"] == "ui"]
    a, b = statistics.mean(r["tokens_per_s"] for r in cli), statistics.mean(r["tokens_per_s"] for r in ui)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"# studio targets: {args.steps} steps x {args.rounds} rounds (A: CLI, B: UI), {args.config}, "
             f"model {args.model or 'the config'}, {os.cpu_count()} cores, {when}",
             "", "| run | round | tokens/s | wall s | studio CPU s per s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['round']} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['ui_cpu_per_s']:.3f} |")
    lines += ["", f"UI / CLI tokens/s: {b / a:.3f} (target: >= 0.95)", "",
              "| request (every {:.0f} s during UI runs) | n | p50 s | p95 s | max s |".format(args.poll_s),
              "|---|---|---|---|---|"]
    for what, key in (("GET / (the page)", "page_s"), ("/on_tick (Train tab's live view)", "tick_s")):
        values = [v for r in ui for v in r[key]]
        if values:
            lines.append(f"| {what} | {len(values)} | {pct(values, 0.5):.3f} | {pct(values, 0.95):.3f} | "
                         f"{max(values):.3f} |")
    lines.append("\ntarget: every request within 1 s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
