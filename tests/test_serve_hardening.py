"""`pgm serve` against a hostile client (issue 32, class 7 and the server's part of class 2): every
field of a request with a value of every JSON type is a 4xx sentence or an answer, never a 5xx;
what a request may cost (its body, its samples, its prompt) is refused before any of it is spent;
a client that leaves `POST /generate` stops its work; and `--host` says who can reach the page."""

import json
import resource
import socket
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient
from test_serve import slowed

import pgm
from pgm.pipeline import GenerationRequest, Stream
from pgm.sampling.settings import SamplerSettings
from pgm.serve import running
from pgm.serve.app import create_app

FIELDS = ["run", *(field.name for field in GenerationRequest.inputs()), *sorted(SamplerSettings.names())]
# One of each JSON type, the edges of its range, and the numbers JSON cannot spell (sent as Python's
# json writes them: NaN, Infinity), which a lenient parser accepts.
VALUES = [None, True, False, 0, -1, 1, 1.5, 1e308, -1e308, 10 ** 30, 2 ** 64, float("nan"), float("inf"),
          "inf", "nan", "", "x", "-1", "1", [], [1], ["x"], [None], [[1]], {}, {"a": 1}, [{"a": []}]]


def test_the_fields_enumerated_are_every_argument_a_request_takes():
    # A new argument joins the property tests below by itself; this pins that the list is not empty
    # or cut short by a rename.
    assert {"run", "prompt", "infill", "num_samples", "length", "seed", "classes", "known", "images", "steps",
            "temperature", "top_p", "top_k", "cache_refresh", "guidance"} <= set(FIELDS)


@pytest.fixture(scope="module")
def text_client(text_run):
    pipe = pgm.load(text_run)
    app = create_app({"tiny": pipe, "tiny-2": pipe}, max_samples=8)  # two runs: `run` is required
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app


def answers_without_a_server_error(client, endpoint: str, body: dict) -> httpx.Response:
    """The answer to `body`, checked: a 4xx with one sentence, or a 200 whose events hold no error."""
    answer = client.post(f"/{endpoint}", content=json.dumps(body), headers={"content-type": "application/json"})
    shown = json.dumps(body)[:200]
    assert answer.status_code < 500, f"{shown} -> {answer.status_code} {answer.text[:300]}"
    if answer.status_code >= 400:
        message = answer.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message, f"{shown} -> {message!r}"
    elif endpoint == "stream":
        assert "event: error" not in answer.text and "event: done" in answer.text, f"{shown} -> {answer.text[-300:]}"
    return answer


@pytest.mark.parametrize("endpoint", ["generate", "stream"])
@pytest.mark.parametrize("field", FIELDS)
def test_every_field_with_every_json_type_is_answered_never_a_server_error(text_client, endpoint, field):
    client, app = text_client
    failed = app.state.scheduler.counts["failed"]
    for value in VALUES:
        answers_without_a_server_error(client, endpoint, {"run": "tiny", "length": 6, "steps": 2, field: value})
    assert app.state.scheduler.counts["failed"] == failed  # nothing reached the samplers that they could not take


@pytest.mark.parametrize("field", ["classes", "known", "images", "num_samples", "guidance", "guidance_schedule",
                                   "hide_newest", "redraw", "steps", "sampler"])
def test_every_image_field_with_every_json_type_is_answered_never_a_server_error(image_runs, field):
    app = create_app({"fmnist": pgm.load(image_runs / "pgm")}, max_samples=4)
    with TestClient(app, raise_server_exceptions=False) as client:
        for value in VALUES:
            answers_without_a_server_error(client, "generate", {"classes": [1], "steps": 2, field: value})
            answers_without_a_server_error(client, "generate", {"known": "left", "images": 1, "steps": 2,
                                                                field: value})
    assert app.state.scheduler.counts["failed"] == 0


@pytest.mark.parametrize("body, says", [
    ({"run": ["tiny"]}, "run must be the name of a loaded run (tiny, tiny-2), got [\"tiny\"]"),
    ({"run": {"name": "tiny"}}, "run must be the name of a loaded run"),
    ({"run": 7}, "run must be the name of a loaded run (tiny, tiny-2), got 7"),
    ({"run": "tiny", "num_samples": 2 ** 64}, "asks for 18446744073709551616 samples, more than this server's limit"),
    ({"run": "tiny", "num_samples": [3]}, "num_samples must be a positive integer, got [3]"),
    ({"run": "tiny", "prompt": {"text": "It"}}, "prompt must be a string or a non-empty list of strings"),
    ({"run": "tiny", "prompt": ["It", 3]}, "prompt must be a string or a non-empty list of strings"),
    ({"run": "tiny", "images": {}}, "images must be a number of validation images or a list of PNG images"),
    (None, "the request body must be a JSON object of arguments, not null"),
    ("It was", "the request body must be a JSON object of arguments, not \"It was\""),
])
def test_a_value_of_the_wrong_type_is_named_in_one_sentence(text_client, body, says):
    client, _ = text_client
    for endpoint in ("generate", "stream"):
        answer = client.post(f"/{endpoint}", content=json.dumps(body))  # json=None would send no body
        assert answer.status_code == 400 and says in answer.json()["error"], answer.text


