#!/usr/bin/env python3
"""Denial of service by idle connections, measured: a running tokenproxy at max_connections with idle connections
(HTTP/1.1 keep-alive after one request, h2c after one request, and zero-byte ones), and how long a new caller's
request and the admin listener's /healthz then take to answer (each new caller at the limit makes the longest-idle
connection give way). Prints one JSON object.

Usage: idle_flood.py HOST PROXY_PORT ADMIN_PORT CONNECTIONS PROBES PID
  CONNECTIONS idle connections are opened to the proxy (a third of each kind), 200 zero-byte ones to the admin
  listener (its limit is 64), then PROBES new callers are timed one after another, each with a GET through the proxy
  and a GET /healthz. PID is tokenproxy's, for its RSS. 127.0.0.1 only.
"""
import asyncio
import json
import sys
import time

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0"


def h2_get(authority, path):
    block = bytes([0x82, 0x86])
    for index, value in ((4, path), (1, authority)):
        block += bytes([index, len(value)]) + value.encode()
    return bytes([0, 0, len(block), 0x1, 0x5, 0, 0, 0, 1]) + block


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def open_idle(host, port, kind):
    """One idle connection of `kind`; returns its writer (kept to hold the connection open), or None."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return None
    try:
        if kind == "http1":
            writer.write(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        elif kind == "h2c":
            writer.write(H2_PREFACE + h2_get("localhost", "/idle"))
            await writer.drain()
            await asyncio.wait_for(reader.read(1), 30)
        return writer
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        writer.close()
        return None


async def timed_get(host, port, path):
    """Seconds until a GET on a new connection is answered (its status line), and the status."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 60)
    elapsed = time.monotonic() - started
    writer.close()
    return elapsed, int(line.split()[1]) if line else 0


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else None


async def main():
    host, proxy_port, admin_port, connections, probes, pid = sys.argv[1:7]
    proxy_port, admin_port, connections, probes, pid = map(int, (proxy_port, admin_port, connections, probes, pid))
    rss_before = rss_kb(pid)
    kinds = ["http1", "h2c", "zero"]
    held = []
    opened = {kind: 0 for kind in kinds}
    batch = 200
    for start in range(0, connections, batch):
        tasks = [open_idle(host, proxy_port, kinds[i % 3]) for i in range(start, min(connections, start + batch))]
        for i, writer in enumerate(await asyncio.gather(*tasks)):
            if writer is not None:
                held.append(writer)
                opened[kinds[(start + i) % 3]] += 1
    admin_idle = [w for w in await asyncio.gather(*[open_idle(host, admin_port, "zero") for _ in range(200)]) if w]
    rss_idle = rss_kb(pid)
    get_times, healthz_times, failures = [], [], 0
    for _ in range(probes):
        elapsed, status = await timed_get(host, proxy_port, "/probe")
        get_times.append(elapsed) if status == 200 else None
        failures += status != 200
        elapsed, status = await timed_get(host, admin_port, "/healthz")
        healthz_times.append(elapsed) if status == 200 else None
        failures += status != 200
    ms = lambda v: None if v is None else round(v * 1000, 2)
    print(json.dumps({
        "idle_opened": opened,
        "admin_idle_opened": len(admin_idle),
        "probes": probes,
        "failed_probes": failures,
        "get_ms_p50": ms(percentile(get_times, 50)),
        "get_ms_p99": ms(percentile(get_times, 99)),
        "healthz_ms_p50": ms(percentile(healthz_times, 50)),
        "healthz_ms_p99": ms(percentile(healthz_times, 99)),
        "rss_kb_before": rss_before,
        "rss_kb_with_idle": rss_idle,
    }))
    for writer in held + admin_idle:
        writer.close()


asyncio.run(main())
