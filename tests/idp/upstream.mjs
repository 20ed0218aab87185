// A tiny protected "API" for tokenproxy's integration tests: it accepts a request only with
// `Authorization: Bearer <JWT>` (or `DPoP <JWT>` with a proof, see below) signed by the test OpenID provider
// (server.mjs).
//
// Usage: node upstream.mjs ISSUER       (or UPSTREAM_ISSUER=ISSUER node upstream.mjs)
// Listens on 127.0.0.1 (port from UPSTREAM_PORT, default 0 = any free port). It reads the issuer's
// discovery document for its jwks_uri, then checks every token's signature (RS256, via the JWKS), `typ`
// at+jwt, `iss`, `aud` = urn:tokenproxy:test-api (or UPSTREAM_AUDIENCE) and `exp`/`nbf` with no clock tolerance at all.
//
//   any other path   401 (+ WWW-Authenticate) for a missing, malformed, forged or expired token,
//                    200 {"client_id", "jti", "exp", "method", "path"} otherwise
//   GET  /_test/stats   {"requests", "ok", "unauthorized", "missing", "invalid", "expired",
//                        "distinct_jti", "clients": {CLIENT_ID: {"ok", "expired", "distinct_jti",
//                        "last_jti", "last_token_sha256"}}}   (last_*: of the last valid token)
//   GET  /_test/tokens  {"tokens": [every distinct bearer token seen, valid or not]}
//   POST /_test/reset   zero everything, stop requiring DPoP nonces, drop pending rejections
//   POST /_test/dpop-nonce?require=1|0   DPoP proofs must (1) or need not (0, the start) carry the current nonce
//        [&rotate=1]                     ?rotate=1: a new current nonce; the previous one is no longer accepted.
//                                        Answers {require, nonce (the current one)}
//   POST /_test/reject-next?count=N      the next N API requests (any scheme; default 1) get 401 invalid_token
//                                        ("revoked for the test"), counted as rejected_on_purpose (and unauthorized)
//
// DPoP (RFC 9449), always on. `Authorization: DPoP <JWT>` (scheme in any case) needs exactly one `DPoP` header: a
// proof (typ dpop+jwt, ES256 / ES384 / EdDSA / Ed25519, its key in the `jwk` header) with htm = the request's
// method, htu = `http://127.0.0.1:PORT/PATH` (https in HTTPS mode; query and fragment ignored), iat within 60 s
// of now, a jti this process has never seen, and ath = base64url(SHA-256(token)). The token is then checked as a
// bearer token is, and its `cnf.jkt` must be the RFC 7638 thumbprint of the proof's key. A token with `cnf.jkt`
// sent as `Bearer` is refused. DPoP failures answer 401 with
// `WWW-Authenticate: DPoP error="invalid_dpop_proof"|"invalid_token", error_description="..."`. In nonce mode a
// proof without the current `nonce` gets 401 with `WWW-Authenticate: DPoP error="use_dpop_nonce",
// error_description="Resource server requires nonce in DPoP proof"` and `DPoP-Nonce: <current>`; every 200 then
// carries `DPoP-Nonce: <current>` too. Order of checks: a pending /_test/reject-next first, then proof present and
// signed, jti unseen, htm, htu, iat, ath, nonce, then the token (`expired` / `invalid` as for Bearer, with a DPoP
// challenge) and its binding. /_test/stats adds:
//   dpop_ok               DPoP requests accepted (also counted in ok)
//   dpop_invalid          bad or missing proof (signature, typ, alg, jti, htm, htu, iat, ath); last_dpop_error: why
//   dpop_replay           a proof jti already seen (a proof's jti is remembered once its signature checks out,
//                         whatever the answer, and also on a rejected_on_purpose request)
//   dpop_missing          a DPoP-bound token (cnf.jkt) sent with the Bearer scheme
//   dpop_jkt_mismatch     a token sent with the DPoP scheme without cnf.jkt, or bound to another key than the proof's
//   dpop_nonce_challenges use_dpop_nonce answers
//   rejected_on_purpose   answers forced by /_test/reject-next
//   dpop_distinct_jti     distinct proof jtis received since the reset (any answer)
//   dpop_jkts             distinct thumbprints of correctly signed proofs' keys, first seen first
//   dpop_nonce_required   whether nonce mode is on; pending_rejections: what /_test/reject-next has left
//   dpop_log              per API request, in arrival order (the last 1000): {status, scheme ("Bearer", "DPoP" or
//                         null), jti, nonce (the proof's, or null), token_sha256 (first 12 hex, or null)}
// Per client, `dpop_ok` too. All the refusals above also count in `unauthorized`. A reset keeps the seen proof jtis.
//
// HTTPS (UPSTREAM_TLS_CERT, UPSTREAM_TLS_KEY and UPSTREAM_TLS_CLIENT_CA set): served over HTTPS only, asking every
// connection for a client certificate (any or none is let through the handshake). A certificate-bound token (RFC
// 8705 §3, `cnf.x5t#S256`) is accepted only on a connection whose client certificate has that SHA-256 thumbprint:
// otherwise 401 invalid_token, counted as `cnf_mismatch`; accepted ones are counted as `cnf_ok` (also per client).
// The issuer's own HTTPS certificate must be trusted through NODE_EXTRA_CA_CERTS.
//
// stdout carries exactly one line, `READY http://127.0.0.1:PORT` (https in HTTPS mode); everything else goes to
// stderr.
// Exits on SIGTERM, SIGINT and when stdin closes (unless UPSTREAM_IGNORE_STDIN=1).

