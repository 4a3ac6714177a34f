"""The studio in a real browser: Debian's chromium driven by Selenium (headless) through Debian's chromedriver.

One studio serves the whole module (a tiny random model of SmolLM2's shape as its base, the runs in a temporary
folder); the tests run in order: load the quickstart data and see the preview, refuse an invalid setting, train 3
steps and watch the loss curve get points, stop a run and resume it, chat with the base and the run side by side,
evaluate two runs and see their reports side by side, package the run, have a bad export refused, and serve it
(one request through the openai client to the URL the page shows, then stopped).
A failed test saves a screenshot (its path in the failure); ``TUNEFORGE_STUDIO_SHOTS=DIR`` saves every tab's
screenshot there (the docs' pictures: docs/guides/img/studio-*.png).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="the studio needs Gradio: pip install -e '.[ui]' (CI installs it)")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need Selenium (the test extra)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("the browser tests need Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver; .ci/run installs them)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SHOTS = os.environ.get("TUNEFORGE_STUDIO_SHOTS")
DATA = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "recipes" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    """The studio on a free local port: ``(url, runs folder)``; every process it started is stopped at the end."""
    from tuneforge.studio import process
    from tuneforge.studio.app import build_app, calm_queue

    folder = tmp_path_factory.mktemp("studio-runs")
    app = build_app(folder, model=str(tiny_model_dir))
    app.queue()
    calm_queue(app)                     # as tuneforge ui does
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}", folder
    for run in folder.iterdir():
        process.stop(run, wait_s=10)
    app.close()


@pytest.fixture(scope="module")
def browser(studio):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(studio[0])
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "runs-table"))
    yield driver
    driver.quit()


@contextlib.contextmanager
def screenshot_on_failure(driver, name: str, tmp_path: Path):
    try:
        yield
    except BaseException as e:
        path = tmp_path / f"{name}.png"
        driver.save_screenshot(str(path))
        raise AssertionError(f"{e}\nscreenshot of the page: {path}") from e


def tab(driver, name: str) -> None:
    button = next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']") if b.text.strip() == name)
    button.click()
    time.sleep(0.5)


def shoot(driver, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"studio-{name}.png"))


def text_of(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def set_field(driver, elem_id: str, value: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)
    box.send_keys(Keys.TAB)


def points(status: str) -> int:
    """The train loss points the status line counts ("... loss points: N train, M validation ...")."""
    found = re.search(r"loss points: (\d+) train", status)
    return int(found.group(1)) if found else 0


def wait_for(driver, condition, timeout: float = 60, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition, message=what)


def test_data_tab_shows_the_quickstart_preview_and_curation_report(browser, tmp_path):
    with screenshot_on_failure(browser, "data", tmp_path):
        tab(browser, "Data")
        picked = browser.find_element(By.CSS_SELECTOR, "#data-file input").get_attribute("value")
        assert picked.endswith("tickets_train.jsonl"), picked        # the quickstart's data, picked by default
        browser.find_element(By.ID, "data-load").click()
        marks = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#data-preview mark.trained"),
                         what="the preview with its trained tokens marked")
        assert marks[0].text.strip() in {"billing", "shipping", "refund", "login", "bug", "feature"} or \
            marks[0].text.strip().split("<")[0] in {"billing", "shipping", "refund", "login", "bug", "feature"}
        wait_for(browser, lambda d: "records in 1 file" in d.find_element(By.CSS_SELECTOR, "#data-summary textarea")
                 .get_attribute("value"), what="the curation report")
        shoot(browser, "data")


def test_train_refuses_an_invalid_value_beside_its_field(browser, studio, tmp_path):
    with screenshot_on_failure(browser, "train-invalid", tmp_path):
        tab(browser, "Train")
        set_field(browser, "train-name", "bad")
        set_field(browser, "cfg-lora-r", "0")
        browser.find_element(By.ID, "train-start").click()
        wait_for(browser, lambda d: "nothing started" in text_of(d, "train-message"), what="the refusal")
        assert "greater than or equal to 1" in text_of(browser, "cfg-lora-r")   # the schema's message, beside r
        assert not (studio[1] / "bad").exists()
        set_field(browser, "cfg-lora-r", "8")


def test_a_3_step_run_draws_its_loss_curve_and_finishes(browser, studio, tmp_path):
    with screenshot_on_failure(browser, "train", tmp_path):
        tab(browser, "Train")
        set_field(browser, "train-name", "three")
        set_field(browser, "cfg-max_steps", "3")
        set_field(browser, "cfg-batch_size", "2")
        set_field(browser, "cfg-eval_every", "1")
        set_field(browser, "cfg-data-val_max_examples", "8")
        browser.find_element(By.ID, "train-start").click()
        wait_for(browser, lambda d: "started" in text_of(d, "train-message"), 20, "the start")
        wait_for(browser, lambda d: points(text_of(d, "train-status")) > 0, 90, "the first loss points")
        wait_for(browser, lambda d: "finished" in text_of(d, "train-status"), 90, "the run to finish")
        assert "loss points: 3 train" in text_of(browser, "train-status")
        wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#train-curve svg polyline"), 20,
                 "the loss curve")
        assert (studio[1] / "three" / "run.json").is_file()
        shoot(browser, "train")
        tab(browser, "Runs")
        browser.find_element(By.ID, "runs-refresh").click()
        wait_for(browser, lambda d: "three" in text_of(d, "runs-table") and "finished" in text_of(d, "runs-table"),
                 20, "the run in the Runs tab")
        shoot(browser, "runs")


def test_stop_and_resume_a_run(browser, studio, tmp_path):
    with screenshot_on_failure(browser, "stop-resume", tmp_path):
        tab(browser, "Train")
        set_field(browser, "train-name", "long")
        set_field(browser, "cfg-max_steps", "100000")      # the tiny model trains ~30 steps/s: stopped long before
        set_field(browser, "cfg-eval_every", "100000")
        browser.find_element(By.ID, "train-start").click()
        wait_for(browser, lambda d: "train-run" and "long" in d.find_element(By.CSS_SELECTOR, "#train-run input")
                 .get_attribute("value"), 20, "the new run watched")
        wait_for(browser, lambda d: "running" in text_of(d, "train-status") and "step 0 " not in
                 text_of(d, "train-status") and "step 0 /" not in text_of(d, "train-status"), 90, "training steps")
        browser.find_element(By.ID, "train-start").click()          # a second Start while it trains
        wait_for(browser, lambda d: "refused" in text_of(d, "train-message"), 20, "the second start refused")
        browser.find_element(By.ID, "train-stop").click()
        wait_for(browser, lambda d: "stopped" in text_of(d, "train-status"), 60, "the stopped run")
        stopped_at = int(text_of(browser, "train-status").split("step ")[1].split(" ")[0])
        browser.find_element(By.ID, "train-resume").click()
        wait_for(browser, lambda d: "running" in text_of(d, "train-status") and
                 int(text_of(d, "train-status").split("step ")[1].split(" ")[0]) > stopped_at, 90, "resumed steps")
        browser.find_element(By.ID, "train-stop").click()
        wait_for(browser, lambda d: "stopped" in text_of(d, "train-status"), 60, "stopped again")


def test_chat_answers_with_base_and_run_side_by_side(browser, studio, tmp_path):
    with screenshot_on_failure(browser, "chat", tmp_path):
        tab(browser, "Chat")
        runs = browser.find_element(By.CSS_SELECTOR, "#chat-runs input")
        runs.send_keys(str(studio[1] / "three"))
        runs.send_keys(Keys.ENTER)
        set_field(browser, "chat-prompt", "Hello")
        browser.find_element(By.ID, "chat-send").click()

        def answered(d) -> bool:        # a random tiny model's answers may be blank: count what streamed
            return text_of(d, "chat-status").count("done (") == 2

        wait_for(browser, answered, 90, "both answers")
        assert "three" in text_of(browser, "chat-answer-1")          # the run's column is labelled with its name
        assert "error" not in text_of(browser, "chat-status")
        shoot(browser, "chat")


def choose(driver, elem_id: str, value: str) -> None:
    """Type ``value`` into the dropdown ``elem_id`` (the runs' dropdowns take a path typed in) and pick it."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    box.send_keys(value)
    box.send_keys(Keys.ENTER)
    driver.find_element(By.TAG_NAME, "h2").click()         # away from it: its list of choices closes


def report_rows(driver, elem_id: str) -> list[str]:
    """The column names in the rows of the embedded report's metric table (``table.main``), read inside its iframe;
    sorted (the report orders the rows by score)."""
    frames = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} iframe")
    if not frames:
        return []
    driver.switch_to.frame(frames[0])
    try:
        return sorted(td.text.strip() for td in driver.find_elements(By.CSS_SELECTOR,
                                                                     "table.main tbody tr td:first-child"))
    finally:
        driver.switch_to.default_content()


