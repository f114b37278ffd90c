"""`pgm serve`: a local web page and JSON API over loaded pipelines (see `pgm.serve.app`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def _uvicorn():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as missing:
        raise ImportError(f"pgm serve needs the serve extra ({missing.name} is missing): "
                          "pip install 'partition-gm[serve]'") from None
    return uvicorn


def _listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port))
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}): choose another --port") from None


def _server(app):
    uvicorn = _uvicorn()
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))


def serve(pipelines: dict, *, host: str = "127.0.0.1", port: int = 8000, log=print, **options) -> None:
    """Serve `pipelines` (name -> pipeline) at http://HOST:PORT until interrupted (Ctrl-C): the
    models work on this thread, the web server on another. `options` go to `create_app`."""
    _uvicorn()
    from .app import create_app

    app = create_app(pipelines, worker_thread=False, **options)
    with running(app, host, port) as url:
        log(f"serving {', '.join(pipelines)} at {url}/ (Ctrl-C stops)")
        try:
            app.state.scheduler.work()
        except KeyboardInterrupt:
            log("stopping")


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0):
    """The application served from a background thread (a notebook, a test); yields its URL and
    stops it on exit. Port 0: a free one."""
    listening = _listen(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{listening.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listening.close()
