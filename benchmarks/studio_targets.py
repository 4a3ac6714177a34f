"""The studio's targets (issue 29): a run started from the UI trains as fast as from the CLI (within 5%), and the
page stays responsive while it trains (a request answers within 1 s).

    python benchmarks/studio_targets.py                          # SmolLM2-135M, the quickstart, 40 steps, A/B x3
    python benchmarks/studio_targets.py --steps 60 --rounds 4 --out benchmarks/results/studio_targets_cpu_DATE.txt
    python benchmarks/studio_targets.py --model tiny --steps 3 --rounds 1     # a smoke test (random tiny model)
    python benchmarks/studio_targets.py --client none        # the studio's process alone beside the UI runs

One studio (``tuneforge ui``) runs as its own process for the whole measurement. Each round trains the same config
(the quickstart's, with ``--steps`` steps and no evaluation until the end) twice, alternating:

- **A, CLI**: ``tuneforge train CONFIG`` in a fresh process; the studio is up but no page is open on it.
- **B, UI**: the Train tab's Start button (its endpoint ``/on_start``, called through ``gradio_client`` with the
  form's values: the studio itself starts ``tuneforge train``), watched by the ``--client``:

  - ``browser`` (the default where Debian's chromium and chromedriver and Selenium are installed): a real headless
    chromium, as the browser tests drive it, with the studio open on the Train tab for the whole run, as a user
    watching it (the page's own timer asks for the live view every second); this script measures responsiveness
    beside it with a light request every ``--poll-s``: a GET of ``/gradio_api/app_id`` (a few bytes, answered by
    the studio's server as every request is). The page is loaded before the Start and closed (``about:blank``)
    after the run, so the CLI runs have no page open;
  - ``poller`` (the default without a browser): this script asks what an open page asks, and more (an open tab
    does not fetch the whole page again): a GET of the page and the live-view tick (``/on_tick``: status, loss curve,
    log) every ``--poll-s``;
  - ``none``: nothing watches (the studio's process alone beside the run); no latency is measured.

tokens/s is each run's last ``avg_tokens_per_s`` in ``metrics.jsonl`` (tokens trained / wall seconds since the
first step); the ratio is B's mean over A's. Latency is each request's wall time (p50, p95, max) over every B run;
the studio process's CPU seconds per wall second during A and B (from ``/proc``) show what the UI itself takes, and
with ``browser`` the chromium processes' too. The client shares the cores with the run, as a browser on the same
machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    p.add_argument("--poll-s", type=float, default=1.0, help="seconds between the client's requests during a UI run")
    p.add_argument("--client", choices=["poller", "browser", "none"], default=None,
                   help="what watches the UI runs: a headless chromium on the Train tab (default where chromium, "
                        "chromedriver and Selenium are installed), this script polling the page and the live view "
                        "(default otherwise), or nothing")
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


def timed_get(url: str) -> float:
    """The wall seconds of a GET of ``url`` (read to the end); a failed request counts as never answered (inf)."""
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
    except OSError:
        return float("inf")
    return time.perf_counter() - t0


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
            self.page_s.append(timed_get(self.url))
            t1 = time.perf_counter()
            try:
                self.client.predict(self.run_dir, api_name="/on_tick")
                self.tick_s.append(time.perf_counter() - t1)
            except Exception:
                self.tick_s.append(float("inf"))
            t2 = time.perf_counter()
            self.done.wait(max(0.0, self.every_s - (t2 - t0)))


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
LIGHT_REQUEST = "gradio_api/app_id"


def browser_available() -> bool:
    """Debian's chromium and chromedriver and Selenium, as the browser tests need them."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


