"""`pgm serve`: a local web page and JSON API over loaded pipelines (see `pgm.serve.app`)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time

from ..errors import MissingDependency, ResourceError


def _uvicorn():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as missing:
        raise MissingDependency(f"pgm serve needs the serve extra ({missing.name} is missing): "
                                "pip install 'partition-gm[serve]'") from None
    return uvicorn


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's own (127.x, localhost), where only its
    users reach the page; an unresolvable host is one sentence that names it."""
    try:
        found = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise ResourceError(f"cannot resolve the host {host!r} ({reason}): give --host an address of this machine, "
                            "such as 127.0.0.1 (the default) or 0.0.0.0 (every interface)") from None
    return all(ipaddress.ip_address(address[4][0]).is_loopback for address in found)


def exposure_warning(host: str) -> str | None:
    """What to tell whoever serves on `host` about who else can reach the page, if anyone can."""
    if is_loopback(host):
        return None
    return (f"warning: --host {host} serves the page beyond this machine, and it has no authentication: anyone "
            "who can reach this address can use the models and this machine's time")


def _listen(host: str, port: int) -> socket.socket:
    is_loopback(host)  # an unknown host is named as such, not blamed on the port
    try:
        return socket.create_server((host, port))
    except OSError as error:
        raise ResourceError(f"cannot listen on {host}:{port} ({error.strerror or error}): choose another "
                            "--port") from None


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
