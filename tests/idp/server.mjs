// A real OpenID provider (npm `oidc-provider`) for tokenproxy's integration tests.
//
// It listens on 127.0.0.1 (port from IDP_PORT, default 0 = any free port), and only once it knows its
// port does it build the Provider, so the issuer is exactly `http://127.0.0.1:PORT`. Client credentials
// tokens are RS256 JWTs (`typ: at+jwt`) for the resource `urn:tokenproxy:test-api` (or, asked for with
// `resource=urn:tokenproxy:test-api-2`, that one: its `aud`), living IDP_TOKEN_TTL seconds (default 5).
//
// Clients: tp-basic / tp-basic-secret (client_secret_basic), tp-post / tp-post-secret (client_secret_post).
// Each must use its registered method (oidc-provider alone would accept either): a client that sends its
// secret the other way gets 401 invalid_client. IDP_LENIENT_CLIENT_AUTH=1 turns that check off.
//
// tp-rotate / tp-rotate-secret (client_secret_basic) holds a user session: grants refresh_token and
// device_code, refresh tokens rotate on every use (`rotateRefreshToken: true`; presenting a rotated one
// again makes oidc-provider answer invalid_grant AND revoke the whole grant, the newest token included),
// and the access tokens a refresh issues are the same JWTs (aud urn:tokenproxy:test-api, IDP_TOKEN_TTL)
// because the grant holds that resource and `useGrantedResource` is on. Refresh tokens live
// IDP_REFRESH_TOKEN_TTL seconds (default 86400). Device flow (RFC 8628) and revocation (RFC 7009) are on;
// the device authorization answer carries `interval` = IDP_DEVICE_INTERVAL (default 1) seconds.
//
// DPoP (RFC 9449) is on for every client (`features.dPoP`, proofs signed ES256 / Ed25519 / EdDSA, a replayed proof
// jti refused, server nonces made from a random secret). tp-dpop / tp-dpop-secret (client_secret_basic,
// client_credentials) is registered with `dpop_bound_access_tokens`: a /token call without a `DPoP` proof gets 400
// invalid_grant ("DPoP proof JWT not provided"); with one, token_type is `DPoP` and the JWT carries `cnf.jkt`, the
// RFC 7638 thumbprint of the proof's key. The `htu` the provider expects is the token endpoint as this request
// reached it (`http://` + Host header + `/token`), query and fragment ignored. Nonces are required only after
// POST /_test/dpop?require_nonce=1: a proof without one (or with a stale one) then gets 400 use_dpop_nonce and a
// `DPoP-Nonce` header to retry with; the provider also sends `DPoP-Nonce` on every answer to a proof that did not
// carry the newest nonce, required or not.
//
// Control API (outside the provider's own paths):
//   GET  /_test/stats                      counts of /token calls per client_id and outcome
//   POST /_test/fail?count=N&status=503    the next N /token calls answer that status
//        [&error=temporarily_unavailable] [&retry_after=SECONDS] [&delay_ms=MS]
//   POST /_test/delay?count=N&ms=M         the next N /token calls are held M ms, then served normally (a call
//                                          whose client went away meanwhile is dropped unprocessed, counted in
//                                          `dropped` of /_test/stats)
//   POST /_test/hold-answer?count=N&ms=M   the next N /token calls are served at once (a refresh token
//                                          is rotated) but their answers held M ms: a client that gives
//                                          up meanwhile never learns what the provider did
//   GET  /_test/client-key?client=ID      the private key of a private_key_jwt client (tp-jwt-rsa: RSA
//                                          2048, tp-jwt-ec: EC P-256), {private_key_pem (PKCS#8), kid, alg};
//                                          the provider holds the public half with kid = its RFC 7638 thumbprint
//   GET  /_test/client-jwks                the public key of tp-jwt-rotate (its jwks_uri)
//   POST /_test/rotate-client-key          a new key for tp-jwt-rotate; the old one is no longer served, and the
//                                          provider's cached copy is marked stale; answers like /_test/client-key
//   POST /_test/dpop?require_nonce=1|0     DPoP proofs at /token must (1) or need not (0, the start) carry a
//                                          server nonce; answers {require_nonce}
//   POST /_test/reset                      zero the counters, drop pending failures and delays, stop
//                                          requiring DPoP nonces (the record of redeemed refresh tokens is
//                                          kept: the provider's own state is not reset either)
//   POST /_test/seed-refresh-token         a fresh refresh token for tp-rotate, made through the
//        [?account=ID]                     provider's own models (a Grant for the account with scope
//                                          'openid offline_access api.read' and the resource, then a
//                                          RefreshToken): {refresh_token, sha256, grant_id, account_id, scope, resource}
//   POST /_test/approve-device             approves a pending device login (RFC 8628) as the user would:
//        [?user_code=XXXX-XXXX] [&deny=1]  a Grant through the models, stored on the DeviceCode (default:
//                                          the newest pending code); {approved, user_code, grant_id}
//
// /_test/stats also reports `refresh`: the /token calls with grant_type=refresh_token, as the provider
// answered them (before any injected failure replaced the answer): calls, ok, invalid_grant,
// other_error, injected, reused (a presented refresh token that an earlier call had already redeemed:
// every redeemed token's SHA-256 is remembered), unknown (never issued by this process), by_grant
// {GRANT_ID: {ok, invalid_grant}}, and `log`, one entry per call in order: {sha256 of the presented token,
// status, error, detail (oidc-provider's error_detail), grant_id, reused, rotated_to (sha256 of the
// new one)}. `device` counts device authorizations / approvals, `revocation` the /token/revocation
// calls. Refresh tokens themselves never appear in stats or logs, only their SHA-256.
//
// HTTPS and mutual TLS (RFC 8705): with IDP_TLS_CERT, IDP_TLS_KEY (the server's pair, for 127.0.0.1) and
// IDP_TLS_CLIENT_CA (the CA client certificates are verified against), the provider is served over HTTPS only,
// the issuer is `https://127.0.0.1:PORT`, every connection is asked for a client certificate (one that is missing
// or from another CA is let through, for the provider to refuse per client), and two more clients exist, both
// getting certificate-bound access tokens (`cnf.x5t#S256`, the SHA-256 of the certificate presented):
//   tp-mtls        tls_client_auth: a certificate from IDP_TLS_CLIENT_CA with subject `CN=tokenproxy-mtls`
//   tp-mtls-self   self_signed_tls_client_auth: the certificate in IDP_SELF_SIGNED_CERT (PEM), registered in the
//                  client's JWKS as `x5c`
// /_test/stats then also lists, per client, `cert_thumbprints`: the x5t#S256 of the certificate each /token call
// came with ("-" for none), in order.
//
// DPoP in /_test/stats: per client `dpop_proofs` (/token calls that carried a `DPoP` header), `dpop_jkts` (the RFC
// 7638 thumbprint of the `jwk` in each proof's header, in call order, "?" for an undecodable one) and
// `use_dpop_nonce` (answers with that error); at the top, `dpop: {use_dpop_nonce, proofs, require_nonce}` over all
// clients.
//
// stdout carries exactly one line, `READY http://127.0.0.1:PORT`; everything else goes to stderr.
// The process exits on SIGTERM, SIGINT, and when its stdin closes (set IDP_IGNORE_STDIN=1 to keep it
// running with a closed stdin), so a test that dies does not leave it behind.

