"""The teacher's timing: how long from starting the app to each step of the guided Learn walkthrough, on the real
starter model with its bundled neuron set, in a real headless browser; one screenshot per step.

    python bench/walkthrough.py [--steps 4] [--shots docs/img]

What `make run` does after its first time (the venv and the starter cache exist): start `streamlit run app.py`. This
script starts the same server on a free localhost port, opens it in Chromium, waits until the starter model is loaded
(the sidebar offers "Unload model"), opens Learn and presses "Run step 1", "Run step 2", ... in turn, waiting for each
step's refusal margins. It prints the seconds from the server's start to each milestone (absolute wall time: a
demo's latency on this machine, not a ratio; say the load average beside it). Needs Chromium, chromedriver and
selenium, like the browser test, whose helpers it uses.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_app_browser import (
    CHROMEDRIVER,
    CHROMIUM,
    By,
    WebDriverWait,
    _free_port,
    _text,
    click_button,
    go,
    new_browser,
    wait_idle,
    wait_text,
    webdriver,
)

COLUMNS_PER_STEP = [1, 1, 2, 2, 3, 2]  # result columns each step adds (as in test_guided_learn_walkthrough)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="walk steps 1..N (default 4)")
    parser.add_argument("--shots", default=str(ROOT / "test-artifacts" / "walkthrough"),
                        help="folder for learn_step_<n>.png")
    args = parser.parse_args()
    if webdriver is None or CHROMIUM is None or CHROMEDRIVER is None:
        print("needs selenium, chromium and chromedriver (make browser)", file=sys.stderr)
        return 2
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SSN_APP_MODEL", "SSN_STARTER_NEURONS")}
    env["HF_HUB_OFFLINE"] = "1"
    started = time.time()
    marks: list[tuple[str, float]] = []
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    browser = new_browser(page_load_timeout=120)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.3)
            if time.time() - started > 120:
                raise RuntimeError("streamlit did not start within 120 s")
        marks.append(("server up", time.time() - started))
        browser.get(url)
        wait_text(browser, "Unload model", timeout=600)
        wait_idle(browser, timeout=600)
        marks.append(("starter loaded, bundle installed", time.time() - started))
        go(browser, "Learn")
        wait_text(browser, "Run step 1", timeout=120)
        wait_idle(browser)
        shown = 0
        for number, width in enumerate(COLUMNS_PER_STEP[:args.steps], start=1):
            click_button(browser, f"Run step {number}")
            shown += width
            WebDriverWait(browser, 900, poll_frequency=0.5).until(
                lambda d, n=shown: len(d.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')) >= n)
            wait_idle(browser, timeout=900)
            marks.append((f"step {number} shown", time.time() - started))
            headers = [h for h in browser.find_elements(By.CSS_SELECTOR, "h3") if h.text.startswith(f"Step {number} ")]
            if headers:
                browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", headers[0])
                time.sleep(0.3)
            browser.save_screenshot(str(shots / f"learn_step_{number}.png"))
        assert "Traceback" not in _text(browser)
    finally:
        browser.quit()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    load = os.getloadavg()
    for label, seconds in marks:
        print(f"{seconds:7.1f} s  {label}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; screenshots in {shots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
