#!/usr/bin/env python3
"""Idle keep-alive callers: opens N connections to HOST:PORT, sends one HTTP/1.1 GET on each (at most CONCURRENCY
at a time, as a pool of busy clients would) and reads its response, then keeps every connection open and idle.
Prints "ready OK FAILED" once all are idle, and closes them when it gets SIGTERM.

Usage: idle_callers.py HOST PORT N CONCURRENCY
"""
import asyncio
import resource
import signal
import sys


async def one_request(host, port, gate, keep):
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            await asyncio.wait_for(reader.readexactly(length), 30)
            ok = head.startswith(b"HTTP/1.1 200")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            return False
    keep.append(writer)
    return ok


async def main():
    host, port, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1024)), hard))
    gate = asyncio.Semaphore(concurrency)
    keep = []
    results = await asyncio.gather(*(one_request(host, port, gate, keep) for _ in range(n)))
    ok = sum(1 for r in results if r)
    print(f"ready {ok} {n - ok}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for writer in keep:
        writer.close()


asyncio.run(main())