import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { createHash, randomBytes, randomUUID, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import process from 'node:process';

// oidc-provider prints its notices with console.info (stdout). stdout is reserved for the READY line,
// so route every console method to stderr before the library is loaded.
const writeStdout = process.stdout.write.bind(process.stdout);
for (const method of ['log', 'info', 'debug']) {
  console[method] = (...args) => console.error(...args);
}

const { default: Provider, errors } = await import('oidc-provider');
const {
  calculateJwkThumbprint, decodeProtectedHeader, exportJWK, exportPKCS8, generateKeyPair, importJWK, jwtVerify,
} = await import('jose');

const RESOURCE = 'urn:tokenproxy:test-api';
const SECOND_RESOURCE = 'urn:tokenproxy:test-api-2';
const RESOURCE_SCOPE = 'api.read api.write';
// The session client: refresh tokens (rotating), device flow.
const ROTATE_CLIENT_ID = 'tp-rotate';
const ROTATE_CLIENT_SECRET = 'tp-rotate-secret';
const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
// What a seeded or device-approved session is granted: OpenID scopes, and api.read on the resource.
const SESSION_OIDC_SCOPE = 'openid offline_access';
const SESSION_RESOURCE_SCOPE = 'api.read';
const SESSION_SCOPE = `${SESSION_OIDC_SCOPE} ${SESSION_RESOURCE_SCOPE}`;
const DEFAULT_ACCOUNT = 'test-user';

function envInt(name, fallback, { min = 0 } = {}) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min) {
    console.error(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return value;
}

const port = envInt('IDP_PORT', 0);
const tokenTtl = envInt('IDP_TOKEN_TTL', 5, { min: 1 });
const refreshTokenTtl = envInt('IDP_REFRESH_TOKEN_TTL', 86400, { min: 1 });
const deviceInterval = envInt('IDP_DEVICE_INTERVAL', 1, { min: 1 });

// ---- lifetime --------------------------------------------------------------------------------------

function shutdown(reason) {
  console.error(`idp: exiting (${reason})`);
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.IDP_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

// ---- test control state ----------------------------------------------------------------------------

const control = {
  // per client_id: { calls, ok, error, injected, statuses: { "200": n, ... },
  //                  auth_methods: { "client_secret_basic": n, ... } }
  clients: {},
  total: 0,
  // pending injected failures, consumed in order by the next /token calls
  failures: [],
  // pending delays (ms), consumed in order by the next /token calls
  delays: [],
  // pending answer holds (ms), consumed in order by the next /token calls
  holds: [],
  refresh: freshRefreshStats(),
  device: { authorizations: 0, approved: 0, denied: 0 },
  revocation: { calls: 0, ok: 0, error: 0 },
  // POST /_test/dpop?require_nonce=1: DPoP proofs at /token must carry a server nonce.
  dpopRequireNonce: false,
  dpop: { use_dpop_nonce: 0, proofs: 0 },
};

// SHA-256 (hex) of every refresh token a refresh_token grant redeemed (the provider consumed it), and of
// every refresh token this process handed out (seeded or returned by /token). Not cleared by a reset:
// the provider does not forget a consumed token either.
const redeemedRefreshTokens = new Set();
const issuedRefreshTokens = new Set();
// user_codes of device authorizations not yet approved or denied, oldest first.
const pendingUserCodes = [];

function freshRefreshStats() {
  return {
    calls: 0, ok: 0, invalid_grant: 0, other_error: 0, injected: 0, reused: 0, unknown: 0, by_grant: {}, log: [],
  };
}

function sha256(text) {
  return createHash('sha256').update(text).digest('hex');
}

// Records one /token call with grant_type=refresh_token, as the provider itself answered it.
function recordRefresh(ctx, injected) {
  const presented = ctx.oidc?.body?.refresh_token;
  const stats = control.refresh;
  const presentedSha = typeof presented === 'string' && presented ? sha256(presented) : null;
  const reused = presentedSha !== null && redeemedRefreshTokens.has(presentedSha);
  const ok = ctx.status >= 200 && ctx.status < 300;
  const error = ok ? null : (ctx.body?.error ?? `http_${ctx.status}`);
  const grantId = ctx.oidc?.entities?.RefreshToken?.grantId ?? ctx.oidc?.entities?.Grant?.jti ?? null;
  let rotatedTo = null;
  if (ok && presentedSha) {
    redeemedRefreshTokens.add(presentedSha);
    const issued = ctx.body?.refresh_token;
    if (typeof issued === 'string' && issued) {
      rotatedTo = sha256(issued);
      issuedRefreshTokens.add(rotatedTo);
    }
  }
  stats.calls += 1;
  if (ok) stats.ok += 1;
  else if (error === 'invalid_grant') stats.invalid_grant += 1;
  else stats.other_error += 1;
  if (injected) stats.injected += 1;
  if (reused) stats.reused += 1;
  if (presentedSha && !issuedRefreshTokens.has(presentedSha)) stats.unknown += 1;
  if (grantId) {
    const entry = stats.by_grant[grantId] ??= { ok: 0, invalid_grant: 0 };
    if (ok) entry.ok += 1;
    else if (error === 'invalid_grant') entry.invalid_grant += 1;
  }
  const detail = grantErrorDetail.get(ctx) ?? null;
  stats.log.push({
    sha256: presentedSha, status: ctx.status, error, detail, grant_id: grantId, reused, rotated_to: rotatedTo, injected,
  });
  return { presentedSha, reused, detail };
}

// oidc-provider's own reason for a refused grant (`error_detail`, e.g. "refresh token already used"),
// which its answer does not carry (error_description is generic).
const grantErrorDetail = new WeakMap();

function record(clientId, status, injected, authMethod) {
  const entry = control.clients[clientId] ??= {
    calls: 0, ok: 0, error: 0, injected: 0, statuses: {}, auth_methods: {}, dpop_proofs: 0, dpop_jkts: [], use_dpop_nonce: 0,
  };
  entry.auth_methods[authMethod] = (entry.auth_methods[authMethod] ?? 0) + 1;
  entry.calls += 1;
  if (injected) entry.injected += 1;
  else if (status >= 200 && status < 300) entry.ok += 1;
  else entry.error += 1;
  entry.statuses[status] = (entry.statuses[status] ?? 0) + 1;
  control.total += 1;
}

// The `kid` of a client assertion's header, in the order the calls came (a header is not secret).
// The client certificate of the connection a request came on, verified or not (HTTPS mode only).
function peerCertificate(ctx) {
  const peer = ctx.socket?.getPeerCertificate?.();
  return peer?.raw ? new X509Certificate(peer.raw) : undefined;
}

function recordCertificate(ctx, clientId) {
  if (!tls) return;
  const cert = peerCertificate(ctx);
  const entry = control.clients[clientId];
  if (entry) (entry.cert_thumbprints ??= []).push(cert ? createHash('sha256').update(cert.raw).digest('base64url') : '-');
}

// A /token call's DPoP proof (its header's key thumbprint; a proof is not secret) and a use_dpop_nonce answer.
// Returns the thumbprint, or null without a proof.
async function recordDpop(ctx, clientId) {
  const entry = control.clients[clientId];
  const proof = ctx.get('dpop');
  let jkt = null;
  if (proof) {
    jkt = '?';
    try {
      jkt = await calculateJwkThumbprint(decodeProtectedHeader(proof).jwk);
    } catch {}
  }
  if (!entry) return jkt;
  if (proof) {
    entry.dpop_proofs += 1;
    entry.dpop_jkts.push(jkt);
    control.dpop.proofs += 1;
  }
  if (ctx.status >= 400 && ctx.body?.error === 'use_dpop_nonce') {
    entry.use_dpop_nonce += 1;
    control.dpop.use_dpop_nonce += 1;
  }
  return jkt;
}

function recordAssertionKid(ctx, clientId) {
  const assertion = ctx.oidc?.body?.client_assertion;
  if (typeof assertion !== 'string') return;
  let kid = '?';
  try {
    kid = JSON.parse(Buffer.from(assertion.split('.')[0], 'base64url').toString('utf8')).kid ?? '(none)';
  } catch {}
  const entry = control.clients[clientId];
  if (entry) (entry.assertion_kids ??= []).push(kid);
}

// The client_id a /token request claims to be, whether or not it authenticated.
function claimedClientId(ctx) {
  if (ctx.oidc?.client?.clientId) return ctx.oidc.client.clientId;
  const auth = ctx.get('authorization');
  if (auth && /^basic /i.test(auth)) {
    const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon > 0) {
      try {
        return decodeURIComponent(decoded.slice(0, colon).replace(/\+/g, ' '));
      } catch {
        return decoded.slice(0, colon);
      }
    }
  }
  const fromBody = ctx.oidc?.body?.client_id ?? ctx.request.body?.client_id;
  if (typeof fromBody === 'string' && fromBody) return fromBody;
  return 'unknown';
}

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
  });
  res.end(text);
}