@pytest.mark.parametrize("raw, says", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", "a number too long to read"),
    (b"\xff\xfe{}", "must be JSON"),
])
def test_json_that_python_cannot_hold_is_the_clients_mistake(text_client, raw, says):
    client, _ = text_client
    answer = client.post("/generate", content=raw)
    assert answer.status_code == 400 and says in answer.json()["error"]


# --- sizes, before work ---------------------------------------------------------------------------

def refused_quickly(client, body: dict, status: int = 400) -> tuple[str, float, int]:
    """(the sentence, the seconds it took, the growth of this process's peak memory in MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    answer = client.post("/generate", json=body)
    seconds = time.perf_counter() - started
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert answer.status_code == status, answer.text
    return answer.json()["error"], seconds, grown


@pytest.mark.parametrize("body, says", [
    ({"run": "tiny", "num_samples": 10 ** 6}, "asks for 1000000 samples, more than this server's limit of 8"),
    ({"run": "tiny", "num_samples": 10 ** 7}, "asks for 10000000 samples, more than this server's limit of 8"),
    ({"run": "tiny", "prompt": ["It was"] * 100_000}, "asks for 100000 samples"),
    ({"run": "tiny", "infill": ["a {{2}} b"] * 3, "num_samples": 3}, "asks for 9 samples"),
])
def test_too_many_samples_are_refused_before_the_request_is_planned(text_client, body, says):
    client, app = text_client
    queued = sum(app.state.scheduler.counts.values())
    message, seconds, grown = refused_quickly(client, body)
    assert says in message
    # Planned, a million samples took 5.5 s and 700 MB, ten million 55 s and 5.2 GB (issue 32).
    assert seconds < 0.5 and grown < 100, (seconds, grown)
    assert sum(app.state.scheduler.counts.values()) == queued  # refused before the worker saw it


def test_an_oversized_body_is_refused_with_413_before_it_is_read(text_run):
    app = create_app({"tiny": pgm.load(text_run)}, max_body_bytes=1000)
    with TestClient(app, raise_server_exceptions=False) as client:
        declared = client.post("/generate", json={"prompt": "x" * 1000})
        assert declared.status_code == 413
        assert declared.json()["error"] == ("the request body is larger than this server's limit of 1000 bytes "
                                            "(pgm serve --max-body-bytes)")
        assert client.post("/generate", json={"length": 6}).status_code == 200  # a body within the limit
        assert client.post("/generate", content=b" " * 990 + b'{"length": 6}').status_code == 413
        deadline = time.monotonic() + 10  # the worker counts a job after its answer has gone out
        while app.state.scheduler.counts["completed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.scheduler.counts["completed"] == 1


@pytest.mark.parametrize("header, chunks_read", [
    ((b"transfer-encoding", b"chunked"), 3),  # read no further than the chunk that passes 1000 bytes
    ((b"content-length", b"5000"), 0),  # refused from its declared length, before reading any of it
])
def test_a_body_is_refused_before_more_than_the_limit_is_read(text_run, header, chunks_read):
    # TestClient reads a streamed body whole before the app runs, so the app is called as its server
    # would call it, with a body of 100 chunks of 400 bytes.
    import asyncio

    app = create_app({"tiny": pgm.load(text_run)}, max_body_bytes=1000, worker_thread=False)
    received, sent = [], []

    async def receive():
        received.append(400)
        return {"type": "http.request", "body": b" " * 400, "more_body": len(received) < 100}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/stream", "raw_path": b"/stream", "root_path": "", "query_string": b"",
             "headers": [header], "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and len(received) == chunks_read


def test_the_default_body_limit_refuses_a_20_mb_prompt_at_once(text_client):
    client, _ = text_client
    message, seconds, _ = refused_quickly(client, {"run": "tiny", "prompt": "the " * 5_000_000}, status=413)
    assert "larger than this server's limit of 1000000 bytes" in message and seconds < 1


def test_a_prompt_too_long_for_the_model_is_refused_before_it_is_tokenized(text_run):
    pipe = pgm.load(text_run)
    tokens = []
    encode = pipe.tokenizer.encode_batch
    pipe.tokenizer.encode_batch = lambda texts: tokens.append(len(texts)) or encode(texts)
    app = create_app({"tiny": pipe}, max_body_bytes=30_000_000)
    with TestClient(app, raise_server_exceptions=False) as client:
        message, seconds, _ = refused_quickly(client, {"prompt": "the " * 5_000_000})
        assert message == (f"prompt 1 has 20000000 characters, more than the model's {pipe.config.length} positions "
                           f"can hold (at most {pipe.config.length * 128})")
        assert seconds < 1 and tokens == []  # a 20 MB prompt took the tokenizer 25 s before (issue 32)
        message, _, _ = refused_quickly(client, {"infill": ["a {{2}}", "b " * 10_000 + "{{2}}"]})
        assert message.startswith("infill 2 has 20005 characters") and tokens == []
    limit = pipe.config.length * 128
    with pytest.raises(ValueError, match=f"prompt 1 has {limit + 1} characters"):  # the same check from Python
        pipe.generate(prompt="x" * (limit + 1))
    assert tokens == []
    # At the limit the tokenizer decides, as before.
    with pytest.raises(ValueError, match="more than the model's"):
        pipe.generate(prompt="the " * (pipe.config.length * 32))
    assert tokens == [1]


# --- a client that leaves --------------------------------------------------------------------------

def counted(pipe):
    """`pipe` whose streams count the events they give (`pipe.steps_taken`)."""
    stream = pipe.stream
    pipe.steps_taken = 0

    def counting_stream(**arguments):
        inner = stream(**arguments)

        def events():
            for event in inner:
                pipe.steps_taken += 1
                yield event

        return Stream(inner.given, inner.length, events())

    pipe.stream = counting_stream
    return pipe


def test_a_client_that_leaves_generate_cancels_its_work_at_the_next_step(text_run):
    pipe = slowed(counted(pgm.load(text_run)), 0.05)  # the model's 31 steps: 1.5 s
    with running(create_app({"tiny": pipe})) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"seed": 1}).encode()
        client = socket.create_connection((host, int(port)))
        client.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while pipe.steps_taken < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        client.close()  # like a script's timeout, or Ctrl-C in curl
        left_at = pipe.steps_taken
        while httpx.get(f"{url}/healthz").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(f"{url}/healthz").json()
    assert 3 <= left_at < 31
    assert health["active"] == 0 and health["cancelled"] == 1 and health["completed"] == 0
    assert pipe.steps_taken - left_at <= 3  # the step under way, and at most a couple more


def test_a_client_that_stays_gets_its_answer_when_others_leave(text_run):
    pipe = slowed(pgm.load(text_run), 0.01)
    expected = pipe.generate(seed=4, length=12)
    with running(create_app({"tiny": pipe})) as url:
        gave_up = []

        def leave():
            try:
                httpx.post(f"{url}/generate", json={"seed": 1}, timeout=0.1)  # 31 steps: longer than it waits
            except httpx.ReadTimeout:
                gave_up.append(True)

        leaving = threading.Thread(target=leave)
        leaving.start()
        answer = httpx.post(f"{url}/generate", json={"seed": 4, "length": 12}, timeout=60)
        leaving.join()
        assert gave_up == [True]
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/healthz").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(f"{url}/healthz").json()
    assert answer.status_code == 200 and answer.json()["texts"] == expected
    assert health["completed"] == 1 and health["cancelled"] == 1


# --- the command ----------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3"])
def test_serving_beyond_this_machine_warns_that_the_page_has_no_authentication(pgm_main, tmp_path, host):
    code, _, err = pgm_main("serve", tmp_path / "no-run", "--host", host)  # stops at loading: nothing served
    assert code == 2 and f"warning: --host {host} serves the page beyond this machine" in err
    assert "no authentication" in err and "no-run does not exist" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2"])
def test_serving_this_machine_alone_gives_no_warning(pgm_main, tmp_path, host):
    code, _, err = pgm_main("serve", tmp_path / "no-run", "--host", host)
    assert code == 2 and "warning" not in err and "no-run does not exist" in err


def test_an_unknown_host_is_named_and_not_blamed_on_the_port(pgm_main, tmp_path):
    code, _, err = pgm_main("serve", tmp_path / "no-run", "--host", "no-such-host.invalid")
    assert code == 2 and "cannot resolve the host 'no-such-host.invalid'" in err
    assert "--port" not in err and "no-run" not in err  # refused before anything is loaded
    assert err.count("\n") == 1


def test_running_names_an_unknown_host_too():
    with pytest.raises(OSError, match="cannot resolve the host 'no-such-host.invalid'"):
        with running(create_app({}, worker_thread=False), "no-such-host.invalid"):
            pass


def test_pgm_serve_refuses_a_body_limit_below_one_byte(pgm_main, text_run):
    code, _, err = pgm_main("serve", text_run, "--max-body-bytes", "0")
    assert code == 2 and "--max-body-bytes must be at least 1, got 0" in err
