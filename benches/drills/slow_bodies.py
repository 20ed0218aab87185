#!/usr/bin/env python3
"""Slow-bodies drill: many callers each sending a request body slowly, all at once.

CONNECTIONS keep-alive connections (default 5,000) each send `POST` with a BODY-byte body (default 64 KiB, the
default `server.replay_buffer`) in CHUNKS pieces spread over BODY_SECONDS, all of them mid-body at the same time.
tokenproxy keeps each body whole (it may replay the request after a 401), so its memory peaks at about
`connections × replay_buffer` plus a per-connection overhead; this drill measures that overhead, checks that every
request is answered, and that RSS and open descriptors come back once the callers are gone.

Everything runs on 127.0.0.1: a fake IdP (benches/load/fake_idp.py), an upstream that reads each body and answers
with its length (a second process of this script), tokenproxy, and the callers. Usage:

    benches/drills/slow_bodies.py [--bin target/release/tokenproxy] [--transport h1|hyper]

Environment: CONNECTIONS, BODY, CHUNKS, BODY_SECONDS. Prints a markdown report; exit status 0 when every request got
its 200 and RSS came back within 2x idle, 1 otherwise.
"""
import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ the upstream
async def upstream_main(port):
    """Reads each request's Content-Length body and answers `200` with the number of bytes it read."""

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                body = str(length).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------------------------------------------------ measuring
def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


async def http_get(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


async def metric(port, name):
    _, text = await http_get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------------------------------------ the callers
async def caller(i, port, body, chunks, interval, opening, started, go, results):
    piece = len(body) // chunks
    try:
        async with opening:  # a bounded number of connections being opened at once: the accept backlog is finite
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST /drill/{i} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/octet-stream\r\n"
                f"content-length: {len(body)}\r\n\r\n".encode()
                + body[:piece]
            )
            await writer.drain()
        started()
        await go.wait()
        for k in range(1, chunks):
            await asyncio.sleep(interval)
            end = len(body) if k == chunks - 1 else (k + 1) * piece
            writer.write(body[k * piece : end])
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        answer = await reader.readexactly(length)
        ok = status == 200 and answer == str(len(body)).encode()
        results.append("ok" if ok else f"status {status}: {answer[:80]!r}")
        writer.close()
    except Exception as error:  # noqa: BLE001 - every failure is counted and reported
        results.append(f"{type(error).__name__}: {error}")
        started()


