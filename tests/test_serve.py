"""`pgm serve`: the JSON API and the stream against the pipeline's own answers, a server that
behaves (bad input, several requests at once, cancelling, taking turns), and the page in a real
browser (Debian's chromium driven by Selenium)."""

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import tiny_mdlm

import pgm
from pgm.pipeline import Stream
from pgm.serve import running
from pgm.serve.app import create_app, run_names
from pgm.serve.scheduler import Job, Scheduler


def slowed(pipe, seconds: float):
    """`pipe` with every event of its streams delayed, so that a request lasts long enough to watch,
    overlap with another or be cancelled."""
    stream = pipe.stream

    def slow_stream(**arguments):
        inner = stream(**arguments)

        def events():
            try:
                for event in inner:
                    time.sleep(seconds)
                    yield event
            finally:
                inner.close()

        return Stream(inner.given, inner.length, events())

    pipe.stream = slow_stream
    return pipe


@pytest.fixture(scope="module")
def mdlm_dir(text_run, tmp_path_factory):
    """A tiny MDLM with the text run's tokenizer and length: the other side of a race."""
    pipe = pgm.load(text_run)
    directory = tmp_path_factory.mktemp("mdlm") / "tiny-mdlm"
    tiny_mdlm(vocab_size=pipe.config.vocab_size, length=pipe.config.length).save_pretrained(directory, pipe.tokenizer)
    return directory


@pytest.fixture(scope="module")
def server(text_run, mdlm_dir):
    pipelines = {"tiny": pgm.load(text_run), "tiny-mdlm": pgm.load(mdlm_dir)}
    with running(create_app(pipelines, max_samples=8)) as url:
        yield url, pipelines


def test_generate_takes_the_encoder_cache_and_refuses_it_for_a_masked_model(server):
    url, pipelines = server
    body = {"run": "tiny", "prompt": "It was", "steps": 8, "seed": 2, "cache_refresh": "never"}
    answer = httpx.post(f"{url}/generate", json=body, timeout=60).json()
    assert answer["texts"] == pipelines["tiny"].generate(prompt="It was", steps=8, seed=2, cache_refresh="never")
    assert answer["settings"]["cache_refresh"] == "never"
    refused = httpx.post(f"{url}/generate", json={**body, "run": "tiny-mdlm"}, timeout=60)
    assert refused.status_code == 400
    message = refused.json()["error"]
    assert message.startswith("the encoder cache (cache_refresh) is for PGM models; ") and message.endswith(
        "tiny-mdlm holds a mdlm model")


def events_of(lines) -> list[tuple[str, dict]]:
    """The (event, data) pairs of the lines of a server-sent event stream."""
    kind, found = None, []
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            found.append((kind, json.loads(line[6:])))
    return found


