// wsfiles web client: speaks docs/protocol.md over the same two WebSockets as
// every other client. Plain JavaScript, no build step, nothing fetched from
// elsewhere.
"use strict";

const CHUNK = 256 * 1024;            // one File.slice() per binary message
const HIGH_WATER = 4 * 1024 * 1024;  // pause while the socket buffers more than this
const RETRIES = 5;                   // failures in a row on one live connection before an upload gives up
const BACKOFF_FIRST = 500;           // ms before the second attempt to reconnect...
const BACKOFF_CAP = 4000;            // ...doubling up to this: a few seconds at most
const STEADY = 10000;                // ms a connection must last for the backoff to start over
const TOKEN_KEY = "wsfiles-token";

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
  superseded: "Another upload of this file (from another tab or program) took over.",
  stalled: "The transfer stalled and was stopped.",
  unavailable: "The server is stopping; it will be retried once it is back.",
  rate_limited: "Too many requests; slow down a little.",
  quota_exceeded: "This upload would exceed your storage quota.",
  disconnected: "The connection to the server was lost.",
  login_needed: "You are not logged in.",
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

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

function makeButton(text, onClick, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  if (label) button.setAttribute("aria-label", label);
  button.addEventListener("click", onClick);
  return button;
}

class ProtocolError extends Error {
  constructor(reply) { super(reply.message || reply.code); this.code = reply.code; }
}

function describe(error) {
  if (error && error.code) return (MESSAGES[error.code] || error.message || "Error") + " (" + error.code + ")";
  return String((error && error.message) || error);
}

// -- messages ------------------------------------------------------------------
// One banner per subject (a file and what was done to it, the login, ...): a
// new message about the same subject replaces the old one, and a banner goes
// away when its problem is gone (or is dismissed), never by a timer.

const banners = new Map();

function showError(key, text) {
  let box = banners.get(key);
  if (!box) {
    box = document.createElement("div");
    box.className = "banner";
    box.dataset.key = key;
    const span = document.createElement("span");
    span.className = "text";
    box.append(span, makeButton("Dismiss", () => clearError(key), "Dismiss this message"));
    banners.set(key, box);
  }
  box.querySelector(".text").textContent = text;
  $("#messages").append(box);  // (re)placed last: the newest message is at the bottom
}

function clearError(key) {
  const box = banners.get(key);
  if (box) { box.remove(); banners.delete(key); }
}

// The connection's state, said plainly while the page waits to reconnect.
function showNotice(text, tryNow) {
  const notice = $("#connection");
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  notice.replaceChildren(span);
  if (tryNow) notice.append(makeButton("Try now", () => wakeLink()));
}

function clearNotice() { $("#connection").replaceChildren(); }

function setStatus(text, kind) {
  const status = $("#status");
  status.textContent = text;
  status.className = "status " + kind;
}

// -- the connection ----------------------------------------------------------

class Connection {
  constructor(token, onLost) {
    this.token = token;
    this.onLost = onLost;
    this.nextId = 1;
    this.waiting = new Map();     // id -> {replies: [], wake: null}
    this.fileSocket = null;
    this.onDownloadData = null;
    this.onFileClosed = null;
    this.currentTransfer = null;
    this.hello = null;
    this.ended = false;           // the command channel has closed
    this.closing = false;         // we closed it on purpose
  }

