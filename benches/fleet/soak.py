#!/usr/bin/env python3
"""Fleet soak: many tokenproxy replicas sharing their tokens through one Redis (docs/fleet.md), for minutes, with
replicas killed (SIGKILL) and restarted along the way. Counts the token calls each provider made at a fake IdP and
compares them with the ideal: one call per provider per refresh cycle for the whole fleet.

Usage: benches/fleet/soak.py
Environment: REPLICAS (10), PROVIDERS (5), DURATION seconds (600), TTL token lifetime in seconds (30),
KILL_EVERY seconds between kills (60; 0: none), TOKENPROXY_BIN (default target/release/tokenproxy, built when missing).
Needs redis-server (apt-get install redis-server). Everything listens on 127.0.0.1. The report goes to stdout.
"""
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLICAS = int(os.environ.get("REPLICAS", "10"))
PROVIDERS = int(os.environ.get("PROVIDERS", "5"))
DURATION = int(os.environ.get("DURATION", "600"))
TTL = int(os.environ.get("TTL", "30"))
KILL_EVERY = int(os.environ.get("KILL_EVERY", "60"))
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("TOKENPROXY_BIN", os.path.join(REPO, "target", "release", "tokenproxy"))

calls = {}
calls_lock = threading.Lock()


def say(text):
    print(f"[soak] {text}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Idp(BaseHTTPRequestHandler):
    """POST /token: a client_credentials token for the scope asked (one scope per provider), living TTL seconds."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        scope = urllib.parse.parse_qs(body).get("scope", ["?"])[0]
        with calls_lock:
            calls.setdefault(scope, []).append(time.time())
            n = len(calls[scope])
        data = json.dumps({"access_token": f"tok-{scope}-{n}", "token_type": "Bearer", "expires_in": TTL}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def config(work, redis_port, idp_port, keys, listen, admin):
    lines = [
        f'[server]\nlisten = "127.0.0.1:{listen}"\n',
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n',
        '[log]\nlevel = "warn"\n',
        f'[state]\ndir = "{work}/state-{listen}"\nstore = "redis"\nredis_url = "redis://127.0.0.1:{redis_port}"\n'
        f'encryption_key_file = "{keys}"\nkey_prefix = "soak"\n',
    ]
    for p in range(PROVIDERS):
        lines.append(
            f'[providers.p{p}]\ntoken_url = "http://127.0.0.1:{idp_port}/token"\nclient_id = "soak"\n'
            f'client_secret = "soak-secret"\nscope = "soak.p{p}"\n'
        )
        lines.append(f'[[routes]]\nprefix = "/p{p}"\nupstream = "http://127.0.0.1:9"\nprovider = "p{p}"\n')
    return "\n".join(lines)


def ready(admin):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as answer:
            return answer.status == 200
    except Exception:
        return False


def main():
    if not os.path.exists(BIN):
        say("building the release binary")
        subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    work = tempfile.mkdtemp(prefix="tokenproxy-soak-")
    keys = os.path.join(work, "keys")
    with open(keys, "w") as f:
        f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    os.chmod(keys, 0o600)
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    idp = ThreadingHTTPServer(("127.0.0.1", 0), Idp)
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    replicas = []
    try:
        for _ in range(REPLICAS):
            listen, admin = free_port(), free_port()
            path = os.path.join(work, f"r{listen}.toml")
            with open(path, "w") as f:
                f.write(config(work, redis_port, idp.server_address[1], keys, listen, admin))
            replicas.append({"config": path, "admin": admin, "proc": None, "kills": 0})
        started = time.time()
        for r in replicas:
            r["proc"] = subprocess.Popen([BIN, "run", "--config", r["config"]], stdout=subprocess.DEVNULL,
                                         stderr=open(r["config"] + ".log", "a"))
        say(f"{REPLICAS} replicas × {PROVIDERS} providers, {TTL} s tokens, {DURATION} s, a kill -9 every {KILL_EVERY} s")
        not_ready = 0
        checks = 0
        next_kill = started + KILL_EVERY if KILL_EVERY else None
        while time.time() - started < DURATION:
            time.sleep(1)
            if next_kill and time.time() >= next_kill:
                victim = random.choice(replicas)
                victim["proc"].send_signal(signal.SIGKILL)
                victim["proc"].wait()
                victim["kills"] += 1
                victim["proc"] = subprocess.Popen([BIN, "run", "--config", victim["config"]],
                                                  stdout=subprocess.DEVNULL, stderr=open(victim["config"] + ".log", "a"))
                next_kill += KILL_EVERY
            if int(time.time() - started) % 10 == 0:
                for r in replicas:
                    checks += 1
                    if not ready(r["admin"]):
                        not_ready += 1
        elapsed = time.time() - started
    finally:
        for r in replicas:
            if r["proc"] and r["proc"].poll() is None:
                r["proc"].terminate()
        for r in replicas:
            if r["proc"]:
                try:
                    r["proc"].wait(timeout=10)
                except subprocess.TimeoutExpired:
                    r["proc"].kill()
        redis.terminate()
        redis.wait()
        idp.shutdown()
    # A refresh cycle is 65-75 % of a lifetime (refresh_at 0.75, jitter up to 10 %): the ideal counts 70 %.
    ideal = elapsed / (0.70 * TTL) + 1
    total = sum(len(v) for v in calls.values())
    kills = sum(r["kills"] for r in replicas)
    print(f"# Fleet soak: {REPLICAS} replicas × {PROVIDERS} providers, {TTL} s tokens, {elapsed:.0f} s, "
          f"{kills} kill -9 (and restarts)\n")
    print("| provider | token calls | ideal (one per refresh cycle, fleet-wide) | ratio | one replica alone × replicas |")
    print("|---|---:|---:|---:|---:|")
    for scope in sorted(calls):
        n = len(calls[scope])
        print(f"| {scope} | {n} | {ideal:.1f} | {n / ideal:.2f} | {ideal * REPLICAS:.0f} |")
    print(f"\nAll providers: {total} token calls; ideal {ideal * PROVIDERS:.0f}; without the shared store about "
          f"{ideal * PROVIDERS * REPLICAS:.0f}.")
    print(f"Readiness checks that failed: {not_ready} of {checks} (a restarted replica is not ready for a moment).")


if __name__ == "__main__":
    main()