import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import process from 'node:process';
import {
  calculateJwkThumbprint, createRemoteJWKSet, decodeJwt, EmbeddedJWK, errors, jwtVerify,
} from 'jose';

// The `aud` it accepts (UPSTREAM_AUDIENCE, default urn:tokenproxy:test-api).
const AUDIENCE = process.env.UPSTREAM_AUDIENCE || 'urn:tokenproxy:test-api';

const issuer = (process.argv[2] ?? process.env.UPSTREAM_ISSUER ?? '').replace(/\/+$/, '');
if (!issuer) {
  console.error('usage: node upstream.mjs ISSUER');
  process.exit(2);
}
const port = Number(process.env.UPSTREAM_PORT ?? 0);

function shutdown(reason) {
  console.error(`upstream: exiting (${reason})`);
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.UPSTREAM_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

const discovery = await (await fetch(`${issuer}/.well-known/openid-configuration`)).json();
if (discovery.issuer !== issuer || !discovery.jwks_uri) {
  console.error(`upstream: unexpected discovery document from ${issuer}: ${JSON.stringify(discovery)}`);
  process.exit(1);
}
const jwks = createRemoteJWKSet(new URL(discovery.jwks_uri));

function freshStats() {
  return {
    requests: 0,
    ok: 0,
    unauthorized: 0,
    missing: 0,
    invalid: 0,
    expired: 0,
    cnf_ok: 0,
    cnf_mismatch: 0,
    jtis: new Set(),
    tokens: new Set(),
    clients: {},
    dpop_ok: 0,
    dpop_invalid: 0,
    dpop_replay: 0,
    dpop_missing: 0,
    dpop_jkt_mismatch: 0,
    dpop_nonce_challenges: 0,
    rejected_on_purpose: 0,
    last_dpop_error: null,
    dpopJtis: new Set(),
    dpopJkts: new Set(),
    dpopLog: [],
  };
}
let stats = freshStats();

function clientStats(clientId) {
  return stats.clients[clientId] ??= {
    ok: 0, expired: 0, cnf_ok: 0, dpop_ok: 0, jtis: new Set(), last_jti: null, last_token_sha256: null,
  };
}

// ---- DPoP (RFC 9449) ---------------------------------------------------------------------------------

const DPOP_ALGS = ['ES256', 'ES384', 'EdDSA', 'Ed25519'];
const DPOP_IAT_WINDOW_S = 60;
const DPOP_LOG_MAX = 1000;
// Every proof jti this process has seen (not cleared by a reset: a proof is never good twice).
const seenProofJtis = new Set();

function newNonce() {
  return randomBytes(18).toString('base64url');
}

const dpop = {
  requireNonce: false,
  nonce: newNonce(),
  // API requests still to be refused by /_test/reject-next
  rejectNext: 0,
};

// A header parameter value: no quote or backslash may end it early.
function quoted(text) {
  return `"${String(text).replace(/["\\]/g, "'")}"`;
}

function sha256(text, encoding = 'hex') {
  return createHash('sha256').update(text).digest(encoding);
}

// This server's own URL for the request (what a proof's htu must name), without query or fragment.
function ownUrl(req) {
  const { pathname } = new URL(req.url ?? '/', 'http://127.0.0.1');
  return new URL(`${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}${pathname}`).href;
}

function sameUrl(htu, expected) {
  if (typeof htu !== 'string') return false;
  let actual;
  try {
    actual = new URL(htu);
  } catch {
    return false;
  }
  actual.search = '';
  actual.hash = '';
  return actual.href === expected;
}

// A refused DPoP request (`kind` one of the dpop_* counters, or invalid / expired for the token itself).
function dpopUnauthorized(res, kind, error, description, headers = {}) {
  stats.unauthorized += 1;
  stats[kind] += 1;
  if (kind === 'dpop_invalid') stats.last_dpop_error = description;
  console.error(`upstream: 401 ${kind}: ${description}`);
  sendJson(res, 401, { error, kind, description }, {
    'www-authenticate': `DPoP error=${quoted(error)}, error_description=${quoted(description)}`,
    ...headers,
  });
}

// The `DPoP` request header(s): the proofs, as separate values.
function proofHeaders(req) {
  return req.headersDistinct?.dpop ?? (req.headers.dpop === undefined ? [] : [req.headers.dpop]);
}

function sendJson(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
    ...headers,
  });
  res.end(text);
}