  open() {
    const query = this.token ? "?token=" + encodeURIComponent(this.token) : "";
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(base + "/command" + query, ["wsfiles.v1"]);
      this.ws = ws;
      let refusal = null;         // an error the server sent instead of hello
      ws.onopen = () => { if (this.closing) ws.close(1000); };
      ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.op === "hello") {
          this.hello = message;
          this.openedAt = Date.now();
          resolve(message);
        } else if (!this.hello && message.op === "error") {
          refusal = message;
        } else {
          this.dispatch(message);
        }
      };
      ws.onclose = (event) => {
        this.ended = true;
        if (!this.hello) {
          const error = new Error(refusal ? describe(refusal) : "the connection was refused or dropped");
          error.closeCode = event.code;
          error.refusal = refusal;
          reject(error);
        }
        this.closed(event.code);
      };
    });
  }

  get live() { return !this.ended && this.ws && this.ws.readyState === WebSocket.OPEN; }

  close() {
    this.closing = true;
    // Closing a socket still connecting makes Chromium log a warning: onopen closes it.
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.close(1000);
  }

  closed(code) {
    for (const entry of this.waiting.values()) {
      this.deliver(entry, { op: "error", code: "disconnected", message: "connection closed" });
    }
    if (this.fileSocket && this.fileSocket.readyState === WebSocket.OPEN) this.fileSocket.close();
    if (this.hello && !this.closing) this.onLost(this, code);
  }

  dispatch(message) {
    if (message.op === "changed") { renderFiles(message.files); return; }
    const entry = this.waiting.get(message.id);
    if (entry) this.deliver(entry, message);
    // An error about a command the page has given up on (its id is ours but
    // no longer awaited) says nothing new; one about no command is shown.
    else if (message.op === "error" && message.id === undefined) showError("server", describe(message));
  }

  deliver(entry, message) {
    entry.replies.push(message);
    if (entry.wake) { const wake = entry.wake; entry.wake = null; wake(); }
  }

  // Never writes to a socket that is not open: the caller gets "disconnected".
  send(message) {
    if (!this.live) throw new ProtocolError({ code: "disconnected", message: "not connected" });
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
      if (!this.live) { reject(new ProtocolError({ code: "disconnected" })); return; }
      const ws = new WebSocket(base + url, ["wsfiles.v1"]);
      // "blob" keeps downloaded pieces out of the JS heap ("arraybuffer" measured
      // worse in Chromium 156); see download() for why they are pieces.
      ws.binaryType = "blob";
      ws.onopen = () => { this.fileSocket = ws; resolve(ws); };
      ws.onmessage = (event) => { if (this.onDownloadData) this.onDownloadData(event.data); };
      ws.onclose = () => {
        if (this.fileSocket === ws) this.fileSocket = null;
        reject(new ProtocolError({ code: "channel_closed", message: "the file connection closed" }));
        const entry = this.currentTransfer && this.waiting.get(this.currentTransfer);
        if (entry) this.deliver(entry, { op: "error", code: "channel_closed", message: "closed" });
        if (this.onFileClosed) this.onFileClosed();
      };
    });
  }
}

// -- staying connected ------------------------------------------------------------
// The page keeps a connection for as long as the tab is open: when it drops it
// asks GET /whoami (the one answer a browser can read: a refused WebSocket
// handshake is only "1006") and reconnects with backoff, unless the server
// refused the token (401, close code 4401): then it asks for a token and stops.

const link = {
  state: "starting",      // starting | checking | waiting | connected | login
  connection: null,
  hello: null,            // the last hello: its max_size still applies while reconnecting
  attempt: 0,
  running: false,
  wake: null,
  waiters: [],            // transfers waiting for a connection
};

function storedToken() { return sessionStorage.getItem(TOKEN_KEY); }

async function whoami(token) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch("/whoami", { headers, cache: "no-store", credentials: "omit" });
  let body = {};
  try { body = await response.json(); } catch (error) { /* not ours: a proxy's page */ }
  return { status: response.status, body };
}

function ready() {
  if (link.state === "connected" && link.connection && link.connection.live) {
    return Promise.resolve(link.connection);
  }
  if (link.state === "login") return Promise.reject(new ProtocolError({ code: "login_needed" }));
  return new Promise((resolve, reject) => link.waiters.push({ resolve, reject }));
}

function wakeLink() { if (link.wake) link.wake(); }

