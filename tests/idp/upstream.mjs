// A tiny protected "API" for tokenproxy's integration tests: it accepts a request only with
// `Authorization: Bearer <JWT>` signed by the test OpenID provider (server.mjs).
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
//   POST /_test/reset   zero everything
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

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import process from 'node:process';
import { createRemoteJWKSet, decodeJwt, errors, jwtVerify } from 'jose';

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
  };
}
let stats = freshStats();

function clientStats(clientId) {
  return stats.clients[clientId] ??= {
    ok: 0, expired: 0, cnf_ok: 0, jtis: new Set(), last_jti: null, last_token_sha256: null,
  };
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
  };
}

async function handleApi(req, res) {
  stats.requests += 1;
  const header = req.headers.authorization;
  const match = /^Bearer ([^\s]+)$/i.exec(header ?? '');
  if (!match) {
    unauthorized(res, header ? 'invalid' : 'missing', header ? 'not a Bearer token' : 'no Authorization header');
    return;
  }
  const token = match[1];
  stats.tokens.add(token);
  try {
    const { payload } = await jwtVerify(token, jwks, {
      issuer,
      audience: AUDIENCE,
      algorithms: ['RS256'],
      typ: 'at+jwt',
      clockTolerance: 0,
      requiredClaims: ['exp', 'jti', 'client_id'],
    });
    const bound = payload.cnf?.['x5t#S256'];
    if (bound !== undefined) {
      const peer = req.socket.getPeerCertificate?.();
      const presented = peer?.raw ? createHash('sha256').update(peer.raw).digest('base64url') : null;
      if (presented !== bound) {
        unauthorized(res, 'cnf_mismatch', `token bound to certificate ${bound}, connection presented ${presented ?? 'none'}`);
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
    c.last_token_sha256 = createHash('sha256').update(token).digest('hex');
    sendJson(res, 200, {
      client_id: payload.client_id,
      jti: payload.jti,
      exp: payload.exp,
      method: req.method,
      path: req.url,
    });
  } catch (err) {
    // jose checks the signature before the claims, so JWTExpired means a genuine token used too late.
    if (err instanceof errors.JWTExpired) {
      let clientId = 'unknown';
      try { clientId = decodeJwt(token).client_id ?? 'unknown'; } catch { /* counted below anyway */ }
      clientStats(clientId).expired += 1;
      unauthorized(res, 'expired', err.message);
    } else {
      unauthorized(res, 'invalid', `${err.code ?? err.name}: ${err.message}`);
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
    if (route === 'GET /_test/stats') return sendJson(res, 200, statsJson());
    if (route === 'GET /_test/tokens') return sendJson(res, 200, { tokens: [...stats.tokens] });
    if (route === 'POST /_test/reset') {
      stats = freshStats();
      return sendJson(res, 200, { reset: true });
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
