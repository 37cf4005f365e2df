#!/usr/bin/env python3
"""Opens the page of `kimi-actors serve` in headless Chromium (test tooling, run by tests/page.rs): types a
prompt, checks that tokens arrive over time, that the reply finishes, and that the expert heatmap changes.

Usage: python tests/tools/page_check.py URL
"""
import sys, tempfile, time
from selenium import webdriver
from selenium.webdriver.common.by import By

url = sys.argv[1]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--user-data-dir=" + tempfile.mkdtemp()]:
    opts.add_argument(a)
driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
try:
    driver.get(url)

    def wait(what, cond, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            v = cond()
            if v:
                return v
            time.sleep(0.05)
        raise SystemExit("timed out waiting for " + what)

    # The page re-renders the cluster view every second: read it in one script call, not element by element.
    def heat():
        return driver.execute_script(
            "return [...document.querySelectorAll('#heat .cell')].reduce((s, c) => s + Number(c.dataset.count), 0)")

    def node_row():
        return driver.execute_script("const r = document.querySelector('#nodes tbody tr'); return r ? r.innerText : ''")

    wait("the cluster view", node_row)
    wait("the heatmap", lambda: driver.execute_script("return document.querySelectorAll('#heat .cell').length"))
    before = heat()
    node = node_row()
    assert "local" in node and "layers 0-3" in node, node

    # Record every length the reply goes through as tokens arrive (faster than polling from here).
    driver.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
            const a = document.querySelector('#log .assistant');
            if (a) window.lengths.push(a.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    driver.find_element(By.ID, "prompt").send_keys("To be, or not to be")
    driver.find_element(By.ID, "send").click()
    wait("the end of the reply", lambda: driver.find_elements(By.CSS_SELECTOR, "#log .meta"))
    text = driver.find_element(By.CSS_SELECTOR, "#log .assistant").text
    assert len(text) > 20, text
    distinct = sorted(set(driver.execute_script("return window.lengths")))
    assert len(distinct) >= 3, f"the reply should appear in pieces, saw lengths {distinct}"
    after = wait("the heatmap to change", lambda: heat() > before and heat())
    print(f"ok: {len(text)} chars in {len(distinct)} visible steps; heatmap {before} -> {after}")
finally:
    driver.quit()
