#!/usr/bin/env node
// text_worker.js: a member of the hub's `text` worker pool, written in Node.js.
//
// It uses no agentd SDK. It speaks the bus protocol in docs/PROTOCOL.md
// directly, with two npm packages: `zeromq` (6.x, which ships libzmq) and
// `@msgpack/msgpack`. Read it next to that document if you are writing an
// agent in another language. The numbers in the comments (§2, §3.1, ...)
// are section numbers in PROTOCOL.md.
//
// What it does:
//   task.text.upper      data.payload {"text": s}  ->  {"text": s.toUpperCase()}
//   task.text.wordcount  data.payload {"text": s}  ->  {"words": n}
// Anything else, or a bad payload, gets an error reply. The orchestrator
// sends the tasks as requests to the pool name `text`, and the broker
// spreads them round robin over text@0 .. text@N-1.
//
// Run it under agentd (etc/examples/mixed.toml), after
//   npm ci --prefix agents/examples/node
// agentd sets AGENTD_NAME, AGENTD_INCARNATION, AGENTD_BUS, AGENTD_HEARTBEAT
// and AGENTD_ACK (§1). Logs go to stderr, which agentd captures into
// <log_dir>/<name>.log.

"use strict";

const crypto = require("crypto");
const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");

// --- Configuration: the environment agentd gives every agent (§1) ------------------

function required(variable) {
  const value = process.env[variable];
  if (!value) {
    console.error(`${variable} is not set: run me under agentd (see etc/examples/mixed.toml)`);
    process.exit(2);
  }
  return value;
}

const NAME = required("AGENTD_NAME"); // also our ZeroMQ routing id, e.g. "text@1"
const BUS = required("AGENTD_BUS"); // e.g. "ipc:///run/agentd/bus.sock"
const INCARNATION = Number(process.env.AGENTD_INCARNATION || 0); // restarts so far
const HEARTBEAT = Number(process.env.AGENTD_HEARTBEAT || 10); // seconds of silence = hung
const ACK = process.env.AGENTD_ACK === "1"; // ack = true: acknowledge every signal (§4.1)

function log(event, fields = {}) {
  const extra = Object.entries(fields).map(([k, v]) => ` ${k}=${JSON.stringify(v)}`);
  console.error(`${new Date().toISOString()} ${NAME} ${event}${extra.join("")}`);
}

// --- The work: the same as work() in agents/examples/jobs.py ----------------------

const MAX_TEXT = 100000;

class JobError extends Error {} // a bad task: becomes an error reply, not a crash

function textOf(payload) {
  const text = payload && payload.text;
  if (typeof text !== "string") throw new JobError("payload.text must be a string");
  if (text.length > MAX_TEXT) {
    throw new JobError(`payload.text is longer than ${MAX_TEXT} characters`);
  }
  return text;
}

function work(type, task) {
  // A task's data: {"job": id, "key": k, "pool": "text", "type": type, "payload": {...}}.
  const payload = task && typeof task === "object" ? task.payload : undefined;
  if (!payload || typeof payload !== "object" || Array.isArray(payload)) {
    throw new JobError("payload must be an object");
  }
  switch (type) {
    case "task.text.upper":
      return { text: textOf(payload).toUpperCase() };
    case "task.text.wordcount": {
      // Like Python's str.split(): runs of whitespace separate words.
      const words = textOf(payload).split(/\s+/).filter((w) => w.length > 0);
      return { words: words.length };
    }
    default:
      throw new JobError(`unknown task type ${JSON.stringify(type)}`);
  }
}

// --- The bus connection (§1) ---------------------------------------------------------

// One DEALER socket. Its routing id is our name: the broker knows us by it,
// and a restarted incarnation reclaims it. linger: at close, give the last
// frames (the final reply, ack and bye) a second to leave.
const sock = new zmq.Dealer({ routingId: NAME, linger: 1000 });

