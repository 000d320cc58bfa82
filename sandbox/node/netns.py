"""Network namespaces for kernel tests: a fake node with pods, without touching the host's network.

WHY: redirect and DNAT rules are only proven by real packets through the real kernel. Each test
builds its own throw-away "node" netns with veth-attached "pod" netns (named with the pid and a
counter so parallel runs never collide) and removes them afterwards, even when the test fails.

- ``NetNS``: one namespace; ``run`` a command in it, ``popen`` a server in it (killed on delete).
- ``run_in_netns``: run a Python callable in a forked child that entered the netns, so
  libnftables (which acts on the calling process's netns) can be driven without moving pytest.
- ``Topology``: node + N pods, pod IPs 10.244.0.(10+i) / fd00:10:244::(10+i), node 10.244.0.1 /
  fd00:10:244::1, service CIDRs routed to a device in the node. ``addressless=True`` builds the
  Calico / Cilium-chaining / AWS VPC CNI shape instead: no address on the host side of any veth.
- Traffic helpers (``tcp_listener``, ``tcp_request``, ...) live in ``sandbox.node.traffic`` and are
  re-exported here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import re
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from shared.errors import SandboxError
from shared.netns import NETNS_DIR as NETNS_DIR  # re-exported: demo and tests name it here
from shared.netns import enter

T = TypeVar("T")

NODE_IP = "10.244.0.1"
NODE_IP6 = "fd00:10:244::1"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:10:96::/112"
SERVICE_DEVICE = "svc0"
# The addressless (Calico-style) topology: every pod's gateway, answered for by the host veth's MAC.
POD_GATEWAY = "169.254.1.1"
POD_GATEWAY6 = "fe80::1"
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"  # what Calico gives every host-side veth

_counter = itertools.count()


class NetnsCommandError(SandboxError, subprocess.CalledProcessError):
    """A command in a netns failed; unlike CalledProcessError, str() shows its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {(self.stderr or '').strip()}"


