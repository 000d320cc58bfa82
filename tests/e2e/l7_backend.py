"""A misbehaving HTTP backend for the L7 e2e tests only (run inside a pod's netns): it fails every Nth
request with a 500, or an exact percentage, or every request, or answers late (every request, or every Nth).
Prints ``READY <port>`` once it listens.

WHY a separate server: the echo server is the well-behaved backend every other test relies on."""

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def fails(n: int, percent: int) -> bool:
    """Request ``n`` (from 1) of a backend failing ``percent`` % exactly: the running count of failures is
    floor(n * percent / 100), so every 100 requests hold exactly ``percent`` failures, evenly spread (30: requests
    4, 7, 10, 14, 17, 20, ...: 3 of every 10, never more than one in a row)."""
    return n * percent // 100 > (n - 1) * percent // 100


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="backend")
    parser.add_argument("--fail-every", type=int, default=0, help="every Nth request gets a 500 (1: all)")
    parser.add_argument("--fail-percent", type=int, default=0,
                        help="exactly this many of every 100 requests get a 500, spread evenly (30: 3 of every 10)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--slow-every", type=int, default=1,
                        help="with --delay: only every Nth request (1, N+1, 2N+1...) is late (1: all)")
    args = parser.parse_args()
    lock, seen = threading.Lock(), [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body are two writes: without TCP_NODELAY the second waits for the peer's delayed
            # ACK (~40 ms) on a kept-alive connection such as Envoy's upstream pool.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            with lock:
                seen[0] += 1
                n = seen[0]
            if args.delay and n % args.slow_every == 1 % args.slow_every:
                time.sleep(args.delay)  # the slow backend this server exists to be
            failed = (args.fail_every > 0 and n % args.fail_every == 1 % args.fail_every) or fails(n, args.fail_percent)
            body = json.dumps({"server": args.name, "n": n, "failed": failed}).encode()
            self.send_response(500 if failed else 200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *a: object) -> None:  # noqa: A002 - the base class's name
            return

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET
        daemon_threads = True

    server = Server(("0.0.0.0", args.port), Handler)
    sys.stdout.write(f"READY {server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