// zeromq.js allows one send() in flight per socket, so every frame goes
// through this queue. Each frame is one ZeroMQ message holding one
// MessagePack map (§1). lastSent: any frame counts as a heartbeat (§2.4).
let sending = Promise.resolve();
let lastSent = 0;
function send(frame) {
  const bytes = encode(frame);
  lastSent = Date.now();
  sending = sending
    .then(() => sock.send(bytes))
    .catch((err) => log("send_failed", { kind: frame.kind, error: String(err) }));
  return sending;
}

// Signal ids are unique and time-ordered (§3.1): 16 hex digits of nanoseconds
// since the epoch, 6 of the pid, 6 of a counter, like the Python SDK's.
let counter = 0;
function newId() {
  counter = (counter + 1) & 0xffffff;
  return (
    (BigInt(Date.now()) * 1000000n).toString(16).padStart(16, "0") +
    (process.pid & 0xffffff).toString(16).padStart(6, "0") +
    counter.toString(16).padStart(6, "0")
  );
}

// --- Tracing (§3.3) ----------------------------------------------------------------------

// Every signal we send while handling one carries the handled signal's trace:
// `traceparent` = the same trace id with a new span id of our own, and
// `causation_id` = the handled signal's id. A missing or invalid traceparent
// (W3C rules: lowercase hex, version ff and all-zero ids invalid, version 00
// exactly 55 characters) starts a new trace instead: never an error.
const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;
const ZEROS = /^0+$/;

function randomHex(bytes) {
  for (;;) {
    const hex = crypto.randomBytes(bytes).toString("hex");
    if (!ZEROS.test(hex)) return hex;
  }
}

function childTraceparent(parent) {
  const m = typeof parent === "string" ? TRACEPARENT.exec(parent) : null;
  const valid =
    m !== null &&
    m[1] !== "ff" &&
    !ZEROS.test(m[2]) &&
    !ZEROS.test(m[3]) &&
    (m[1] !== "00" || m[5] === undefined);
  const traceId = valid ? m[2] : randomHex(16);
  const sampled = valid ? parseInt(m[4], 16) & 1 : 1; // of the flags, only "sampled" is ours
  return `00-${traceId}-${randomHex(8)}-0${sampled}`;
}

const hello = {
  kind: "hello",
  name: NAME, // must equal our routing id
  incarnation: INCARNATION,
  pid: process.pid,
  subscribe: [], // publish patterns we want: none, a worker only gets requests
};

let ready = false;
function announce() {
  // HELLO, then READY once set up (§2). This worker has no setup to do.
  send(hello);
  send({ kind: "ready" });
  ready = true;
}

// --- Heartbeats (§2.4) ------------------------------------------------------------------

// Silence for HEARTBEAT seconds makes us hung, so something goes out at least
// every HEARTBEAT/3: when idle, from a timer; when busy, from the receive loop
// between two handlers. A timer alone is not enough: while we work through a
// backlog (the broker hands us up to max_in_flight signals at once, §4.1) the
// event loop may never get to it.
const BEAT_MS = (HEARTBEAT / 3) * 1000;
function beatIfDue() {
  if (Date.now() - lastSent >= BEAT_MS) send({ kind: "heartbeat" });
}

// --- Handling one signal ---------------------------------------------------------------