function unauthorized(res, kind, description) {
  stats.unauthorized += 1;
  stats[kind] += 1;
  const error = kind === 'missing' ? '' : ', error="invalid_token"';
  sendJson(res, 401, { error: kind === 'missing' ? 'missing_token' : 'invalid_token', kind, description }, {
    'www-authenticate': `Bearer realm="test-api"${error}`,
  });
}

function statsJson() {
  const clients = {};
  for (const [id, c] of Object.entries(stats.clients)) {
    clients[id] = {
      ok: c.ok,
      expired: c.expired,
      cnf_ok: c.cnf_ok,
      dpop_ok: c.dpop_ok,
      distinct_jti: c.jtis.size,
      last_jti: c.last_jti,
      last_token_sha256: c.last_token_sha256,
    };
  }
  return {
    requests: stats.requests,
    ok: stats.ok,
    unauthorized: stats.unauthorized,
    missing: stats.missing,
    invalid: stats.invalid,
    expired: stats.expired,
    cnf_ok: stats.cnf_ok,
    cnf_mismatch: stats.cnf_mismatch,
    distinct_jti: stats.jtis.size,
    clients,
    dpop_ok: stats.dpop_ok,
    dpop_invalid: stats.dpop_invalid,
    dpop_replay: stats.dpop_replay,
    dpop_missing: stats.dpop_missing,
    dpop_jkt_mismatch: stats.dpop_jkt_mismatch,
    dpop_nonce_challenges: stats.dpop_nonce_challenges,
    rejected_on_purpose: stats.rejected_on_purpose,
    last_dpop_error: stats.last_dpop_error,
    dpop_distinct_jti: stats.dpopJtis.size,
    dpop_jkts: [...stats.dpopJkts],
    dpop_nonce_required: dpop.requireNonce,
    pending_rejections: dpop.rejectNext,
    dpop_log: stats.dpopLog,
  };
}

async function handleApi(req, res) {
  stats.requests += 1;
  const header = req.headers.authorization;
  const match = /^(Bearer|DPoP) ([^\s]+)$/i.exec(header ?? '');
  const scheme = match ? (match[1].toLowerCase() === 'dpop' ? 'DPoP' : 'Bearer') : null;
  const token = match ? match[2] : null;
  const proofs = scheme === 'DPoP' ? proofHeaders(req) : [];
  // What the proof says, read without checking it (for the log; the checks come below).
  let claimed = {};
  if (proofs.length === 1) {
    try { claimed = decodeJwt(proofs[0]); } catch { /* an undecodable proof is refused below */ }
  }
  const entry = {
    status: null,
    scheme,
    jti: typeof claimed.jti === 'string' ? claimed.jti : null,
    nonce: typeof claimed.nonce === 'string' ? claimed.nonce : null,
    token_sha256: token ? sha256(token).slice(0, 12) : null,
  };
  stats.dpopLog.push(entry);
  if (stats.dpopLog.length > DPOP_LOG_MAX) stats.dpopLog.shift();
  try {
    await checkRequest(req, res, { scheme, token, proofs, claimed });
  } finally {
    entry.status = res.statusCode;
  }
}

