// The polyglot example's web service: Node.js, the plain `http` module, no npm packages.
//
// For every request it calls service B by its mesh name (UPSTREAM_URL, e.g. http://b.service:8000/)
// and answers "Node web: B said: <B's body>" with B's status; 502 with the reason when B cannot be
// reached. Node resolves b.service with getaddrinfo, i.e. through /etc/hosts: inside a pod that is
// the pod's hosts file, so nothing here knows about meshctl.
//
// Environment: LISTEN (host:port; the topology writes 127.0.0.1:PORT, which meshctl turns into the
// pod's alias), UPSTREAM_URL. GET /healthz answers 200 without calling B (the readiness probe).
'use strict';

const http = require('http');

function fail(message) {
  console.error(`web: ${message}`);
  process.exit(2);
}

const listen = process.env.LISTEN || '';
const colon = listen.lastIndexOf(':');
const host = listen.slice(0, colon);
const port = Number(listen.slice(colon + 1));
if (colon < 1 || !Number.isInteger(port) || port < 1 || port > 65535) {
  fail(`LISTEN must be HOST:PORT, got ${JSON.stringify(listen)}`);
}
let upstream;
try {
  upstream = new URL(process.env.UPSTREAM_URL || '');
} catch {
  fail(`UPSTREAM_URL must be a URL, got ${JSON.stringify(process.env.UPSTREAM_URL || '')}`);
}

// Keep-alive to B. B may close an idle connection just as we reuse it: Node's documented answer
// is to retry once when a *reused* socket is reset (nothing reached B then).
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

// The trace context of the request being served goes on to B as it came (Istio asks this of
// applications), so the sidecar's spans and B's join into one trace in a traced mesh.
const PROPAGATED = ['x-request-id', 'traceparent', 'tracestate', 'x-b3-traceid', 'x-b3-spanid',
  'x-b3-parentspanid', 'x-b3-sampled', 'x-b3-flags', 'b3'];

function context(incoming) {
  const out = {};
  for (const name of PROPAGATED) {
    if (incoming[name] !== undefined) out[name] = incoming[name];
  }
  return out;
}

function callB(attempt, headers, done) {
  const req = http.get(upstream, { agent, timeout: 5000, headers }, (res) => {
    const chunks = [];
    res.on('data', (c) => chunks.push(c));
    res.on('end', () => done(null, res.statusCode, Buffer.concat(chunks).toString()));
    res.on('error', (err) => done(err));
  });
  req.on('timeout', () => req.destroy(new Error('timed out after 5 s')));
  req.on('error', (err) => {
    if (attempt === 0 && req.reusedSocket && err.code === 'ECONNRESET') {
      callB(1, headers, done);
    } else {
      done(err);
    }
  });
}

const server = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  callB(0, context(req.headers), (err, status, body) => {
    if (err) {
      // e.g. "getaddrinfo ENOTFOUND b.service" when /etc/hosts does not know B.
      console.log(`${req.method} ${req.url} -> 502 (${err.message})`);
      res.writeHead(502, { 'content-type': 'text/plain' });
      res.end(`Node web: cannot reach ${upstream.host}: ${err.message}\n`);
      return;
    }
    console.log(`${req.method} ${req.url} -> ${status}`);
    res.writeHead(status, { 'content-type': 'text/plain' });
    res.end(`Node web: B said: ${body.trimEnd()}\n`);
  });
});
// The sidecar pools connections to us and reuses them whenever it likes; if we closed an idle one
// (Node's default after 5 s) just as it sends a request, that request would fail (Envoy's 503 UC).
// So idle connections stay open: only the sidecar connects here.
server.keepAliveTimeout = 0;

server.on('error', (err) => fail(`listen ${host}:${port}: ${err.message}`));
server.listen(port, host, () => console.log(`web: listening on ${host}:${port}, upstream ${upstream.href}`));

// The supervisor stops a pod with SIGTERM: exit 0 at once (idle keep-alive connections would
// otherwise hold server.close() open until the grace period ends).
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => process.exit(0));
}