function backoff(reason) {
  const delay = Math.min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** link.attempt) * (0.8 + 0.2 * Math.random());
  link.attempt++;
  link.state = "waiting";
  setStatus("reconnecting…", "wait");
  showNotice(reason + " Trying again in " + Math.ceil(delay / 1000) + " s…", true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => link.wake(), delay);
    link.wake = () => { clearTimeout(timer); link.wake = null; resolve(); };
  });
}

async function connectLoop() {
  if (link.running) { wakeLink(); return; }
  link.running = true;
  try {
    while (link.state !== "login") {
      link.state = "checking";
      if (link.attempt > 0) showNotice("Trying to reconnect…", false);
      const token = storedToken();
      let check;
      try { check = await whoami(token); }
      catch (error) { await backoff("The server cannot be reached."); continue; }
      if (link.state === "login") return;  // logged out meanwhile
      if (check.status === 401) { needLogin(token ? "refused" : null); return; }
      if (check.status === 200 && check.body.client === null) { needLogin(null); return; }
      if (check.status === 429) {
        await backoff("Too many connections are open for you (" + (check.body.message || "429") +
                      "); close another tab or program.");
        continue;
      }
      if (check.status !== 200) {
        await backoff(check.status === 503 ? "The server is stopping or busy." :
                      check.status === 403 ? "The server is checking too many sign-ins at once." :
                      "The server answered HTTP " + check.status + ".");
        continue;
      }
      const connection = new Connection(token, lost);
      try {
        const hello = await connection.open();
        if (link.state === "login") { connection.close(); return; }
        connected(connection, hello);
        return;
      } catch (error) {
        if (error.closeCode === 4401) { needLogin("revoked"); return; }
        await backoff(error.closeCode === 1013 || (error.refusal && error.refusal.code === "storage_error")
          ? "The server's storage is unavailable." : "The server did not accept the connection.");
      }
    }
  } finally { link.running = false; }
}

function connected(connection, hello) {
  link.connection = connection;
  link.hello = hello;
  link.state = "connected";
  clearNotice();
  clearError("login");
  setStatus("connected", "ok");
  $("#who").textContent = hello.client;
  $("#limit").textContent = "Up to " + humanSize(hello.max_size) + " per file.";
  $("#logout").hidden = !connection.token;
  renderFiles(hello.files);
  const wasHidden = $("#app").hidden;
  $("#login").hidden = true;
  $("#app").hidden = false;
  if (wasHidden && document.activeElement && document.activeElement.closest("#login")) $("#drop").focus();
  for (const waiter of link.waiters.splice(0)) waiter.resolve(connection);
}

function lost(connection, code) {
  if (connection !== link.connection || link.state !== "connected") return;
  link.connection = null;
  if (code === 4401) { needLogin("revoked"); return; }
  if (Date.now() - connection.openedAt > STEADY) link.attempt = 0;
  link.state = "waiting";
  setStatus("reconnecting…", "wait");
  showNotice(code === 1001 ? "The server is restarting." :
             code === 1013 ? "The server's storage is unavailable." :
             "Lost the connection to the server.", false);
  connectLoop();
}

function needLogin(why) {
  link.state = "login";
  link.attempt = 0;
  if (link.connection) { link.connection.close(); link.connection = null; }
  for (const waiter of link.waiters.splice(0)) waiter.reject(new ProtocolError({ code: "login_needed" }));
  clearNotice();
  if (why) {
    sessionStorage.removeItem(TOKEN_KEY);
    showError("login", why === "refused"
      ? "The server refused this token: it is wrong, or no longer valid. Check it, or ask for a new one."
      : "Your token is no longer valid (the user was removed or given a new token). Ask for a new one.");
  }
  setStatus("login needed", "bad");
  $("#who").textContent = "";
  $("#logout").hidden = true;
  $("#app").hidden = true;
  $("#login").hidden = false;
  const field = $("#token");
  field.focus();
  field.select();
}

function logOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  $("#token").value = "";
  clearError("login");
  needLogin(null);
  wakeLink();
}

// -- rendering ---------------------------------------------------------------------

let fileNames = new Set();

