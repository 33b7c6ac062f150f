// wsfiles web client: speaks docs/protocol.md over the same two WebSockets as
// every other client. Plain JavaScript, no build step, nothing fetched from
// elsewhere.
"use strict";

const CHUNK = 256 * 1024;            // one File.slice() per binary message
const HIGH_WATER = 4 * 1024 * 1024;  // pause while the socket buffers more than this
const RETRIES = 5;                   // a dropped upload resumes this many times

const MESSAGES = {
  bad_request: "The server did not understand the request.",
  unknown_op: "The server does not know this command.",
  invalid_name: "That name is not allowed (no slashes, control characters, '.', '..' or names over 255 bytes).",
  not_found: "There is no such file.",
  too_large: "The file is larger than the server accepts.",
  size_mismatch: "The file changed size while it was being sent.",
  wrong_channel: "Data was sent on the wrong connection.",
  unexpected_data: "The server received data it did not expect.",
  channel_timeout: "The file connection could not be opened in time.",
  channel_closed: "The file connection closed during the transfer.",
  storage_error: "The server could not store or read the file (disk full or permissions).",
  internal_error: "The server hit an internal error; it has been logged.",
  checksum_mismatch: "The file arrived damaged (checksum mismatch); nothing was stored.",
  exists: "A file with that name already exists.",
  superseded: "Another upload of this file took over.",
  stalled: "The transfer stalled and was stopped.",
  rate_limited: "Too many requests; slow down a little.",
  quota_exceeded: "This upload would exceed your storage quota.",
};

const $ = (selector) => document.querySelector(selector);
const base = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;

function humanSize(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return (unit === 0 ? value : value.toFixed(1)) + " " + units[unit];
}

function humanTime(seconds) {
  if (!isFinite(seconds)) return "…";
  if (seconds < 60) return Math.ceil(seconds) + " s";
  return Math.floor(seconds / 60) + " min " + Math.ceil(seconds % 60) + " s";
}

function showError(text) {
  const box = document.createElement("div");
  box.className = "error";
  box.textContent = text;
  $("#messages").append(box);
  setTimeout(() => box.remove(), 15000);
}

function describe(error) {
  return (MESSAGES[error.code] || error.message || "Error") + " (" + error.code + ")";
}

class ProtocolError extends Error {
  constructor(reply) { super(reply.message); this.code = reply.code; }
}

// -- the connection ----------------------------------------------------------

class Connection {
  constructor(token) {
    this.token = token;
    this.nextId = 1;
    this.waiting = new Map();     // id -> {replies: [], wake: null}
    this.fileSocket = null;
    this.onDownloadData = null;
    this.hello = null;
  }

  open() {
    const query = this.token ? "?token=" + encodeURIComponent(this.token) : "";
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(base + "/command" + query, ["wsfiles.v1"]);
      this.ws = ws;
      ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.op === "hello") { this.hello = message; resolve(message); return; }
        this.dispatch(message);
      };
      ws.onclose = () => {
        if (!this.hello) reject(new Error("refused"));
        this.closed();
      };
    });
  }

  closed() {
    setStatus("disconnected", false);
    for (const entry of this.waiting.values()) {
      this.deliver(entry, { op: "error", code: "channel_closed", message: "connection closed" });
    }
    if (this.fileSocket) this.fileSocket.close();
  }

  dispatch(message) {
    if (message.op === "changed") { renderFiles(message.files); return; }
    const entry = this.waiting.get(message.id);
    if (entry) this.deliver(entry, message);
    else if (message.op === "error") showError(describe(message));
  }

  deliver(entry, message) {
    entry.replies.push(message);
    if (entry.wake) { const wake = entry.wake; entry.wake = null; wake(); }
  }

  send(message) {
    const id = this.nextId++;
    this.waiting.set(id, { replies: [], wake: null });
    this.ws.send(JSON.stringify({ ...message, id }));
    return id;
  }

  async reply(id) {
    const entry = this.waiting.get(id);
    while (entry.replies.length === 0) await new Promise((wake) => (entry.wake = wake));
    return entry.replies.shift();
  }

  done(id) { this.waiting.delete(id); }

  async request(message) {
    const id = this.send(message);
    try {
      const reply = await this.reply(id);
      if (reply.op === "error") throw new ProtocolError(reply);
      return reply;
    } finally { this.done(id); }
  }

  openFileChannel(url) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(base + url, ["wsfiles.v1"]);
      // "blob" keeps downloaded pieces out of the JS heap ("arraybuffer" measured
      // worse in Chromium 156); see download() for why they are pieces.
      ws.binaryType = "blob";
      ws.onopen = () => { this.fileSocket = ws; resolve(ws); };
      ws.onmessage = (event) => { if (this.onDownloadData) this.onDownloadData(event.data); };
      ws.onclose = () => {
        if (this.fileSocket === ws) this.fileSocket = null;
        reject(new Error("file channel closed"));
        const entry = this.currentTransfer && this.waiting.get(this.currentTransfer);
        if (entry) this.deliver(entry, { op: "error", code: "channel_closed", message: "closed" });
      };
    });
  }
}

