// The gateway's demo client: the browser's own WebSocket, protocol v1 as in docs/protocol.md.
// Reconnects with capped exponential backoff and full jitter (reset only after a connection
// stayed up STABLE_MS), and resumes history channels from the last offset it received.
"use strict";

const BACKOFF_MIN_MS = 500, BACKOFF_MAX_MS = 10000, STABLE_MS = 10000, MAX_ROWS = 500;
const MAX_NOTICES = 5;
const url = new URL("ws", location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";

const channels = new Set(new URLSearchParams(location.search).get("channels")?.split(",").filter(Boolean) ?? []);
const positions = new Map(); // channel -> {offset, epoch} of the last message received
const pending = new Map(); // request id -> what it was, for its reply
const confirmed = new Set(); // channels the gateway has confirmed on this connection
const present = new Map(); // channel -> client id -> member, for channels with presence
let ws = null, nextId = 1, attempt = 0, openedAt = 0;

const $ = (id) => document.getElementById(id);

// The last few notices, newest first: one that arrives right after another does not hide it.
function notice(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("notices").prepend(item);
  while ($("notices").children.length > MAX_NOTICES) $("notices").lastElementChild.remove();
}

function setStatus(text, cls) {
  $("status").textContent = text;
  $("status").className = cls;
}

function send(request) {
  request.id = nextId++;
  pending.set(request.id, request);
  ws.send(JSON.stringify(request));
}

// Fossil deltas (docs/protocol.md, "Delta compression"): on a channel that allows them, every
// message after the subscribed reply's offset comes as text, the first as its full text, then
// deltas against the previous one; replayed and latest messages come as ordinary frames.
const bases = new Map(); // channel -> {offset, epoch, bytes} of the last text received
const DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
const VALUES = new Map([...DIGITS].map((c, i) => [c.charCodeAt(0), i]));

function fossilApply(source, delta) {
  let at = 0;
  const number = () => {
    let value = 0, start = at;
    while (at < delta.length && VALUES.has(delta[at])) value = value * 64 + VALUES.get(delta[at++]);
    if (at === start) throw new Error("a number expected");
    return value;
  };
  const size = number();
  if (delta[at++] !== 10) throw new Error("size must end with a newline");
  const out = new Uint8Array(size);
  let length = 0;
  while (at < delta.length) {
    const count = number();
    const command = String.fromCharCode(delta[at++]);
    if (command === "@") {
      const offset = number();
      if (delta[at++] !== 44 || offset + count > source.length || length + count > size) throw new Error("bad copy");
      out.set(source.subarray(offset, offset + count), length);
      length += count;
    } else if (command === ":") {
      if (at + count > delta.length || length + count > size) throw new Error("bad insert");
      out.set(delta.subarray(at, at + count), length);
      length += count;
      at += count;
    } else if (command === ";") {
      if (length !== size || count !== checksum(out)) throw new Error("checksum mismatch");
      return out;
    } else throw new Error("unknown command");
  }
  throw new Error("no checksum");
}

function checksum(bytes) {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 4) {
    const word = ((bytes[i] << 24) | ((bytes[i + 1] ?? 0) << 16) | ((bytes[i + 2] ?? 0) << 8) | (bytes[i + 3] ?? 0)) >>> 0;
    sum = (sum + word) >>> 0;
  }
  return sum;
}

// A delta subscription's frame as a plain one; false if its delta cannot be applied.
function undelta(frame) {
  let bytes = new TextEncoder().encode(frame.data);
  if (frame.delta) {
    const base = bases.get(frame.channel);
    if (!base || base.epoch !== frame.epoch || base.offset !== frame.offset - 1) return false;
    try {
      bytes = fossilApply(base.bytes, bytes);
    } catch {
      return false;
    }
    document.body.dataset.deltas = Number(document.body.dataset.deltas ?? 0) + 1; // applied
  }
  bases.set(frame.channel, { offset: frame.offset, epoch: frame.epoch, bytes });
  frame.data = JSON.parse(new TextDecoder().decode(bytes));
  frame.delta = undefined;
  return true;
}

function subscribe(channel) {
  const request = { op: "subscribe", channel, delta: "fossil" };
  const since = positions.get(channel);
  if (since) request.since = since;
  send(request);
}

function renderChannels() {
  const box = $("channels");
  box.replaceChildren();
  for (const channel of channels) {
    const tag = document.createElement("span");
    tag.textContent = channel;
    tag.dataset.state = confirmed.has(channel) ? "subscribed" : "subscribing";
    tag.style.opacity = confirmed.has(channel) ? "1" : "0.5";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.title = `unsubscribe ${channel}`;
    remove.textContent = "×";
    remove.onclick = () => {
      channels.delete(channel);
      positions.delete(channel);
      present.delete(channel);
      renderPresence();
      if (ws?.readyState === WebSocket.OPEN) send({ op: "unsubscribe", channel });
      renderChannels();
    };
    tag.append(remove);
    box.append(tag);
  }
}

// Who is here, for the channels with presence (demo.* under ./dev run and compose): read once
// after subscribing, then kept up to date by the join and leave frames.
function who(member) {
  return member.user ?? `anonymous ${member.client.slice(0, 6)}`;
}

function renderPresence() {
  const box = $("presence");
  box.replaceChildren();
  for (const [channel, members] of present) {
    const line = document.createElement("li");
    line.dataset.channel = channel;
    line.dataset.count = members.size;
    line.textContent = `${channel}: ${members.size} here (${[...members.values()].map(who).join(", ")})`;
    box.append(line);
  }
}