def test_evaluate_a_run_and_compare_two_reports_side_by_side(browser, studio, tmp_path):
    """Two finished runs evaluated from the tab with different columns (``three``: base and tuned; ``three-b``, a
    copy of its run directory: tuned alone), then shown side by side: each frame holds its own run's metric table."""
    folder = studio[1]
    shutil.copytree(folder / "three", folder / "three-b", ignore=shutil.ignore_patterns("eval", "studio*"))
    with screenshot_on_failure(browser, "evaluate", tmp_path):
        tab(browser, "Evaluate")
        set_field(browser, "eval-data", str(DATA / "tickets_test.jsonl"))
        set_field(browser, "eval-max", "2")
        choose(browser, "eval-run", str(folder / "three-b"))
        browser.find_element(By.XPATH, "//*[@id='eval-columns']//label[normalize-space()='base']").click()
        browser.find_element(By.ID, "eval-start").click()
        wait_for(browser, lambda d: "evaluating three-b" in text_of(d, "eval-message"), 20, "the first evaluation")
        choose(browser, "eval-run", str(folder / "three"))
        browser.find_element(By.XPATH, "//*[@id='eval-columns']//label[normalize-space()='base']").click()
        browser.find_element(By.ID, "eval-start").click()
        wait_for(browser, lambda d: "evaluating three " in text_of(d, "eval-message") + " ", 20, "the second one")
        wait_for(browser, lambda d: report_rows(d, "eval-report") == ["base", "tuned"], 120,
                 "three's report embedded, its metric table with the base and tuned rows")
        assert "report:" in browser.find_element(By.CSS_SELECTOR, "#eval-log textarea").get_attribute("value")
        choose(browser, "eval-other", str(folder / "three-b"))
        wait_for(browser, lambda d: report_rows(d, "eval-report-other") == ["tuned"], 120,
                 "three-b's report beside it (tuned alone)")
        assert report_rows(browser, "eval-report") == ["base", "tuned"]
        shoot(browser, "evaluate")