class Prober(threading.Thread):
    """Responsiveness beside an open page: every ``every_s`` a GET of a small endpoint; each one's wall time."""

    def __init__(self, url: str, every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.probe_s: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            t0 = time.perf_counter()
            self.probe_s.append(timed_get(self.url))
            self.done.wait(max(0.0, self.every_s - (time.perf_counter() - t0)))


class Browser:
    """A headless chromium driven by Selenium (the options of tests/test_studio_browser.py), started once; it opens
    the studio on the Train tab for a UI run and leaves it (``about:blank``) afterwards."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                    "--disable-gpu"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)

    def watch(self, url: str) -> None:
        """Open the studio and show the Train tab (its live view then asks every second, as for a user)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(url)
        WebDriverWait(self.driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role='tab']"))
        tab = next(b for b in self.driver.find_elements(By.CSS_SELECTOR, "button[role='tab']")
                   if b.text.strip() == "Train")
        tab.click()
        WebDriverWait(self.driver, 60).until(lambda d: d.find_element(By.ID, "train-status").is_displayed())

    def status(self) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, "train-status").text

    def leave(self) -> None:
        self.driver.get("about:blank")

    def cpu_s(self) -> float:
        """CPU seconds of chromedriver and every process under it (chromium's browser, GPU, renderer processes)."""
        pid = self.driver.service.process.pid
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        tree, grew = {pid}, True
        while grew:
            below = {p for p, parent in parents.items() if parent in tree} - tree
            tree |= below
            grew = bool(below)
        total = 0.0
        for p in tree:
            try:
                total += cpu_s(p)
            except (OSError, IndexError):
                continue
        return total

    def close(self) -> None:
        self.driver.quit()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client is None:
        args.client = "browser" if browser_available() else "poller"
    elif args.client == "browser" and not browser_available():
        raise SystemExit("--client browser needs Debian's chromium and chromium-driver (apt-get install chromium "
                         "chromium-driver) and Selenium (pip install selenium)")
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
    browser: Browser | None = None
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
        if args.client == "browser":
            browser = Browser()
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
            # B: the studio's Start button, watched by the client
            name = f"ui-{i}"
            if browser is not None:
                browser.watch(url)      # loaded before the Start: a user opens the page, then starts the run
            ui_cpu, t0 = cpu_s(ui.pid), time.monotonic()
            browser_cpu = browser.cpu_s() if browser is not None else 0.0
            message = client.predict(name, *values, api_name="/on_start")[0]
            if "started" not in str(message):
                raise SystemExit(f"the studio did not start the run: {message}")
            watcher: Poller | Prober | None = None
            if args.client == "poller":
                watcher = Poller(url, Client(url, verbose=False), str(runs / name), args.poll_s)
            elif args.client == "browser":
                watcher = Prober(url + LIGHT_REQUEST, args.poll_s)
            if watcher is not None:
                watcher.start()
            wait_finished(runs / name)
            if watcher is not None:
                watcher.done.set()
                watcher.join()
            wall = time.monotonic() - t0
            row: dict[str, Any] = {"kind": "ui", "round": i, "tokens_per_s": tokens_per_s(runs / name),
                                   "wall_s": wall, "ui_cpu_per_s": (cpu_s(ui.pid) - ui_cpu) / wall}
            if isinstance(watcher, Poller):
                row.update(page_s=watcher.page_s, tick_s=watcher.tick_s)
            elif isinstance(watcher, Prober):
                row.update(probe_s=watcher.probe_s)
            if browser is not None:
                row["browser_cpu_per_s"] = (browser.cpu_s() - browser_cpu) / wall
                time.sleep(args.poll_s + 1)                 # the page's last ticks: it shows the finished run
                row["page_status"] = browser.status()
                browser.leave()
            results.append(row)
    finally:
        if browser is not None:
            browser.close()
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
    watched = {"browser": "a headless chromium open on the Train tab", "poller": "this script polling the page "
               "and /on_tick", "none": "nothing"}[args.client]
    lines = [f"# studio targets: {args.steps} steps x {args.rounds} rounds (A: CLI, B: UI), {args.config}, "
             f"model {args.model or 'the config'}, {os.cpu_count()} cores, client {args.client} (UI runs watched "
             f"by {watched}), {when}",
             "", "| run | round | tokens/s | wall s | studio CPU s per s | browser CPU s per s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        shown = f"{r['browser_cpu_per_s']:.3f}" if "browser_cpu_per_s" in r else ""
        lines.append(f"| {r['kind']} | {r['round']} | {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | "
                     f"{r['ui_cpu_per_s']:.3f} | {shown} |")
    lines += ["", f"UI / CLI tokens/s: {b / a:.3f} (target: >= 0.95)"]
    if args.client == "none":
        return "\n".join(lines + ["", "no client: latency not measured (--client browser or poller measures it)"])
    lines += ["", "| request (every {:.0f} s during UI runs) | n | p50 s | p95 s | max s |".format(args.poll_s),
              "|---|---|---|---|---|"]
    for what, key in (("GET / (the page)", "page_s"), ("/on_tick (Train tab's live view)", "tick_s"),
                      (f"GET /{LIGHT_REQUEST} (beside the open page)", "probe_s")):
        values = [v for r in ui for v in r.get(key, [])]
        if values:
            lines.append(f"| {what} | {len(values)} | {pct(values, 0.5):.3f} | {pct(values, 0.95):.3f} | "
                         f"{max(values):.3f} |")
    lines.append("\ntarget: every request within 1 s")
    seen = [r["page_status"] for r in ui if r.get("page_status")]
    if seen:
        lines += ["", "the open page's status line after each UI run: " + " | ".join(seen)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
