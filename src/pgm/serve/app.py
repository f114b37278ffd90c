"""The ASGI application of `pgm serve` (Starlette): the page, its script, and the JSON API.

    GET  /              the page (text, race, images), shipped in the package: no network needed
    GET  /healthz       {"status": "ok", "runs": [...], "active": N, "completed": N, ...}
    GET  /runs          what each loaded run is and takes (kind, length, orders, classes, ...)
    POST /generate      a request -> {"texts": [...]} (images: {"images": [PNG data URLs]}), timing
    POST /stream        the same request as server-sent events: start, step..., done (or error)
    GET  /validation/RUN/I.png   an image run's validation image I, through its VQ

A request is a JSON object of the pipeline's arguments (`prompt`, `infill`, `num_samples`,
`steps`, `length`, `order`, `temperature`, `seed`, `classes`, `guidance`, ...) and `run`, the
name of a loaded run (not needed when one is loaded). `images` takes PNGs as data URLs or base64,
or a number N for the run's first N validation images. Whatever the pipeline refuses is answered
with a 4xx status and {"error": "one sentence"}, and the server goes on serving. What a request may
cost is checked before any of it is spent: a body over `max_body_bytes` is refused (413) before it
is read whole, and one asking for more than `max_samples` rows before it is planned.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from pathlib import Path

import torch
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ArgumentError, PGMError
from ..pipeline import GenerationRequest, Pipeline, to_pictures
from ..sampling.codes import REGIONS
from ..sampling.settings import IMAGE_SAMPLERS, ORDERS, SAMPLERS
from .scheduler import Busy, Job, Scheduler

STATIC = Path(__file__).parent / "static"
VALIDATION_SHOWN = 10  # validation images offered for inpainting on the page
MAX_BODY_BYTES = 1_000_000  # a request's JSON: ample for prompts, and a few PNGs to inpaint


class Refused(Exception):
    """A request answered with a 4xx status and one sentence."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def run_names(sources: list[str]) -> list[str]:
    """Short names for the loaded runs: the directory's or file's name, numbered when repeated."""
    names: list[str] = []
    for source in sources:
        base = Path(str(source).rstrip("/")).name or str(source)
        name, number = base, 2
        while name in names:
            name, number = f"{base}-{number}", number + 1
        names.append(name)
    return names


