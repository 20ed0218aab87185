#!/usr/bin/env python3
"""Reads the raw outputs that benches/load/run collected in a results directory and prints the markdown report.

Files in RESULTS (written by `run`):
  CASE.TARGET.ROUND.out   wrk or h2load output    (CASE: h1-get, h1-post, h2-get, h1-exchange, h1-dpop, h1-get-traced0,
                          h1-get-traced1; TARGET: nginx, tokenproxy, traced: the traced cases' tokenproxy with telemetry)
  CASE.TARGET.ROUND.cpu   CPU clock ticks the proxy process used during that run
  CASE.traced.ROUND.spans spans the collector received, spans tokenproxy dropped, exports the collector refused,
                          CPU clock ticks the collector used, during that run (and until its last spans arrived)
  CASE.TARGET.ROUND.log   h2load --log-file (per-request latency) for the h2 case
  upstream.out            wrk straight at the upstream (reference)
  facts                   key=value lines (RSS in kB, settings, counts)
  metrics.txt             tokenproxy's /metrics after the load (metrics.CASE.txt: a traced case's tokenproxy)
  CASE.TARGET.ROUND.lat   p50 and p99 (ms) computed from that log, which is then deleted (it is large)
Usage: report.py RESULTS | report.py --h2-latency LOG
"""
import glob
import os
import re
import statistics
import sys

