"""The HTTP shell: one handler thread per connection, HTTP/1.1 keep-alive, chunked watch streams.

WHY: the official client speaks plain HTTP/1.1 JSON to the API server and reads watches as a chunked
stream of newline-delimited JSON events; this is that, and nothing else (no auth, no protobuf, no
HTTP/2). Every failure is answered with a Status object, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from sandbox.api import routes, tables
from sandbox.api.errors import ApiError
from sandbox.api.label_selectors import object_filter, parse_field_selector, parse_label_selector
from sandbox.api.store import WatchExpired
from sandbox.api.watch import bookmark, gone

if TYPE_CHECKING:
    from sandbox.api.apiserver import SandboxApiServer

log = logging.getLogger("sandbox.api.apiserver")
DEFAULT_WATCH_TIMEOUT = 1800.0  # the real server's --min-request-timeout
_POLL = 0.1  # how often a quiet watch re-checks stop/stall flags


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # many watches may connect at once

    def __init__(self, address: tuple[str, int], sandbox: SandboxApiServer, family: int) -> None:
        self.address_family = family
        self.sandbox = sandbox
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self.connections_lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return (query.get(name) or [""])[-1].lower() in ("true", "1")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _verb(method: str, name: str | None, query: dict[str, list[str]]) -> str:
    """The RBAC verb of a request, as kube-apiserver's RequestInfo names it."""
    if method == "GET":
        return "get" if name is not None else ("watch" if _flag(query, "watch") else "list")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())


