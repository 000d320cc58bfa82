"""Open-loop load driver for the webhook: a fixed offered rate, latency measured from the INTENDED send time.

wrk is closed-loop (each connection waits for its answer before sending the next request), so a slow
answer also delays the requests behind it and hides them from the latency figures ("coordinated
omission"). Here a clock decides when request i is due (t0 + i/rate); a pool of keep-alive TLS
connections sends it as soon as one is free, and its latency is counted from the due time, so time
spent queued behind a slow answer is counted too.

Run by bench/webhook_bench.py in its own process:
``python -m bench.webhook_load --port P --cafile ca.pem --body review.json --rate 200 --duration 30``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

HOSTNAME = "lightpath-webhook.lightpath-system.svc"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def run(args: argparse.Namespace) -> dict[str, Any]:
    body = Path(args.body).read_bytes()
    request = (
        f"POST /mutate?timeout=10s HTTP/1.1\r\nHost: {HOSTNAME}:443\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    ctx = ssl.create_default_context(cafile=args.cafile)
    conns = [
        await asyncio.open_connection(args.host, args.port, ssl=ctx, server_hostname=HOSTNAME)
        for _ in range(args.connections)
    ]
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[tuple[float, float]] = []  # (due time, latency)
    statuses: dict[int, int] = {}
    errors = 0

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        while (due := await queue.get()) is not None:
            try:
                writer.write(request)
                status = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                return
            latencies.append((due, time.perf_counter() - due))
            statuses[status] = statuses.get(status, 0) + 1

    workers = [asyncio.create_task(worker(r, w)) for r, w in conns]
    total = int(args.rate * (args.duration + args.warmup))
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        due = t0 + i / args.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(due)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - t0
    for _, w in conns:
        w.close()

    measured = sorted(lat for due, lat in latencies if due >= t0 + args.warmup)
    ms = [v * 1000 for v in measured]
    return {
        "offered_rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "sent": total,
        "answered": len(latencies),
        "measured": len(ms),
        "achieved_rate": round(len(latencies) / elapsed, 1),
        "statuses": statuses,
        "errors": errors,
        "latency_ms": {
            "p50": round(percentile(ms, 50), 3),
            "p90": round(percentile(ms, 90), 3),
            "p99": round(percentile(ms, 99), 3),
            "p99.9": round(percentile(ms, 99.9), 3),
            "max": round(ms[-1], 3) if ms else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--body", required=True, help="file holding the AdmissionReview to send")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, open loop")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds sent first and not measured")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections in the pool")
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    json.dump(runner(run(args)), sys.stdout)
    print()


if __name__ == "__main__":
    main()