def stream(url: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", f"{url}/stream", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return events_of(response.iter_lines())


def test_generate_answers_what_the_pipeline_generates(server):
    url, pipelines = server
    request = dict(prompt=["It was", "The old man"], num_samples=2, length=16, steps=5, seed=3, order="confidence")
    answer = httpx.post(f"{url}/generate", json={"run": "tiny", **request}, timeout=60).json()
    assert answer["texts"] == pipelines["tiny"].generate(**request)
    assert answer["generated"] == 4 * (16 - 1) - 2 * len(pipelines["tiny"].tokenizer.encode_batch(["It was"])[0]) \
        - 2 * len(pipelines["tiny"].tokenizer.encode_batch(["The old man"])[0])
    assert answer["tokens_per_second"] == pytest.approx(answer["generated"] / answer["seconds"])
    assert 0 < answer["seconds"] <= answer["wall_seconds"]
    mdlm = httpx.post(f"{url}/generate", json={"run": "tiny-mdlm", "infill": "It {{3}} was", "seed": 1}, timeout=60)
    assert mdlm.json()["texts"] == pipelines["tiny-mdlm"].generate(infill="It {{3}} was", seed=1)


def test_stream_sends_the_given_tokens_then_each_step_then_the_samples(server):
    url, pipelines = server
    request = dict(infill="It was {{4}} and {{3}}", steps=4, seed=2)
    events = stream(url, {"run": "tiny", **request})
    kinds = [kind for kind, _ in events]
    assert kinds == ["start", "step", "step", "step", "step", "done"]
    start, steps, done = events[0][1], [data for _, data in events[1:-1]], events[-1][1]
    samples = pipelines["tiny"].sample(**request)
    known = samples.known[0].nonzero()[:, 0].tolist()
    assert start["positions"] == [known] and start["length"] == samples.tokens.shape[1] and start["rows"] == 1
    assert start["pieces"][0] == [pipelines["tiny"].tokenizer.decode([t]) for t in samples.tokens[0, known].tolist()]
    committed = sorted(p for data in steps for p in data["positions"][0])
    assert committed == (~samples.known[0]).nonzero()[:, 0].tolist()  # every gap position once
    for data in steps:
        assert data["tokens"][0] == samples.tokens[0, data["positions"][0]].tolist()
    assert [data["generated"] for data in steps] == [sum(len(d["positions"][0]) for d in steps[:i + 1])
                                                     for i in range(4)]
    elapsed = [data["elapsed"] for data in steps]
    assert elapsed == sorted(elapsed) and done["seconds"] >= elapsed[-1]
    assert done["texts"] == samples.outputs and done["generated"] == 7


@pytest.mark.parametrize("body, status, says", [
    ({"prompt": "x"}, 400, "name the run to use: one of tiny, tiny-mdlm"),
    ({"run": "nope"}, 404, "no run named 'nope'"),
    ({"run": "tiny", "prompt": "the " * 300}, 400, "more than the model's"),
    ({"run": "tiny", "steps": 0}, 400, "steps must be a positive integer"),
    ({"run": "tiny", "order": "spiral"}, 400, "order must be one of"),
    ({"run": "tiny", "infill": "a {{two}} b"}, 400, "is not a positive number of tokens"),
    ({"run": "tiny", "infill": "a {{2} b"}, 400, "unmatched"),
    ({"run": "tiny", "temperature": "hot"}, 400, "temperature must be a finite number"),
    ('{"run": "tiny", "temperature": 1e400}', 400, "temperature must be a finite number"),  # JSON's inf
    ({"run": "tiny", "colour": "red"}, 400, "unknown argument 'colour'"),
    ({"run": "tiny", "classes": [1]}, 400, "classes applies to image models"),
    ({"run": "tiny-mdlm", "order": "confidence"}, 400, "decoding orders other than random are for PGM models"),
    ({"run": "tiny", "num_samples": 9}, 400, "more than this server's limit of 8"),
    ({"run": "tiny", "prompt": ["a", "b"], "num_samples": 5}, 400, "asks for 10 samples"),
    ([1, 2], 400, "must be a JSON object"),
])
@pytest.mark.parametrize("endpoint", ["generate", "stream"])
def test_bad_requests_get_one_sentence_and_a_4xx_and_the_server_goes_on(server, endpoint, body, status, says):
    url, _ = server
    given = dict(content=body) if isinstance(body, str) else dict(json=body)
    answer = httpx.post(f"{url}/{endpoint}", **given, timeout=60)
    assert answer.status_code == status and says in answer.json()["error"]
    assert answer.json()["error"].count("\n") == 0
    assert httpx.post(f"{url}/generate", json={"run": "tiny", "length": 6}, timeout=60).status_code == 200


def test_malformed_json_and_unknown_pages_are_refused(server):
    url, _ = server
    answer = httpx.post(f"{url}/generate", content=b"{prompt: ", timeout=60)
    assert answer.status_code == 400 and answer.json()["error"].startswith("the request body must be JSON")
    assert httpx.get(f"{url}/validation/tiny/0.png").status_code == 404
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok" and health["runs"] == ["tiny", "tiny-mdlm"]


def test_requests_at_once_each_get_their_own_samples_and_take_turns(text_run):
    pipe = slowed(pgm.load(text_run), 0.01)
    requests = [dict(prompt=prompt, length=20, steps=10, seed=seed)
                for prompt, seed in (("It was", 0), ("The old", 1), ("It was", 2), ("She said", 0))]
    expected = [pipe.generate(**request) for request in requests]
    results, started, finished = [None] * 4, [0.0] * 4, [0.0] * 4
    with running(create_app({"tiny": pipe})) as url:
        def client(index):
            with httpx.stream("POST", f"{url}/stream", json=requests[index], timeout=60) as response:
                lines = response.iter_lines()
                assert next(lines) == "event: start"
                started[index] = time.perf_counter()
                results[index] = events_of(lines)[-1][1]["texts"]
                finished[index] = time.perf_counter()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        health = httpx.get(f"{url}/healthz").json()
    assert results == expected  # nothing mixed up between requests
    assert health["completed"] == 4 and health["active"] == 0
    assert max(started) < min(finished)  # all four were under way together, taking turns


def test_a_closed_stream_cancels_its_request(text_run):
    pipe = slowed(pgm.load(text_run), 0.05)
    with running(create_app({"tiny": pipe})) as url:
        with httpx.stream("POST", f"{url}/stream", json={}, timeout=60) as response:  # 31 steps of 0.05 s
            assert response.status_code == 200
            for line in response.iter_lines():
                if line == "event: step":
                    break  # the client goes away after the first step, like a closed tab
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/healthz").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/healthz").json()
    assert health["active"] == 0 and health["cancelled"] == 1 and health["completed"] == 0