function renderFiles(files) {
  fileNames = new Set(files.map((file) => file.name));
  const body = $("#files tbody");
  body.replaceChildren();
  for (const file of files) {
    const row = document.createElement("tr");
    row.dataset.name = file.name;
    const name = document.createElement("td");
    name.className = "name";
    name.textContent = file.name;
    const size = document.createElement("td");
    size.className = "num";
    size.textContent = humanSize(file.size);
    const mtime = document.createElement("td");
    mtime.className = "mtime";
    const when = new Date(file.mtime * 1000);
    const time = document.createElement("time");
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
    mtime.append(time);
    const actions = document.createElement("td");
    actions.className = "actions";
    for (const [label, action] of [["Download", download], ["Rename", rename], ["Delete", remove]]) {
      const button = makeButton(label, () => action(file.name), label + " " + file.name);
      button.dataset.action = label.toLowerCase();
      actions.append(button);
    }
    row.append(name, size, mtime, actions);
    body.append(row);
  }
  $("#empty").hidden = files.length > 0;
}

class TransferItem {
  constructor(kind, name) {
    this.kind = kind;
    this.name = name;
    const item = document.createElement("li");
    item.dataset.name = name;
    item.dataset.kind = kind;
    item.innerHTML = '<div class="line"><span class="kind" aria-hidden="true"></span>' +
      '<span class="label"><span class="visually-hidden"></span></span>' +
      '<span class="stats"></span></div><progress max="1"></progress><div class="buttons"></div>';
    item.querySelector(".kind").textContent = kind === "upload" ? "↑" : "↓";
    item.querySelector(".visually-hidden").textContent = kind === "upload" ? "Upload: " : "Download: ";
    item.querySelector(".label").append(name);  // a text node: the label clamps it to two lines
    item.querySelector("progress").setAttribute("aria-label", kind + " of " + name);
    this.element = item;
    this.stats = item.querySelector(".stats");
    this.bar = item.querySelector("progress");
    this.buttons = item.querySelector(".buttons");
    $("#transfers").append(item);
  }

  state(name, text) {
    this.element.className = name;
    this.stats.removeAttribute("role");
    this.stats.textContent = text;
    this.buttons.replaceChildren();
    this.bar.removeAttribute("value");
  }

  queued() { this.state("queued", "queued"); }
  waiting(text) { this.state("waiting", text); }

  start(total, offset = 0) {
    this.state("active", offset ? "resuming at " + humanSize(offset) + "…" : "starting…");
    this.total = total;
    this.offset = offset;
    this.started = performance.now();
  }

  resize(size) { this.total = size; }

  progress(done) {
    const seconds = (performance.now() - this.started) / 1000;
    const speed = (done - this.offset) / Math.max(seconds, 0.001);
    this.bar.value = this.total ? done / this.total : 1;
    this.stats.textContent = humanSize(done) + " of " + humanSize(this.total) + " · " +
      humanSize(speed) + "/s · " + humanTime((this.total - done) / speed) + " left";
  }

  finish(text) {
    this.state("done", text);
    this.bar.value = 1;
    setTimeout(() => this.element.remove(), 5000);
  }

  fail(reason, retry) {
    this.state("failed", "Failed: " + reason);
    this.stats.setAttribute("role", "alert");
    if (retry) {
      this.buttons.append(makeButton("Retry", () => { retry(); $("#drop").focus(); },
                                     "Retry the " + this.kind + " of " + this.name));
    }
    this.buttons.append(makeButton("Dismiss", () => this.dismiss(),
                                   "Dismiss the " + this.kind + " of " + this.name));
  }

  // A question that must be answered before the upload starts.
  ask(question, yes, onYes) {
    this.state("asking", question);
    const focusNext = () => {
      const next = document.querySelector("#transfers li.asking button");
      (next || $("#drop")).focus();
    };
    this.buttons.append(
      makeButton(yes, () => { onYes(); focusNext(); }, yes + " " + this.name),
      makeButton("Cancel", () => { this.element.remove(); focusNext(); }, "Cancel the upload of " + this.name));
    if (!document.activeElement || !document.activeElement.closest("#transfers li.asking")) {
      this.buttons.querySelector("button").focus();
    }
  }