async function handle(sig) {
  if (sig.reply) return; // a reply to a request of ours: we make none
  let data = null;
  let error = null;
  try {
    data = work(sig.type, sig.data);
  } catch (err) {
    // Same form as the Python SDK's error replies: "JobError: message".
    error = err instanceof JobError ? `JobError: ${err.message}` : `Error: ${err}`;
    log("task_failed", { type: sig.type, id: sig.id, error });
  }
  if (sig.redelivered) {
    log("redelivered", { type: sig.type, id: sig.id, deliveries: sig.deliveries });
  }
  // ack = true: settle it with the broker only now that the handler is done,
  // never before (§4.1). Until then the broker keeps it (in its journal), and
  // would deliver it again, to another pool member or to us, if we or the
  // broker died. A request is settled by its reply; the ack may go ahead of
  // it (the broker takes our frames in order). A signal that is not a request
  // has no reply to carry the error: a failed one is nacked instead, and the
  // broker retries it after retry_backoff, then dead-letters it (§4.2).
  if (ACK) {
    if (error !== null && !sig.correlation_id) send({ kind: "nack", ids: [sig.id], error });
    else send({ kind: "ack", ids: [sig.id] });
  }
  if (sig.correlation_id) {
    // A request: answer it (§4, request/reply). The reply goes to reply_to
    // (or the sender), carries the request's correlation_id and reply: true,
    // and holds either data or an error (then data is nil).
    await send({
      kind: "signal",
      id: newId(),
      type: `${sig.type}.reply`,
      source: NAME, // must equal our routing id, or the broker refuses it
      time: Date.now() / 1000,
      to: sig.reply_to || sig.source,
      correlation_id: sig.correlation_id,
      reply: true,
      data: error === null ? data : null,
      error,
      traceparent: childTraceparent(sig.traceparent), // the request's trace (§3.3)
      causation_id: sig.id, // sent while handling the request
    });
  } else {
    log("not_a_request", { type: sig.type, id: sig.id });
  }
}

// One signal, then a heartbeat if one is due and a turn of the event loop,
// so that the queued frames (acks, replies, heartbeats) leave and the timers
// run even when the signals keep coming.
async function handled(sig) {
  await handle(sig);
  beatIfDue();
  await new Promise((resolve) => setImmediate(resolve));
}

async function onFrame(frame) {
  switch (frame.kind) {
    case "signal":
      return handled(frame);
    case "batch": // several signals in one frame, in order
      for (const sig of frame.signals) await handled(sig);
      return;
    case "reconnect":
      // The broker restarted and does not know us (§2.6). After our HELLO it
      // delivers again, from its journal, what we had not acked (§4.1).
      log("reconnect");
      send(hello);
      if (ready) send({ kind: "ready" });
      return;
    case "error": // something we sent was refused
      log("bus_error", { reason: frame.reason, id: frame.id, to: frame.to });
      return;
    default: // receipts, stats: we ask for neither; unknown kinds are ignored
      return;
  }
}

// --- Life: connect, announce, beat, receive; stop on SIGTERM (§2) ---------------------

let stopping = false;
let inFlight = Promise.resolve(); // the frame being handled, if any

// When idle: check twice per HEARTBEAT/3 whether a heartbeat is due (§2.4).
const beat = setInterval(beatIfDue, BEAT_MS / 2);

async function stop(signal) {
  if (stopping) return;
  stopping = true;
  log("stopping", { signal });
  clearInterval(beat);
  await inFlight; // finish the signal in hand: its reply and ack (or nack) go out
  await send({ kind: "bye" }); // a clean goodbye
  sock.close(); // the pending receive() rejects; main() returns; exit code 0
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));

async function main() {
  sock.connect(BUS);
  announce();
  log("ready", { incarnation: INCARNATION, bus: BUS, heartbeat: HEARTBEAT, ack: ACK });
  for (;;) {
    let parts;
    try {
      parts = await sock.receive();
    } catch (err) {
      if (stopping) break; // closed by stop()
      throw err;
    }
    if (stopping) break; // not handled and not acked: the broker keeps it
    if (parts.length !== 1) {
      log("malformed", { frames: parts.length });
      continue;
    }
    let frame;
    try {
      frame = decode(parts[0]);
    } catch (err) {
      log("malformed", { error: String(err) });
      continue;
    }
    if (!frame || typeof frame !== "object") continue;
    inFlight = onFrame(frame);
    await inFlight;
  }
  log("stopped");
}

main().catch((err) => {
  log("crashed", { error: String((err && err.stack) || err) });
  process.exit(1);
});