function positiveInt(params, name, fallback) {
  const raw = params.get(name);
  if (raw === null) return fallback;
  const value = Number(raw);
  return Number.isInteger(value) && value >= 0 ? value : NaN;
}

function handleControl(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  const params = url.searchParams;
  switch (route) {
    case 'GET /_test/client-key': {
      const key = clientKeys[params.get('client')];
      if (!key) return sendJson(res, 404, { error: `no private_key_jwt client ${params.get('client')}` });
      return sendJson(res, 200, { private_key_pem: key.pem, kid: key.kid, alg: key.alg });
    }
    case 'GET /_test/client-jwks':
      return sendJson(res, 200, { keys: [rotating.key.publicJwk] });
    case 'POST /_test/rotate-client-key':
      return newRotatingKey().then(async () => {
        const client = await provider.Client.find(rotating.clientId);
        if (client?.asymmetricKeyStore) client.asymmetricKeyStore.freshUntil = 0;
        return sendJson(res, 200, { private_key_pem: rotating.key.pem, kid: rotating.key.kid, alg: 'ES256' });
      });
    case 'GET /_test/stats':
      return sendJson(res, 200, {
        total: control.total,
        clients: control.clients,
        pending_failures: control.failures.length,
        pending_delays: control.delays.length,
        dropped: control.dropped ?? 0,
        pending_holds: control.holds.length,
        token_ttl: tokenTtl,
        refresh: { ...control.refresh, redeemed: redeemedRefreshTokens.size, issued: issuedRefreshTokens.size },
        device: { ...control.device, pending: pendingUserCodes.length },
        revocation: control.revocation,
        dpop: { ...control.dpop, require_nonce: control.dpopRequireNonce },
      });
    case 'POST /_test/fail': {
      const count = positiveInt(params, 'count', 1);
      const status = positiveInt(params, 'status', 503);
      const retryAfter = positiveInt(params, 'retry_after', null);
      const delayMs = positiveInt(params, 'delay_ms', 0);
      const error = params.get('error')
        ?? (status === 401 ? 'invalid_client' : status >= 500 ? 'temporarily_unavailable' : 'invalid_request');
      if ([count, status, retryAfter, delayMs].some(Number.isNaN) || status < 100 || status > 599) {
        return sendJson(res, 400, { error: 'count, status, retry_after and delay_ms must be non-negative integers' });
      }
      for (let i = 0; i < count; i += 1) {
        control.failures.push({ status, error, retryAfter, delayMs });
      }
      return sendJson(res, 200, { pending_failures: control.failures.length });
    }
    case 'POST /_test/delay': {
      const count = positiveInt(params, 'count', 1);
      const ms = positiveInt(params, 'ms', 1000);
      if (Number.isNaN(count) || Number.isNaN(ms)) {
        return sendJson(res, 400, { error: 'count and ms must be non-negative integers' });
      }
      for (let i = 0; i < count; i += 1) control.delays.push(ms);
      return sendJson(res, 200, { pending_delays: control.delays.length });
    }
    case 'POST /_test/hold-answer': {
      const count = positiveInt(params, 'count', 1);
      const ms = positiveInt(params, 'ms', 1000);
      if (Number.isNaN(count) || Number.isNaN(ms)) {
        return sendJson(res, 400, { error: 'count and ms must be non-negative integers' });
      }
      for (let i = 0; i < count; i += 1) control.holds.push(ms);
      return sendJson(res, 200, { pending_holds: control.holds.length });
    }
    case 'POST /_test/reset':
      control.clients = {};
      control.total = 0;
      control.failures = [];
      control.delays = [];
      control.holds = [];
      control.refresh = freshRefreshStats();
      control.device = { authorizations: 0, approved: 0, denied: 0 };
      control.revocation = { calls: 0, ok: 0, error: 0 };
      control.dpopRequireNonce = false;
      control.dpop = { use_dpop_nonce: 0, proofs: 0 };
      return sendJson(res, 200, { reset: true });
    case 'POST /_test/dpop': {
      const value = params.get('require_nonce');
      if (value !== '0' && value !== '1') return sendJson(res, 400, { error: 'require_nonce must be 0 or 1' });
      control.dpopRequireNonce = value === '1';
      console.error(`idp: DPoP nonces ${control.dpopRequireNonce ? 'required' : 'not required'} at /token`);
      return sendJson(res, 200, { require_nonce: control.dpopRequireNonce });
    }
    case 'POST /_test/seed-refresh-token':
      return seedRefreshToken(res, params);
    case 'POST /_test/approve-device':
      return approveDevice(res, params);
    default:
      return sendJson(res, 404, { error: `no control endpoint ${route}` });
  }
}