def test_a_full_server_answers_503(text_run):
    # Slow enough that the stream cannot finish before the second request, even on a loaded machine
    # (at 0.05 s a step it once did in CI); the client leaves it after its first line.
    pipe = slowed(pgm.load(text_run), 0.5)
    with running(create_app({"tiny": pipe}, capacity=1)) as url:
        with httpx.stream("POST", f"{url}/stream", json={}, timeout=60) as response:
            next(response.iter_lines())
            busy = httpx.post(f"{url}/generate", json={"length": 6}, timeout=60)
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
        assert httpx.get(f"{url}/healthz").json()["refused"] == 1


class FakeStream:
    """A stream whose steps take a given time and record when they ran."""

    def __init__(self, name, cost, steps, log):
        self.name, self.cost, self.steps, self.log, self.step = name, cost, steps, log, 0
        self.given = pgm.StepEvent(-1, steps, 0.0, [[]], [[]])

    def __next__(self):
        time.sleep(self.cost)
        self.step += 1
        self.log.append(self.name)
        return pgm.StepEvent(self.step, self.steps, 0.0, [[self.step]], [[0]], done=self.step == self.steps)

    def close(self):
        pass


def test_the_worker_gives_each_request_an_equal_share_and_times_its_own_steps():
    log, finished = [], {}
    scheduler = Scheduler(thread=False)
    jobs = {}
    for name, cost in (("cheap", 0.002), ("dear", 0.006)):
        def deliver(kind, message, name=name):
            if kind == "done":
                finished[name] = len(log)
        jobs[name] = Job(lambda name=name, cost=cost: FakeStream(name, cost, 30, log), lambda *a: {}, deliver)
        scheduler.submit(jobs[name])
    worker = threading.Thread(target=scheduler.work)
    worker.start()
    deadline = time.monotonic() + 10
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.close()
    worker.join()
    # Equal shares: while both run, about 3 cheap steps for each dear one; the cheap one ends first.
    assert finished["cheap"] < finished["dear"]
    both = log[:finished["cheap"]]
    assert 2.0 < both.count("cheap") / both.count("dear") < 4.5
    for name, cost in (("cheap", 0.002), ("dear", 0.006)):
        assert jobs[name].generated == 30 and 30 * cost <= jobs[name].sampling_seconds < 30 * cost * 2.5
    assert scheduler.counts["completed"] == 2