async def drill(args):
    connections = int(os.environ.get("CONNECTIONS", 5000))
    body_size = int(os.environ.get("BODY", 65536))
    chunks = int(os.environ.get("CHUNKS", 16))
    body_seconds = float(os.environ.get("BODY_SECONDS", 10))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * connections + 200:
        sys.exit(f"slow_bodies: {2 * connections + 200} descriptors needed, the hard limit is {hard}")

    tmp = tempfile.mkdtemp(prefix="tokenproxy-drill.")
    ports = {name: free_port() for name in ("idp", "upstream", "proxy", "admin")}
    children = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPROXY_") and k != "RUST_LOG"}
    try:
        children.append(subprocess.Popen([sys.executable, os.path.join(REPO, "benches/load/fake_idp.py"),
                                          str(ports["idp"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        children.append(subprocess.Popen([sys.executable, __file__, "--upstream", str(ports["upstream"])]))
        config = os.path.join(tmp, "tokenproxy.toml")
        with open(config, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{ports['proxy']}"
h1_transport = {'true' if args.transport == 'h1' else 'false'}
shutdown_grace = "1s"

[admin]
listen = "127.0.0.1:{ports['admin']}"

[log]
level = "warn"

[state]
dir = "{tmp}/state"

[providers.drill]
token_url = "http://127.0.0.1:{ports['idp']}/token"
client_id = "drill-client"
client_secret = "drill-secret"

[[routes]]
name = "drill"
prefix = "/drill"
upstream = "http://127.0.0.1:{ports['upstream']}"
provider = "drill"
""")
        log = open(os.path.join(tmp, "tokenproxy.log"), "w")
        proxy = subprocess.Popen([args.bin, "run", "--config", config], env=env, stdout=log, stderr=log)
        children.append(proxy)
        for _ in range(200):
            try:
                if (await http_get(ports["admin"], "/readyz"))[0] == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.05)
        else:
            sys.exit("slow_bodies: tokenproxy did not become ready; its log: " + open(log.name).read()[-2000:])

        # Warm up the paths once (the token, an upstream connection), then measure idle.
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["proxy"])
        writer.write(b"POST /drill/warm HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
        warm = await reader.read()
        writer.close()
        if not warm.startswith(b"HTTP/1.1 200"):
            sys.exit(f"slow_bodies: the warm-up request failed: {warm[:200]!r}")
        await asyncio.sleep(1)
        idle_rss, _ = rss_kb(proxy.pid)
        idle_fds = descriptors(proxy.pid)

        body = os.urandom(body_size)
        results = []
        ready = 0
        all_started = asyncio.Event()
        go = asyncio.Event()

        def started():
            nonlocal ready
            ready += 1
            if ready == connections:
                all_started.set()

        samples = []

        async def sample():
            while True:
                samples.append(rss_kb(proxy.pid)[0])
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        t0 = time.monotonic()
        opening = asyncio.Semaphore(256)

        tasks = [
            asyncio.create_task(
                caller(i, ports["proxy"], body, chunks, body_seconds / chunks, opening, started, go, results)
            )
            for i in range(connections)
        ]
        await asyncio.wait_for(all_started.wait(), 120)
        opened_in = time.monotonic() - t0
        go.set()
        # Halfway through the bodies every caller is connected and mid-body: how many requests are in flight.
        await asyncio.sleep(body_seconds / 2)
        inflight_mid = await metric(ports["admin"], "tokenproxy_inflight_requests")
        await asyncio.gather(*tasks)
        finished_in = time.monotonic() - t0
        sampler.cancel()
        _, hwm = rss_kb(proxy.pid)
        peak = max(max(samples), hwm)

        # After: the callers have closed; give the proxy a moment to see it, then sample for 10 s.
        after = []
        for _ in range(20):
            await asyncio.sleep(0.5)
            after.append(rss_kb(proxy.pid)[0])
        after_fds = descriptors(proxy.pid)
        inflight_after = await metric(ports["admin"], "tokenproxy_inflight_requests")
        answered_200 = await metric(ports["admin"], 'tokenproxy_requests_total{route="drill",status="200"}')

        failures = [r for r in results if r != "ok"]
        kept = connections * body_size / 1024
        overhead = (peak - idle_rss - kept) / connections
        mib = lambda kb: f"{kb / 1024:.1f} MiB"  # noqa: E731
        print(f"# slow-bodies drill ({args.transport} transport)\n")
        print(f"{connections:,} connections, each a POST with a {body_size:,}-byte body in {chunks} pieces over "
              f"{body_seconds:g} s; all connected and mid-body after {opened_in:.1f} s, done after {finished_in:.1f} s.\n")
        print("| measure | value |\n|---|---:|")
        print(f"| requests sent | {connections:,} |")
        print(f"| answered 200 with the whole body seen upstream | {connections - len(failures):,} |")
        print(f"| failed | {len(failures):,} |")
        print(f"| in flight halfway through the bodies (tokenproxy_inflight_requests) | {inflight_mid:,.0f} |")
        print(f"| RSS idle (after one warm-up request) | {mib(idle_rss)} |")
        print(f"| RSS peak (VmHWM) | {mib(peak)} |")
        print(f"| connections x body | {mib(kept)} |")
        print(f"| overhead per connection: (peak - idle - connections x body) / connections | {overhead:.1f} KiB |")
        print(f"| RSS 10 s after the last answer | {mib(after[-1])} ({after[-1] / idle_rss:.2f}x idle) |")
        print(f"| open descriptors: idle / after | {idle_fds} / {after_fds} |")
        print(f"| in flight after | {inflight_after:.0f} |")
        print(f"| tokenproxy_requests_total 200 (incl. warm-up) | {answered_200:,.0f} |")
        if failures:
            print("\nFirst failures: " + "; ".join(failures[:5]))
        ok = not failures and after[-1] <= 2 * idle_rss and inflight_after == 0
        print(f"\nResult: {'pass' if ok else 'FAIL'} (every request answered 200, RSS after within 2x idle, "
              f"nothing left in flight)")
        return 0 if ok else 1
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
        subprocess.run(["rm", "-rf", tmp])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=os.path.join(REPO, "target/release/tokenproxy"))
    parser.add_argument("--transport", choices=("h1", "hyper"), default="h1")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
        asyncio.run(upstream_main(args.upstream))
        return
    sys.exit(asyncio.run(drill(args)))


if __name__ == "__main__":
    main()