// ---- sessions made through the provider's own models ---------------------------------------------------

// A Grant for tp-rotate and `accountId`: the OpenID scopes, and api.read on the resource. Saved; its id
// is what the refresh tokens and device codes of the session point at.
async function sessionGrant(accountId) {
  const grant = new provider.Grant({ accountId, clientId: ROTATE_CLIENT_ID });
  grant.addOIDCScope(SESSION_OIDC_SCOPE);
  grant.addResourceScope(RESOURCE, SESSION_RESOURCE_SCOPE);
  return grant.save();
}

// What a browser login + consent would have produced, without a browser: the Grant, then a RefreshToken
// like the one the authorization_code grant issues (same fields), saved in the provider's adapter. It is
// redeemed through the real /token endpoint like any other.
async function seedRefreshToken(res, params) {
  if (!providerCallback) return sendJson(res, 503, { error: 'provider starting' });
  const accountId = params.get('account') || DEFAULT_ACCOUNT;
  const client = await provider.Client.find(ROTATE_CLIENT_ID);
  const grantId = await sessionGrant(accountId);
  const refreshToken = new provider.RefreshToken({
    accountId,
    authTime: Math.floor(Date.now() / 1000),
    client,
    grantId,
    gty: 'authorization_code',
    resource: RESOURCE,
    rotations: 0,
    scope: SESSION_SCOPE,
  });
  const value = await refreshToken.save();
  const digest = sha256(value);
  issuedRefreshTokens.add(digest);
  console.error(`idp: seeded a refresh token for ${ROTATE_CLIENT_ID} account=${accountId} grant=${grantId} sha256=${digest.slice(0, 12)}`);
  return sendJson(res, 200, {
    refresh_token: value, sha256: digest, grant_id: grantId, account_id: accountId, scope: SESSION_SCOPE, resource: RESOURCE,
  });
}