def test_a_late_request_starts_level_with_the_others_instead_of_owning_the_worker():
    log, done = [], threading.Event()
    scheduler = Scheduler(thread=False)

    class Stepping(FakeStream):
        def __next__(self):
            if self.step == 20:  # the early request has had 20 steps when the late one arrives
                scheduler.submit(late)
            return super().__next__()

    late = Job(lambda: FakeStream("late", 0.001, 10, log), lambda *a: {},
               lambda kind, message: kind == "done" and done.set())
    scheduler.submit(Job(lambda: Stepping("early", 0.001, 60, log), lambda *a: {}, lambda *a: None))
    worker = threading.Thread(target=scheduler.work)
    worker.start()
    done.wait(10)
    scheduler.close()
    worker.join()
    after = log[log.index("late"):][:10]
    assert after.count("early") >= 3  # they alternate from the start, not 20 late steps first


def test_run_names_are_short_and_distinct():
    assert run_names(["runs/text-small", "other/text-small/", "a/mdlm-small", "text-small"]) == \
        ["text-small", "text-small-2", "mdlm-small", "text-small-3"]


# --- images ---------------------------------------------------------------------------------------

def png_pixels(data_url: str):
    import numpy as np
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def test_image_runs_generate_stream_previews_and_inpaint(image_runs):
    import numpy as np

    pipe = pgm.load(image_runs / "pgm")
    with running(create_app({"fmnist": pipe}, preview_every=2)) as url:
        request = dict(classes=["bag", 3], guidance=2, steps=4, seed=1)
        answer = httpx.post(f"{url}/generate", json=request, timeout=60).json()
        expected = pipe.generate(**request)
        assert [np.array_equal(png_pixels(u), np.asarray(p)) for u, p in zip(answer["images"], expected)] == [1, 1]
        assert answer["labels"] == [8, 3]

        events = stream(url, request)
        previews = [data for kind, data in events if kind == "step" and "images" in data]
        assert [data["step"] for data in previews] == [1, 3]  # every second step
        grey = png_pixels(previews[0]["images"][0])
        cells, side = pipe.tokenizer.grid_size, grey.shape[0] // pipe.tokenizer.grid_size
        committed = {p for kind, data in events[1:3] for p in data["positions"][0]}
        for cell in set(range(cells * cells)) - committed:  # still unknown after two steps: flat grey
            row, column = divmod(cell, cells)
            assert (grey[row * side:(row + 1) * side, column * side:(column + 1) * side] == 128).all()

        thumbnail = httpx.get(f"{url}/validation/fmnist/2.png")
        assert thumbnail.headers["content-type"] == "image/png"
        codes = pipe.data.val[[2]][0][:, 1:]
        assert np.array_equal(png_pixels("data:image/png;base64," + base64.b64encode(thumbnail.content).decode()),
                              np.asarray(pgm.pipeline.to_pictures(pipe.decode_codes(codes))[0]))
        picture = "data:image/png;base64," + base64.b64encode(thumbnail.content).decode()
        inpainted = httpx.post(f"{url}/generate", json=dict(known="left", images=[picture], classes=["1"], steps=4),
                               timeout=60).json()
        from PIL import Image

        by_hand = pipe.generate(known="left", images=[Image.open(io.BytesIO(thumbnail.content))], classes=["1"],
                                steps=4)
        assert np.array_equal(png_pixels(inpainted["images"][0]), np.asarray(by_hand[0]))
        runs = httpx.get(f"{url}/runs").json()["runs"][0]
        assert runs["classes"][8] == "Bag" and runs["validation"][2]["label"] == int(pipe.data.val.labels_of([2])[0])
        refused = httpx.post(f"{url}/generate", json=dict(known="left", images=["not an image"]), timeout=60)
        assert refused.status_code == 400 and "is not a PNG" in refused.json()["error"]
        refused = httpx.post(f"{url}/generate", json=dict(prompt="a"), timeout=60)
        assert refused.status_code == 400 and "prompt applies to text models" in refused.json()["error"]