async function checkRequest(req, res, { scheme, token, proofs, claimed }) {
  const header = req.headers.authorization;
  if (dpop.rejectNext > 0) {
    dpop.rejectNext -= 1;
    stats.unauthorized += 1;
    stats.rejected_on_purpose += 1;
    if (token) stats.tokens.add(token);
    if (typeof claimed.jti === 'string' && claimed.jti) {
      seenProofJtis.add(claimed.jti);
      stats.dpopJtis.add(claimed.jti);
    }
    const challenge = scheme === 'DPoP'
      ? `DPoP error="invalid_token", error_description="revoked for the test"`
      : 'Bearer error="invalid_token"';
    sendJson(res, 401, { error: 'invalid_token', kind: 'rejected_on_purpose', description: 'revoked for the test' }, {
      'www-authenticate': challenge,
    });
    return;
  }
  if (!scheme) {
    unauthorized(res, header ? 'invalid' : 'missing', header ? 'not a Bearer token' : 'no Authorization header');
    return;
  }
  stats.tokens.add(token);

  let jkt = null;
  if (scheme === 'DPoP') {
    const refuse = (description) => dpopUnauthorized(res, 'dpop_invalid', 'invalid_dpop_proof', description);
    if (proofs.length !== 1) {
      refuse(proofs.length ? `${proofs.length} DPoP headers, exactly one is allowed` : 'no DPoP header');
      return;
    }
    let payload;
    let protectedHeader;
    try {
      ({ payload, protectedHeader } = await jwtVerify(proofs[0], EmbeddedJWK, { typ: 'dpop+jwt', algorithms: DPOP_ALGS }));
      jkt = await calculateJwkThumbprint(protectedHeader.jwk);
    } catch (err) {
      refuse(`proof refused: ${err.code ?? err.name}: ${err.message}`);
      return;
    }
    stats.dpopJkts.add(jkt);
    if (typeof payload.jti !== 'string' || !payload.jti) {
      refuse('proof without a jti');
      return;
    }
    stats.dpopJtis.add(payload.jti);
    if (seenProofJtis.has(payload.jti)) {
      dpopUnauthorized(res, 'dpop_replay', 'invalid_dpop_proof', `proof jti ${payload.jti} already used`);
      return;
    }
    seenProofJtis.add(payload.jti);
    if (payload.htm !== req.method) {
      refuse(`htm ${payload.htm} is not the request method ${req.method}`);
      return;
    }
    const expected = ownUrl(req);
    if (!sameUrl(payload.htu, expected)) {
      refuse(`htu ${payload.htu} is not ${expected}`);
      return;
    }
    const now = Math.floor(Date.now() / 1000);
    if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > DPOP_IAT_WINDOW_S) {
      refuse(`iat ${payload.iat} is not within ${DPOP_IAT_WINDOW_S} s of ${now}`);
      return;
    }
    if (payload.ath !== sha256(token, 'base64url')) {
      refuse(payload.ath === undefined ? 'proof without ath' : 'ath is not the SHA-256 of the access token');
      return;
    }
    if (dpop.requireNonce && payload.nonce !== dpop.nonce) {
      dpopUnauthorized(res, 'dpop_nonce_challenges', 'use_dpop_nonce', 'Resource server requires nonce in DPoP proof', {
        'dpop-nonce': dpop.nonce,
      });
      return;
    }
  }
  // How a token problem is answered: in the request's own scheme.
  const refuseToken = (kind, description) => (scheme === 'DPoP'
    ? dpopUnauthorized(res, kind, 'invalid_token', description)
    : unauthorized(res, kind, description));

  try {
    const { payload } = await jwtVerify(token, jwks, {
      issuer,
      audience: AUDIENCE,
      algorithms: ['RS256'],
      typ: 'at+jwt',
      clockTolerance: 0,
      requiredClaims: ['exp', 'jti', 'client_id'],
    });
    const boundJkt = payload.cnf?.jkt;
    if (scheme === 'Bearer' && boundJkt !== undefined) {
      dpopUnauthorized(res, 'dpop_missing', 'invalid_token', 'DPoP-bound token (cnf.jkt) sent with the Bearer scheme');
      return;
    }
    if (scheme === 'DPoP' && boundJkt !== jkt) {
      dpopUnauthorized(res, 'dpop_jkt_mismatch', 'invalid_token', boundJkt === undefined
        ? 'token not DPoP-bound (no cnf.jkt)'
        : `token bound to key ${boundJkt}, proof signed with ${jkt}`);
      return;
    }
    const bound = payload.cnf?.['x5t#S256'];
    if (bound !== undefined) {
      const peer = req.socket.getPeerCertificate?.();
      const presented = peer?.raw ? createHash('sha256').update(peer.raw).digest('base64url') : null;
      if (presented !== bound) {
        refuseToken('cnf_mismatch', `token bound to certificate ${bound}, connection presented ${presented ?? 'none'}`);
        return;
      }
      stats.cnf_ok += 1;
      clientStats(payload.client_id).cnf_ok += 1;
    }
    stats.ok += 1;
    stats.jtis.add(payload.jti);
    const c = clientStats(payload.client_id);
    c.ok += 1;
    c.jtis.add(payload.jti);
    c.last_jti = payload.jti;
    c.last_token_sha256 = sha256(token);
    if (scheme === 'DPoP') {
      stats.dpop_ok += 1;
      c.dpop_ok += 1;
    }
    sendJson(res, 200, {
      client_id: payload.client_id,
      jti: payload.jti,
      exp: payload.exp,
      method: req.method,
      path: req.url,
    }, dpop.requireNonce ? { 'dpop-nonce': dpop.nonce } : {});
  } catch (err) {
    // jose checks the signature before the claims, so JWTExpired means a genuine token used too late.
    if (err instanceof errors.JWTExpired) {
      let clientId = 'unknown';
      try { clientId = decodeJwt(token).client_id ?? 'unknown'; } catch { /* counted below anyway */ }
      clientStats(clientId).expired += 1;
      refuseToken('expired', err.message);
    } else {
      refuseToken('invalid', `${err.code ?? err.name}: ${err.message}`);
    }
  }
}