function onPresence(frame) {
  if (!channels.has(frame.channel)) return;
  if (frame.op === "presence") {
    const members = present.get(frame.channel) ?? new Map();
    for (const member of frame.members) members.set(member.client, member);
    present.set(frame.channel, members);
    if (frame.cursor !== "0") send({ op: "presence", channel: frame.channel, cursor: frame.cursor });
  } else {
    const members = present.get(frame.channel);
    if (!members) return; // its presence has not been read yet: the read will include them
    for (const member of frame.members) {
      if (frame.op === "join") members.set(member.client, member);
      else members.delete(member.client);
    }
    if (frame.members.length === 1) notice(`${who(frame.members[0])} ${frame.op === "join" ? "joined" : "left"} ${frame.channel}`);
    else notice(`${frame.members.length} ${frame.op === "join" ? "joined" : "left"} ${frame.channel}`);
  }
  renderPresence();
}

function showMessage(frame) {
  const row = document.createElement("tr");
  row.dataset.channel = frame.channel;
  if (frame.offset !== undefined) row.dataset.offset = frame.offset;
  const cells = [
    new Date().toLocaleTimeString(),
    frame.channel,
    frame.offset ?? "",
    `${Math.max(0, Date.now() - frame.ts)} ms`,
    JSON.stringify(frame.data),
  ];
  cells.forEach((text, i) => {
    const cell = document.createElement("td");
    cell.textContent = text;
    if (i === 4) cell.className = "data";
    row.append(cell);
  });
  const body = $("messages");
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
}

function onMessage(frame) {
  if (frame.delta !== undefined && !undelta(frame)) {
    notice(`cannot apply a delta on ${frame.channel}: reconnecting to resume`);
    ws.close();
    return;
  }
  if (frame.offset !== undefined) {
    let last = positions.get(frame.channel);
    // Subscribed before the channel had history (epoch "0"): this is its start.
    if (last && last.epoch === "0" && last.offset === 0) last = { offset: 0, epoch: frame.epoch };
    if (last && last.epoch === frame.epoch && frame.offset <= last.offset) return; // seen
    if (last && (last.epoch !== frame.epoch || frame.offset > last.offset + 1)) {
      notice(`missed messages on ${frame.channel}: reload its state`);
    }
    positions.set(frame.channel, { offset: frame.offset, epoch: frame.epoch });
  }
  showMessage(frame);
}

function onReply(frame) {
  const request = pending.get(frame.id);
  pending.delete(frame.id);
  if (frame.op === "subscribed") {
    if (frame.recovered === true) notice(`resumed ${frame.channel}: nothing lost`);
    // recovered: false says the gap cannot be filled, not that anything was published in it.
    if (frame.recovered === false) {
      notice(`could not resume ${frame.channel}: anything published while disconnected is not in its history any more (reload its state)`);
    }
    if (frame.latest) {
      // A state channel: its newest message, at offset, follows.
      positions.set(frame.channel, { offset: frame.offset - 1, epoch: frame.epoch });
    } else if (frame.epoch !== undefined && frame.recovered !== true) {
      positions.set(frame.channel, { offset: frame.offset, epoch: frame.epoch });
    }
    confirmed.add(frame.channel);
    renderChannels();
    if (frame.channel.startsWith("demo.")) {
      present.delete(frame.channel);
      send({ op: "presence", channel: frame.channel });
    }
  } else if (frame.op === "presence") {
    onPresence(frame);
  } else if (frame.op === "published") {
    notice("published");
  } else if (frame.op === "error") {
    if (request?.op === "presence") return; // a demo.* channel without presence: nothing to show
    notice(`${request ? request.op + " " + (request.channel ?? "") : "request"} refused: ${frame.code}: ${frame.message}`);
    if (request?.op === "subscribe") {
      channels.delete(request.channel);
      renderChannels();
    }
  }
}

function connect() {
  setStatus("connecting", "closed");
  ws = new WebSocket(url);
  ws.onopen = () => {
    openedAt = Date.now();
    setStatus("connected", "open");
    for (const channel of channels) subscribe(channel);
  };
  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    if (frame.op === "message") onMessage(frame);
    else if (frame.op === "join" || frame.op === "leave") onPresence(frame);
    else onReply(frame);
  };
  ws.onclose = (event) => {
    pending.clear();
    confirmed.clear();
    present.clear();
    renderPresence();
    renderChannels();
    if (openedAt && Date.now() - openedAt >= STABLE_MS) attempt = 0;
    openedAt = 0;
    const delay = Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt++);
    setStatus(`disconnected (${event.code}), retrying in ${(delay / 1000).toFixed(1)} s`, "closed");
    setTimeout(connect, delay);
  };
}

$("subscribe-form").onsubmit = (event) => {
  event.preventDefault();
  const channel = $("channel").value.trim();
  if (!channels.has(channel)) {
    channels.add(channel);
    renderChannels();
    if (ws?.readyState === WebSocket.OPEN) subscribe(channel);
  }
  $("channel").value = "";
  if (!$("pub-channel").value) $("pub-channel").value = channel;
};

$("publish-form").onsubmit = (event) => {
  event.preventDefault();
  let data;
  try {
    data = JSON.parse($("pub-data").value);
  } catch (error) {
    notice(`not JSON: ${error.message}`);
    return;
  }
  if (ws?.readyState !== WebSocket.OPEN) {
    notice("not connected");
    return;
  }
  send({ op: "publish", channel: $("pub-channel").value.trim(), data });
};

renderChannels();
connect();
