"""`pgm serve` measured through its page in Debian's chromium: the race view (a PGM against a
masked model, the same request on both) at a few batch sizes, and four tabs at once (each tab's
latency against the same request alone, and whether each got its own samples). Writes the JSON,
prints a table, and saves the README's screenshots.

    python benchmarks/serve_race.py runs/text-small runs/mdlm-small --out docs/serve

The models work on this process's main thread, as under `pgm serve`; the browser runs on another.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

import pgm
from pgm.serve import running
from pgm.serve.app import create_app, run_names

PROMPT = "It was"
TABS = [("It was", 0), ("The Emperor", 1), ("She said", 2), ("In the morning", 3)]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,820"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait_for(driver, script: str, timeout: float = 600, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(script)


def fill(driver, form: str, values: dict) -> None:
    from selenium.webdriver.common.by import By

    for name, value in values.items():
        field = driver.find_element(By.CSS_SELECTOR, f'#{form} [name="{name}"]')
        field.clear()
        field.send_keys(str(value))


def open_panel(driver, url: str, panel: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/")
    wait_for(driver, "return document.querySelectorAll('.text-runs option').length > 0")
    driver.find_element(By.CSS_SELECTOR, f'#tabs .tab[data-panel="{panel}"]').click()


def race(driver, url: str, samples: int, screenshots: Path | None) -> dict:
    from selenium.webdriver.common.by import By

    open_panel(driver, url, "race")
    driver.find_element(By.ID, "race-prompt").send_keys(PROMPT)
    fill(driver, "race-form", {"num_samples": samples})
    driver.find_element(By.ID, "race-go").click()
    if screenshots:  # the moment the PGM is done and the masked model is still writing
        wait_for(driver, "return window.pgmLog.some(e => e.panel === 'race-a' && e.kind === 'done')", every=0.005)
        driver.save_screenshot(str(screenshots / "race.png"))
    ratio = float(wait_for(driver, "return document.getElementById('race-result').dataset.ratio"))
    done = driver.execute_script("return window.pgmLog.filter(e => e.kind === 'done')")
    rates = {entry["panel"]: entry["rate"] for entry in done}
    return {"num_samples": samples, "pgm_tokens_per_second": rates["race-a"],
            "masked_tokens_per_second": rates["race-b"], "ratio": ratio,
            "page_says": driver.find_element(By.ID, "race-result").text}


def write_screenshot(driver, url: str, screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    open_panel(driver, url, "write")
    driver.find_element(By.ID, "write-prompt").send_keys("The Emperor Napoleon {{40}} and the army {{30}}")
    fill(driver, "write-form", {"steps": 64, "num_samples": 2})
    driver.find_element(By.ID, "write-go").click()
    wait_for(driver, "return window.pgmLog.filter(e => e.panel === 'write' && e.kind === 'step').length >= 20",
             every=0.005)
    driver.save_screenshot(str(screenshots / "write.png"))
    wait_for(driver, "return window.pgmLog.some(e => e.panel === 'write' && e.kind === 'done')")


def tabs_at_once(driver, url: str, run: str) -> list[dict]:
    """Four tabs started together, then each request alone; latency from the click to the samples."""
    from selenium.webdriver.common.by import By

    def start(prompt, seed):
        open_panel(driver, url, "write")
        driver.find_element(By.ID, "write-prompt").send_keys(prompt)
        fill(driver, "write-form", {"seed": seed})
        driver.execute_script("window.pgmLog = []")

    def latency():
        entries = driver.execute_script("return window.pgmLog")
        submitted = next(e["at"] for e in entries if e["kind"] == "submit")
        done = next(e for e in entries if e["kind"] == "done")
        return (done["at"] - submitted) / 1000, done["texts"][0]

    handles = []
    for number, (prompt, seed) in enumerate(TABS):
        if number:
            driver.switch_to.new_window("tab")
        handles.append(driver.current_window_handle)
        start(prompt, seed)
    for handle in handles:  # click Generate in every tab, one right after the other
        driver.switch_to.window(handle)
        driver.find_element(By.ID, "write-go").click()
    results = []
    for handle, (prompt, seed) in zip(handles, TABS):
        driver.switch_to.window(handle)
        wait_for(driver, "return window.pgmLog.some(e => e.kind === 'done')")
        seconds, text = latency()
        expected = httpx.post(f"{url}/generate", json={"run": run, "prompt": prompt, "seed": seed}, timeout=600)
        results.append({"prompt": prompt, "seed": seed, "together_seconds": seconds,
                        "own_samples": text == expected.json()["texts"][0]})
    for handle, result in zip(handles, results):  # the same requests one at a time
        driver.switch_to.window(handle)
        driver.execute_script("window.pgmLog = []")
        driver.find_element(By.ID, "write-go").click()
        wait_for(driver, "return window.pgmLog.some(e => e.kind === 'done')")
        result["alone_seconds"] = latency()[0]
    for handle in handles[1:]:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(handles[0])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pgm_run")
    parser.add_argument("masked_run")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", default="docs/serve")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = run_names([args.pgm_run, args.masked_run])
    pipelines = {name: pgm.load(source) for name, source in zip(names, (args.pgm_run, args.masked_run))}
    app = create_app(pipelines, worker_thread=False)
    results: dict = {}

    def measure(url: str) -> None:
        driver = browser()
        try:
            write_screenshot(driver, url, out)
            results["race"] = [race(driver, url, samples, out if samples == args.samples[0] else None)
                               for samples in args.samples]
            results["tabs"] = tabs_at_once(driver, url, names[0])
        finally:
            driver.quit()
            app.state.scheduler.close()

    with running(app) as url:
        client = threading.Thread(target=measure, args=(url,))
        client.start()
        app.state.scheduler.work()
        client.join()
    results["setup"] = {"pgm": repr(pipelines[names[0]]), "masked": repr(pipelines[names[1]]), "prompt": PROMPT,
                        "steps": "default (one per position up to 128)"}
    (out / "serve.json").write_text(json.dumps(results, indent=1))
    print("| samples per request | PGM tokens/s | masked tokens/s | ratio |\n|---:|---:|---:|---:|")
    for row in results["race"]:
        print(f"| {row['num_samples']} | {row['pgm_tokens_per_second']:.0f} | {row['masked_tokens_per_second']:.0f} | "
              f"{row['ratio']:.2f}x |")
    print("\n| tab | prompt | 4 tabs at once: s | alone: s | its own samples |\n|---:|---|---:|---:|---|")
    for number, row in enumerate(results["tabs"], 1):
        print(f"| {number} | {row['prompt']} | {row['together_seconds']:.2f} | {row['alone_seconds']:.2f} | "
              f"{'yes' if row['own_samples'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