def _int(query: dict[str, list[str]], name: str) -> int | None:
    value = _one(query, name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"invalid {name} {value!r}: must be an integer") from None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small header/body writes would otherwise wait for delayed ACKs
    server: SandboxHTTPServer

    # ---- connection bookkeeping (so stop() can cut every stream) ---------------------------
    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    # ---- plumbing ----------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, code: int, body: Any, warnings: list[str] | None = None) -> None:
        data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for w in warnings or []:
            self.send_header("Warning", '299 - "{}"'.format(w.replace('"', '\\"')))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, body: Any) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        try:
            try:
                raw = self._read_body()
            except ValueError as exc:
                self.close_connection = True  # the framing is lost: do not reuse the connection
                raise ApiError(400, f"malformed request body framing: {exc}") from exc
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            self._route(method, url.path, query, raw)
        except ApiError as exc:
            self._safe_send(exc.code, exc.status())
        except OSError:  # the client (or stop()) closed the connection under us
            self.close_connection = True
        except Exception as exc:  # a bug in the double: still answer like an API server would
            log.exception("internal error on %s %s", method, self.path)
            self._safe_send(500, ApiError(500, f"sandbox internal error: {exc!r}").status())

    def _safe_send(self, code: int, body: Any) -> None:
        try:
            self._send_json(code, body)
        except OSError:
            self.close_connection = True

    def _json_body(self, raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc

    def _route(self, method: str, path: str, query: dict[str, list[str]], raw: bytes) -> None:
        sandbox = self.server.sandbox
        route = routes.parse(path, f"{sandbox.host}:{sandbox.port}")
        if isinstance(route, routes.DocumentRoute):
            if method != "GET":
                raise ApiError(405, f"method {method} is not allowed on {path}")
            self._send_json(200, route.body)
            return
        rt, ns, name, sub = route.rt, route.namespace, route.name, route.subresource
        sandbox.authorize(rt, _verb(method, name, query), ns)
        ops = sandbox.operations
        dry_run_values = query.get("dryRun") or []
        if any(v != "All" for v in dry_run_values):
            raise ApiError(400, f"invalid dryRun {dry_run_values!r}: the only supported value is All")
        dry_run = bool(dry_run_values)
        if method == "GET" and name is None:
            accept = object_filter(
                parse_label_selector(_one(query, "labelSelector")),
                parse_field_selector(_one(query, "fieldSelector"), rt.kind),
            )
            if _flag(query, "watch"):
                self._watch(rt, ns, accept, query)
                return
            limit = _int(query, "limit") or 0
            items, rv, cont, remaining = sandbox.store.list(
                rt, ns, accept, limit=limit, continue_token=_one(query, "continue") or None
            )
            meta: dict[str, Any] = {"resourceVersion": rv}
            if cont:
                meta["continue"], meta["remainingItemCount"] = cont, remaining
            if tables.wants_table(self.headers.get("Accept")):
                self._send_json(200, tables.table(rt, items, meta))
            else:
                self._send_json(200, {"kind": rt.list_kind, "apiVersion": rt.api_version, "metadata": meta, "items": items})
        elif method == "GET":
            obj = sandbox.store.get(rt, ns, name or "")
            as_table = tables.wants_table(self.headers.get("Accept"))
            self._send_json(200, tables.table(rt, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]})
                            if as_table else obj)
        elif method == "POST" and name is None:
            obj, warnings = ops.create(rt, ns, self._json_body(raw), dry_run=dry_run)
            self._send_json(201 if not dry_run else 200, obj, warnings)
        elif method == "PUT" and name is not None:
            obj, warnings = ops.replace(rt, ns, name, sub, self._json_body(raw), dry_run=dry_run)
            self._send_json(200, obj, warnings)
        elif method == "PATCH" and name is not None:
            ctype = self.headers.get("Content-Type") or ""
            obj, warnings = ops.patch(rt, ns, name, sub, ctype, raw, dry_run=dry_run)
            self._send_json(200, obj, warnings)
        elif method == "DELETE" and name is not None and sub is None:
            self._send_json(200, ops.delete(rt, ns, name, self._json_body(raw), dry_run=dry_run))
        else:
            raise ApiError(405, f"method {method} is not allowed on {path}", reason="MethodNotAllowed")

    def _client_gone(self) -> bool:
        """True when the client hung up (readable socket with nothing to read). A watch client never
        sends anything on the stream's connection, so readable means closed."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ---- watch -------------------------------------------------------------------------------
    def _watch(self, rt: Any, ns: str | None, accept: Any, query: dict[str, list[str]]) -> None:
        sandbox = self.server.sandbox
        rv = _one(query, "resourceVersion") or ""
        timeout = _int(query, "timeoutSeconds")
        bookmarks = _flag(query, "allowWatchBookmarks")
        as_table = tables.wants_table(self.headers.get("Accept"))
        try:
            watcher = sandbox.store.open_watch(rt, ns, accept, rv)
        except WatchExpired as exc:
            watcher = None
            expired: WatchExpired | None = exc
        else:
            expired = None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if watcher is None:
            assert expired is not None
            self._chunk(gone(expired.requested, expired.oldest))
            self.wfile.write(b"0\r\n\r\n")
            return
        interval = sandbox.bookmark_interval
        start = time.monotonic()
        deadline = start + (timeout if timeout and timeout > 0 else DEFAULT_WATCH_TIMEOUT)
        next_bookmark = start + interval
        ended = False
        try:
            while not sandbox.stopping.is_set() and not watcher.closed:
                if not sandbox.begin_send():  # stalled: say nothing at all, not even "goodbye"
                    time.sleep(_POLL)
                    continue
                try:
                    for kind, obj in watcher.drain():
                        self._chunk({"type": kind, "object": tables.table(rt, [obj]) if as_table else obj})
                    now = time.monotonic()
                    if now >= deadline:  # timeoutSeconds: end the stream cleanly
                        self.wfile.write(b"0\r\n\r\n")
                        ended = True
                        break
                    if bookmarks and now >= next_bookmark:
                        bm_rv = sandbox.store.bookmark_rv(watcher)
                        if bm_rv is not None:
                            self._chunk(bookmark(rt, bm_rv))
                            next_bookmark = now + interval
                finally:
                    sandbox.end_send()
                if self._client_gone():  # reap abandoned streams even when there is nothing to send
                    break
                wake = min(deadline, next_bookmark if bookmarks else deadline)
                watcher.wait(max(0.0, min(wake - now, _POLL * 5)))
            if not ended:  # stopped or closed under us: the connection is being cut
                self.close_connection = True
        finally:
            sandbox.store.close_watch(watcher)