// -- state and rendering -------------------------------------------------------

let connection = null;
let transfers = Promise.resolve();  // one transfer at a time, in order

function setStatus(text, ok) {
  const status = $("#status");
  status.textContent = text;
  status.className = "status " + (ok ? "ok" : "bad");
}

function renderFiles(files) {
  const body = $("#files tbody");
  body.replaceChildren();
  for (const file of files) {
    const row = document.createElement("tr");
    row.dataset.name = file.name;
    const name = document.createElement("td");
    name.textContent = file.name;
    const size = document.createElement("td");
    size.className = "num";
    size.textContent = humanSize(file.size);
    const mtime = document.createElement("td");
    mtime.textContent = new Date(file.mtime * 1000).toLocaleString();
    const actions = document.createElement("td");
    actions.className = "actions";
    for (const [label, action] of [["Download", download], ["Rename", rename], ["Delete", remove]]) {
      const button = document.createElement("button");
      button.textContent = label;
      button.dataset.action = label.toLowerCase();
      button.onclick = () => action(file.name);
      actions.append(button);
    }
    row.append(name, size, mtime, actions);
    body.append(row);
  }
  $("#empty").hidden = files.length > 0;
}

function transferItem(label, total) {
  const item = document.createElement("li");
  item.innerHTML = '<div class="line"><span class="label"></span><span class="stats"></span></div><progress max="1"></progress>';
  item.querySelector(".label").textContent = label;
  $("#transfers").append(item);
  const started = performance.now();
  return {
    element: item,
    resize(size) { total = size; },
    progress(done, offset = 0) {
      const seconds = (performance.now() - started) / 1000;
      const speed = (done - offset) / Math.max(seconds, 0.001);
      item.querySelector("progress").value = total ? done / total : 1;
      item.querySelector(".stats").textContent =
        humanSize(done) + " of " + humanSize(total) + " · " + humanSize(speed) + "/s · " +
        humanTime((total - done) / speed) + " left";
    },
    waiting(text) {
      item.querySelector("progress").removeAttribute("value");
      item.querySelector(".stats").textContent = text;
    },
    finish(text) {
      item.querySelector("progress").value = 1;
      item.querySelector(".stats").textContent = text;
      item.classList.add("done");
      setTimeout(() => item.remove(), 5000);
    },
  };
}

// -- commands ----------------------------------------------------------------------

