"""The Delta ADS gRPC server: the shell that runs ``controlplane.stream.Stream`` for each connected Envoy.

It listens on a unix socket in a directory shared with the Envoy pod (``/run/lightpath/xds.sock``) and,
optionally, on a loopback TCP port -- never on a routable address (anyone who can reach it could steer
every migrated Service). One thread reads a stream's requests; the RPC's own thread sends responses when
the store or a request gives it something to send.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.resources import SHORT
from controlplane.store import Store
from controlplane.stream import Acked, Stream, StreamError

log = logging.getLogger(__name__)
MAX_STREAMS = 4  # an Envoy, its successor during an upgrade, and room for a debugging client


def check_loopback(address: str) -> None:
    """Refuse anything but a loopback address for the optional TCP listener."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"xDS TCP address {address!r} must be a loopback IP:port (e.g. 127.0.0.1:18000)") from None
    if not ip.is_loopback:
        raise ValueError(f"xDS TCP address {address!r} is not loopback: the control plane never listens on a "
                         "routable address")


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc] # generated, untyped
    """Serves ``store`` to every Envoy that connects; ``on_ack`` hears what each confirms."""

    def __init__(self, store: Store, *, expected_node: str | None = None, on_ack: Callable[[Stream, str, dict[str, str | None]], None] | None = None,
                 on_nack: Callable[[Stream, str, list[str], str], None] | None = None,
                 on_stream: Callable[[Stream, bool], None] | None = None, on_push: Callable[[str, int, int], None] | None = None,
                 ready: threading.Event | None = None, on_demand: bool = False) -> None:
        """``ready``: set once the store holds the first full translation. Until then a stream is not opened:
        a restarted agent with a half-built store would otherwise tell a running Envoy to remove what it
        serves (Envoy keeps its configuration while it waits for our first answer)."""
        self.store = store
        self.ready = ready
        self.on_demand = on_demand  # clusters on Envoy's request only (ControlPlane's flag of the same name)
        self.waiting = 0  # streams held until ``ready`` (debug, tests)
        self.expected_node = expected_node
        self.on_ack = on_ack
        self.on_nack = on_nack
        self.on_stream = on_stream
        self.on_push = on_push
        self.cond = threading.Condition(threading.RLock())
        self.streams: list[Stream] = []
        self.closed: list[dict[str, object]] = []  # summaries of ended streams, newest last (bounded)
        self._server: grpc.Server | None = None
        store.subscribe(self._changed)

    # -- store -> streams --------------------------------------------------------------------------------

    def _changed(self, type_url: str, names: frozenset[str]) -> None:
        with self.cond:
            for stream in self.streams:
                stream.changed(type_url, names)
            self.cond.notify_all()

    # -- the RPCs ----------------------------------------------------------------------------------------

    def StreamAggregatedResources(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      "lightpath serves the incremental protocol only: set ads_config.api_type DELTA_GRPC")

    def DeltaAggregatedResources(self, request_iterator: Iterator[discovery_pb2.DeltaDiscoveryRequest],  # noqa: N802
                                 context: grpc.ServicerContext) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        if self.ready is not None and not self.ready.is_set():
            with self.cond:
                self.waiting += 1
            try:
                while not self.ready.wait(0.2):
                    if not context.is_active():
                        return
            finally:
                with self.cond:
                    self.waiting -= 1
        stream = self._open(context.peer())
        failure: list[str] = []
        reader = threading.Thread(target=self._read, args=(stream, request_iterator, failure),
                                  name=f"xds-read-{stream.peer}", daemon=True)
        reader.start()
        try:
            while True:
                with self.cond:
                    while True:
                        if failure or not context.is_active():
                            break
                        out = stream.responses()
                        if out:
                            break
                        self.cond.wait(1.0)
                if failure:
                    if failure[0].startswith("protocol:"):
                        context.abort(grpc.StatusCode.FAILED_PRECONDITION, failure[0].removeprefix("protocol: "))
                    return
                if not context.is_active():
                    return
                for response in out:
                    if self.on_push is not None:
                        self.on_push(response.type_url, len(response.resources), len(response.removed_resources))
                    yield response
        finally:
            self._close(stream, failure[0] if failure else "client went away")

    def _read(self, stream: Stream, requests: Iterator[discovery_pb2.DeltaDiscoveryRequest], failure: list[str]) -> None:
        try:
            for request in requests:
                with self.cond:
                    try:
                        stream.handle(request)
                    except StreamError as exc:
                        failure.append(f"protocol: {exc}")
                        log.error("xDS stream refused", extra={"peer": stream.peer, "error": str(exc)})
                        return
                    finally:
                        self.cond.notify_all()
            failure.append("stream ended by Envoy")
        except Exception as exc:  # noqa: BLE001 - grpc raises on cancellation; the stream just ends
            failure.append(f"stream broken: {type(exc).__name__}")
        finally:
            with self.cond:
                self.cond.notify_all()

    def _open(self, peer: str) -> Stream:
        def acked(type_url: str, versions: dict[str, str | None]) -> None:
            if self.on_ack is not None:
                self.on_ack(stream, type_url, versions)

        def nacked(type_url: str, names: list[str], message: str) -> None:
            if self.on_nack is not None:
                self.on_nack(stream, type_url, names, message)

        stream = Stream(self.store, peer=peer, expected_node=self.expected_node, on_ack=acked, on_nack=nacked,
                        on_demand=self.on_demand)
        with self.cond:
            self.streams.append(stream)
        log.info("Envoy connected", extra={"peer": peer})
        if self.on_stream is not None:
            self.on_stream(stream, True)
        return stream

    def _close(self, stream: Stream, why: str) -> None:
        with self.cond:
            if stream in self.streams:
                self.streams.remove(stream)
            summary = stream.summary()
            summary["ended"] = why
            self.closed = [*self.closed[-9:], summary]
        log.info("Envoy disconnected", extra={"peer": stream.peer, "node": stream.node_id, "why": why})
        if self.on_stream is not None:
            self.on_stream(stream, False)

    # -- facts -------------------------------------------------------------------------------------------

    def newest(self) -> Stream | None:
        """The most recently connected Envoy that identified itself (during an upgrade: the new one)."""
        with self.cond:
            live = [s for s in self.streams if s.node_id is not None]
            return live[-1] if live else None

    def summaries(self) -> list[dict[str, object]]:
        with self.cond:
            return [s.summary() for s in self.streams]

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self, *, socket_path: Path | None = None, tcp_address: str | None = None,
              owner: int | None = None) -> AdsServer:
        """``owner``: a UID that gets the socket (mode 0660), so a non-root Envoy can connect and nobody else."""
        if socket_path is None and tcp_address is None:
            raise ValueError("the xDS server needs a unix socket path or a loopback TCP address")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 1, thread_name_prefix="xds"),
                             maximum_concurrent_rpcs=MAX_STREAMS,
                             options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 16 << 20),
                                      ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 4_000)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        if socket_path is not None:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            if socket_path.exists() or socket_path.is_symlink():
                socket_path.unlink()  # a previous agent's: nobody listens on it any more
            server.add_insecure_port(f"unix:{socket_path}")
        if tcp_address is not None:
            check_loopback(tcp_address)
            if server.add_insecure_port(tcp_address) == 0:
                raise OSError(f"cannot listen on {tcp_address}")
        server.start()
        if socket_path is not None:
            os.chmod(socket_path, 0o660)
            if owner is not None:
                try:
                    os.chown(socket_path, owner, -1)
                except PermissionError:
                    # No CAP_CHOWN (the shipped DaemonSet grants only NET_ADMIN and NET_RAW): the socket keeps the
                    # agent's group, which the DaemonSet makes the proxy's (runAsGroup), so Envoy can still connect.
                    st = socket_path.stat()
                    log.warning("cannot give the xDS socket to the proxy's uid (no CAP_CHOWN): it stays mode 0660 "
                                "for gid %d; run the agent with the proxy's group", st.st_gid,
                                extra={"socket": str(socket_path), "uid": st.st_uid, "gid": st.st_gid})
        self._server = server
        log.info("xDS server listening", extra={"socket": str(socket_path) if socket_path else None, "tcp": tcp_address})
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.store.unsubscribe(self._changed)
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
            self._server = None
        with self.cond:
            self.cond.notify_all()


def wait_in_sync(server: AdsServer, timeout: float) -> bool:
    """Until the newest Envoy confirmed everything (tests, demo and benchmarks)."""
    deadline = time.monotonic() + timeout
    with server.cond:
        while True:
            stream = server.newest()
            if stream is not None and stream.in_sync():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            server.cond.wait(min(left, 0.5))


__all__ = ["Acked", "AdsServer", "SHORT", "check_loopback", "wait_in_sync"]