  dismiss() {
    const next = this.element.nextElementSibling || this.element.previousElementSibling;
    this.element.remove();
    const target = next && next.querySelector("button");
    (target || $("#drop")).focus();
  }
}

// -- transfers ----------------------------------------------------------------------

let transfers = Promise.resolve();  // one transfer at a time, in order
const HOPELESS = ["invalid_name", "too_large"];  // the same request fails again: no Retry

function queue(item, work, retry) {
  item.queued();
  transfers = transfers.then(async () => {
    try { await work(); }
    catch (error) { item.fail(describe(error), HOPELESS.includes(error.code) ? null : retry); }
  });
}

async function connectionFor(item, why = "waiting for the connection to the server…") {
  if (link.state !== "connected" || !link.connection || !link.connection.live) item.waiting(why);
  return ready();
}

async function drained(ws) {
  while (ws.readyState === WebSocket.OPEN && ws.bufferedAmount > HIGH_WATER) await sleep(10);
}

function pick(files) {
  for (const file of files) {
    const item = new TransferItem("upload", file.name);
    const limit = link.hello ? link.hello.max_size : Infinity;
    if (file.size > limit) {
      item.fail(MESSAGES.too_large + " (" + humanSize(file.size) + " > " + humanSize(limit) + ")", null);
    } else if (fileNames.has(file.name)) {
      item.ask("A file named “" + file.name + "” already exists. Replace it?", "Replace",
               () => upload(file, item));
    } else {
      upload(file, item);
    }
  }
}

function upload(file, item) {
  queue(item, () => uploadResuming(file, item), () => upload(file, item));
}

// Interrupted uploads resume where they stopped (protocol 1.1 resume): after a
// lost connection for as long as it takes to reconnect, and on a live
// connection up to RETRIES times in a row.
async function uploadResuming(file, item) {
  let failures = 0, previous = null;
  for (;;) {
    const connection = await connectionFor(item, previous === null ? undefined :
      "connection lost; the upload resumes where it stopped once the page reconnects…");
    if (connection !== previous) failures = 0;
    previous = connection;
    try {
      await uploadOnce(connection, file, item);
      item.finish("uploaded");
      return;
    } catch (error) {
      if (error.code === "disconnected" || !connection.live) {
        continue;
      }
      if (error.code === "unavailable") {  // the server is stopping: reconnect (maybe elsewhere)
        item.waiting("the server is stopping; the upload resumes once the page reconnects…");
        connection.close();
        lost(connection, 1001);
        continue;
      }
      const retry = ["channel_closed", "channel_timeout", "stalled"].includes(error.code);
      if (!retry || ++failures > RETRIES) throw error;
      item.waiting("the file connection dropped; resuming…");
      await sleep(500 * failures);
    }
  }
}