class RemoteTraceback(SandboxError):
    """Carries the child's formatted traceback as the __cause__ of a re-raised exception."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0])


def _run(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def run_in_netns(netns_name: str, fn: Callable[..., T], *args: Any, timeout: float = 60, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` in a forked child inside ``netns_name``; return its result.

    ``timeout`` (seconds) belongs to this helper, not to ``fn``; the child is killed when it passes.
    The result must be picklable. An exception in the child is re-raised here (its original type
    when it unpickles, else RuntimeError) with the child's traceback text chained as the cause.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack (pytest!), always os._exit
        try:
            os.close(read_fd)
            try:
                enter(netns_name)  # the forked child is single-threaded: the whole process moves
                payload: tuple[bool, Any] = (True, fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
                payload = (False, (exc, traceback.format_exc()))
            try:
                data = pickle.dumps(payload)
                pickle.loads(data)
            except Exception as exc:  # noqa: BLE001
                detail = payload[1][1] if not payload[0] else ""
                error = RuntimeError(f"result of {fn!r} in netns {netns_name} is not picklable: {exc!r}")
                data = pickle.dumps((False, (error, detail or traceback.format_exc())))
            with os.fdopen(write_fd, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    poller = select.poll()  # not select(): fds above 1024 are common in a long pytest run
    poller.register(read_fd, select.POLLIN)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"{fn!r} in netns {netns_name} did not finish within {timeout}s")
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError(f"child running {fn!r} in netns {netns_name} died without a result")
    ok, value = pickle.loads(b"".join(chunks))
    if ok:
        return value  # type: ignore[no-any-return]
    error, tb = value
    raise error from RemoteTraceback(tb)


def _nft_cmd(script: str) -> str:
    import nftables  # type: ignore[import-untyped]  # Debian python3-nftables; acts on the calling process's netns

    nft = nftables.Nftables()
    rc, out, err = nft.cmd(script)
    if rc != 0:
        raise RuntimeError(f"nft failed ({rc}): {err.strip()}\n--- script ---\n{script}")
    return str(out)


def nft(netns_name: str, script: str) -> str:
    """Run an nft script (one atomic transaction) with libnftables inside ``netns_name``."""
    import nftables  # noqa: F401  # imported before the fork, so the child never runs the import machinery

    return run_in_netns(netns_name, _nft_cmd, script)


class NetNS:
    """One named network namespace, plus the processes started in it (killed on delete)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"

    def create(self) -> NetNS:
        _run(["ip", "netns", "add", self.name])
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        return self

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def delete(self) -> None:
        """Kill our processes, then remove the namespace (idempotent)."""
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        if self.exists():
            _run(["ip", "netns", "del", self.name], check=False)

    def run(
        self, argv: Sequence[str], check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the netns (text in, text out)."""
        return _run(["ip", "netns", "exec", self.name, *argv], check=check, input=input, timeout=timeout)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside the netns; it is killed when the netns is deleted."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``run_in_netns`` for this namespace."""
        return run_in_netns(self.name, fn, *args, **kwargs)

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Topology:
    """A node netns and ``pods`` pod netns, each pod joined to the node by a veth pair.

    Node: forwarding on, ``vethI`` carries NODE_IP(/6) as /32 (/128) with a host route to pod I,
    the service CIDRs route to a device (so locally generated traffic to a ClusterIP has a
    route and passes the nat output hook). Pods: ``eth0`` with their /32 (/128), default route via
    the node. Use as a context manager; everything is removed on exit.

    ``addressless=True``: the shape Calico, Cilium (chaining) and the AWS VPC CNI give a node, where
    REDIRECT in prerouting has no address to rewrite to. The host side of each veth has no address
    (IPv6: only the kernel's own link-local) and the MAC HOST_VETH_MAC; each pod's default route goes
    via POD_GATEWAY (POD_GATEWAY6), a static neighbour entry pointing at that MAC (what proxy ARP
    answers on a real node); the node keeps its /32 (/128) routes to the pods, and NODE_IP(/6) sits
    on the service device, the stand-in for the node's uplink.
    """

    def __init__(self, pods: int = 2, *, ipv6: bool = True, prefix: str = "lp", addressless: bool = False,
                 subnet: int = 0) -> None:
        """``subnet``: this node's pod range, 10.244.<subnet>.0/24 and fd00:10:244:<subnet>::/64 (several
        nodes in one test, ``sandbox.node.multinode``); 0 is the single node every other test uses."""
        if pods < 0 or pods > 200:
            raise ValueError(f"pods must be in 0..200, got {pods}")
        if not 0 <= subnet < 256:
            raise ValueError(f"subnet must be in 0..255, got {subnet}")
        base = f"{prefix}-{os.getpid()}-{next(_counter)}"
        self.ipv6 = ipv6
        self.addressless = addressless
        self.node = NetNS(f"{base}-node")
        self.pods = [NetNS(f"{base}-pod{i}") for i in range(pods)]
        self.subnet = subnet
        v6 = f"fd00:10:244:{subnet:x}:" if subnet else "fd00:10:244:"
        self.pod_ips = [f"10.244.{subnet}.{10 + i}" for i in range(pods)]
        self.pod_ips6 = [f"{v6}:{10 + i}" for i in range(pods)] if ipv6 else []
        node_ip, node_ip6 = f"10.244.{subnet}.1", f"{v6}:1"
        self.node_ips = [node_ip, node_ip6] if ipv6 else [node_ip]
        self.node_ip, self.node_ip6 = node_ip, (node_ip6 if ipv6 else None)

    @property
    def all(self) -> list[NetNS]:
        return [self.node, *self.pods]

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Kill processes started via popen and delete every namespace (idempotent)."""
        for ns in reversed(self.all):
            ns.delete()

    def _build(self) -> None:
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        for ns in self.all:
            ns.create()
            ns.run(["sysctl", "-q", "-w", *sysctls])
        self.node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        node = [
            # A veth pair with both ends in the node stands in for a dummy device (the dummy
            # module may be missing); unNATed service traffic leaves here and dies unanswered.
            f"link add {SERVICE_DEVICE} type veth peer name {SERVICE_DEVICE}p",
            f"link set {SERVICE_DEVICE}p up",
            f"link set {SERVICE_DEVICE} up",
            f"route add {SERVICE_CIDR} dev {SERVICE_DEVICE}",
        ]
        if self.ipv6:
            node.append(f"route add {SERVICE_CIDR6} dev {SERVICE_DEVICE}")
        if self.addressless:
            node.append(f"addr add {self.node_ip}/32 dev {SERVICE_DEVICE}")
            if self.ipv6:
                node.append(f"addr add {self.node_ip6}/128 dev {SERVICE_DEVICE} nodad")
        for i, pod in enumerate(self.pods):
            veth = f"veth{i}"
            mac = f" address {HOST_VETH_MAC}" if self.addressless else ""
            node += [
                f"link add {veth}{mac} type veth peer name eth0 netns {pod.name}",
                f"link set {veth} up",
                f"route add {self.pod_ips[i]}/32 dev {veth}",
            ]
            if not self.addressless:
                node.append(f"addr add {self.node_ip}/32 dev {veth}")
            if self.ipv6:
                node.append(f"route add {self.pod_ips6[i]}/128 dev {veth}")
                if not self.addressless:
                    node.append(f"addr add {self.node_ip6}/128 dev {veth} nodad")
        _run(["ip", "-n", self.node.name, "-batch", "-"], input="\n".join(node) + "\n")
        for i, pod in enumerate(self.pods):
            _run(["ip", "-n", pod.name, "-batch", "-"], input="\n".join(self._pod_commands(i)) + "\n")

    def _pod_commands(self, i: int) -> list[str]:
        """``ip -batch`` lines for pod ``i``'s eth0: its /32 (/128) and a default route via the node."""
        gateways = [(POD_GATEWAY, self.pod_ips[i], "32", "")]
        if self.ipv6:
            gateways.append((POD_GATEWAY6, self.pod_ips6[i], "128", " nodad"))
        cmds = ["link set eth0 up"]
        for gateway, ip, plen, flags in gateways:
            cmds.append(f"addr add {ip}/{plen} dev eth0{flags}")
            if self.addressless:
                if ":" not in gateway:  # fe80::/64 is on-link already
                    cmds.append(f"route add {gateway}/32 dev eth0 scope link")
                cmds.append(f"neigh add {gateway} lladdr {HOST_VETH_MAC} dev eth0 nud permanent")
            else:
                gateway = (self.node_ip6 or "") if ":" in gateway else self.node_ip
                cmds.append(f"route add {gateway}/{plen} dev eth0")
            cmds.append(f"route add default via {gateway} dev eth0")
        return cmds


_STALE = re.compile(r"^(?P<prefix>.+)-(?P<pid>\d+)-\d+-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "lp") -> list[str]:
    """Delete ``prefix`` namespaces left by test runs whose process is gone; return their names.

    Namespaces of live processes (parallel test runs) are left alone.
    """
    removed = []
    names = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    for name in names:
        m = _STALE.match(name)
        if not m or m["prefix"] != prefix or _alive(int(m["pid"])):
            continue
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed


_TRAFFIC_NAMES = frozenset(
    {
        "Listener",
        "TrafficError",
        "echo_listener",
        "http_listener",
        "http_request",
        "tcp_listener",
        "tcp_request",
        "udp_listener",
        "udp_request",
        "wait_until",
    }
)


def __getattr__(name: str) -> Any:
    """Re-export the traffic helpers lazily (``sandbox.node.traffic`` imports this module)."""
    if name in _TRAFFIC_NAMES:
        from sandbox.node import traffic

        return getattr(traffic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
