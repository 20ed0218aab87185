#!/usr/bin/env python3
"""A tiny fake OAuth2 token endpoint for the load benchmark (127.0.0.1 only).

POST /token answers a client_credentials grant with a fixed opaque token valid for a day, so tokenproxy makes one
token call at startup and none while it is measured; a call with a DPoP proof gets the token as `token_type: DPoP`
(the proof is not checked: the benchmark prices making proofs, not checking them). GET /count answers how many token
calls were made.
Usage: fake_idp.py PORT
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = {"access_token": "bench-access-token-0123456789abcdef", "token_type": "Bearer", "expires_in": 86400}
calls = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        global calls
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] != "/token":
            return self._answer(404, {"error": "not_found"})
        calls += 1
        self._answer(200, dict(TOKEN, token_type="DPoP") if self.headers.get("DPoP") else TOKEN)

    def do_GET(self):
        if self.path == "/count":
            return self._answer(200, {"token_calls": calls})
        self._answer(404, {"error": "not_found"})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