const tls = process.env.UPSTREAM_TLS_CERT ? {
  cert: readFileSync(process.env.UPSTREAM_TLS_CERT),
  key: readFileSync(process.env.UPSTREAM_TLS_KEY),
  ca: readFileSync(process.env.UPSTREAM_TLS_CLIENT_CA),
  requestCert: true,
  rejectUnauthorized: false,
} : null;

const handler = (req, res) => {
  const path = (req.url ?? '/').split('?')[0];
  if (path.startsWith('/_test/')) {
    const route = `${req.method} ${path}`;
    const params = new URL(req.url ?? '/', 'http://127.0.0.1').searchParams;
    if (route === 'GET /_test/stats') return sendJson(res, 200, statsJson());
    if (route === 'GET /_test/tokens') return sendJson(res, 200, { tokens: [...stats.tokens] });
    if (route === 'POST /_test/reset') {
      stats = freshStats();
      dpop.requireNonce = false;
      dpop.nonce = newNonce();
      dpop.rejectNext = 0;
      return sendJson(res, 200, { reset: true });
    }
    if (route === 'POST /_test/dpop-nonce') {
      const require = params.get('require');
      const rotate = params.get('rotate');
      if (![null, '0', '1'].includes(require) || ![null, '0', '1'].includes(rotate) || (require === null && rotate === null)) {
        return sendJson(res, 400, { error: 'require and rotate must be 0 or 1 (one of them at least)' });
      }
      if (require !== null) dpop.requireNonce = require === '1';
      if (rotate === '1') dpop.nonce = newNonce();
      console.error(`upstream: DPoP nonce ${dpop.requireNonce ? 'required' : 'not required'}${rotate === '1' ? ' (rotated)' : ''}`);
      return sendJson(res, 200, { require: dpop.requireNonce, nonce: dpop.nonce });
    }
    if (route === 'POST /_test/reject-next') {
      const count = Number(params.get('count') ?? 1);
      if (!Number.isInteger(count) || count < 0) return sendJson(res, 400, { error: 'count must be a non-negative integer' });
      dpop.rejectNext = count;
      return sendJson(res, 200, { pending_rejections: dpop.rejectNext });
    }
    return sendJson(res, 404, { error: `no control endpoint ${route}` });
  }
  // Drain the request body before answering, so keep-alive connections stay usable.
  req.resume();
  req.on('end', () => {
    handleApi(req, res).catch((err) => {
      console.error('upstream: handler failed', err);
      if (!res.headersSent) sendJson(res, 500, { error: 'upstream_bug' });
    });
  });
  return undefined;
};
const server = tls ? createTlsServer(tls, handler) : createServer(handler);

// Keep idle keep-alive connections longer than any client's pool would (Node's default is 5 s), so a
// test never trips over the server closing a pooled connection just as a request goes out on it.
server.keepAliveTimeout = 75_000;
server.headersTimeout = 80_000;

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
process.stdout.write(`READY ${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}\n`);
