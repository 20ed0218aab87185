#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace receiver for the load benchmark (127.0.0.1 only): it counts spans, nothing more.

POST /v1/traces with `Content-Type: application/x-protobuf` (an ExportTraceServiceRequest) is answered 200 with an
empty ExportTraceServiceResponse (a zero-length protobuf body: full success). The body is not decoded: a walk over
the protobuf wire format steps into the three levels that lead to the spans and counts the spans' fields without
reading them:

  ExportTraceServiceRequest  field 1: ResourceSpans (repeated)
  ResourceSpans              field 2: ScopeSpans (repeated)
  ScopeSpans                 field 2: Span (repeated)      <- counted, skipped by their length

A request with another content type is answered 415, a compressed body or one that is not valid protobuf 400; all
are counted as `refused` (tokenproxy counts the spans of a refused export as dropped).
GET /count answers one line, the counts since the start: "SPANS EXPORTS REFUSED BYTES" (spans received, exports
answered 200, exports refused, bytes of the exports answered 200).
Usage: otlp_collector.py PORT | otlp_collector.py --self-test
"""
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LEN = 2  # wire type of length-delimited fields (messages, strings, bytes, packed)

counts = {"spans": 0, "exports": 0, "refused": 0, "bytes": 0}
lock = threading.Lock()


def varint(buf, i):
    """The varint at buf[i]: (value, index after it)."""
    b = buf[i]
    if b < 0x80:
        return b, i + 1
    value, shift = b & 0x7F, 7
    while True:
        i += 1
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i + 1
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf, i, end, wanted):
    """(start, end) of each length-delimited field number `wanted` in buf[i:end]; other fields are skipped."""
    while i < end:
        tag, i = varint(buf, i)
        wire = tag & 7
        if wire == LEN:
            length, i = varint(buf, i)
            if i + length > end:
                raise ValueError("field runs past its message")
            if tag >> 3 == wanted:
                yield i, i + length
            i += length
        elif wire == 0:
            _, i = varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if i != end:
        raise ValueError("field runs past its message")


def count_fields(buf, i, end, wanted):
    """How many length-delimited fields numbered `wanted` buf[i:end] holds, without looking into them (the loop
    that runs once per span: a one-byte tag is compared first, the general walk only for the other fields)."""
    tag_byte = wanted << 3 | LEN  # one byte for field numbers up to 15
    n = 0
    while i < end:
        if buf[i] == tag_byte:
            length, i = varint(buf, i + 1)
            i += length
            n += 1
            continue
        tag, i = varint(buf, i)
        wire = tag & 7
        if wire == LEN:
            length, i = varint(buf, i)
            i += length
        elif wire == 0:
            _, i = varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if i != end:
        raise ValueError("field runs past its message")
    return n


def count_spans(buf):
    """Spans in an ExportTraceServiceRequest, counted without decoding them."""
    spans = 0
    for rs, rs_end in fields(buf, 0, len(buf), 1):  # ResourceSpans
        for ss, ss_end in fields(buf, rs, rs_end, 2):  # ScopeSpans
            spans += count_fields(buf, ss, ss_end, 2)  # Span
    return spans


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] != "/v1/traces":
            return self._answer(404, b"", "text/plain")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        spans = None
        if content_type == "application/x-protobuf" and not self.headers.get("Content-Encoding"):
            try:
                spans = count_spans(body)
            except (ValueError, IndexError):
                pass
        with lock:
            if spans is None:
                counts["refused"] += 1
            else:
                counts["spans"] += spans
                counts["exports"] += 1
                counts["bytes"] += len(body)
        if spans is None:
            return self._answer(415 if content_type != "application/x-protobuf" else 400, b"", "text/plain")
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self):
        if self.path != "/count":
            return self._answer(404, b"", "text/plain")
        with lock:
            line = f"{counts['spans']} {counts['exports']} {counts['refused']} {counts['bytes']}\n"
        self._answer(200, line.encode(), "text/plain")

    def log_message(self, *args):
        pass


def self_test():
    """Builds ExportTraceServiceRequests by hand and checks the count (run it after changing the walker)."""

    def enc_varint(v):
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    def field(number, payload):
        return enc_varint(number << 3 | LEN) + enc_varint(len(payload)) + payload

    # A span: trace id, span id, a name, kind (varint), start time (fixed64), an attribute long enough that its
    # length takes two varint bytes.
    span = (field(1, bytes(16)) + field(2, bytes(8)) + field(5, b"GET bench") + enc_varint(6 << 3) + b"\x02"
            + enc_varint(7 << 3 | 1) + bytes(8) + field(9, b"x" * 300))
    scope = field(1, field(1, b"tokenproxy"))  # InstrumentationScope, not a span
    resource = field(1, field(1, b"service.name"))  # Resource, not spans
    scope_spans = lambda n: field(2, scope + b"".join(field(2, span) for _ in range(n)) + field(3, b"schema"))
    resource_spans = lambda *ns: field(1, resource + b"".join(scope_spans(n) for n in ns))
    cases = [
        (b"", 0),
        (resource_spans(), 0),
        (resource_spans(1), 1),
        (resource_spans(512), 512),
        (resource_spans(3, 0, 4) + resource_spans(5), 12),
    ]
    for body, want in cases:
        got = count_spans(body)
        assert got == want, f"counted {got} spans, want {want}"
    for bad in (resource_spans(2)[:-1], b"\x0b", b"\x0a\x05ab"):
        try:
            count_spans(bad)
        except (ValueError, IndexError):
            continue
        raise AssertionError(f"accepted a malformed body: {bad[:20]!r}")
    print("ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    else:
        ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
