// Unary gRPC load generator for benchmarks/mesh_overhead.py, started by mesh_load.load_process.
// Node's built-in http2 only (no npm packages): the Python grpc.aio generator it replaces used a
// large share of the machine's two cores itself, which skewed the figures it measured.
//
//   node benchmarks/grpc_load.mjs TARGET METHOD SECONDS IN_FLIGHT CERT RATE BODIES_FILE
//
// TARGET is host:port; CERT is a CA PEM path ('' = plaintext h2c), checked against the name
// "localhost" (the edge's certificate); BODIES_FILE holds gRPC-framed messages back to back (flag
// byte, 4-byte big-endian length, message), sent in turn, cycled. IN_FLIGHT calls in a closed loop
// over 4 HTTP/2 connections; with RATE > 0, no faster than RATE calls/s in all. SIGTERM ends it
// early. Prints one JSON line: {"rps": ok calls/s, "p50": median ok latency ms, "errors": n}.

import fs from "node:fs";
import http2 from "node:http2";
import { performance } from "node:perf_hooks";

const CONNECTIONS = 4; // mesh_load.CONNECTIONS
const CALL_TIMEOUT_MS = 10_000;

const [target, method, secondsArg, inFlightArg, cert, rateArg, bodiesFile] = process.argv.slice(2);
if (!bodiesFile) {
  console.error("usage: grpc_load.mjs TARGET METHOD SECONDS IN_FLIGHT CERT RATE BODIES_FILE");
  process.exit(2);
}
const seconds = Number(secondsArg);
const inFlight = Number(inFlightArg);
const rate = Number(rateArg) || 0;

function splitFrames(buffer) {
  const frames = [];
  for (let at = 0; at + 5 <= buffer.length; ) {
    const end = at + 5 + buffer.readUInt32BE(at + 1);
    if (end > buffer.length) throw new Error(`${bodiesFile}: truncated frame at byte ${at}`);
    frames.push(buffer.subarray(at, end));
    at = end;
  }
  return frames;
}

const bodies = splitFrames(fs.readFileSync(bodiesFile));
if (bodies.length === 0) throw new Error(`${bodiesFile}: no frames`);
let nextBody = 0;

const authority = cert ? `https://${target}` : `http://${target}`;
const tlsOptions = cert ? { ca: fs.readFileSync(cert), servername: "localhost" } : {};
const sessions = new Array(CONNECTIONS).fill(null);

// A session the server closed (GOAWAY, reset) is replaced on next use, as a grpc channel reconnects.
function session(index) {
  let s = sessions[index];
  if (s === null || s.closed || s.destroyed) {
    s = http2.connect(authority, tlsOptions);
    s.on("error", () => {}); // its streams report the failure; an unheard "error" would throw
    sessions[index] = s;
  }
  return s;
}

const requestHeaders = {
  ":method": "POST",
  ":path": method,
  "content-type": "application/grpc",
  te: "trailers",
};

// One unary call; resolves to {ok, answered}: ok for HTTP 200 and grpc-status 0 (in trailers, or in
// the headers of a trailers-only response); answered when the server sent response headers at all.
function call(index) {
  const body = bodies[nextBody];
  nextBody = (nextBody + 1) % bodies.length;
  return new Promise((resolve) => {
    let status = 0;
    let grpcStatus;
    let answered = false;
    let stream;
    const finish = () => {
      clearTimeout(timer);
      resolve({ ok: status === 200 && grpcStatus === "0", answered });
    };
    const timer = setTimeout(() => {
      grpcStatus = "timeout";
      stream?.close(http2.constants.NGHTTP2_CANCEL);
    }, CALL_TIMEOUT_MS);
    try {
      stream = session(index).request(requestHeaders);
    } catch {
      // the session went away between the check and the request
      finish();
      return;
    }
    stream.on("response", (headers) => {
      answered = true;
      status = headers[":status"];
      grpcStatus ??= headers["grpc-status"];
    });
    stream.on("trailers", (trailers) => {
      if (grpcStatus !== "timeout") grpcStatus = trailers["grpc-status"];
    });
    stream.on("data", () => {}); // read the reply, or flow control would stall the connection
    stream.on("error", () => {
      grpcStatus = "stream error";
    });
    stream.on("close", () => {
      if (stream.rstCode && stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) grpcStatus = "reset";
      finish();
    });
    stream.end(body);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Registered before connecting, so that a SIGTERM at any point still ends with the figures line.
let stopped = false;
let stopAt = Infinity;
process.on("SIGTERM", () => {
  stopped = true;
  stopAt = 0;
});

// Connect first, one call per session (as the Python generator did): any answer, even a non-zero
// grpc-status, means the connection is up; none is a failure to reach TARGET.
const first = await Promise.all(sessions.map((_, i) => call(i)));
if (!first.every((r) => r.answered)) {
  console.error(`grpc_load: no answer from ${authority}${method}`);
  for (const s of sessions) s?.destroy();
  process.exit(1);
}

const latencies = [];
let errors = 0;
const started = performance.now();
const cpuAtStart = process.cpuUsage();
if (!stopped) stopAt = started + seconds * 1000;
// The next call is due 1/RATE after the last one was due, never before now: a generator that fell
// behind (a slow target, or paused with SIGSTOP) goes on at RATE instead of bursting to catch up.
let nextDue = started;

async function worker(index) {
  let now;
  while ((now = performance.now()) < stopAt) {
    if (rate > 0) {
      const due = Math.max(nextDue, now);
      nextDue = due + 1000 / rate;
      if (due > now) await sleep(due - now);
    }
    const began = performance.now();
    const { ok } = await call(index);
    if (ok) latencies.push(performance.now() - began);
    else errors += 1;
  }
}

await Promise.all(Array.from({ length: inFlight }, (_, i) => worker(i % CONNECTIONS)));
const elapsedMs = performance.now() - started;
const cpu = process.cpuUsage(cpuAtStart); // this process's CPU over the measured window only
for (const s of sessions) s?.destroy();

latencies.sort((a, b) => a - b);
const middle = latencies.length >> 1;
const p50 =
  latencies.length === 0
    ? null
    : latencies.length % 2
      ? latencies[middle]
      : (latencies[middle - 1] + latencies[middle]) / 2;
// a pipe write is synchronous on Linux, so the line is out before exit
const cpuS = (cpu.user + cpu.system) / 1e6;
console.log(JSON.stringify({ rps: latencies.length / (elapsedMs / 1000), p50, errors, ok: latencies.length, cpu_s: cpuS }));
process.exit(0);
