#!/usr/bin/env python3
"""Token-exchange callers drill: many distinct callers through a route that exchanges each caller's token.

CALLERS distinct callers (default 10,000), each with its own bearer token, send one request each and then REPEAT
more (default 1), over 64 keep-alive connections. tokenproxy exchanges each caller's token once at the IdP (a fake
that answers every token call, benches/load/fake_idp.py) and keeps the exchanged tokens in its per-caller cache,
bounded by MAX_SUBJECTS (default 10,000). The report gives the exchanges the IdP saw, the cache's size and
evictions (from /metrics), and tokenproxy's RSS before and after, so the memory per cached caller can be read off.

Everything runs on 127.0.0.1. Usage:

    benches/drills/exchange_callers.py [--bin target/release/tokenproxy]

Environment: CALLERS, REPEAT, MAX_SUBJECTS. Prints a markdown report; exit status 0 when every request got its 200
and the IdP saw one exchange per caller (plus one per evicted caller that came back), 1 otherwise.
"""
import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited at startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within {timeout} s")


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def get(url):
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.read().decode()


def metric(text, name, labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def upstream_main(port):
    """Answers every request `200 ok` (no body read: the drill sends none)."""

    async def serve(reader, writer):
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


async def callers(port, tokens, connections=64):
    """Sends one GET per token in `tokens`, spread over `connections` keep-alive connections; returns (ok, failed)."""
    queue = asyncio.Queue()
    for token in tokens:
        queue.put_nowait(token)
    results = {"ok": 0, "failed": 0}

    async def connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not queue.empty():
                token = queue.get_nowait()
                writer.write(
                    f"GET /exchange/x HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                results["ok" if head.startswith(b"HTTP/1.1 200") else "failed"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return results["ok"], results["failed"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default=os.path.join(REPO, "target", "release", "tokenproxy"))
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        asyncio.run(upstream_main(args.upstream))
        return
    n_callers = int(os.environ.get("CALLERS", "10000"))
    repeat = int(os.environ.get("REPEAT", "1"))
    max_subjects = int(os.environ.get("MAX_SUBJECTS", "10000"))
    if not os.path.exists(args.bin):
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=REPO, check=True)

    procs = []
    try:
        port_idp, port_up, port_tp, port_admin = free_port(), free_port(), free_port(), free_port()
        idp = subprocess.Popen([sys.executable, os.path.join(REPO, "benches", "load", "fake_idp.py"), str(port_idp)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(idp)
        up = subprocess.Popen([sys.executable, __file__, "--upstream", str(port_up)])
        procs.append(up)
        wait_port(port_idp, idp, "fake IdP")
        wait_port(port_up, up, "upstream")
        tmp = tempfile.mkdtemp(prefix="tokenproxy-exchange-")
        config = os.path.join(tmp, "tokenproxy.toml")
        with open(config, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{port_tp}"
[admin]
listen = "127.0.0.1:{port_admin}"
[log]
level = "warn"
[state]
dir = "{tmp}/state"
[providers.exchange]
token_url = "http://127.0.0.1:{port_idp}/token"
grant = "token_exchange"
client_id = "bench-client"
client_secret = "bench-secret"
max_subjects = {max_subjects}
[[routes]]
prefix = "/exchange"
upstream = "http://127.0.0.1:{port_up}"
provider = "exchange"
""")
        tp = subprocess.Popen([args.bin, "run", "--config", config], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(tmp, "tokenproxy.log"), "w"))
        procs.append(tp)
        wait_port(port_admin, tp, "tokenproxy")
        time.sleep(1)
        rss_idle = rss_kb(tp.pid)
        tokens = [f"caller-{i:06d}-" + "x" * 600 for i in range(n_callers)]  # about the size of a real JWT
        started = time.time()
        ok, failed = asyncio.run(callers(port_tp, tokens * repeat))
        elapsed = time.time() - started
        rss_after = rss_kb(tp.pid)
        exchanges = json.loads(get(f"http://127.0.0.1:{port_idp}/count"))["token_calls"]
        metrics = get(f"http://127.0.0.1:{port_admin}/metrics")
        subjects = metric(metrics, "tokenproxy_exchange_subjects", {"provider": "exchange"})
        evicted = metric(metrics, "tokenproxy_exchange_cache_total", {"provider": "exchange", "event": "evicted"})
        hits = metric(metrics, "tokenproxy_exchange_cache_total", {"provider": "exchange", "event": "hit"})
        per_caller = (rss_after - rss_idle) * 1024 / max(1, min(n_callers, max_subjects))
        print(f"# token exchange, {n_callers:,} callers × {repeat} request(s) each, max_subjects {max_subjects:,}\n")
        print("| measure | value |\n|---|---|")
        print(f"| requests | {ok + failed:,} ({ok:,} × 200, {failed:,} other) in {elapsed:.1f} s |")
        print(f"| exchanges at the IdP | {exchanges:,} |")
        print(f"| cache hits | {hits:,.0f} |")
        print(f"| callers cached / evicted | {subjects:,.0f} / {evicted:,.0f} |")
        print(f"| tokenproxy RSS idle → after | {rss_idle / 1024:.1f} MB → {rss_after / 1024:.1f} MB "
              f"(≈ {per_caller:,.0f} bytes per cached caller) |")
        expected_min = n_callers
        good = failed == 0 and exchanges >= expected_min and (max_subjects < n_callers or exchanges == n_callers)
        sys.exit(0 if good else 1)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