// Does what the user-code page and a login + consent would: the DeviceCode of `user_code` gets the
// account, a Grant and its scope/resource (as oidc-provider's own device flow stores them), so the next
// poll of /token with its device_code issues tokens. deny=1 stores access_denied instead.
async function approveDevice(res, params) {
  if (!providerCallback) return sendJson(res, 503, { error: 'provider starting' });
  const userCode = params.get('user_code') || pendingUserCodes[pendingUserCodes.length - 1];
  if (!userCode) return sendJson(res, 404, { error: 'no pending device authorization' });
  // As oidc-provider normalises what the user types: upper case, no separators.
  const normalized = userCode.replace(/[a-z]/g, (c) => c.toUpperCase()).replace(/\W/g, '');
  const code = await provider.DeviceCode.findByUserCode(normalized);
  if (!code || code.isExpired || code.accountId || code.error || code.consumed) {
    return sendJson(res, 404, { error: `no pending device authorization for user_code ${userCode}` });
  }
  const index = pendingUserCodes.indexOf(userCode);
  if (index >= 0) pendingUserCodes.splice(index, 1);
  if (params.get('deny') === '1') {
    Object.assign(code, { error: 'access_denied', errorDescription: 'denied by the test control API' });
    await code.save();
    control.device.denied += 1;
    return sendJson(res, 200, { approved: false, user_code: userCode });
  }
  const accountId = params.get('account') || DEFAULT_ACCOUNT;
  const grantId = await sessionGrant(accountId);
  Object.assign(code, {
    accountId,
    authTime: Math.floor(Date.now() / 1000),
    grantId,
    resource: RESOURCE,
    scope: SESSION_SCOPE,
  });
  await code.save();
  control.device.approved += 1;
  console.error(`idp: approved device login user_code=${userCode} account=${accountId} grant=${grantId}`);
  return sendJson(res, 200, { approved: true, user_code: userCode, grant_id: grantId });
}

// ---- server ----------------------------------------------------------------------------------------

let providerCallback = null;

// HTTPS mode (see the top of this file).
const tls = process.env.IDP_TLS_CERT ? {
  cert: readFileSync(process.env.IDP_TLS_CERT),
  key: readFileSync(process.env.IDP_TLS_KEY),
  ca: readFileSync(process.env.IDP_TLS_CLIENT_CA),
  requestCert: true,
  rejectUnauthorized: false,
} : null;