function queue(work) {
  transfers = transfers.then(work).catch((error) => showError(error.code ? describe(error) : String(error)));
  return transfers;
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

async function drained(ws) {
  while (ws.readyState === WebSocket.OPEN && ws.bufferedAmount > HIGH_WATER) await sleep(10);
}

function upload(file) {
  if (file.size > connection.hello.max_size) {
    showError(file.name + ": " + MESSAGES.too_large + " (" + humanSize(file.size) +
              " > " + humanSize(connection.hello.max_size) + ")");
    return Promise.resolve();
  }
  return queue(async () => {
    const item = transferItem("↑ " + file.name, file.size);
    for (let attempt = 0; ; attempt++) {
      try {
        await uploadOnce(file, item);
        item.finish("uploaded");
        return;
      } catch (error) {
        const retry = ["channel_closed", "stalled", "superseded"].includes(error.code);
        if (!retry || attempt >= RETRIES) { item.finish("failed"); throw error; }
        item.waiting("connection lost; resuming…");
        await sleep(500 * (attempt + 1));
        if (connection.ws.readyState !== WebSocket.OPEN) await reconnect();
      }
    }
  });
}

async function uploadOnce(file, item) {
  const id = connection.send({ op: "save", name: file.name, size: file.size, resume: true, chunked: true });
  connection.currentTransfer = id;
  try {
    for (;;) {
      const reply = await connection.reply(id);
      if (reply.op === "channel") {
        await connection.openFileChannel(reply.url).catch(() => {});
      } else if (reply.op === "ready") {
        sendSlices(file, reply.offset || 0, item);  // acks come on the command channel
      } else if (reply.op === "ack") {
        return reply;
      } else if (reply.op === "error") {
        throw new ProtocolError(reply);
      }
    }
  } finally {
    connection.currentTransfer = null;
    connection.done(id);
  }
}

async function sendSlices(file, offset, item) {
  const ws = connection.fileSocket;
  if (!ws) return;
  if (offset >= file.size) { ws.send(new ArrayBuffer(0)); return; }
  let position = offset;
  while (position < file.size && ws.readyState === WebSocket.OPEN) {
    await drained(ws);
    const end = Math.min(position + CHUNK, file.size);
    ws.send(file.slice(position, end));
    position = end;
    item.progress(Math.max(offset, position - ws.bufferedAmount), offset);
  }
  while (ws.readyState === WebSocket.OPEN && ws.bufferedAmount > 0) {
    item.progress(file.size - ws.bufferedAmount, offset);
    await sleep(50);
  }
}

// Downloads come in pieces (protocol 1.1 "pieces"): a WebSocket message reaches
// the page only whole, so one message per file would cost the browser memory
// in proportion to the file (measured in Chromium 156 by bench/browser.py: about
// 3x a 1 GiB file at its peak). Each piece of PIECE bytes arrives as a Blob and
// goes to downloadTarget().
const PIECE = 8 * 1024 * 1024;

async function getPiece(name, offset, item) {
  let blob = null, sent = null, arrived;
  const got = new Promise((done) => (arrived = done));
  connection.onDownloadData = (data) => { blob = data; arrived(); };
  const id = connection.send({ op: "get", name, offset, length: PIECE });
  connection.currentTransfer = id;
  try {
    for (;;) {
      const reply = await connection.reply(id);
      if (reply.op === "channel") await connection.openFileChannel(reply.url).catch(() => {});
      else if (reply.op === "sending") item.resize(reply.size);
      else if (reply.op === "sent") { sent = reply; break; }
      else if (reply.op === "error") throw new ProtocolError(reply);
    }
    await got;
  } finally {
    connection.onDownloadData = null;
    connection.currentTransfer = null;
    connection.done(id);
  }
  if (blob.size !== sent.length) throw new ProtocolError({ code: "channel_closed", message: "short download" });
  return { blob, size: sent.size };
}

// Where the pieces go. In a secure context (https, or http to localhost) they
// are written to a file in the origin-private file system, on disk, and the
// download is made from that file, so neither the page nor the browser holds
// the file in memory. Elsewhere they stay Blobs, which the browser keeps in
// its own (browser-process) memory until the download is saved.
async function downloadTarget() {
  if (window.isSecureContext && navigator.storage && navigator.storage.getDirectory) {
    try {
      const folder = await navigator.storage.getDirectory();
      const fileName = "download-" + Date.now() + "-" + Math.random().toString(36).slice(2);
      const handle = await folder.getFileHandle(fileName, { create: true });
      const writable = await handle.createWritable();
      return {
        write: (blob) => writable.write(blob),
        async finish() { await writable.close(); return handle.getFile(); },
        async discard() {
          await writable.abort().catch(() => {});
          await folder.removeEntry(fileName).catch(() => {});
        },
        remove: () => folder.removeEntry(fileName).catch(() => {}),
      };
    } catch (error) { /* no usable private file system: keep Blobs */ }
  }
  const pieces = [];
  return {
    write: async (blob) => { pieces.push(blob); },
    finish: async () => new Blob(pieces),
    discard: async () => {},
    remove: () => {},
  };
}

function download(name) {
  return queue(async () => {
    const item = transferItem("↓ " + name, 0);
    const target = await downloadTarget();
    let received = 0, size = 0, file;
    try {
      do {
        const piece = await getPiece(name, received, item);
        await target.write(piece.blob);
        received += piece.blob.size;
        size = piece.size;
        item.progress(received);
        if (!piece.blob.size && received < size) {
          throw new ProtocolError({ code: "channel_closed", message: "the file shrank" });
        }
      } while (received < size);
      file = await target.finish();
    } catch (error) {
      await target.discard();
      item.finish("failed");
      throw error;
    }
    const link = document.createElement("a");
    link.href = URL.createObjectURL(file);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => { URL.revokeObjectURL(link.href); target.remove(); }, 60000);
    item.finish("downloaded");
  });
}

async function rename(name) {
  const to = prompt("New name for " + name, name);
  if (!to || to === name) return;
  try { await connection.request({ op: "rename", name, to }); }
  catch (error) { showError(describe(error)); }
}

async function remove(name) {
  if (!confirm("Delete " + name + "?")) return;
  try { await connection.request({ op: "delete", name }); }
  catch (error) { showError(describe(error)); }
}

// -- start-up, login, drag and drop --------------------------------------------------

async function reconnect() {
  const token = sessionStorage.getItem("wsfiles-token");
  connection = new Connection(token);
  const hello = await connection.open();
  setStatus("connected", true);
  $("#who").textContent = hello.client;
  $("#limit").textContent = "Up to " + humanSize(hello.max_size) + " per file.";
  renderFiles(hello.files);
  return hello;
}

async function start() {
  try {
    await reconnect();
    $("#login").hidden = true;
    $("#app").hidden = false;
  } catch (error) {
    const hadToken = sessionStorage.getItem("wsfiles-token") !== null;
    setStatus(hadToken ? "wrong token" : "login needed", false);
    if (hadToken) showError("The server refused this token.");
    $("#app").hidden = true;
    $("#login").hidden = false;
  }
}

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("wsfiles-token", $("#token").value.trim());
  start();
});

$("#picker").addEventListener("change", (event) => {
  for (const file of event.target.files) upload(file);
  event.target.value = "";
});

const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  for (const file of event.dataTransfer.files) upload(file);
});

start();
