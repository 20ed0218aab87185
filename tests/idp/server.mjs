// A real OpenID provider (npm `oidc-provider`) for tokenproxy's integration tests.
//
// It listens on 127.0.0.1 (port from IDP_PORT, default 0 = any free port), and only once it knows its
// port does it build the Provider, so the issuer is exactly `http://127.0.0.1:PORT`. Client credentials
// tokens are RS256 JWTs (`typ: at+jwt`) for the resource `urn:tokenproxy:test-api`, living IDP_TOKEN_TTL
// seconds (default 5).
//
// Clients: tp-basic / tp-basic-secret (client_secret_basic), tp-post / tp-post-secret (client_secret_post).
// Each must use its registered method (oidc-provider alone would accept either): a client that sends its
// secret the other way gets 401 invalid_client. IDP_LENIENT_CLIENT_AUTH=1 turns that check off.
//
// Control API (outside the provider's own paths):
//   GET  /_test/stats                      counts of /token calls per client_id and outcome
//   POST /_test/fail?count=N&status=503    the next N /token calls answer that status
//        [&error=temporarily_unavailable] [&retry_after=SECONDS] [&delay_ms=MS]
//   POST /_test/delay?count=N&ms=M         the next N /token calls are held M ms, then served normally
//   POST /_test/reset                      zero the counters, drop pending failures and delays
//
// stdout carries exactly one line, `READY http://127.0.0.1:PORT`; everything else goes to stderr.
// The process exits on SIGTERM, SIGINT, and when its stdin closes (set IDP_IGNORE_STDIN=1 to keep it
// running with a closed stdin), so a test that dies does not leave it behind.

import { createServer } from 'node:http';
import { randomBytes, randomUUID } from 'node:crypto';
import process from 'node:process';

// oidc-provider prints its notices with console.info (stdout). stdout is reserved for the READY line,
// so route every console method to stderr before the library is loaded.
const writeStdout = process.stdout.write.bind(process.stdout);
for (const method of ['log', 'info', 'debug']) {
  console[method] = (...args) => console.error(...args);
}

const { default: Provider } = await import('oidc-provider');
const { exportJWK, generateKeyPair } = await import('jose');

const RESOURCE = 'urn:tokenproxy:test-api';
const RESOURCE_SCOPE = 'api.read api.write';

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
};

function record(clientId, status, injected, authMethod) {
  const entry = control.clients[clientId] ??= {
    calls: 0, ok: 0, error: 0, injected: 0, statuses: {}, auth_methods: {},
  };
  entry.auth_methods[authMethod] = (entry.auth_methods[authMethod] ?? 0) + 1;
  entry.calls += 1;
  if (injected) entry.injected += 1;
  else if (status >= 200 && status < 300) entry.ok += 1;
  else entry.error += 1;
  entry.statuses[status] = (entry.statuses[status] ?? 0) + 1;
  control.total += 1;
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
    case 'GET /_test/stats':
      return sendJson(res, 200, {
        total: control.total,
        clients: control.clients,
        pending_failures: control.failures.length,
        pending_delays: control.delays.length,
        token_ttl: tokenTtl,
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
    case 'POST /_test/reset':
      control.clients = {};
      control.total = 0;
      control.failures = [];
      control.delays = [];
      return sendJson(res, 200, { reset: true });
    default:
      return sendJson(res, 404, { error: `no control endpoint ${route}` });
  }
}

// ---- server ----------------------------------------------------------------------------------------

let providerCallback = null;

const server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  if (url.pathname.startsWith('/_test/')) {
    handleControl(req, res, url);
    return;
  }
  if (!providerCallback) {
    sendJson(res, 503, { error: 'temporarily_unavailable', error_description: 'provider starting' });
    return;
  }
  providerCallback(req, res);
});

// Keep idle keep-alive connections longer than any client's pool would (Node's default is 5 s), so a
// test never trips over the server closing a pooled connection just as a request goes out on it.
server.keepAliveTimeout = 75_000;
server.headersTimeout = 80_000;

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const { privateKey } = await generateKeyPair('RS256', { extractable: true, modulusLength: 2048 });
const signingKey = { ...(await exportJWK(privateKey)), kid: randomUUID(), alg: 'RS256', use: 'sig' };

const clientBase = {
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
};

const provider = new Provider(issuer, {
  clients: [
    {
      ...clientBase,
      client_id: 'tp-basic',
      client_secret: 'tp-basic-secret',
      token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      ...clientBase,
      client_id: 'tp-post',
      client_secret: 'tp-post-secret',
      token_endpoint_auth_method: 'client_secret_post',
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async () => ({
        audience: RESOURCE,
        scope: RESOURCE_SCOPE,
        accessTokenFormat: 'jwt',
        accessTokenTTL: tokenTtl,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  ttl: {
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? tokenTtl,
    AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? tokenTtl,
  },
});

// How a /token request presented its client credentials.
function presentedAuthMethod(ctx) {
  const header = ctx.get('authorization');
  const bodySecret = ctx.oidc?.body?.client_secret;
  if (header && bodySecret) return 'both';
  if (header) return /^basic /i.test(header) ? 'client_secret_basic' : 'other_header';
  if (bodySecret) return 'client_secret_post';
  if (ctx.oidc?.body?.client_assertion) return 'client_assertion';
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
  if (ctx.path !== '/token') {
    await next();
    return;
  }
  const delayMs = control.delays.shift();
  if (delayMs) await sleep(delayMs);
  const failure = control.failures.shift();
  if (failure?.delayMs) await sleep(failure.delayMs);

  try {
    await next();
  } catch (err) {
    record(claimedClientId(ctx), 500, false, presentedAuthMethod(ctx));
    throw err;
  }

  const clientId = claimedClientId(ctx);
  const method = presentedAuthMethod(ctx);
  const registered = ctx.oidc?.client?.clientAuthMethod;
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
  // One line per token call on stderr (never a secret or a token), shown when a test fails.
  const error = ctx.status >= 400 ? ` error=${ctx.body?.error ?? '?'}` : '';
  console.error(`idp: /token client=${clientId} auth=${method} status=${ctx.status}${error}${failure ? ' (injected)' : ''}`);
});

provider.on('server_error', (_ctx, err) => console.error('idp: server_error', err));

providerCallback = provider.callback();
writeStdout(`READY ${issuer}\n`);
