"""The labelling web app: a FastAPI app over one :class:`LabelSession`, served by uvicorn.

FastAPI (with uvicorn) is the ``label`` extra: it validates request bodies with pydantic,
which rlhfkit already uses for recipes, so a bad request is a 400 whose message names the
field; and it is small, typed and well kept. The page itself is static HTML, CSS and one
script (``static/``), with no build step and nothing fetched from the network.

Every request that changes the session returns only after the judgement is on disk
(:meth:`LabelSession.submit`). Requests are answered with JSON: ``{"error": message}``
with a 4xx status for a bad one, never a traceback.
"""

import hmac
import ipaddress
import logging
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from rlhfkit.errors import UserError
from rlhfkit.label.session import LabelRequestError, LabelSession
from rlhfkit.rundir import is_disk_full

MAX_BODY = 1 << 20
TOKEN_COOKIE = "rlhfkit_label"
log = logging.getLogger("rlhfkit.label")


class Submission(BaseModel):
    """POST /api/submit: ``tiers`` lists completion indices, best tier first."""

    model_config = ConfigDict(extra="forbid")
    labeller: str = Field(max_length=80)
    item: str = Field(max_length=200)
    tiers: list[list[StrictInt]] = Field(max_length=16)
    flags: dict[str, list[str]] = Field(default_factory=dict)
    submission: str | None = Field(None, max_length=64)
    seconds: float | None = None


class Skip(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeller: str = Field(max_length=80)
    item: str = Field(max_length=200)
    submission: str | None = Field(None, max_length=64)


class Undo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeller: str = Field(max_length=80)


def _missing_extra() -> UserError:
    return UserError("the labelling page needs the `label` extra: pip install 'rlhfkit[label]' "
                     "(FastAPI and uvicorn).")


def create_app(session: LabelSession, token: str | None = None) -> Any:
    """The app serving ``session``; with ``token``, every request must carry it. Without
    one, only requests addressed to this machine's own names are answered (a web page
    cannot reach the server through a domain name it re-points at 127.0.0.1)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, RedirectResponse, Response
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError:
        raise _missing_extra() from None

    static = resources.files("rlhfkit.label") / "static"
    app = FastAPI(title="rlhfkit label", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> Any:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if token is None and not is_loopback(_host_name(request.headers.get("host", ""))):
            return error(421, "this labelling server answers only at 127.0.0.1 or localhost; to serve a team "
                              "network, start it with --host and --token")
        if token is not None:
            given = (request.headers.get("x-label-token") or request.cookies.get(TOKEN_COOKIE)
                     or request.query_params.get("token") or "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "this labelling server needs its token: open the link you were given "
                                  "(…/?token=…), or send the X-Label-Token header")
        if request.method == "POST":
            if not request.headers.get("content-type", "").startswith("application/json"):
                return error(415, "send the request body as JSON (Content-Type: application/json)")
            length = request.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > MAX_BODY:
                return error(413, f"request bodies are JSON of at most {MAX_BODY} bytes, with a Content-Length")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
        response.headers["Cache-Control"] = "no-store"
        if token is not None and request.query_params.get("token"):  # a link with the token: remember it
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Any:
        problems = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":
                return error(400, "bad request: the body is not valid JSON")
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
        return error(400, "bad request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def not_here(request: Request, exc: StarletteHTTPException) -> Any:
        what = "no such page or API" if exc.status_code == 404 else str(exc.detail)
        return error(exc.status_code, f"{what}: {request.method} {request.url.path[:100]}")

    @app.exception_handler(LabelRequestError)
    async def refused(request: Request, exc: LabelRequestError) -> Any:
        return error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> Any:
        if is_disk_full(exc):
            log.error("disk full while saving a judgement: %s", exc)
            return error(507, "the disk holding the session is full: this judgement was NOT saved (nothing "
                              "saved before is lost). Free some space and submit again.")
        log.exception("error serving %s", request.url.path)
        return error(500, "the server failed on this request and saved nothing for it; see its log")

    kinds = {"index.html": "text/html", "agreement.html": "text/html", "label.js": "text/javascript",
             "label.css": "text/css", "agreement.js": "text/javascript"}

    def static_file(name: str) -> Any:
        return Response((static / name).read_bytes(), media_type=kinds[name])

    @app.get("/")
    def index(request: Request) -> Any:
        if token is not None and request.query_params.get("token"):
            return RedirectResponse("/", status_code=303)  # the token leaves the address bar
        return static_file("index.html")

    @app.get("/agreement")
    def agreement_page() -> Any:
        return static_file("agreement.html")

    @app.get("/static/{name}")
    def asset(name: str) -> Any:
        if name not in kinds or name.endswith(".html"):
            return error(404, f"no file {name[:40]!r}")
        return static_file(name)

    @app.get("/api/session")
    def describe() -> Any:
        return {"name": session.directory.name, "items": len(session.items), "flags": list(session.flags),
                "labellers": session.labellers()}

    @app.get("/api/next")
    def next_item(labeller: str = "") -> Any:
        return session.next_item(labeller)

    @app.get("/api/progress")
    def progress(labeller: str = "") -> Any:
        return session.progress(labeller)

    @app.post("/api/submit")
    def submit(body: Submission) -> Any:
        return session.submit(body.labeller, body.item, body.tiers, body.flags, body.submission, body.seconds)

    @app.post("/api/skip")
    def skip(body: Skip) -> Any:
        return session.skip(body.labeller, body.item, body.submission)

    @app.post("/api/undo")
    def undo(body: Undo) -> Any:
        return session.undo(body.labeller)

    @app.get("/api/agreement")
    def agreement() -> Any:
        return session.agreement()

    return app


def _host_name(header: str) -> str:
    """The name in a Host header (``[::1]:8765`` -> ``::1``, ``localhost:8765`` -> ``localhost``)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(directory: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Open the session (taking its lock), then serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise _missing_extra() from None
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} would let anyone on the network label (and read the session); give a "
                        f"shared token with --token or RLHFKIT_LABEL_TOKEN, or keep the default 127.0.0.1.")
    session = LabelSession(directory, lock=True)
    for line in session.repaired:
        print(f"note: {line}", file=sys.stderr, flush=True)
    app = create_app(session, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                        f"(0 picks a free one).") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    judged = len(session.entries)
    print(f"labelling {directory} ({len(session.items)} items, {judged} judgements so far) at "
          f"http://{shown}:{bound}/" + ("?token=…" if token else ""), flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