const handler = (req, res) => {
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  if (url.pathname.startsWith('/_test/')) {
    Promise.resolve()
      .then(() => handleControl(req, res, url))
      .catch((err) => {
        console.error(`idp: control ${req.method} ${url.pathname} failed`, err);
        if (!res.headersSent) sendJson(res, 500, { error: String(err?.message ?? err) });
      });
    return;
  }
  if (!providerCallback) {
    sendJson(res, 503, { error: 'temporarily_unavailable', error_description: 'provider starting' });
    return;
  }
  providerCallback(req, res);
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
const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${server.address().port}`;

const { privateKey } = await generateKeyPair('RS256', { extractable: true, modulusLength: 2048 });
const signingKey = { ...(await exportJWK(privateKey)), kid: randomUUID(), alg: 'RS256', use: 'sig' };

// private_key_jwt clients (RFC 7523 §2.2): each has a key pair made here; the provider knows the public half
// (registered `jwks`, `kid` = its RFC 7638 thumbprint, so a client that computes the thumbprint differently
// is refused), and GET /_test/client-key hands the private half to the test as PKCS#8 PEM.
const clientKeys = {};
for (const [clientId, alg] of [['tp-jwt-rsa', 'RS256'], ['tp-jwt-ec', 'ES256'], ['tp-jwt-grant', 'ES256'], ['tp-jwt-nokid', 'ES256']]) {
  const pair = await generateKeyPair(alg, { extractable: true, modulusLength: 2048 });
  const publicJwk = await exportJWK(pair.publicKey);
  const kid = await calculateJwkThumbprint(publicJwk);
  clientKeys[clientId] = { alg, kid, publicJwk: { ...publicJwk, kid, alg, use: 'sig' }, pem: await exportPKCS8(pair.privateKey) };
}

// tp-jwt-rotate: a private_key_jwt client whose keys the provider fetches from its jwks_uri (served below, from
// this process); POST /_test/rotate-client-key makes a new key pair, serves only the new public key (the old one is
// dropped) and marks the provider's copy of the client's keys stale, as if its cache had expired.
const rotating = { clientId: 'tp-jwt-rotate', key: null };
async function newRotatingKey() {
  const pair = await generateKeyPair('ES256', { extractable: true });
  const publicJwk = await exportJWK(pair.publicKey);
  const kid = await calculateJwkThumbprint(publicJwk);
  rotating.key = { alg: 'ES256', kid, publicJwk: { ...publicJwk, kid, alg: 'ES256', use: 'sig' }, pem: await exportPKCS8(pair.privateKey) };
  clientKeys[rotating.clientId] = rotating.key;
}
await newRotatingKey();

const JWT_BEARER_GRANT = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const TOKEN_EXCHANGE_GRANT = 'urn:ietf:params:oauth:grant-type:token-exchange';

const clientBase = {
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
};

// The mutual-TLS clients (HTTPS mode only).
const mtlsClients = [];
if (tls) {
  const selfSigned = new X509Certificate(readFileSync(process.env.IDP_SELF_SIGNED_CERT));
  const selfSignedJwk = { ...selfSigned.publicKey.export({ format: 'jwk' }), x5c: [selfSigned.raw.toString('base64')], use: 'sig' };
  mtlsClients.push(
    {
      ...clientBase,
      client_id: 'tp-mtls',
      token_endpoint_auth_method: 'tls_client_auth',
      tls_client_auth_subject_dn: 'CN=tokenproxy-mtls',
      tls_client_certificate_bound_access_tokens: true,
    },
    {
      ...clientBase,
      client_id: 'tp-mtls-self',
      token_endpoint_auth_method: 'self_signed_tls_client_auth',
      jwks: { keys: [selfSignedJwk] },
      tls_client_certificate_bound_access_tokens: true,
    },
  );
}

const provider = new Provider(issuer, {
  clients: [
    ...mtlsClients,
    {
      ...clientBase,
      client_id: 'tp-basic',
      client_secret: 'tp-basic-secret',
      token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      ...clientBase,
      client_id: 'tp-dpop',
      client_secret: 'tp-dpop-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      // oidc-provider refuses a /token call of this client without a DPoP proof (invalid_grant).
      dpop_bound_access_tokens: true,
    },
    {
      ...clientBase,
      client_id: 'tp-post',
      client_secret: 'tp-post-secret',
      token_endpoint_auth_method: 'client_secret_post',
    },
    {
      ...clientBase,
      client_id: rotating.clientId,
      token_endpoint_auth_method: 'private_key_jwt',
      jwks_uri: `${issuer}/_test/client-jwks`,
    },
    ...Object.entries(clientKeys).filter(([clientId]) => ['tp-jwt-rsa', 'tp-jwt-ec'].includes(clientId)).map(([clientId, key]) => ({
      ...clientBase,
      client_id: clientId,
      token_endpoint_auth_method: 'private_key_jwt',
      jwks: { keys: [key.publicJwk] },
    })),
    // tp-jwt-nokid: its public key registered without a `kid`, as many IdPs' consoles do; the provider then
    // refuses an assertion whose header names any kid.
    (({ kid, ...publicJwk }) => ({
      ...clientBase,
      client_id: 'tp-jwt-nokid',
      token_endpoint_auth_method: 'private_key_jwt',
      jwks: { keys: [publicJwk] },
    }))(clientKeys['tp-jwt-nokid'].publicJwk),
    {
      ...clientBase,
      client_id: 'tp-exchange',
      client_secret: 'tp-exchange-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [TOKEN_EXCHANGE_GRANT],
    },
    {
      ...clientBase,
      client_id: 'tp-jwt-grant',
      client_secret: 'tp-jwt-grant-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [JWT_BEARER_GRANT],
    },
    {
      client_id: ROTATE_CLIENT_ID,
      client_secret: ROTATE_CLIENT_SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['refresh_token', DEVICE_CODE_GRANT],
      response_types: [],
      redirect_uris: [],
    },
  ],
  // Every use of a refresh token returns a new one and consumes the old (the default rotates only past
  // 70 % of the token's life, or for public clients).
  // oidc-provider refuses to fetch from loopback addresses (SSRF protection); tp-jwt-rotate's jwks_uri is this
  // process's own control API on 127.0.0.1, so that one URL is fetched without the protection.
  fetch: (url, options) => {
    if (String(url).startsWith(`${issuer}/_test/client-jwks`)) delete options.dispatcher;
    return globalThis.fetch(url, options);
  },
  // The defaults, and in HTTPS mode the two mutual-TLS methods.
  clientAuthMethods: [
    'client_secret_basic', 'client_secret_jwt', 'client_secret_post', 'private_key_jwt', 'none',
    ...(tls ? ['tls_client_auth', 'self_signed_tls_client_auth'] : []),
  ],
  rotateRefreshToken: true,
  issueRefreshToken: async (_ctx, client) => client.clientId === ROTATE_CLIENT_ID && client.grantTypeAllowed('refresh_token'),
  findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    deviceFlow: { enabled: true },
    // DPoP (RFC 9449): proofs accepted from any client, required of tp-dpop (dpop_bound_access_tokens); a nonce
    // only after POST /_test/dpop?require_nonce=1.
    dPoP: {
      enabled: true,
      nonceSecret: randomBytes(32),
      requireNonce: () => control.dpopRequireNonce,
      allowReplay: false,
    },
    mTLS: {
      enabled: Boolean(tls),
      certificateBoundAccessTokens: true,
      tlsClientAuth: true,
      selfSignedTlsClientAuth: true,
      getCertificate: peerCertificate,
      // Verified against IDP_TLS_CLIENT_CA by Node during the handshake.
      certificateAuthorized: (ctx) => ctx.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) => property === 'tls_client_auth_subject_dn'
        && peerCertificate(ctx)?.subject === expected,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => RESOURCE,
      useGrantedResource: async () => true,
      // A second resource for route profiles (tokens per audience from one client); anything else is invalid_target.
      getResourceServerInfo: async (_ctx, resourceIndicator) => {
        if (![RESOURCE, SECOND_RESOURCE].includes(resourceIndicator)) throw new errors.InvalidTarget();
        return {
          audience: resourceIndicator,
          scope: RESOURCE_SCOPE,
          accessTokenFormat: 'jwt',
          accessTokenTTL: tokenTtl,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  ttl: {
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? tokenTtl,
    AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? tokenTtl,
    RefreshToken: refreshTokenTtl,
    Grant: Math.max(refreshTokenTtl, 3600),
    DeviceCode: 600,
    IdToken: 3600,
    Interaction: 3600,
    Session: 86400,
  },
});

// How a /token request presented its client credentials.
function presentedAuthMethod(ctx) {
  const header = ctx.get('authorization');
  const bodySecret = ctx.oidc?.body?.client_secret;
  if (header && bodySecret) return 'both';
  if (header) return /^basic /i.test(header) ? 'client_secret_basic' : 'other_header';
  if (bodySecret) return 'client_secret_post';
  // oidc-provider verified the assertion's signature against the client's registered keys.
  if (ctx.oidc?.body?.client_assertion) return 'private_key_jwt';
  // oidc-provider verified the certificate (CA and subject, or the registered self-signed one).
  const registered = ctx.oidc?.client?.clientAuthMethod;
  if (peerCertificate(ctx) && ['tls_client_auth', 'self_signed_tls_client_auth'].includes(registered)) return registered;
  return 'none';
}

function sleep(ms) {
  return new Promise((resolve) => { setTimeout(resolve, ms); });
}

// Counts /token calls, holds them or answers with an injected failure when the control API asked for
// it, and (unless IDP_LENIENT_CLIENT_AUTH=1) refuses a client that authenticated with a method other than
// its registered one: oidc-provider itself treats client_secret_basic and client_secret_post as
// interchangeable, and the tests must prove tokenproxy uses the configured method.
//
// The provider handles the request first and any injected failure replaces its answer afterwards, so the
// request's client_id is known (the form body is parsed only inside the provider) and counted correctly.
provider.use(async (ctx, next) => {
  if (ctx.path === '/device/auth') {
    await next();
    // RFC 8628 §3.2 `interval`: oidc-provider leaves it out (the client then waits 5 s between polls).
    if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
      ctx.body.interval = deviceInterval;
      control.device.authorizations += 1;
      pendingUserCodes.push(ctx.body.user_code);
      console.error(`idp: device authorization for ${claimedClientId(ctx)} user_code=${ctx.body.user_code}`);
    }
    return;
  }
  if (ctx.path === '/token/revocation') {
    await next();
    const ok = ctx.status >= 200 && ctx.status < 300;
    control.revocation.calls += 1;
    control.revocation[ok ? 'ok' : 'error'] += 1;
    const hint = ctx.oidc?.body?.token_type_hint ?? '-';
    const token = ctx.oidc?.body?.token;
    const digest = typeof token === 'string' && token ? sha256(token).slice(0, 12) : '-';
    console.error(`idp: /token/revocation client=${claimedClientId(ctx)} hint=${hint} sha256=${digest} status=${ctx.status}`);
    return;
  }
  if (ctx.path !== '/token') {
    await next();
    return;
  }
  const delayMs = control.delays.shift();
  if (delayMs) {
    await sleep(delayMs);
    // A client that went away while its call was held (killed) never reached the provider: drop the call unprocessed,
    // as a request lost in flight would be.
    if (ctx.req.socket.destroyed || ctx.req.aborted) {
      control.dropped = (control.dropped ?? 0) + 1;
      console.error(`idp: a held /token call was dropped unprocessed: its client went away`);
      ctx.status = 499;
      ctx.body = '';
      return;
    }
  }
  const failure = control.failures.shift();
  if (failure?.delayMs) await sleep(failure.delayMs);
  const holdMs = control.holds.shift();

  try {
    await next();
  } catch (err) {
    record(claimedClientId(ctx), 500, false, presentedAuthMethod(ctx));
    await recordDpop(ctx, claimedClientId(ctx));
    throw err;
  }

  const clientId = claimedClientId(ctx);
  const method = presentedAuthMethod(ctx);
  const registered = ctx.oidc?.client?.clientAuthMethod;
  const grantType = ctx.oidc?.params?.grant_type ?? ctx.oidc?.body?.grant_type;
  // What the provider did with a refresh token, before an injected failure hides its answer (a rotation
  // the client never hears of is exactly what an injected failure after a refresh simulates).
  const refresh = grantType === 'refresh_token' ? recordRefresh(ctx, Boolean(failure)) : null;
  if (grantType === DEVICE_CODE_GRANT && ctx.status === 200 && typeof ctx.body?.refresh_token === 'string') {
    issuedRefreshTokens.add(sha256(ctx.body.refresh_token));
  }
  if (
    !failure
    && process.env.IDP_LENIENT_CLIENT_AUTH !== '1'
    && ctx.status >= 200 && ctx.status < 300
    && registered && registered !== method
  ) {
    ctx.status = 401;
    ctx.set('cache-control', 'no-store');
    ctx.body = {
      error: 'invalid_client',
      error_description: `client ${clientId} is registered for ${registered} but used ${method}`,
    };
  }
  if (failure) {
    ctx.status = failure.status;
    ctx.remove('www-authenticate');
    if (failure.retryAfter !== null) ctx.set('retry-after', String(failure.retryAfter));
    ctx.set('cache-control', 'no-store');
    ctx.body = { error: failure.error, error_description: 'failure injected by the test control API' };
  }
  record(clientId, ctx.status, Boolean(failure), method);
  const dpopJkt = await recordDpop(ctx, clientId);
  recordAssertionKid(ctx, clientId);
  recordCertificate(ctx, clientId);
  // One line per token call on stderr (never a secret or a token), shown when a test fails.
  const error = ctx.status >= 400 ? ` error=${ctx.body?.error ?? '?'}` : '';
  let extra = '';
  if (refresh) {
    extra = ` grant_type=refresh_token rt_sha256=${refresh.presentedSha?.slice(0, 12) ?? '-'}`
      + `${refresh.reused ? ' REUSED' : ''}${refresh.detail ? ` detail=${JSON.stringify(refresh.detail)}` : ''}`;
  } else if (grantType && grantType !== 'client_credentials') {
    extra = ` grant_type=${grantType}`;
  }
  if (dpopJkt) extra += ` dpop_jkt=${dpopJkt.slice(0, 12)}`;
  // oidc-provider's reason for a refused DPoP call (its invalid_grant answer only says "grant request is invalid").
  const dpopDetail = ctx.status >= 400 && (dpopJkt || ctx.oidc?.client?.dpopBoundAccessTokens) ? grantErrorDetail.get(ctx) : undefined;
  if (dpopDetail && !refresh) extra += ` detail=${JSON.stringify(dpopDetail)}`;
  console.error(`idp: /token client=${clientId} auth=${method} status=${ctx.status}${error}${extra}${failure ? ' (injected)' : ''}${holdMs ? ` (answer held ${holdMs} ms)` : ''}`);
  if (holdMs) await sleep(holdMs);
});

provider.on('grant.error', (ctx, err) => {
  if (err?.error_detail) grantErrorDetail.set(ctx, err.error_detail);
  // Why a client's authentication failed (never a secret: oidc-provider's detail names the check).
  if (err?.error === 'invalid_client') console.error(`idp: invalid_client: ${err.error_detail ?? err.message}${err.cause ? ` (${err.cause.error_description ?? err.cause.message ?? err.cause})` : ""}`);
});

provider.on('server_error', (_ctx, err) => console.error('idp: server_error', err));

// grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer (RFC 7523 §2.1) for tp-jwt-grant (client_secret_basic on
// top): the assertion must be signed with the key /_test/client-key?client=tp-jwt-grant hands out, with iss = the
// client, sub = svc-42, aud = the token endpoint, at most 5 minutes of life, a jti never seen before, and the claim
// tenant = acme. The token is the same JWT a client_credentials call gets (aud urn:tokenproxy:test-api).
const seenAssertionJtis = new Set();
provider.registerGrantType(JWT_BEARER_GRANT, async (ctx) => {
  const { client } = ctx.oidc;
  const key = await importJWK(clientKeys['tp-jwt-grant'].publicJwk, 'ES256');
  let payload;
  try {
    ({ payload } = await jwtVerify(String(ctx.oidc.params.assertion ?? ''), key, {
      issuer: client.clientId, subject: 'svc-42', audience: `${issuer}/token`, requiredClaims: ['jti', 'iat', 'exp'],
    }));
  } catch (err) {
    throw new errors.InvalidGrant(`assertion refused: ${err.code ?? err.message}`);
  }
  if (payload.exp - payload.iat > 300) throw new errors.InvalidGrant('assertion lives longer than 5 minutes');
  if (seenAssertionJtis.has(payload.jti)) throw new errors.InvalidGrant('assertion jti reused');
  if (payload.tenant !== 'acme') throw new errors.InvalidGrant('assertion without tenant = acme');
  seenAssertionJtis.add(payload.jti);
  const token = new provider.ClientCredentials({ client, scope: 'api.read' });
  token.resourceServer = new provider.ResourceServer(RESOURCE, {
    audience: RESOURCE, scope: RESOURCE_SCOPE, accessTokenFormat: 'jwt', accessTokenTTL: tokenTtl, jwt: { sign: { alg: 'RS256' } },
  });
  const value = await token.save();
  ctx.body = { access_token: value, expires_in: token.expiration, token_type: 'Bearer', scope: token.scope };
}, ['assertion', 'scope']);

// grant_type=urn:ietf:params:oauth:grant-type:token-exchange (RFC 8693) for tp-exchange (client_secret_basic): the
// subject token must be an access token this provider issued (signature with its own key, iss, aud, exp) and of
// type access_token; a subject issued to tp-post is refused (unauthorized_client), any other failure is
// invalid_grant. The token is the usual JWT, for tp-exchange. /_test/stats counts the calls as tp-exchange's.
const subjectKey = await importJWK({ kty: signingKey.kty, n: signingKey.n, e: signingKey.e }, 'RS256');
provider.registerGrantType(TOKEN_EXCHANGE_GRANT, async (ctx) => {
  const { client, params } = ctx.oidc;
  if (params.subject_token_type !== 'urn:ietf:params:oauth:token-type:access_token') {
    throw new errors.InvalidRequest('subject_token_type must be urn:ietf:params:oauth:token-type:access_token');
  }
  let payload;
  try {
    ({ payload } = await jwtVerify(String(params.subject_token ?? ''), subjectKey, { issuer, audience: RESOURCE }));
  } catch (err) {
    throw new errors.InvalidGrant(`subject token refused: ${err.code ?? err.message}`);
  }
  if (payload.client_id === 'tp-post') throw new errors.UnauthorizedClient('subjects of tp-post may not be exchanged');
  const token = new provider.ClientCredentials({ client, scope: 'api.read' });
  token.resourceServer = new provider.ResourceServer(RESOURCE, {
    audience: RESOURCE, scope: RESOURCE_SCOPE, accessTokenFormat: 'jwt', accessTokenTTL: tokenTtl, jwt: { sign: { alg: 'RS256' } },
  });
  const value = await token.save();
  ctx.body = {
    access_token: value, issued_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    expires_in: token.expiration, token_type: 'Bearer', scope: token.scope,
  };
}, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'audience', 'resource', 'scope']);

providerCallback = provider.callback();
writeStdout(`READY ${issuer}\n`);
