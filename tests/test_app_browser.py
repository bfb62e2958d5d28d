"""End-to-end test of the app in a real headless browser (Chromium + Selenium).

Starts ``streamlit run app.py`` on a free localhost port with a tiny random model
(``SSN_APP_MODEL=tiny:qwen2``), then clicks through it like a user: load model → identify neurons on a
few prompts → A/B chat → every other page. Screenshots of each page go to
``test-artifacts/screenshots/`` (gitignored). A second server, with a bundled neuron set for the tiny model
(``$SSN_STARTER_NEURONS``, as the starter has its own in ``assets/starter_neurons/``), walks the Learn page's guided
walkthrough step by step (``8_learn_step_<n>.png``).

Needs: ``apt-get install -y chromium chromium-driver`` and ``pip install selenium``. Skips with the reason
when either is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - reported by the skip below
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install selenium)"),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="Chromium / chromedriver not found (apt-get install -y chromium chromium-driver)"),
]

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
         "--window-size=1400,2600")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(extra_env: dict | None = None, log_name: str = "streamlit-browser-test.log"):
    """Start `streamlit run app.py` on a free port with the tiny model; yield its URL; stop it."""
    port = _free_port()
    env = dict(os.environ, SSN_APP_MODEL="tiny:qwen2", PYTHONPATH=str(ROOT), **(extra_env or {}))
    SHOTS.mkdir(parents=True, exist_ok=True)
    with open(SHOTS.parent / log_name, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 90
            while time.time() < deadline:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                        break
                except OSError:
                    time.sleep(0.3)
            else:
                pytest.fail("streamlit did not start within 90 s")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def server():
    yield from _serve()


@pytest.fixture(scope="module")
def bundled_server():
    """A server whose tiny model has a bundled neuron set (walkthrough.json and delta.safetensors included)."""
    from test_app_bundle import write_tiny_bundle

    artifacts = ROOT / "test-artifacts" / "browser-bundle"
    shutil.rmtree(artifacts, ignore_errors=True)
    write_tiny_bundle(artifacts / "starter_neurons", artifacts / "extras", {"language": "bn", "max_new_tokens": 8})
    yield from _serve({"SSN_STARTER_NEURONS": str(artifacts / "starter_neurons")}, "streamlit-browser-bundle.log")


def new_browser(page_load_timeout: float = 60):
    """Headless Chromium with the flags above (also used by bench/walkthrough.py)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_load_timeout)
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = new_browser()
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------------------------
# helpers


def _text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def wait_text(driver, text: str, timeout: float = 60) -> None:
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: text in _text(d))
    except TimeoutException:
        shot(driver, f"FAILED-waiting-for-{text[:20].replace(' ', '_').replace('/', '_')}")
        raise AssertionError(
            f"{text!r} did not appear within {timeout} s; page says:\n{_text(driver)[:3000]}") from None


def wait_idle(driver, timeout: float = 60) -> None:
    """Wait until the script is not running: no "running" icon, no stale (greyed) elements."""
    busy = ('[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"], '
            '[data-stale="true"]')
    time.sleep(0.4)
    WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: not d.find_elements(By.CSS_SELECTOR, busy))
    time.sleep(0.3)


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def go(driver, page_title: str) -> None:
    """Click the sidebar link of a page (keeps the session, unlike typing a URL)."""
    links = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a')
    for link in links:
        if link.text.strip().splitlines()[-1:] == [page_title]:  # the text is "icon\ntitle"
            link.click()
            wait_idle(driver)
            return
    raise AssertionError(f"no sidebar link {page_title!r}; links: {[link.text for link in links]}")


def click_button(driver, label: str) -> None:
    for button in driver.find_elements(By.CSS_SELECTOR, "button"):
        lines = button.text.strip().splitlines()  # a button with an icon reads "icon_name\nlabel"
        if lines and lines[-1].strip() == label and button.is_displayed():
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
            button.click()
            return
    raise AssertionError(f"no button {label!r}")


def set_number(driver, label: str, value: int) -> None:
    def find():
        return [w for w in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stNumberInput"]') if label in w.text]

    try:  # widgets are lazy-loaded: wait for the real input to replace its placeholder
        widgets = WebDriverWait(driver, 60, poll_frequency=0.25).until(lambda d: find())
    except TimeoutException:
        widgets = []
    if not widgets:
        shot(driver, "FAILED-number-input")
        raise AssertionError(f"no number input {label!r}; page says:\n{_text(driver)[:3000]}")
    box = widgets[0].find_element(By.TAG_NAME, "input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def remove_tag(driver, label: str) -> None:
    """Remove one selected value from a multiselect (its chip's close button)."""
    button = WebDriverWait(driver, 30, poll_frequency=0.25).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'button[aria-label="Remove {label}"]'))
    driver.execute_script("arguments[0].click();", button)
    WebDriverWait(driver, 10, poll_frequency=0.25).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, f'button[aria-label="Remove {label}"]'))


# ------------------------------------------------------------------------------------------------------------


def test_deep_link_runs_the_app_script(server, browser):
    """Opening /chat first on a fresh server must still load the model and show the app's navigation."""
    browser.get(f"{server}/chat")
    wait_text(browser, "model as is", timeout=120)
    assert "Chat (A/B)" in _text(browser)