async function uploadOnce(connection, file, item) {
  const id = connection.send({ op: "save", name: file.name, size: file.size, resume: true, chunked: true });
  connection.currentTransfer = id;
  try {
    for (;;) {
      const reply = await connection.reply(id);
      if (reply.op === "channel") {
        await connection.openFileChannel(reply.url);
      } else if (reply.op === "ready") {
        item.start(file.size, reply.offset || 0);
        sendSlices(connection, file, reply.offset || 0, item);  // the ack comes on the command channel
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

async function sendSlices(connection, file, offset, item) {
  const ws = connection.fileSocket;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  if (offset >= file.size) { ws.send(new ArrayBuffer(0)); return; }
  let position = offset;
  while (position < file.size) {
    await drained(ws);
    if (ws.readyState !== WebSocket.OPEN) return;
    const end = Math.min(position + CHUNK, file.size);
    ws.send(file.slice(position, end));
    position = end;
    item.progress(Math.max(offset, position - ws.bufferedAmount));
  }
  while (ws.readyState === WebSocket.OPEN && ws.bufferedAmount > 0) {
    item.progress(file.size - ws.bufferedAmount);
    await sleep(50);
  }
}

// Downloads come in pieces (protocol 1.1 "pieces"): a WebSocket message reaches
// the page only whole, so one message per file would cost the browser memory
// in proportion to the file (measured in Chromium 156 by bench/browser.py: about
// 3x a 1 GiB file at its peak). Each piece of PIECE bytes arrives as a Blob and
// goes to downloadTarget().
const PIECE = 8 * 1024 * 1024;

async function getPiece(connection, name, offset, item) {
  let blob = null, sent = null, arrived;
  const got = new Promise((done) => (arrived = done));
  connection.onDownloadData = (data) => { blob = data; arrived(); };
  connection.onFileClosed = () => arrived();  // no more data will come
  const id = connection.send({ op: "get", name, offset, length: PIECE });
  connection.currentTransfer = id;
  try {
    for (;;) {
      const reply = await connection.reply(id);
      if (reply.op === "channel") await connection.openFileChannel(reply.url);
      else if (reply.op === "sending") item.resize(reply.size);
      else if (reply.op === "sent") { sent = reply; break; }
      else if (reply.op === "error") throw new ProtocolError(reply);
    }
    await got;
  } finally {
    connection.onDownloadData = null;
    connection.onFileClosed = null;
    connection.currentTransfer = null;
    connection.done(id);
  }
  if (blob === null || blob.size !== sent.length) {
    throw new ProtocolError({ code: "channel_closed", message: "short download" });
  }
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
  const item = new TransferItem("download", name);
  const run = () => queue(item, () => downloadOnce(name, item), run);
  run();
}

// An interrupted download fails (with a Retry button) rather than resuming:
// what it had received is discarded, and the retry starts over.
async function downloadOnce(name, item) {
  const connection = await connectionFor(item);
  item.start(0);
  const target = await downloadTarget();
  let received = 0, size = 0, file;
  try {
    do {
      const piece = await getPiece(connection, name, received, item);
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
    if (error.code === "disconnected" || error.code === "channel_closed") {
      throw new Error("the connection was lost during the download");
    }
    throw error;
  }
  const anchor = document.createElement("a");
  anchor.href = URL.createObjectURL(file);
  anchor.download = name;
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => { URL.revokeObjectURL(anchor.href); target.remove(); }, 60000);
  item.finish("downloaded");
}

// -- rename and delete ----------------------------------------------------------------

async function act(key, what, message) {
  try {
    if (link.state !== "connected" || !link.connection) {
      throw new Error("not connected to the server (the page reconnects by itself; try again then)");
    }
    await link.connection.request(message);
    clearError(key);
    return true;
  } catch (error) {
    showError(key, what + " failed: " + describe(error));
    return false;
  }
}

async function rename(name) {
  const to = prompt("New name for " + name, name);
  if (!to || to === name) return;
  if (await act("file:" + name, "Renaming “" + name + "” to “" + to + "”", { op: "rename", name, to })) {
    clearError("file:" + to);
  }
}

async function remove(name) {
  if (!confirm("Delete " + name + "?")) return;
  await act("file:" + name, "Deleting “" + name + "”", { op: "delete", name });
}

// -- start-up, login, drag and drop --------------------------------------------------

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  link.state = "checking";
  setStatus("checking the token…", "wait");
  connectLoop();
});

$("#logout").addEventListener("click", logOut);

const picker = $("#picker");
picker.addEventListener("change", () => {
  pick(picker.files);
  picker.value = "";
});

const drop = $("#drop");
drop.addEventListener("click", () => picker.click());
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    picker.click();
  }
});
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  pick(event.dataTransfer.files);
});
// A file dropped beside the drop zone must not replace the page with the file.
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => event.preventDefault());

connectLoop();
