"""The station page and its read-only JSON API, served from the `web` thread off a StationState snapshot.

GET only: `/` (the page, inline CSS/JS, nothing fetched from elsewhere), `/api/state`,
`/api/verdicts?since=SEQ`, `/api/image/SEQ.jpg`, `/api/gallery`, `/retained/NAME.png`.
Off loopback every request needs the token (Bearer, or the password of HTTP basic auth).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from edge_agent.config import is_loopback
from edge_agent.state import StationState

logger = logging.getLogger(__name__)

GALLERY_LIMIT = 24
_RETAINED = re.compile(r"^(\d{13}_\d{8}_(?:NG|ERROR|OK))\.png$")
_IMAGE = re.compile(r"^/api/image/(\d{1,12})\.jpg$")
_REALM = 'Basic realm="edge-agent station page", charset="UTF-8"'


def gallery(retention_dir: Path | None, limit: int = GALLERY_LIMIT) -> list[dict[str, Any]]:
    """The newest NG frames kept by retention (retention.py names files so that name order is age order)."""
    if retention_dir is None or not retention_dir.is_dir():
        return []
    stems = sorted((p.stem for p in retention_dir.glob("*_NG.json")), reverse=True)
    items = []
    for stem in stems[:limit]:
        try:
            verdict = json.loads((retention_dir / f"{stem}.json").read_text())
        except (OSError, ValueError):
            continue  # being written or pruned right now; the next poll shows it
        items.append({"name": stem, "image": f"/retained/{stem}.png", "seq": verdict.get("seq"),
                      "captured_at": verdict.get("captured_at"), "part_id": verdict.get("part_id"),
                      "score": verdict.get("score"), "threshold": verdict.get("threshold"),
                      "message_id": verdict.get("message_id")})
    return items


class _BadRequest(Exception):
    """A malformed query parameter: answered 400 with the message."""


def _int(query: dict[str, list[str]], key: str, default: Any) -> Any:
    if key not in query:
        return default
    raw = query[key][-1]
    if not raw.isdigit():
        raise _BadRequest(f"{key}={raw!r} is not a non-negative integer; e.g. /api/verdicts?since=0")
    return int(raw)


def authorized(header: str | None, token: str | None) -> bool:
    """No token: open. Else `Bearer TOKEN` or basic auth with TOKEN as the password (any user name)."""
    if token is None:
        return True
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


class StationPage:
    """ThreadingHTTPServer on a `web` thread; start() binds (OSError when it cannot), stop() ends it."""

    def __init__(self, state: StationState, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 retention_dir: Path | None = None) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.token = token
        self.retention_dir = retention_dir
        self.html = resources.files("edge_agent").joinpath("station_page.html").read_bytes()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        page = self

        class Handler(_Handler):
            station_page = page

        self._server = (_Server6 if ":" in self.host else _Server)((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="web", daemon=True)
        self._thread.start()
        shown = f"[{self.host}]" if ":" in self.host else self.host
        if self.token is not None:
            logger.info("station page on http://%s:%d/ (read-only; every request needs the token from web.auth_file)",
                        shown, self.port)
        elif is_loopback(self.host):
            logger.info("station page on http://%s:%d/ (read-only, loopback only, no token)", shown, self.port)
        else:  # config.WebConfig refuses this; only a direct caller can get here
            logger.warning("station page on http://%s:%d/ is open to the network without a token", shown, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never holds up the agent's shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    station_page: StationPage
    timeout = 30  # seconds a client may take to send its request
    server_version = "edge-agent"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        page = self.station_page
        if not authorized(self.headers.get("Authorization"), page.token):
            self._send(401, b'{"error": "a token is needed: Authorization: Bearer TOKEN, or basic auth"}\n',
                       "application/json", {"WWW-Authenticate": _REALM})
            return
        try:
            self._route(self.station_page, urlsplit(self.path))
        except _BadRequest as e:
            self._error(400, str(e))

    def _route(self, page: StationPage, url: Any) -> None:
        query = parse_qs(url.query)
        path = url.path
        if path in ("/", "/index.html"):
            self._send(200, page.html, "text/html; charset=utf-8")
        elif path == "/api/state":
            self._json(page.state.snapshot())
        elif path == "/api/verdicts":
            self._json(page.state.verdicts(_int(query, "since", 0), _int(query, "limit", None)))
        elif path == "/api/gallery":
            self._json({"version": 1, "items": gallery(page.retention_dir,
                                                       _int(query, "limit", GALLERY_LIMIT))})
        elif m := _IMAGE.match(path):
            found = page.state.image(int(m.group(1)))
            if found is None:
                self._error(404, "no image kept for this verdict (only recent ones are; OK frames may have none)")
            else:
                self._send(200, found[0], "image/jpeg", {"X-Image-Kind": found[1]})
        elif path.startswith("/retained/") and (m := _RETAINED.match(path.removeprefix("/retained/"))):
            self._retained(m.group(0))
        else:
            self._error(404, f"no such page: {path}")

    def _retained(self, name: str) -> None:
        directory = self.station_page.retention_dir
        try:
            body = (directory / name).read_bytes() if directory is not None else None
        except OSError:
            body = None
        if body is None:
            self._error(404, "not in the retention folder (pruned, or retention is off)")
        else:
            self._send(200, body, "image/png", {"Cache-Control": "max-age=3600"})

    def _refuse(self) -> None:
        self._send(405, b'{"error": "the station page is read-only: GET only"}\n', "application/json",
                   {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _json(self, body: dict[str, Any]) -> None:
        self._send(200, json.dumps(body, allow_nan=False, default=str).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._send(code, json.dumps({"error": message}).encode() + b"\n", "application/json")

    def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self'; "
                         "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'")
        for key, value in ({"Cache-Control": "no-store"} | (headers or {})).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s %s", self.address_string(), format % args)