# --- the command ----------------------------------------------------------------------------------

def test_pgm_serve_serves_until_interrupted(text_run):
    # A shell without job control starts background commands with SIGINT ignored, and a child
    # inherits that: the server gets the default disposition back, as under a terminal.
    process = subprocess.Popen([sys.executable, "-m", "pgm", "serve", str(text_run), "--port", "0"],
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stderr:
            if line.startswith("serving "):
                break
        url = line.split(" at ")[1].split("/ ")[0]
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        assert httpx.get(f"{url}/healthz").json()["runs"] == ["tiny"]
        assert len(httpx.post(f"{url}/generate", json={"length": 8}, timeout=60).json()["texts"]) == 1
        page = httpx.get(f"{url}/")
        assert "<script src=\"/static/app.js\">" in page.text and "http" not in page.text.split("<body>")[1]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()


@pytest.mark.parametrize("arguments, says", [
    (["--port", "70000"], "--port must lie in [0, 65535]"),
    (["--max-samples", "0"], "--max-samples must be at least 1"),
])
def test_pgm_serve_refuses_bad_options(pgm_main, text_run, arguments, says):
    code, _, err = pgm_main("serve", text_run, *arguments)
    assert code == 2 and says in err


def test_pgm_serve_refuses_a_model_that_does_not_generate(pgm_main, image_runs):
    code, _, err = pgm_main("serve", image_runs / "vq", "--port", "0")
    assert code == 2 and "does not generate: serve a text or image model" in err


def test_a_taken_port_is_one_sentence(pgm_main, text_run):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        code, _, err = pgm_main("serve", text_run, "--port", taken.getsockname()[1])
    finally:
        taken.close()
    assert code == 2 and "cannot listen on 127.0.0.1:" in err and "choose another --port" in err


# --- the page, in a real browser ------------------------------------------------------------------

def chromium():
    """A headless Debian chromium through its chromedriver; skipped where they are not installed,
    unless PGM_REQUIRE_BROWSER is set (CI), where that is a failure."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("PGM_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def log_of(driver, panel: str) -> list[dict]:
    return driver.execute_script(f"return window.pgmLog.filter(e => e.panel === '{panel}')")


def open_page(driver, url: str, panel: str):
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/")
    wait_for(driver, "return document.querySelectorAll('.text-runs option').length "
                     "+ document.querySelectorAll('.image-runs option').length > 0")
    driver.find_element(By.CSS_SELECTOR, f'#tabs .tab[data-panel="{panel}"]').click()


@pytest.fixture(scope="module")
def page_server(text_run, mdlm_dir):
    pipelines = {"tiny": slowed(pgm.load(text_run), 0.03), "tiny-mdlm": slowed(pgm.load(mdlm_dir), 0.03)}
    with running(create_app(pipelines)) as url:
        yield url, pipelines


def test_the_page_streams_a_prompt_and_a_second_tab_gets_its_own_result(browser, page_server):
    from selenium.webdriver.common.by import By

    url, pipelines = page_server
    requests = {"first": ("It was", 3), "second": ("The old man", 5)}
    tabs = {}
    for name, (prompt, seed) in requests.items():
        if tabs:
            browser.switch_to.new_window("tab")
        tabs[name] = browser.current_window_handle
        open_page(browser, url, "write")
        browser.find_element(By.ID, "write-prompt").send_keys(prompt)
        for field, value in (("steps", 24), ("length", 32), ("seed", seed)):
            box = browser.find_element(By.CSS_SELECTOR, f'#write-form input[name="{field}"]')
            box.clear()
            box.send_keys(str(value))
        browser.find_element(By.ID, "write-go").click()
    for name, (prompt, seed) in requests.items():
        browser.switch_to.window(tabs[name])
        text = wait_for(browser, "const s = document.querySelector('#write-output .sample.done'); "
                                 "return s && s.dataset.text")
        assert text == pipelines["tiny"].generate(prompt=prompt, steps=24, length=32, seed=seed)[0]
        assert text.startswith(prompt)
        given = browser.find_elements(By.CSS_SELECTOR, "#write-output .tok.given")
        assert "".join(browser.execute_script("return arguments[0].textContent", e) for e in given) == prompt
        steps = [entry for entry in log_of(browser, "write") if entry["kind"] == "step"]
        filled = [entry["filled"][0] for entry in steps]
        assert len(steps) == 24 and filled == sorted(set(filled)) and filled[-1] == 31  # one state per step
        assert "done: 24 steps" in browser.find_element(By.ID, "write-status").text
    browser.close()
    browser.switch_to.window(tabs["first"])


def test_the_page_says_what_is_wrong_and_goes_on(browser, page_server):
    from selenium.webdriver.common.by import By

    url, _ = page_server
    open_page(browser, url, "write")
    browser.find_element(By.ID, "write-prompt").send_keys("the " * 200)
    browser.find_element(By.ID, "write-go").click()
    message = wait_for(browser, "const e = document.getElementById('write-error'); return !e.hidden && e.textContent")
    assert "more than the model's" in message
    prompt = browser.find_element(By.ID, "write-prompt")
    prompt.clear()
    prompt.send_keys("It {{4}} was")
    browser.find_element(By.ID, "write-go").click()
    assert wait_for(browser, "const s = document.querySelector('#write-output .sample.done'); "
                             "return s && s.dataset.text").startswith("It")
    assert browser.find_element(By.ID, "write-error").get_attribute("hidden")


def test_stop_cancels_the_request(browser, page_server):
    from selenium.webdriver.common.by import By

    url, _ = page_server
    before = httpx.get(f"{url}/healthz").json()["cancelled"]
    open_page(browser, url, "write")
    browser.find_element(By.ID, "write-go").click()  # the model's full length: 31 slow steps
    wait_for(browser, "return window.pgmLog.some(e => e.kind === 'step')")
    browser.find_element(By.ID, "write-stop").click()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/healthz").json()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{url}/healthz").json()["cancelled"] == before + 1
    assert browser.find_element(By.ID, "write-go").is_enabled() and not browser.find_elements(By.CSS_SELECTOR,
                                                                                               ".sample.done")


def test_the_race_runs_both_models_side_by_side_and_gives_the_ratio(browser, page_server):
    from selenium.webdriver.common.by import By

    url, _ = page_server
    open_page(browser, url, "race")
    assert browser.find_element(By.ID, "race-a").get_attribute("value") == "tiny"  # the PGM on the left
    assert browser.find_element(By.ID, "race-b").get_attribute("value") == "tiny-mdlm"
    browser.find_element(By.ID, "race-prompt").send_keys("It was")
    box = browser.find_element(By.CSS_SELECTOR, '#race-form input[name="steps"]')
    box.send_keys("12")
    browser.find_element(By.ID, "race-go").click()
    ratio = float(wait_for(browser, "return document.getElementById('race-result').dataset.ratio"))
    lanes = {side: [e for e in log_of(browser, f"race-{side}") if e["kind"] == "done"] for side in "ab"}
    assert all(len(done) == 1 and done[0]["texts"][0].startswith("It was") for done in lanes.values())
    assert ratio > 0 and "x the tokens/s of" in browser.find_element(By.ID, "race-result").text
    steps = {side: [e for e in log_of(browser, f"race-{side}") if e["kind"] == "step"] for side in "ab"}
    assert len(steps["a"]) == 12 and 1 < len(steps["b"]) <= 12  # MDLM sends no event for a step that reveals nothing
    assert steps["a"][-1]["filled"] == [31] and steps["b"][-1]["filled"] == [31]


def test_the_race_puts_a_pgm_with_its_encoder_cache_against_itself(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    url, pipelines = page_server
    open_page(browser, url, "race")
    assert not browser.find_element(By.ID, "race-a-cache").find_element(By.XPATH, "..").get_attribute("hidden")
    assert browser.find_element(By.ID, "race-b-cache").find_element(By.XPATH, "..").get_attribute("hidden")  # MDLM
    Select(browser.find_element(By.ID, "race-b")).select_by_value("tiny")
    Select(browser.find_element(By.ID, "race-a-cache")).select_by_value("never")
    browser.find_element(By.ID, "race-prompt").send_keys("It was")
    browser.find_element(By.CSS_SELECTOR, '#race-form input[name="steps"]').send_keys("12")
    browser.find_element(By.ID, "race-go").click()
    wait_for(browser, "return document.getElementById('race-result').dataset.ratio")
    done = {side: next(e for e in log_of(browser, f"race-{side}") if e["kind"] == "done") for side in "ab"}
    expected = {"a": pipelines["tiny"].generate(prompt="It was", steps=12, cache_refresh="never"),
                "b": pipelines["tiny"].generate(prompt="It was", steps=12)}
    assert expected["a"] != expected["b"]  # the cache changes the draws, so the lanes can be told apart
    assert {side: entry["texts"] for side, entry in done.items()} == expected
    assert "with its cache (refresh: never)" in browser.find_element(By.ID, "race-a-name").text
    assert "cache" not in browser.find_element(By.ID, "race-b-name").text


def test_the_image_page_generates_classes_and_completes_a_validation_image(browser, image_runs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    pipe = slowed(pgm.load(image_runs / "pgm"), 0.02)
    with running(create_app({"fmnist": pipe})) as url:
        open_page(browser, url, "images")
        classes = Select(browser.find_element(By.ID, "images-classes"))
        classes.select_by_visible_text("Bag")
        classes.select_by_visible_text("Sneaker")
        browser.find_element(By.CSS_SELECTOR, '#images-form input[name="steps"]').send_keys("8")
        browser.find_element(By.ID, "images-go").click()
        wait_for(browser, "return window.pgmLog.some(e => e.panel === 'images' && e.kind === 'done')")
        updates = [e for e in log_of(browser, "images") if e.get("images")]
        assert len(updates) == 1 + 4 + 1 and all(e["images"] == 2 for e in updates)  # start, every 2nd step, done
        assert len(browser.find_elements(By.CSS_SELECTOR, "#images-output img")) == 2

        browser.execute_script("window.pgmLog = []")
        Select(browser.find_element(By.ID, "images-mode")).select_by_value("inpaint")
        Select(browser.find_element(By.ID, "images-region")).select_by_value("top")
        browser.find_element(By.ID, "images-go").click()
        message = wait_for(browser, "const e = document.getElementById('images-error'); return !e.hidden && "
                                    "e.textContent")
        assert message == "pick a validation image to complete"
        browser.find_element(By.CSS_SELECTOR, '#images-validation img[data-index="1"]').click()
        browser.find_element(By.ID, "images-go").click()
        wait_for(browser, "return window.pgmLog.some(e => e.panel === 'images' && e.kind === 'done')")
        final = browser.find_element(By.CSS_SELECTOR, "#images-output img").get_attribute("src")
        thumbnail = httpx.get(f"{url}/validation/fmnist/1.png").content
        from PIL import Image

        by_hand = pipe.generate(known="top", images=[Image.open(io.BytesIO(thumbnail))], steps=8,
                                classes=[str(int(pipe.data.val.labels_of([1])[0]))])
        import numpy as np

        assert np.array_equal(png_pixels(final), np.asarray(by_hand[0]))
