#!/usr/bin/python3
"""The dashboard in a real browser: headless Chromium driven by Selenium (Debian's chromium,
chromium-driver and python3-selenium) against a live fleet that tests/tests/dashboard.rs starts.

Environment (set by that test):
  BERTH_API_URL        the API, e.g. http://127.0.0.1:41234
  BERTH_ADMIN_TOKEN    the admin token
  BERTH_KEY_A          an API key of project A, whose runner is BERTH_RUNNER_A
  BERTH_RUNNER_A       a runner printing a few lines slowly (so they appear live)
  BERTH_SLEEPER_A      a runner of project A that sleeps (stopped from the page)
  BERTH_RUNNER_B       a runner of project B, with one run BERTH_RUN_B
  BERTH_RUN_B
  BERTH_NODE_ID        the fleet's node
  BERTH_SCREENSHOTS    where each page's screenshot goes

Exits non-zero with a message on the first check that fails (and saves a screenshot of it).
"""

import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

API = os.environ["BERTH_API_URL"]
SHOTS = os.environ["BERTH_SCREENSHOTS"]
os.makedirs(SHOTS, exist_ok=True)


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


class Page:
    def __init__(self, driver):
        self.d = driver

    def wait(self, condition, what, timeout=30):
        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            self.shot("failed")
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    def css(self, selector, timeout=30):
        return self.wait(EC.presence_of_element_located((By.CSS_SELECTOR, selector)), selector, timeout)

    def attr(self, selector, name):
        """An attribute of the element now matching `selector` (None if there is none): read in
        one script, so a table re-rendered meanwhile cannot leave a stale reference."""
        return self.d.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
            selector, name)

    def text(self, selector):
        return self.d.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", selector)

    def click(self, selector, timeout=30):
        """Clicks the element matching `selector` once it is there (in one script: see attr)."""
        self.wait(lambda d: d.execute_script(
            "const e = document.querySelector(arguments[0]); if (!e || e.disabled) return false; e.click(); return true;",
            selector), f"{selector} to click", timeout)

    def go(self, fragment):
        self.d.get(f"{API}/ui/#{fragment}")

    def shot(self, name):
        path = os.path.join(SHOTS, f"{name}.png")
        self.d.save_screenshot(path)
        print(f"screenshot {path}", flush=True)

    def login(self, key):
        self.d.get(f"{API}/ui/")
        self.d.execute_script("sessionStorage.clear()")
        self.go("/login")
        field = self.css("#key")
        field.clear()
        field.send_keys(key)
        self.click("#login")
        self.wait(lambda d: not d.current_url.endswith("/login"), "the login to go through")


def text_of(page, selector):
    page.css(selector)
    return (page.text(selector) or "").strip()


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main():
    driver = browser()
    page = Page(driver)
    try:
        run_checks(page)
    except AssertionError as e:
        print(f"FAILED: {e}", flush=True)
        try:
            print(driver.get_log("browser"), flush=True)
        except Exception:  # the log is a help, not a check
            pass
        return 1
    finally:
        driver.quit()
    print("all dashboard checks passed", flush=True)
    return 0


def run_checks(page):
    d = page.d
    node = os.environ["BERTH_NODE_ID"]

    # A wrong key is refused on the login page itself.
    page.go("/login")
    page.css("#key").send_keys("berth_nope_0000000000000000")
    page.click("#login")
    page.wait(lambda d: (page.text("#login-error") or "") != "", "the login error")
    page.shot("login")

    # ---------------------------------------------------------------- the admin: the fleet
    page.login(os.environ["BERTH_ADMIN_TOKEN"])
    row = f'#nodes tr[data-node-id="{node}"]'
    page.css(row)
    page.wait(lambda d: page.attr(f"{row} [data-heartbeat]", "data-heartbeat") == "fresh", "a fresh heartbeat")
    check("fra" in text_of(page, row), f"the node's region: {text_of(page, row)}")
    page.shot("fleet")
    page.click(f"{row} button.drain")
    page.wait(lambda d: page.attr(row, "data-draining") == "true", "the node marked draining")
    status = text_of(page, f"{row} .status")
    check(status == "draining", f"the drained node says {status!r}")
    page.shot("fleet-draining")
    page.click(f"{row} button.resume")
    page.wait(lambda d: page.attr(row, "data-draining") == "false", "the node resumed")

    # ---------------------------------------------------------------- project A
    page.login(os.environ["BERTH_KEY_A"])
    check("Fleet" not in [a.text for a in d.find_elements(By.CSS_SELECTOR, "nav a") if a.is_displayed()],
          "a project key is offered the fleet")
    runner = os.environ["BERTH_RUNNER_A"]
    page.css(f'#runners tr[data-runner-id="{runner}"]')
    check(not d.find_elements(By.CSS_SELECTOR, f'#runners tr[data-runner-id="{os.environ["BERTH_RUNNER_B"]}"]'),
          "project A's key lists project B's runner")
    page.shot("runners")

    # Trigger a run: its lines appear while it runs, then its final state.
    page.go(f"/runners/{runner}")
    page.click("#trigger")
    page.wait(lambda d: "/runs/" in d.current_url, "the run page")
    page.wait(lambda d: (page.text("#run-status .status") or "") == "running", "the run running")
    page.wait(lambda d: "line 1" in (page.text("#logs") or ""), "the first line, live")
    check((page.text("#final") or "") == "", "the run ended before its first line was seen")
    page.shot("run-live")
    page.wait(lambda d: page.attr("#final", "data-status") == "succeeded", "the final state", 60)
    lines = (page.text("#logs") or "").splitlines()
    check(lines == [f"line {i}" for i in range(1, 6)], f"the run's lines, in order, once each: {lines}")
    # The status line is read again once the stream ends: it follows within moments.
    page.wait(lambda d: text_of(page, "#run-status .status") == "succeeded", "the status after the end")
    page.shot("run")

    # The runner's recent runs, newest first.
    page.go(f"/runners/{runner}")
    page.css("#runs tbody tr[data-run-id]")
    first = text_of(page, "#runs tbody tr")
    check("succeeded" in first, f"the newest run first: {first}")

    # Stop a running run from its page.
    sleeper = os.environ["BERTH_SLEEPER_A"]
    page.go(f"/runners/{sleeper}")
    page.click("#trigger")
    page.wait(lambda d: "/runs/" in d.current_url, "the sleeper's page")
    page.wait(lambda d: (page.text("#run-status .status") or "") == "running", "the sleeper running", 60)
    page.shot("run-stoppable")
    page.click("#stop")
    page.wait(lambda d: page.attr("#final", "data-status") == "canceled", "the stopped run's final state", 60)

    # The queue (nothing of A's waits now) and the usage per day.
    page.go("/queue")
    page.css("#queue")
    page.css("#running")
    page.shot("queue")
    page.go("/usage")
    day = time.strftime("%Y-%m-%d", time.gmtime())
    page.css(f'#usage tr[data-day="{day}"]')
    page.shot("usage")

    # ---------------------------------------------------------------- B's run is not A's
    page.go(f"/runs/{os.environ['BERTH_RUNNER_B']}/{os.environ['BERTH_RUN_B']}")
    error = text_of(page, "#page-error")
    check("Not found" in error, f"project A's key sees project B's run: {error}")
    page.shot("other-project")


if __name__ == "__main__":
    sys.exit(main())
