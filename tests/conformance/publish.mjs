// A publisher written from docs/protocol.md alone ("Publishing"), in another language than
// the gateway's, with no Redis library: it speaks RESP itself. tests/test_conformance.py runs
// it against real gateways.
//
//   node publish.mjs REDIS_PORT PREFIX APPEND_SCRIPT_PATH < requests
//
// Each request line is JSON: {"channel", "data", "key"?, "version"?, "pretty"?}. Each reply
// line is JSON: {"kind": "plain", "receivers"} or {"kind": "history", "reply": [...]} or
// {"error": "..."}.

import { readFileSync } from "node:fs";
import { createConnection } from "node:net";
import { randomBytes, randomUUID } from "node:crypto";
import { createInterface } from "node:readline";

const [port, prefix, scriptPath] = process.argv.slice(2);
const script = readFileSync(scriptPath, "utf8");

// RESP: commands as arrays of bulk strings; replies parsed as they come.
const socket = createConnection({ host: "127.0.0.1", port: Number(port) });
let buffer = Buffer.alloc(0);
const waiting = [];

function encode(args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const arg of args) {
    const bytes = Buffer.from(String(arg), "utf8");
    parts.push(Buffer.from(`$${bytes.length}\r\n`), bytes, Buffer.from("\r\n"));
  }
  return Buffer.concat(parts);
}

function parse(at) {
  // Returns [value, next offset] or null when the buffer holds less than one reply.
  const end = buffer.indexOf("\r\n", at);
  if (end < 0) return null;
  const type = String.fromCharCode(buffer[at]);
  const line = buffer.toString("utf8", at + 1, end);
  if (type === "+") return [line, end + 2];
  if (type === "-") return [new Error(line), end + 2];
  if (type === ":") return [Number(line), end + 2];
  if (type === "$") {
    const length = Number(line);
    if (length < 0) return [null, end + 2];
    if (buffer.length < end + 2 + length + 2) return null;
    return [buffer.toString("utf8", end + 2, end + 2 + length), end + 2 + length + 2];
  }
  if (type === "*") {
    const count = Number(line);
    if (count < 0) return [null, end + 2];
    const items = [];
    let next = end + 2;
    for (let i = 0; i < count; i++) {
      const item = parse(next);
      if (item === null) return null;
      items.push(item[0]);
      next = item[1];
    }
    return [items, next];
  }
  throw new Error(`unexpected RESP type ${type}`);
}

socket.on("data", (chunk) => {
  buffer = Buffer.concat([buffer, chunk]);
  for (;;) {
    const reply = parse(0);
    if (reply === null) return;
    buffer = buffer.subarray(reply[1]);
    waiting.shift()(reply[0]);
  }
});

function command(...args) {
  return new Promise((resolve) => {
    waiting.push(resolve);
    socket.write(encode(args));
  });
}

// Which channels keep history: the document the gateways write ("one place, in Redis").
function globToRegExp(pattern) {
  let source = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "*") source += ".*";
    else if (c === "?") source += ".";
    else if (c === "[") {
      const close = pattern.indexOf("]", i + 2);
      if (close < 0) source += "\\[";
      else {
        let set = pattern.slice(i + 1, close).replace(/\\/g, "\\\\");
        if (set[0] === "!") set = "^" + set.slice(1);
        source += `[${set}]`;
        i = close;
      }
    } else source += c.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  }
  return new RegExp(`^${source}$`, "s");
}

async function kinds() {
  const document = await command("GET", `${prefix}@@channels`);
  if (document === null) throw new Error("no gateway has written its channel kinds");
  const parsed = JSON.parse(document);
  if (parsed.v !== 1) throw new Error(`channel kinds version ${parsed.v}`);
  return { ...parsed.history, patterns: parsed.history.patterns.map(globToRegExp) };
}

// The keys' base: the channel's own hash tag, else the whole name in braces.
function base(name) {
  const open = name.indexOf("{");
  const close = open < 0 ? -1 : name.indexOf("}", open + 1);
  return close > open + 1 ? name : `{${name}}`;
}

async function publish(history, request) {
  const name = prefix + request.channel;
  // Keys in another order than the schema lists them, to show order does not matter.
  const envelope = {
    mid: randomUUID(),
    ts: Date.now(),
    data: request.data,
    channel: request.channel,
    v: 1,
  };
  const text = JSON.stringify(envelope, null, request.pretty ? 2 : undefined);
  if (!history.patterns.some((pattern) => pattern.test(request.channel))) {
    return { kind: "plain", receivers: await command("PUBLISH", name, text) };
  }
  const b = base(name);
  const reply = await command(
    "EVAL", script, 4,
    `${b}:history`, `${b}:meta`, `${b}:idempotency`, `${b}:idempotency:exp`,
    name, text,
    history.size, Math.round(history.ttl * 1000),
    Math.round(Math.max(history.retention, history.ttl) * 1000),
    randomBytes(8).toString("hex"), "PUBLISH",
    request.key ?? "", Math.round(history.idempotency_window * 1000),
    request.version ?? "",
  );
  if (reply instanceof Error) return { error: reply.message };
  return { kind: "history", reply };
}

const history = await kinds();
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  process.stdout.write(JSON.stringify(await publish(history, JSON.parse(line))) + "\n");
}
socket.end();