class _Server:
    """The handlers of the application's routes, over the loaded pipelines and the one worker."""

    def __init__(self, pipelines: dict[str, Pipeline], scheduler: Scheduler, max_samples: int, preview_every: int,
                 max_body_bytes: int):
        self.pipelines, self.scheduler = pipelines, scheduler
        self.max_samples, self.preview_every, self.max_body_bytes = max_samples, preview_every, max_body_bytes

    def pipeline_of(self, body: dict) -> tuple[str, Pipeline]:
        name = body.pop("run", None)
        if name is None:
            if len(self.pipelines) > 1:
                raise Refused(f"name the run to use: one of {', '.join(self.pipelines)}")
            name = next(iter(self.pipelines))
        if not isinstance(name, str):
            raise Refused(f"run must be the name of a loaded run ({', '.join(self.pipelines)}), got "
                          f"{_shown(name)}")
        if name not in self.pipelines:
            raise Refused(f"no run named {name!r} is loaded; the runs are {', '.join(self.pipelines)}", 404)
        return name, self.pipelines[name]

    async def submit(self, request: Request, previews: bool) -> tuple[Job, asyncio.Queue, tuple]:
        """Check and queue a request; (the job, its messages, the first message)."""
        body = _parsed(await _body_within(request, self.max_body_bytes))
        if not isinstance(body, dict):
            raise Refused(f"the request body must be a JSON object of arguments, not {_shown(body)}")
        name, pipe = self.pipeline_of(body)
        if "images" in body:
            body["images"] = _pictures(body["images"])
        try:  # counted from the inputs alone, so that a million samples cost nothing to refuse
            rows = pipe.rows(GenerationRequest.from_arguments(body))
        except PGMError as error:
            raise Refused(str(error)) from None
        if rows > self.max_samples:
            raise Refused(f"the request asks for {rows} samples, more than this server's limit of "
                          f"{self.max_samples} (pgm serve --max-samples)")
        loop, messages = asyncio.get_running_loop(), asyncio.Queue()
        every = self.preview_every

        def start():
            return pipe.stream(**body)

        def describe(kind, event, job):
            return _message(name, pipe, kind, event, job, previews and _preview_due(kind, event, every))

        def deliver(kind, message):
            try:
                loop.call_soon_threadsafe(messages.put_nowait, (kind, message))
            except RuntimeError:  # the event loop is gone: the server is stopping
                job.cancelled.set()

        job = Job(start, describe, deliver)
        try:
            self.scheduler.submit(job)
        except Busy as busy:
            raise Refused(str(busy), 503) from None
        try:
            first = await messages.get()
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise
        if first[0] == "invalid":
            raise Refused(first[1])
        if first[0] == "error":
            raise Refused(first[1], 500)
        return job, messages, first

    async def generate(self, request: Request) -> Response:
        job, messages, message = await self.submit(request, previews=False)

        async def last_message():
            nonlocal message
            while message[0] not in ("done", "error"):
                message = await messages.get()

        # Whichever comes first: the end of the request, or its client leaving (a closed connection, a
        # script's timeout), which would otherwise leave the worker running steps nobody will read.
        finishing, leaving = asyncio.ensure_future(last_message()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((finishing, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.scheduler.cancel(job)
            finishing.cancel()
            leaving.cancel()
        if not finishing.done() or finishing.cancelled():
            return Response(status_code=499)  # nobody is there to read it; nginx's "client closed request"
        if message[0] == "error":
            return JSONResponse({"error": message[1]}, status_code=500)
        return JSONResponse(message[1])

    async def stream(self, request: Request) -> Response:
        job, messages, first = await self.submit(request, previews=True)

        async def events():
            message = first
            try:
                while True:
                    kind, payload = message
                    yield f"event: {kind}\ndata: {json.dumps(payload if kind != 'error' else {'error': payload})}\n\n"
                    if kind in ("done", "error"):
                        return
                    message = await messages.get()
            finally:  # the client went away (closed the tab, pressed stop) or the request ended
                self.scheduler.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def healthz(self, request: Request) -> Response:
        scheduler = self.scheduler
        return JSONResponse({"status": "ok", "runs": list(self.pipelines), "active": scheduler.active,
                             **{how: scheduler.counts[how] for how in ("completed", "cancelled", "invalid", "failed",
                                                                       "refused")}})

    async def runs(self, request: Request) -> Response:
        return JSONResponse({"runs": [_describe_run(name, pipe) for name, pipe in self.pipelines.items()],
                             "max_samples": self.max_samples})

    async def validation_image(self, request: Request) -> Response:
        name, pipe = self.pipeline_of({"run": request.path_params["run"]})
        index = request.path_params["index"]
        if pipe.modality != "image" or pipe.run is None:
            raise Refused(f"{name} is not an image run: it has no validation images", 404)
        shown = min(VALIDATION_SHOWN, len(pipe.data.val))
        if index >= shown:
            raise Refused(f"the page offers validation images 0 to {shown - 1}", 404)
        codes = pipe.data.val[[index]][0][:, 1:]
        picture = (await asyncio.to_thread(lambda: to_pictures(pipe.decode_codes(codes))))[0]
        return Response(_png(picture), media_type="image/png")


def create_app(pipelines: dict[str, Pipeline], *, capacity: int = 16, max_samples: int = 16,
               preview_every: int = 2, worker_thread: bool = True, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The application serving `pipelines` (name -> text or image pipeline). `capacity`: requests
    held at once (more are refused with 503); `max_samples`: rows one request may ask for;
    `preview_every`: image runs' grids are decoded for the page every this many steps;
    `worker_thread` False: the caller runs `app.state.scheduler.work()` (see `Scheduler`);
    `max_body_bytes`: the largest request body read (larger ones are refused with 413)."""
    for name, pipe in pipelines.items():
        if pipe.modality not in ("text", "image"):
            raise ArgumentError(f"{name} holds a {pipe.config.kind} model, which does not generate: serve a text or "
                                "image model")
    scheduler = Scheduler(capacity, thread=worker_thread)
    server = _Server(pipelines, scheduler, max_samples, preview_every, max_body_bytes)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    async def refused(request: Request, error: Refused) -> Response:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    app = Starlette(routes=[
        Route("/", page), Route("/healthz", server.healthz), Route("/runs", server.runs),
        Route("/generate", server.generate, methods=["POST"]), Route("/stream", server.stream, methods=["POST"]),
        Route("/validation/{run}/{index:int}.png", server.validation_image),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], exception_handlers={Refused: refused}, lifespan=lifespan)
    app.state.scheduler = scheduler
    return app


async def _body_within(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it is known to pass `limit` bytes: from its
    Content-Length before reading anything, else (a chunked body) at the chunk that passes it."""
    too_large = f"the request body is larger than this server's limit of {limit} bytes (pgm serve --max-body-bytes)"
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdecimal():
            raise Refused(f"the Content-Length header must be a number of bytes, got {declared[:40]!r}")
        if int(declared) > limit:
            raise Refused(too_large, 413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(too_large, 413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refused("the client closed the connection before sending the whole request") from None
    return b"".join(chunks)


def _parsed(body: bytes):
    """The JSON of a request body; whatever is not JSON Python can hold is the client's mistake."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused("the request body must be JSON (an object of the pipeline's arguments)") from None
    except RecursionError:
        raise Refused("the request body's JSON is nested too deeply: arguments are at most lists of values") from None
    except ValueError as error:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise Refused(f"the request body holds a number too long to read ({error})") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client of a request whose body has been read goes away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _shown(value) -> str:
    """A client's value in a message, cut short: the message stays one readable sentence."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_run(name: str, pipe: Pipeline) -> dict:
    config = pipe.config
    described = {"name": name, "modality": pipe.modality, "kind": config.kind, "source": pipe.name,
                 "parameters": pipe.model.num_parameters(), "device": str(pipe.device), "precision": pipe.dtype}
    if pipe.modality == "text":
        return {**described, "length": config.length, "samplers": list(SAMPLERS[config.kind]),
                "orders": list(ORDERS) if config.kind == "pgm" else ["random"]}
    validation = []
    if pipe.run is not None:
        shown = min(VALIDATION_SHOWN, len(pipe.data.val))
        validation = [{"index": i, "label": label, "url": f"/validation/{name}/{i}.png"}
                      for i, label in enumerate(pipe.data.val.labels_of(range(shown)).tolist())]
    return {**described, "classes": pipe.class_names or [str(i) for i in range(config.num_classes)],
            "grid": pipe.tokenizer.grid_size, "samplers": list(IMAGE_SAMPLERS), "regions": list(REGIONS),
            "validation": validation}


def _preview_due(kind: str, event, every: int) -> bool:
    return kind in ("start", "done") or (event.step + 1) % every == 0


def _message(name: str, pipe: Pipeline, kind: str, event, job: Job, preview: bool) -> dict:
    """What the page (or a script) is told of one event of a request: the event, with the time the
    request's own steps took as `elapsed` and the tokens generated so far."""
    values = event.to_dict()
    values.update(run=name, elapsed=job.sampling_seconds, generated=job.generated)
    if kind == "start":
        values.update(rows=len(event.positions), length=job.stream.length, modality=pipe.modality)
    if kind == "done":
        values.update(seconds=job.sampling_seconds, wall_seconds=time.perf_counter() - job.submitted,
                      tokens_per_second=event.samples.generated / max(job.sampling_seconds, 1e-9))
        if pipe.modality == "image":
            values["images"] = [_data_url(picture) for picture in event.samples.outputs]
        return values
    if pipe.modality == "image" and preview:
        values["images"] = [_data_url(picture) for picture in _partial_pictures(pipe, event.codes)]
    return values


def _partial_pictures(pipe: Pipeline, codes: torch.Tensor) -> list:
    """PIL images of code grids [N, g, g] that are still partly unknown (-1): decoded with the
    unknown cells grey."""
    count, grid, _ = codes.shape
    known = codes >= 0
    images = pipe.decode_codes(codes.clamp(min=0).reshape(count, -1))
    cell = images.shape[-1] // grid
    shown = known.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None]
    return to_pictures(torch.where(shown, images, torch.zeros_like(images)))


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(picture) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(picture)).decode()


def _pictures(images):
    """A request's `images`: a number (the run's first validation images) stays; PNGs given as
    data URLs or base64 become PIL images."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(images, int) and not isinstance(images, bool):
        return images
    if not isinstance(images, list) or not images or not all(isinstance(item, str) for item in images):
        raise Refused("images must be a number of validation images or a list of PNG images (data URLs or base64)")
    pictures = []
    for number, item in enumerate(images, 1):
        encoded = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            with Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))) as opened:
                opened.load()
                pictures.append(opened.copy())
        except (ValueError, OSError, UnidentifiedImageError):
            raise Refused(f"image {number} is not a PNG or JPEG image in base64 (or a data URL)") from None
    return pictures