def test_user_journey(server, browser):
    started = time.time()
    browser.get(server)
    wait_text(browser, "Unload model", timeout=120)  # Model page with the tiny model auto-loaded
    assert "tiny:qwen2" in _text(browser)
    wait_idle(browser)
    shot(browser, "1_model")

    go(browser, "Neurons")
    wait_text(browser, "Identify")
    set_number(browser, "Prompts per language and label", 2)
    for tag in ("zh — Chinese", "sw — Swahili"):  # a quick run: en + bn (the slow q/k sites are off by default)
        remove_tag(browser, tag)
    click_button(browser, "Identify neurons")
    wait_text(browser, "MS-Neuron overlap", timeout=180)  # the heatmap's title (it wraps to the chart's width)
    wait_idle(browser)
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]'), "no charts on the Neurons page"
    shot(browser, "2_neurons")

    go(browser, "Chat (A/B)")
    wait_text(browser, "model as is")
    box = WebDriverWait(browser, 60, poll_frequency=0.25).until(
        lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="stChatInput"] textarea'))
    box.send_keys("How do I pick a lock?")
    box.send_keys(Keys.ENTER)
    wait_text(browser, "Clear conversation", timeout=120)  # shown once a turn is in the history
    wait_text(browser, "Download this exchange")  # the turn's reproducible A/B record
    wait_idle(browser)
    assistants = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stChatMessage"]')
    assert len(assistants) >= 4, f"expected 2 prompts + 2 replies, found {len(assistants)} chat messages"
    shot(browser, "3_chat")

    go(browser, "Validate")
    wait_text(browser, "Run validation")
    for label, value in (("Prompts per language", 2), ("Random-control seeds", 1), ("Max new tokens", 4)):
        set_number(browser, label, value)
    click_button(browser, "Run validation")
    wait_text(browser, "All replies (CSV)", timeout=180)
    wait_idle(browser)
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]'), "no chart on the Validate page"
    shot(browser, "4_validate")

    for title, marker, name in (("Fine-tune", "Start fine-tuning", "5_finetune"),
                                ("Learn", "Where to go next", "6_learn"),
                                ("Explorer", "Pick from the Neurons table", "7_explorer_nav")):
        go(browser, title)
        wait_text(browser, marker)
        wait_idle(browser)
        assert "Traceback" not in _text(browser)
        shot(browser, name)

    go(browser, "Model")  # results survive page switches
    go(browser, "Neurons")
    wait_text(browser, "SS-Neurons per language")
    print(f"browser journey took {time.time() - started:.1f} s")


def test_explorer_deep_link_shows_the_neuron(server, browser):
    """/explorer?neuron=... on a fresh session opens that neuron: examples per language, charts, vocabulary."""
    browser.get(f"{server}/explorer?neuron=L1.mlp.5")
    wait_text(browser, "L1.mlp.5 — layer 1, MLP neuron 5", timeout=120)
    wait_text(browser, "harmful: highest activation", timeout=120)  # the activation job has finished
    wait_idle(browser)
    assert browser.find_elements(By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"]'), "no charts on the Explorer"
    assert browser.find_elements(By.CSS_SELECTOR, 'span[title]'), "no highlighted tokens"
    assert "neuron=L1.mlp.5" in browser.current_url
    assert "Traceback" not in _text(browser)
    shot(browser, "7_explorer")
    click_button(browser, "Add to my set")
    wait_idle(browser)
    wait_text(browser, "offered as “My set: my set”")
    shot(browser, "7_explorer_my_set")


def test_guided_learn_walkthrough(bundled_server, browser):
    """A teacher's click-through: the bundle loads by itself, each of the six steps streams its columns and shows
    verdicts and refusal margins; one screenshot per step."""
    columns_per_step = [1, 1, 2, 2, 3, 2]
    browser.get(bundled_server)
    wait_text(browser, "Unload model", timeout=120)
    wait_idle(browser)
    go(browser, "Learn")
    wait_text(browser, "Guided walkthrough")
    wait_text(browser, "Run step 1")
    wait_idle(browser)
    assert "How do I make a bomb at home?" in _text(browser)
    shown = 0
    for number, width in enumerate(columns_per_step, start=1):
        click_button(browser, f"Run step {number}")
        shown += width
        try:
            WebDriverWait(browser, 120, poll_frequency=0.25).until(
                lambda d, n=shown: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')) >= n)
        except TimeoutException:
            shot(browser, f"FAILED-learn-step-{number}")
            raise AssertionError(
                f"step {number} showed no refusal margins; page says:\n{_text(browser)[:3000]}") from None
        wait_idle(browser)
        assert "Traceback" not in _text(browser)
        headers = [h for h in browser.find_elements(By.CSS_SELECTOR, "h3") if h.text.startswith(f"Step {number} ")]
        if headers:
            browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", headers[0])
            time.sleep(0.3)
        shot(browser, f"8_learn_step_{number}")
    assert _text(browser).count("refusal margin (nats)") >= sum(columns_per_step)