def test_ship_packages_refuses_a_bad_export_and_serves_a_run(browser, studio, tmp_path):
    from openai import OpenAI

    folder = studio[1]
    with screenshot_on_failure(browser, "ship", tmp_path):
        tab(browser, "Ship")
        choose(browser, "ship-run", str(folder / "three"))
        browser.find_element(By.ID, "ship-package").click()
        package = folder / "three-package"
        wait_for(browser, lambda d: f"into {package}" in text_of(d, "ship-message"), 20, "the packaging started")
        wait_for(browser, lambda d: f"-> {package}" in browser.find_element(By.CSS_SELECTOR, "#ship-log textarea")
                 .get_attribute("value"), 60, "the package's report in the log")
        assert (package / "tuneforge.json").is_file() and (package / "adapter_model.safetensors").is_file()

        # the quantization choices offered; a run that is not a folder is refused with its message
        browser.find_element(By.CSS_SELECTOR, "#ship-quant input").click()
        offered = wait_for(browser, lambda d: [li.text.strip(" ✓\n") for li in d.find_elements(
            By.CSS_SELECTOR, "li[data-testid=dropdown-option]") if li.is_displayed()], 10, "the quantization choices")
        from tuneforge.export.gguf import QUANTS
        assert offered == list(QUANTS)
        browser.find_element(By.TAG_NAME, "h2").click()
        choose(browser, "ship-run", str(folder / "no-such-run"))
        browser.find_element(By.ID, "ship-export").click()
        wait_for(browser, lambda d: "is not a folder" in text_of(d, "ship-message"), 20, "the refusal")
        choose(browser, "ship-run", str(folder / "three"))           # back to the run: its log in the picture

        choose(browser, "ship-adapters", str(folder / "three"))
        port = _free_port()
        set_field(browser, "ship-port", str(port))
        browser.find_element(By.ID, "ship-serve").click()
        wait_for(browser, lambda d: "serving at" in text_of(d, "ship-serving"), 20, "the server's URL")
        shown = text_of(browser, "ship-serving")
        url = re.search(r"serving at (http://\S+)", shown).group(1)
        assert url == f"http://127.0.0.1:{port}"
        assert f"curl {url}/v1/chat/completions" in shown and f'OpenAI(base_url="{url}/v1"' in shown
        wait_for(browser, lambda d: "server running (pid" in text_of(d, "ship-serve-status"), 20, "its status")
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:                     # the server loads the base model first: its port opens when ready
            try:
                answer = client.chat.completions.create(model="three", max_tokens=4,
                                                        messages=[{"role": "user", "content": "Hello"}])
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].finish_reason in \
            {"stop", "length"}
        assert answer.model == "three"
        shoot(browser, "ship")
        browser.find_element(By.ID, "ship-serve-stop").click()
        wait_for(browser, lambda d: "server stopped" in text_of(d, "ship-serving"), 30, "the server stopped")
        wait_for(browser, lambda d: "no server running" in text_of(d, "ship-serve-status"), 20, "its status")
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        tab(browser, "Runs")
        browser.find_element(By.ID, "runs-refresh").click()
        time.sleep(1)
        listed = text_of(browser, "runs-table")
        assert "three-package" not in listed and ".serve" not in listed     # a package and the server are not runs