CASES = [
    ("h1-get", "HTTP/1.1 GET (wrk -t1 -c64)"),
    ("h1-post", "HTTP/1.1 POST 8 KiB (wrk -t1 -c64)"),
    ("h2-get", "h2c GET (h2load -c{h2_clients} -m{h2_streams})"),
    ("h1-exchange", "HTTP/1.1 GET, 1,000 callers, token exchange (wrk -t1 -c64)"),
    ("h1-dpop", "HTTP/1.1 GET, DPoP proof per request (wrk -t1 -c64)"),
]
TARGETS = ["nginx", "tokenproxy"]
# Traced cases: GET through a tokenproxy with [telemetry], against the untraced tokenproxy in the same rounds.
# (case, label, the least traced / untraced req/s ratio wanted)
TRACED = [
    ("h1-get-traced0", "HTTP/1.1 GET, traced, sample_ratio = 0 (wrk -t1 -c64)", 0.98),
    ("h1-get-traced1", "HTTP/1.1 GET, traced, sample_ratio = 1.0 (wrk -t1 -c64)", 0.90),
]
TRACED_TARGETS = ["tokenproxy", "traced"]
# A traced run that dropped more than this share of its spans is not a result: its load figure was bought by
# dropping spans.
MAX_DROPPED = 0.01
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def ms(text):
    """wrk's '652.00us' / '1.23ms' / '2.00s' in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * UNIT[m.group(2)] if m else None


def parse_wrk(text):
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    r["rps"] = float(m.group(1)) if m else None
    for pct, key in (("50", "p50"), ("99", "p99")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        r[key] = ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["sockerr"] = sum(int(g) for g in m.groups()) if m else 0
    return r


def parse_h2load(text, log_path):
    r = {}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    r["rps"] = float(m.group(1)) if m else None
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    r["requests"] = int(m.group(3)) if m else None
    r["sockerr"] = int(m.group(5)) + int(m.group(6)) + int(m.group(7)) if m else 0
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    r["non2xx"] = int(m.group(3)) + int(m.group(4)) if m else 0
    r["p50"] = r["p99"] = None
    lat_path = log_path[:-4] + ".lat"
    if os.path.exists(lat_path):
        values = open(lat_path).read().split()
        if len(values) == 2:
            r["p50"], r["p99"] = float(values[0]), float(values[1])
    elif os.path.exists(log_path):
        r["p50"], r["p99"] = h2_latency(log_path)
    return r


def h2_latency(log_path):
    """p50 and p99 in ms from h2load's --log-file (third column: µs until the end of the response)."""
    lat = []
    with open(log_path) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3:
                lat.append(int(parts[2]))
    if not lat:
        return None, None
    lat.sort()
    return lat[int(0.50 * (len(lat) - 1))] / 1000, lat[int(0.99 * (len(lat) - 1))] / 1000


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main(results):
    facts = {}
    if os.path.exists(os.path.join(results, "facts")):
        for line in open(os.path.join(results, "facts")):
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                facts[k] = v
    runs = {}  # (case, target) -> list of (round, result)
    for path in sorted(glob.glob(os.path.join(results, "*.*.*.out"))):
        case, target, rnd, _ = os.path.basename(path).split(".")
        text = open(path, errors="replace").read()
        r = parse_h2load(text, path[:-4] + ".log") if case.startswith("h2") else parse_wrk(text)
        cpu = path[:-4] + ".cpu"
        ticks = int(open(cpu).read().strip() or 0) if os.path.exists(cpu) else None
        hz = int(facts.get("clk_tck", "100"))
        r["cpu_us"] = ticks * 1e6 / hz / r["requests"] if ticks is not None and r["requests"] else None
        spans = path[:-4] + ".spans"
        if os.path.exists(spans):
            values = open(spans).read().split()
            if len(values) == 4:
                received, dropped, refused, collector_ticks = (int(v) for v in values)
                finished = received + dropped
                r["spans"] = {
                    "received": received, "dropped": dropped, "refused": refused,
                    "per_request": received / r["requests"] if r["requests"] else None,
                    "dropped_share": dropped / finished if finished else 0.0,
                    "collector_us": collector_ticks * 1e6 / hz / r["requests"] if r["requests"] else None,
                }
        runs.setdefault((case, target), []).append((int(rnd), r))

    out = []
    out.append(f"tokenproxy load benchmark — {facts.get('date', '?')}, {facts.get('cpus', '?')} cores, "
               f"{facts.get('rounds', '?')} rounds × {facts.get('duration', '?')} s, build {facts.get('build', '?')}, "
               f"medians over rounds; "
               f"ratios are tokenproxy / nginx (req/s: higher is better; p99: lower is better)")
    out.append("")
    out.append("| case | nginx req/s | tokenproxy req/s | ratio req/s | nginx p50 ms | tokenproxy p50 ms "
               "| nginx p99 ms | tokenproxy p99 ms | ratio p99 | nginx CPU µs/req | tokenproxy CPU µs/req |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    medians = {}
    for case, label in CASES:
        if not any(runs.get((case, t)) for t in TARGETS):
            continue
        label = label.format(h2_clients=facts.get("h2_clients", "16"), h2_streams=facts.get("h2_streams", "4"))
        m = {}
        for t in TARGETS:
            rs = [r for _, r in runs.get((case, t), [])]
            m[t] = {k: med([r[k] for r in rs]) for k in ("rps", "p50", "p99", "cpu_us")}
        medians[case] = m
        n, p = m["nginx"], m["tokenproxy"]
        rr, pr = ratio(p["rps"], n["rps"]), ratio(p["p99"], n["p99"])
        out.append(f"| {label} | {fmt(n['rps'])} | {fmt(p['rps'])} | {fmt(rr, 2)} | {fmt(n['p50'], 2)} "
                   f"| {fmt(p['p50'], 2)} | {fmt(n['p99'], 2)} | {fmt(p['p99'], 2)} | {fmt(pr, 2)} "
                   f"| {fmt(n['cpu_us'], 1)} | {fmt(p['cpu_us'], 1)} |")
    # A token per caller against one token for all, measured in the same run.
    if "h1-exchange" in medians and "h1-get" in medians:
        per_caller = ratio(medians["h1-exchange"]["tokenproxy"]["rps"], medians["h1-get"]["tokenproxy"]["rps"])
        out.append(f"| tokenproxy: 1,000-caller token exchange / single provider (HTTP/1.1 GET) | | {fmt(per_caller, 2)} "
                   f"| | | | | | | | |")
    if "h1-dpop" in medians and "h1-get" in medians:
        dpop = ratio(medians["h1-dpop"]["tokenproxy"]["rps"], medians["h1-get"]["tokenproxy"]["rps"])
        out.append(f"| tokenproxy: DPoP proof per request / bearer token (HTTP/1.1 GET) | | {fmt(dpop, 2)} "
                   f"| | | | | | | | |")
    up = parse_wrk(open(os.path.join(results, "upstream.out")).read()) if os.path.exists(
        os.path.join(results, "upstream.out")) else None
    if up:
        out.append(f"| reference: upstream direct, no proxy (wrk -t1 -c64, once) | {fmt(up['rps'])} | | "
                   f"| {fmt(up['p50'], 2)} | | {fmt(up['p99'], 2)} | | | | |")
    out.append("")

    # Traced cases: traced / untraced tokenproxy, and what the spans cost the collector and whether any were lost.
    traced_verdicts = []
    if any(runs.get((case, "traced")) for case, _, _ in TRACED):
        out.append("Traced cases: tokenproxy with `[telemetry]` exporting to a span-counting collector on loopback, "
                   "against the untraced tokenproxy in the same rounds; medians over rounds; ratio req/s = traced / "
                   "untraced; spans per request and dropped share over all rounds; a case with a round that dropped "
                   f"more than {MAX_DROPPED * 100:g} % of its spans is not a result")
        out.append("")
        out.append("| case | untraced req/s | traced req/s | ratio req/s (want) | untraced p99 ms | traced p99 ms "
                   "| untraced CPU µs/req | traced CPU µs/req | spans received per request | spans dropped "
                   "| collector CPU µs/req | result |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for case, label, want in TRACED:
            if not runs.get((case, "traced")):
                continue
            m = {}
            for t in TRACED_TARGETS:
                rs = [r for _, r in runs.get((case, t), [])]
                m[t] = {k: med([r[k] for r in rs]) for k in ("rps", "p99", "cpu_us")}
            u, tr = m["tokenproxy"], m["traced"]
            rr = ratio(tr["rps"], u["rps"])
            traced_runs = [(rnd, r) for rnd, r in runs[(case, "traced")]]
            counted = [r for _, r in traced_runs if "spans" in r and r["requests"]]
            received = sum(r["spans"]["received"] for r in counted)
            dropped = sum(r["spans"]["dropped"] for r in counted)
            requests = sum(r["requests"] for r in counted)
            per_request = received / requests if requests else None
            dropped_share = dropped / (received + dropped) if received + dropped else 0.0
            collector_us = med([r["spans"]["collector_us"] for r in counted])
            over = [rnd for rnd, r in traced_runs if "spans" in r and r["spans"]["dropped_share"] > MAX_DROPPED]
            if len(counted) < len(traced_runs):
                result = "**not a result**: spans not counted in every round"
            elif over:
                result = (f"**not a result**: more than {MAX_DROPPED * 100:g} % of the spans dropped in round"
                          f"{'s' if len(over) > 1 else ''} {', '.join(str(r) for r in over)}")
            elif rr is None:
                result = "—"
            else:
                result = f"{'met' if rr >= want else 'not met'} ({fmt(rr, 3)} {'≥' if rr >= want else '<'} {want:.2f})"
            traced_verdicts.append(f"{case}: {result}")
            out.append(f"| {label} | {fmt(u['rps'])} | {fmt(tr['rps'])} | {fmt(rr, 2)} (≥ {want:.2f}) "
                       f"| {fmt(u['p99'], 2)} | {fmt(tr['p99'], 2)} | {fmt(u['cpu_us'], 1)} | {fmt(tr['cpu_us'], 1)} "
                       f"| {fmt(per_request, 2)} | {fmt(dropped)} ({dropped_share * 100:.2f} %) | {fmt(collector_us, 1)} "
                       f"| {result} |")
        out.append("")

    def mb(key):
        v = facts.get(key)
        return f"{int(v) / 1024:.1f} MB" if v and v.isdigit() else "—"

    out.append("| RSS (VmRSS) | idle after startup | after HTTP/1.1 GET rounds | after all load | 5 s later "
               "| peak (VmHWM) |")
    out.append("|---|---:|---:|---:|---:|---:|")
    out.append(f"| tokenproxy | {mb('tp_rss_idle_kb')} | {mb('tp_rss_after_get_kb')} | {mb('tp_rss_after_kb')} "
               f"| {mb('tp_rss_settled_kb')} | {mb('tp_hwm_kb')} |")
    out.append(f"| nginx proxy worker | {mb('ngx_rss_idle_kb')} | {mb('ngx_rss_after_get_kb')} "
               f"| {mb('ngx_rss_after_kb')} | | {mb('ngx_hwm_kb')} |")
    trace_path = os.path.join(results, "tp_rss_trace")
    if os.path.exists(trace_path):
        trace = [line.split() for line in open(trace_path) if len(line.split()) == 3]
        out.append("")
        out.append("tokenproxy RSS right after each of its runs (MB): " +
                   ", ".join(f"{c} r{r} {int(kb) / 1024:.1f}" for c, r, kb in trace))
    traced_rss = [(case, facts.get(f"rss_kb_{case}"), facts.get(f"hwm_kb_{case}")) for case, _, _ in TRACED]
    traced_rss = [(c, rss, hwm) for c, rss, hwm in traced_rss if rss and hwm and rss.isdigit() and hwm.isdigit()]
    if traced_rss:
        out.append("")
        out.append("traced tokenproxies' RSS after all load (peak): " +
                   ", ".join(f"{c} {int(rss) / 1024:.1f} MB ({int(hwm) / 1024:.1f} MB)" for c, rss, hwm in traced_rss))
    out.append("")

    # Idle keep-alive callers: memory per idle connection, upstream connections held.
    idle = {t: facts.get(k, "").split() for t, k in (("nginx", "idle_ngx"), ("tokenproxy", "idle_tp"))}
    if all(len(v) == 5 for v in idle.values()):
        n_callers = int(facts.get("idle_callers", "0") or 0)
        out.append(f"| {n_callers:,} idle keep-alive callers (one request each, 64 at a time, then idle) "
                   f"| RSS before | RSS with them idle | bytes per idle connection | upstream connections held "
                   f"| callers ok / failed |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for t in TARGETS:
            before, after, held, ok, failed = (int(x) for x in idle[t])
            per = (after - before) * 1024 / ok if ok else None
            out.append(f"| {t} | {before / 1024:.1f} MB | {after / 1024:.1f} MB | {fmt(per)} | {held} "
                       f"| {ok} / {failed} |")
        out.append("")

    # Per-round numbers, so the noise is visible next to the medians.
    out.append("Per round, req/s as nginx / tokenproxy (odd rounds ran nginx first, even rounds tokenproxy first):")
    for case, label in CASES:
        pairs = []
        per_round_ratios = []
        rounds = sorted({rnd for t in TARGETS for rnd, _ in runs.get((case, t), [])})
        for rnd in rounds:
            got = {t: dict(runs.get((case, t), [])).get(rnd) for t in TARGETS}
            n, p = (got["nginx"] or {}).get("rps"), (got["tokenproxy"] or {}).get("rps")
            pairs.append(f"{fmt(n)} / {fmt(p)}")
            if ratio(p, n):
                per_round_ratios.append(p / n)
        if pairs:
            out.append(f"- {case}: " + "; ".join(pairs) +
                       f" (median of per-round ratios {fmt(med(per_round_ratios), 2)})")
    for case, _, _ in TRACED:
        rounds = sorted({rnd for t in TRACED_TARGETS for rnd, _ in runs.get((case, t), [])})
        if not rounds:
            continue
        pairs = []
        per_round_ratios = []
        for rnd in rounds:
            u = dict(runs.get((case, "tokenproxy"), [])).get(rnd) or {}
            tr = dict(runs.get((case, "traced"), [])).get(rnd) or {}
            sp = tr.get("spans")
            spans = (f", {fmt(sp['per_request'], 2)} spans/request, {fmt(sp['dropped'])} dropped "
                     f"({sp['dropped_share'] * 100:.2f} %{', NOT A RESULT' if sp['dropped_share'] > MAX_DROPPED else ''})"
                     if sp else ", spans not counted")
            pairs.append(f"{fmt(u.get('rps'))} / {fmt(tr.get('rps'))}{spans}")
            if ratio(tr.get("rps"), u.get("rps")):
                per_round_ratios.append(tr["rps"] / u["rps"])
        out.append(f"- {case}, untraced / traced tokenproxy (odd rounds ran the untraced one first): " +
                   "; ".join(pairs) + f" (median of per-round ratios {fmt(med(per_round_ratios), 2)})")
    out.append("")

    # Errors: anything but a clean 200 from either proxy is worth a look.
    problems = []
    for case, targets in [(c, TARGETS) for c, _ in CASES] + [(c, TRACED_TARGETS) for c, _, _ in TRACED]:
        for t in targets:
            for rnd, r in runs.get((case, t), []):
                if r["non2xx"] or r["sockerr"] or r["rps"] is None:
                    problems.append(f"{case} {t} round {rnd}: non-2xx {r['non2xx']}, socket errors/failed "
                                    f"{r['sockerr']}{', no result parsed' if r['rps'] is None else ''}")
    statuses = {}
    metrics_path = os.path.join(results, "metrics.txt")
    if os.path.exists(metrics_path):
        for line in open(metrics_path):
            m = re.match(r'tokenproxy_requests_total\{(.*)\}\s+([\d.e+]+)', line)
            if m:
                st = re.search(r'status="(\d+)"', m.group(1))
                key = st.group(1) if st else "?"
                statuses[key] = statuses.get(key, 0) + int(float(m.group(2)))
    out.append("Checks:")
    out.append("- errors seen by the load generators: " + ("none" if not problems else ""))
    out.extend(f"  - {p}" for p in problems)
    if statuses:
        out.append("- tokenproxy_requests_total by status: " +
                   ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
    ran = lambda case: any(runs.get((case, t)) for t in TARGETS)
    eager = (2 if ran("h1-dpop") else 1) + int(facts.get("traced_processes", "0") or 0)
    expected = (f"{1000 + eager:,}: the eager fetches at startup and one exchange per caller of h1-exchange"
                if ran("h1-exchange") else f"{eager}: the eager fetch{'es' if eager > 1 else ''} at startup")
    out.append(f"- token calls to the fake IdP during the whole run: {facts.get('idp_token_calls', '?')} "
               f"(expected {expected})")
    out.append(f"- tokenproxy log lines at WARN or above: {facts.get('tp_warn_lines', '?')}"
               + (f" (the traced tokenproxies: {facts.get('traced_warn_lines', '?')})"
                  if facts.get("traced_processes", "0") not in ("", "0") else ""))
    dropped_whole = []
    for case, _, _ in TRACED:
        path = os.path.join(results, f"metrics.{case}.txt")
        if os.path.exists(path):
            m = re.search(r"^tokenproxy_telemetry_spans_dropped_total\s+([\d.e+]+)", open(path).read(), re.M)
            dropped_whole.append(f"{case} {fmt(float(m.group(1))) if m else '?'}")
    if dropped_whole:
        totals = facts.get("collector_totals", "").split()
        out.append("- spans dropped by the traced tokenproxies over the whole run, warm-up included "
                   "(tokenproxy_telemetry_spans_dropped_total): " + ", ".join(dropped_whole) +
                   (f"; the collector received {int(totals[0]):,} spans in {int(totals[1]):,} exports and refused "
                    f"{int(totals[2]):,} exports" if len(totals) == 4 else ""))
    if traced_verdicts:
        out.append("- the traced cases (issue 27: traced / untraced req/s ≥ 0.98 at sample_ratio 0, ≥ 0.90 at 1.0, "
                   f"with at most {MAX_DROPPED * 100:g} % of the spans dropped): " + "; ".join(traced_verdicts))
    out.append(f"- machine load: load average {facts.get('loadavg_before', '?')} before, "
               f"{facts.get('loadavg_after', '?')} after; a compiler (rustc/cc1) was running at the start of "
               f"{facts.get('busy_runs', '?')} of {facts.get('measured_runs', '?')} measurements; "
               f"tokenproxy worker_threads: {facts.get('worker_threads', '?')}; "
               f"tokenproxy routes: {facts.get('routes', '1')} (the measured one listed last); "
               f"upstream: {facts.get('upstream', 'h1')}")
    try:
        in_flight = int(facts.get("h2_clients", "16")) * int(facts.get("h2_streams", "4"))
        if ("h2-get", "nginx") in runs and in_flight > int(facts.get("nginx_keepalive", "128")):
            out.append(f"- warning: {in_flight} h2 streams in flight > nginx keepalive {facts.get('nginx_keepalive')}: "
                       f"nginx churned upstream connections in the h2 case, which is unfair to it")
    except ValueError:
        pass
    g = medians.get("h1-get", {})
    rr = ratio(g.get("tokenproxy", {}).get("rps"), g.get("nginx", {}).get("rps"))
    pr = ratio(g.get("tokenproxy", {}).get("p99"), g.get("nginx", {}).get("p99"))
    idle = facts.get("tp_rss_idle_kb")
    verdict = [
        f"req/s ratio {fmt(rr, 3)} {'≥' if rr and rr >= 1 else '<'} 1 ({'met' if rr and rr >= 1 else 'not met'})",
        f"p99 ratio {fmt(pr, 3)} {'≤' if pr and pr <= 1 else '>'} 1 ({'met' if pr and pr <= 1 else 'not met'})",
        f"idle RSS {mb('tp_rss_idle_kb')} {'<' if idle and int(idle) < 15 * 1024 else '≥'} 15 MB "
        f"({'met' if idle and int(idle) < 15 * 1024 else 'not met'})",
    ]
    out.append("- the bar of docs/benchmarks.md (HTTP/1.1 GET): " + "; ".join(verdict))
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--h2-latency":
        p50, p99 = h2_latency(sys.argv[2])
        if p50 is not None:
            print(p50, p99)
    else:
        main(sys.argv[1])
