// wsfiles web client: speaks docs/protocol.md over the same two WebSockets as
// every other client. Plain JavaScript, no build step, nothing fetched from
// elsewhere.
"use strict";

let CHUNK = 1024 * 1024;            // bytes per binary message (Chromium frames them in ~80 KiB)
let HIGH_WATER = 4 * 1024 * 1024;   // pause while the socket buffers more than this
let VERIFY = true;                  // hash uploads (and pieces) and compare with the server's
let FEED = true;                    // uploads send the bytes the hash worker read (else File.slice()s)
let READ = 16 * 1024 * 1024;        // the worker's reads (hash-worker.js); docs/performance.md
// bench/browser.py may change these for one tab (sessionStorage "wsfiles-tuning",
// JSON {"chunk": bytes, "highWater": bytes, "verify": false, "feed": false, "read": bytes}),
// read as each upload starts.
function applyTuning() {
  let tuning = {};
  try { tuning = JSON.parse(sessionStorage.getItem("wsfiles-tuning")) || {}; } catch (error) { /* defaults */ }
  CHUNK = tuning.chunk || 1024 * 1024;
  HIGH_WATER = tuning.highWater || 4 * 1024 * 1024;
  VERIFY = tuning.verify !== false;
  FEED = tuning.feed !== false;
  READ = tuning.read || 16 * 1024 * 1024;
}
applyTuning();
const RETRIES = 5;                   // failures in a row on one live connection before an upload gives up
const BACKOFF_FIRST = 500;           // ms before the second attempt to reconnect...
const BACKOFF_CAP = 4000;            // ...doubling up to this: a few seconds at most
const STEADY = 10000;                // ms a connection must last for the backoff to start over
const TOKEN_KEY = "wsfiles-token";
// Protocol 1.2 (folders) when the server selects it; a 1.1 server selects
// wsfiles.v1 and the page shows one flat folder, as before.
const SUBPROTOCOLS = ["wsfiles.v1.2", "wsfiles.v1"];
const MAX_PAGES = 1000;              // list pages of one folder at most (1000 entries each)
const TREE_LIMIT = 100000;           // files and folders in one dropped or picked tree at most
const COUNT_PAGES = 10;              // pages counted before deleting a folder (then "more than")
const TOP = "Home";                  // what the page calls the top folder

const MESSAGES = {
  bad_request: "The server did not understand the request.",
  unknown_op: "The server does not know this command.",
  invalid_name: "That name is not allowed (no slashes, control characters, '.', '..' or names over 255 bytes).",
  not_found: "There is no such file or folder.",
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
  is_a_folder: "That is a folder, not a file.",
  not_a_folder: "A file is in the way: that path is not a folder.",
  not_empty: "The folder is not empty.",
  invalid_move: "A folder cannot be moved into itself.",
  too_many: "Too many files at once.",
  disconnected: "The connection to the server was lost.",
  file_changed: "The file changed on the server after the download began; download it again.",
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
      const ws = new WebSocket(base + "/command" + query, SUBPROTOCOLS);
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
    if (message.op === "changed") { folderChanged(message); return; }
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
  view.folders = hello.protocol === "1.2" && (hello.features || []).includes("folders");
  $("#where").hidden = !view.folders;
  $("#drop-what").textContent = view.folders ? "files or folders" : "files";
  if (!view.folders) {
    view.path = "";
    showListing("", hello.files, undefined);
  } else {
    const wanted = pathFromHash();
    if (wanted === "") showListing("", hello.files, hello.cursor);
    else openFolder(wanted, false);
  }
  const wasHidden = $("#app").hidden;
  $("#login").hidden = true;
  $("#app").hidden = false;
  if (wasHidden && document.activeElement && document.activeElement.closest("#login")) $("#drop").focus();
  for (const waiter of link.waiters.splice(0)) waiter.resolve(connection);
  refreshShares();
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

// -- folders and rendering -----------------------------------------------------------
// On a 1.2 channel the page shows one folder at a time: view.path ("" for the
// top), named in the address (#/docs/2026) so Back, reload and bookmarks work.
// Big folders are listed in pages (cursor) and shown as the pages arrive.

const view = {
  folders: false,       // the server speaks protocol 1.2
  path: "",             // the folder in view
  entries: new Map(),   // name -> entry, for the folder in view
  generation: 0,        // bumped by every new listing: older ones stop
  replacing: false,     // the next hashchange is the page's own (goUp), not a person's
};

let fileNames = new Set();  // files (not folders) in view: an upload of one of these asks first

function join(folder, name) { return folder ? folder + "/" + name : name; }
function parentOf(path) { const i = path.lastIndexOf("/"); return i < 0 ? "" : path.slice(0, i); }
function baseName(path) { return path.slice(path.lastIndexOf("/") + 1); }
function shown(path) { return path === "" ? TOP : path; }
function within(path, folder) { return folder === "" || path === folder || path.startsWith(folder + "/"); }

function hashFor(path) {
  return "#/" + (path ? path.split("/").map(encodeURIComponent).join("/") : "");
}

function pathFromHash() {
  if (!location.hash.startsWith("#/")) return "";
  try {
    return location.hash.slice(2).split("/").filter(Boolean).map(decodeURIComponent).join("/");
  } catch (error) { return ""; }  // a malformed address: the top
}

// The folder in view is gone: show `path` instead, in place of it in the history.
function goUp(path) {
  view.replacing = true;
  location.replace(hashFor(path));  // hashchange opens it
}

async function openFolder(path, focus) {
  if (!view.folders) return;
  view.path = path;
  renderCrumbs(focus);
  clearError("folder");
  if (focus) clearError("gone");  // a person went elsewhere: that news is old
  showEntries([], false);
  $("#loading").textContent = "Loading " + shown(path) + "…";
  await load(path);
}

// List `path` again (its first page replaces what is shown).
async function load(path) {
  const generation = ++view.generation;
  let reply;
  try {
    const connection = await ready();
    reply = await connection.request({ op: "list", path });
  } catch (error) {
    if (generation !== view.generation) return;
    $("#loading").textContent = "";
    if (error.code === "not_found" || error.code === "not_a_folder" || error.code === "invalid_name") {
      showError("gone", "The folder “" + path + "” does not exist (any more).");
      goUp(parentOf(path));
    } else if (error.code !== "disconnected" && error.code !== "login_needed") {
      showError("folder", "Listing “" + shown(path) + "” failed: " + describe(error));
    }
    return;
  }
  if (generation === view.generation) showListing(path, reply.files, reply.cursor, generation);
}

// Show a listing's first page, then fetch and append the rest.
async function showListing(path, files, cursor, generation = ++view.generation) {
  view.path = path;
  if (view.folders) renderCrumbs(false);
  showEntries(files || [], false);
  for (let pages = 1; cursor && pages < MAX_PAGES; pages++) {
    $("#loading").textContent = "Loading more… (" + view.entries.size + " so far)";
    let reply;
    try {
      reply = await (await ready()).request({ op: "list", path, cursor });
    } catch (error) {
      if (generation === view.generation) {
        $("#loading").textContent = "";
        if (error.code !== "disconnected") showError("folder", "Listing “" + shown(path) + "” failed: " + describe(error));
      }
      return;
    }
    if (generation !== view.generation) return;
    showEntries(reply.files, true);
    cursor = reply.cursor;
  }
  if (generation === view.generation) $("#loading").textContent = "";
}

// A folder changed (1.2: the event names it; 1.1: always the top).
function folderChanged(message) {
  const path = message.path || "";
  if (!view.folders || path === view.path) {
    if (message.more) { load(view.path); return; }
    ++view.generation;  // a listing in progress is out of date
    $("#loading").textContent = "";
    showEntries(message.files, false);
    return;
  }
  // An ancestor of the folder in view: is the way down still there?
  if (within(view.path, path) && message.files) {
    const next = view.path.slice(path ? path.length + 1 : 0).split("/")[0];
    const still = message.files.some((entry) => entry.name === next && entry.type === "folder");
    if (!still) {
      showError("gone", "The folder “" + view.path + "” was removed or moved.");
      goUp(path);
    }
  }
  // Other folders' events do not change what is shown.
}

function renderCrumbs(focus) {
  const list = $("#crumbs");
  const active = document.activeElement;
  focus = focus || Boolean(active && active.id === "current-folder");
  list.replaceChildren();
  const parts = view.path ? view.path.split("/") : [];
  const paths = [""].concat(parts.map((_, i) => parts.slice(0, i + 1).join("/")));
  paths.forEach((path, i) => {
    const item = document.createElement("li");
    const label = i === 0 ? TOP : parts[i - 1];
    if (i === paths.length - 1) {
      const current = document.createElement("span");
      current.textContent = label;
      current.setAttribute("aria-current", "location");
      current.tabIndex = -1;
      current.id = "current-folder";
      item.append(current);
    } else {
      const anchor = document.createElement("a");
      anchor.href = hashFor(path);
      anchor.textContent = label;
      dropTarget(anchor, path);
      item.append(anchor);
    }
    list.append(item);
  });
  $("#files caption").textContent = view.folders ? "Files in " + shown(view.path) : "Your files";
  $("#empty").textContent = view.path ? "This folder is empty." : "No files yet.";
  if (focus) $("#current-folder").focus();
}

function showEntries(files, append) {
  const body = $("#files tbody");
  // A live update must not throw the keyboard user's focus away.
  const active = document.activeElement;
  const focused = active && active.closest && active.closest("#files tbody tr");
  const keep = focused ? [focused.dataset.name, active.dataset.action] : null;
  if (!append) {
    view.entries = new Map();
    body.replaceChildren();
  }
  for (const file of files) {
    view.entries.set(file.name, file);
    body.append(entryRow(file));
  }
  fileNames = new Set([...view.entries.values()].filter((e) => e.type !== "folder").map((e) => e.name));
  $("#empty").hidden = view.entries.size > 0;
  if (keep) {
    const row = body.querySelector("tr[data-name=" + JSON.stringify(keep[0]) + "]");
    const button = row && (row.querySelector("[data-action=" + JSON.stringify(keep[1] || "") + "]") ||
                           row.querySelector("a, button"));
    if (button) button.focus();
  }
}

// Drawn in CSS: an emoji needs a font that may be missing, and the CSP allows no data: images.
function folderIcon() {
  const icon = document.createElement("span");
  icon.className = "icon";
  icon.setAttribute("aria-hidden", "true");
  return icon;
}

function entryRow(file) {
  const folder = file.type === "folder";
  const path = join(view.path, file.name);
  const row = document.createElement("tr");
  row.dataset.name = file.name;
  row.dataset.type = folder ? "folder" : "file";
  const name = document.createElement("td");
  name.className = "name";
  if (folder) {
    const anchor = document.createElement("a");
    anchor.href = hashFor(path);
    anchor.dataset.action = "open";
    const icon = folderIcon();
    const label = document.createElement("span");
    label.className = "visually-hidden";
    label.textContent = "Folder ";
    anchor.append(icon, label, file.name);
    name.append(anchor);
  } else {
    name.textContent = file.name;
  }
  const size = document.createElement("td");
  size.className = "num";
  size.textContent = folder ? "folder" : humanSize(file.size);
  const mtime = document.createElement("td");
  mtime.className = "mtime";
  const when = new Date(file.mtime * 1000);
  const time = document.createElement("time");
  time.dateTime = when.toISOString();
  time.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  mtime.append(time);
  const actions = document.createElement("td");
  actions.className = "actions";
  const buttons = folder ? [] : [["Download", "download", () => download(path)]];
  buttons.push(["Share…", "share", () => shareDialog(path, folder)]);
  buttons.push(["Rename", "rename", () => rename(path)]);
  if (view.folders) buttons.push(["Move…", "move", () => moveDialog(path, folder)]);
  buttons.push(["Delete", "delete", () => (folder ? removeFolder(path) : remove(path))]);
  for (const [label, action, run] of buttons) {
    const what = folder ? "folder " + file.name : file.name;
    const button = makeButton(label, run, label.replace("…", "") + " " + what);
    button.dataset.action = action;
    actions.append(button);
  }
  row.append(name, size, mtime, actions);
  if (view.folders) {
    row.draggable = true;
    row.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData(DRAG_TYPE, path);
      event.dataTransfer.effectAllowed = "move";
    });
    if (folder) dropTarget(row, path);
  }
  return row;
}

// -- moving by drag: a row onto a folder row or a breadcrumb ---------------------------

const DRAG_TYPE = "application/x-wsfiles-path";

function dropTarget(element, folder) {
  const ours = (event) => event.dataTransfer && Array.from(event.dataTransfer.types).includes(DRAG_TYPE);
  element.addEventListener("dragover", (event) => {
    if (!ours(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
    element.classList.add("target");
  });
  element.addEventListener("dragleave", () => element.classList.remove("target"));
  element.addEventListener("drop", (event) => {
    element.classList.remove("target");
    if (!ours(event)) return;
    event.preventDefault();
    event.stopPropagation();
    const from = event.dataTransfer.getData(DRAG_TYPE);
    if (from && from !== folder) move(from, folder);
  });
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

  finish(text, sha256) {
    this.state("done", text);
    this.bar.value = 1;
    if (sha256) this.element.title = "SHA-256 " + sha256;
    setTimeout(() => this.element.remove(), 5000);
  }

  // The upload is stored; the page's own hash is still being computed.
  verifying(share) {
    this.element.className = "active";
    this.bar.value = share;
    this.stats.textContent = "stored · verifying SHA-256… " + Math.floor(share * 100) + "%";
  }

  // The browser's download manager has the download (its progress is there):
  // what the server says the file is stays in view until dismissed.
  handedOver(reply) {
    this.state("done", "");
    this.bar.hidden = true;  // the browser shows the download's progress, not the page
    const text = document.createElement("span");
    text.textContent = "sent to your browser's downloads · " + humanSize(reply.size);
    const digest = document.createElement("span");
    digest.className = "digest";
    digest.textContent = reply.sha256 ? "SHA-256 " + reply.sha256
      : "no SHA-256 recorded on the server for this file";
    this.stats.replaceChildren(text, digest);
    this.buttons.append(makeButton("Dismiss", () => this.dismiss(), "Dismiss the download of " + this.name));
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
const HOPELESS = ["invalid_name", "too_large", "is_a_folder", "not_a_folder"];  // the same request fails again: no Retry

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

// Files picked or dropped go to the folder in view when they were picked
// (`folder`), even if the page shows another one by the time they are sent.
function pick(files, folder = view.path) {
  for (const file of files) uploadTo(file, join(folder, file.name), folder === view.path);
}

// One file to `target` (a path); `ask` when a file of that name in view must not
// be replaced without a yes.
function uploadTo(file, target, ask) {
  const item = new TransferItem("upload", target);
  const limit = link.hello ? link.hello.max_size : Infinity;
  if (file.size > limit) {
    item.fail(MESSAGES.too_large + " (" + humanSize(file.size) + " > " + humanSize(limit) + ")", null);
  } else if (ask && fileNames.has(baseName(target))) {
    item.ask("A file named “" + baseName(target) + "” already exists. Replace it?", "Replace",
             () => upload(file, item, target));
  } else {
    upload(file, item, target);
  }
}

function upload(file, item, target) {
  queue(item, () => uploadResuming(file, item, target), () => upload(file, item, target));
}

// Interrupted uploads resume where they stopped (protocol 1.1 resume): after a
// lost connection for as long as it takes to reconnect, and on a live
// connection up to RETRIES times in a row.
async function uploadResuming(file, item, target) {
  applyTuning();
  // The worker reads the whole file once, hashes it (whatever a resume sends)
  // and feeds the first attempt's sending; later attempts send File.slice()s.
  const reading = VERIFY || FEED ? hashBlob(file, { hash: VERIFY, feed: FEED, slice: READ })
    : { feeding: false, unfeed() {}, cancel() {} };  // File.slice()s and no hash: no worker
  try { await verify(await uploadStored(file, item, target, reading), VERIFY ? reading : null, item); }
  finally { reading.cancel(); }
}

// The ack of the upload, once the server has stored it.
async function uploadStored(file, item, target, reading) {
  let failures = 0, previous = null;
  for (;;) {
    const connection = await connectionFor(item, previous === null ? undefined :
      "connection lost; the upload resumes where it stopped once the page reconnects…");
    if (connection !== previous) failures = 0;
    previous = connection;
    try {
      return await uploadOnce(connection, file, item, target, reading);
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
      const retry = ["channel_closed", "channel_timeout", "stalled", "rate_limited"].includes(error.code);
      if (!retry || ++failures > RETRIES) throw error;
      item.waiting("the file connection dropped; resuming…");
      await sleep(500 * failures);
    }
  }
}

async function uploadOnce(connection, file, item, target, reading) {
  const id = connection.send({ op: "save", name: target, size: file.size, resume: true, chunked: true });
  connection.currentTransfer = id;
  try {
    for (;;) {
      const reply = await connection.reply(id);
      if (reply.op === "channel") {
        await connection.openFileChannel(reply.url);
      } else if (reply.op === "ready") {
        item.start(file.size, reply.offset || 0);
        sendSlices(connection, file, reply.offset || 0, item, reading);  // the ack comes on the command channel
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

async function sendSlices(connection, file, offset, item, reading) {
  const ws = connection.fileSocket;
  const feed = reading.feeding && !reading.taken;
  reading.taken = true;  // the worker's bytes serve one attempt; a resume sends File.slice()s
  if (!ws || ws.readyState !== WebSocket.OPEN) { reading.unfeed(); return; }
  if (offset >= file.size) { reading.unfeed(); ws.send(new ArrayBuffer(0)); return; }
  let position = offset;
  if (feed) {
    try { position = await sendFed(ws, file, offset, item, reading); }
    finally { reading.unfeed(); }  // done, or the socket closed: the hash goes on alone
  }
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

// The file's bytes from the worker (read once, hashed on the way) in CHUNK-sized
// messages from `offset`; returns the position reached (the file's size unless
// the socket closed or the worker stopped feeding: the caller sends the rest
// as File.slice()s).
async function sendFed(ws, file, offset, item, reading) {
  let position = offset;
  while (position < file.size) {
    const slice = await reading.take();
    if (slice === null) return position;
    const start = slice.offset, end = start + slice.bytes.byteLength;
    if (start > position) return position;  // (cannot happen: slices come in order from 0)
    while (position < end) {
      await drained(ws);
      if (ws.readyState !== WebSocket.OPEN) return position;
      const next = Math.min(position + CHUNK, end);
      ws.send(new Uint8Array(slice.bytes, position - start, next - position));
      position = next;
      item.progress(Math.max(offset, position - ws.bufferedAmount));
    }
  }
  return position;
}

// Verification: the SHA-256 of the file as this page read it (hashed in a
// worker while the slices go out) against the one in the server's ack, the
// hash of what it stored. A mismatch is an error: the file changed while it
// was read, or bytes were damaged on the way.
async function verify(ack, hashing, item) {
  if (!hashing) { item.finish("uploaded"); return; }
  if (!ack.sha256) { item.finish("uploaded (not verified: the server sent no SHA-256)"); return; }
  hashing.onProgress = (done) => item.verifying(done / Math.max(1, ack.size));
  item.verifying(hashing.done / Math.max(1, ack.size));
  let ours;
  try { ours = await hashing.promise; }
  catch (error) { item.finish("uploaded (not verified: " + describe(error) + ")"); return; }
  if (ours !== ack.sha256) {
    throw new Error("verification failed: the server stored SHA-256 " + ack.sha256.slice(0, 16) +
      "…, but the file this page read has " + ours.slice(0, 16) +
      "… (it changed while it was sent, or was damaged on the way); upload it again");
  }
  item.finish("uploaded · SHA-256 verified", ours);
}

// -- hashing in a worker (sha256.js, hash-worker.js) ------------------------------------

const hasher = { worker: null, jobs: new Map(), next: 1 };

function hashWorker() {
  if (hasher.worker) return hasher.worker;
  const worker = new Worker("hash-worker.js");
  worker.onmessage = (event) => {
    const { id, done, hex, error, bytes, offset } = event.data;
    const job = hasher.jobs.get(id);
    if (!job) return;
    if (bytes !== undefined) job.fed({ offset, bytes });
    if (done !== undefined) { job.done = done; if (job.onProgress) job.onProgress(done); return; }
    hasher.jobs.delete(id);
    job.fed(null);  // the end (of the file, or of the job)
    if (hex !== undefined) job.resolve(hex);
    else job.reject(new Error("hashing failed: " + error));
  };
  worker.onerror = (event) => {
    event.preventDefault();
    for (const job of hasher.jobs.values()) {
      job.fed(null);
      job.reject(new Error("hashing is not available here"));
    }
    hasher.jobs.clear();
    hasher.worker = null;
  };
  hasher.worker = worker;
  return worker;
}

// The SHA-256 (hex) of a Blob or File, read and hashed off the main thread:
// {promise, done (bytes hashed so far), onProgress, cancel()}. With `feed`,
// the worker also hands the file's bytes over in order (4 MiB ArrayBuffers,
// transferred), so an upload reads the file once for both the hash and the
// socket: take() gives the next {offset, bytes}, or null at the end (or when
// the job failed); unfeed() stops the handing over and lets the hash go on
// alone. With `hash: false` the worker only reads (promise: null).
function hashBlob(blob, { hash = true, feed = false, slice = undefined } = {}) {
  const id = hasher.next++;
  const job = { done: 0, onProgress: null, feeding: feed };
  job.promise = new Promise((resolve, reject) => { job.resolve = resolve; job.reject = reject; });
  job.promise.catch(() => {});  // (awaited, or not, by its owner)
  const slices = [], waiting = [];
  job.fed = (slice) => {
    if (!job.feeding) return;
    if (slice === null) job.feeding = false;
    if (waiting.length) waiting.shift()(slice); else if (slice !== null) slices.push(slice);
    if (slice === null) while (waiting.length) waiting.shift()(null);
  };
  job.take = () => {
    if (slices.length) {
      if (hasher.worker && hasher.jobs.has(id)) hasher.worker.postMessage({ id, credit: 1 });
      return Promise.resolve(slices.shift());
    }
    if (!job.feeding) return Promise.resolve(null);
    return new Promise((resolve) => {
      waiting.push((slice) => {
        if (slice !== null && hasher.worker && hasher.jobs.has(id)) hasher.worker.postMessage({ id, credit: 1 });
        resolve(slice);
      });
    });
  };
  job.unfeed = () => {
    if (!job.feeding) return;
    job.fed(null);
    slices.length = 0;
    if (hasher.worker && hasher.jobs.has(id)) hasher.worker.postMessage({ id, unfeed: true });
  };
  job.cancel = () => {
    job.unfeed();
    if (hasher.jobs.delete(id) && hasher.worker) hasher.worker.postMessage({ id, cancel: true });
  };
  try {
    hashWorker().postMessage({ id, blob, hash, feed, slice });
    hasher.jobs.set(id, job);
  } catch (error) {
    job.fed(null);
    job.reject(error);
  }
  return job;
}

// Downloads go to the browser's own download manager: the page asks for a
// short-lived download URL (the "download" op, docs/protocol.md "Download
// tickets") and follows it as a link. Full speed, the browser's progress,
// pause and resume (Range), and nothing of the file in the page.
function download(name) {
  const item = new TransferItem("download", name);
  const run = async () => {
    item.waiting("asking the server for a download link…");
    try {
      const connection = await connectionFor(item);
      const reply = await patiently(connection, { op: "download", name });
      const anchor = document.createElement("a");
      anchor.href = reply.url;
      anchor.download = baseName(name);
      document.body.append(anchor);
      anchor.click();
      anchor.remove();
      item.handedOver(reply);
    } catch (error) {
      if (error.code === "unknown_op") downloadInPieces(name, item);  // an older server
      else item.fail(describe(error), HOPELESS.includes(error.code) ? null : run);
    }
  };
  run();
}

// The WebSocket pieces path is used only with a server that has no "download"
// op (older than the page): the pieces come over the file channel, each checked
// against its range_sha256, and are saved as one file.
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
  if (VERIFY && sent.range_sha256) {
    let ours = null;
    try { ours = await hashBlob(blob).promise; } catch (error) { /* no worker: not checked */ }
    if (ours !== null && ours !== sent.range_sha256) {
      throw new Error("verification failed: bytes " + offset + "… arrived damaged (SHA-256 mismatch)");
    }
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

function downloadInPieces(name, item) {
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
  anchor.download = baseName(name);
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => { URL.revokeObjectURL(anchor.href); target.remove(); }, 60000);
  item.finish(VERIFY ? "downloaded · SHA-256 of each piece verified" : "downloaded");
}

// -- rename, move, delete, new folder ----------------------------------------------------

async function act(key, what, message) {
  try {
    if (link.state !== "connected" || !link.connection) {
      throw new Error("not connected to the server (the page reconnects by itself; try again then)");
    }
    await patiently(link.connection, message);
    clearError(key);
    return true;
  } catch (error) {
    showError(key, what + " failed: " + describe(error));
    return false;
  }
}

// A request that waits out rate_limited (a dropped tree makes many at once).
async function patiently(connection, message) {
  for (let attempt = 1; ; attempt++) {
    try { return await connection.request(message); }
    catch (error) {
      if (error.code !== "rate_limited" || attempt >= 10) throw error;
      await sleep(500 * attempt);
    }
  }
}

// A name typed by a person: one segment. Moving is Move…'s job.
function typedName(name, what) {
  if (view.folders && name.includes("/")) {
    showError("typed", what + ": a name cannot contain “/”.");
    return false;
  }
  clearError("typed");
  return true;
}

async function rename(path) {
  const name = baseName(path);
  const to = prompt("New name for " + name, name);
  if (!to || to === name || !typedName(to, "Renaming “" + path + "”")) return;
  const target = join(parentOf(path), to);
  if (await act("file:" + path, "Renaming “" + path + "” to “" + to + "”", { op: "rename", name: path, to: target })) {
    clearError("file:" + target);
  }
}

async function remove(path) {
  if (!confirm("Delete " + path + "?")) return;
  await act("file:" + path, "Deleting “" + path + "”", { op: "delete", name: path });
}

async function newFolder() {
  const name = prompt("Name of the new folder in " + shown(view.path));
  if (!name || !typedName(name, "Creating a folder")) return;
  const path = join(view.path, name);
  if (await act("folder:new", "Creating the folder “" + name + "”", { op: "mkdir", path })) {
    whenShown(name, (row) => row.querySelector("a").focus());
  }
}

// Once `name` is listed in the folder in view (the server's changed event), do `then`.
function whenShown(name, then) {
  const path = view.path;
  const found = () => $("#files tbody tr[data-name=" + JSON.stringify(name) + "]");
  if (found()) { then(found()); return; }
  const observer = new MutationObserver(() => {
    if (view.path !== path) { observer.disconnect(); return; }
    if (found()) { observer.disconnect(); then(found()); }
  });
  observer.observe($("#files tbody"), { childList: true });
  setTimeout(() => observer.disconnect(), 10000);  // the event may never come (another tab removed it)
}

async function move(from, folder) {
  const to = join(folder, baseName(from));
  if (to === from) return false;
  return act("file:" + from, "Moving “" + from + "” to “" + shown(folder) + "”", { op: "rename", name: from, to });
}

// Every entry of a folder's listing, page after page (bounded).
async function listAll(connection, path, recursive, maxPages) {
  const entries = [];
  let cursor, pages = 0;
  do {
    const message = { op: "list", path };
    if (recursive) message.recursive = true;
    if (cursor) message.cursor = cursor;
    const reply = await connection.request(message);
    entries.push(...reply.files);
    cursor = reply.cursor;
  } while (cursor && ++pages < maxPages);
  return { entries, more: Boolean(cursor) };
}

// "Move…": a dialog that browses folders from the item's own, keyboard first.
const moving = { path: null, folder: false, at: "", generation: 0, opener: null };

function moveDialog(path, isFolder) {
  moving.path = path;
  moving.folder = isFolder;
  moving.opener = document.activeElement;
  $("#move-title").textContent = "Move “" + baseName(path) + "”";
  $("#move-dialog").showModal();
  browseMove(parentOf(path));
}

async function browseMove(at) {
  moving.at = at;
  const generation = ++moving.generation;
  const here = at === parentOf(moving.path);
  $("#move-where").textContent = shown(at);
  $("#move-here").disabled = here;
  $("#move-note").textContent = here ? "It is in this folder now: open another one." : "";
  const list = $("#move-folders");
  list.replaceChildren();
  const add = (text, label, target, icon) => {
    const item = document.createElement("li");
    const button = makeButton(text, () => browseMove(target), label);
    if (icon) button.prepend(folderIcon());
    item.append(button);
    list.append(item);
  };
  if (at !== "") add("↑ " + shown(parentOf(at)), "Up to " + shown(parentOf(at)), parentOf(at));
  // Focus waits on the list itself while it loads (the button pressed went
  // with the old list); if the person moves it meanwhile, it stays theirs.
  list.focus();
  list.setAttribute("aria-busy", "true");
  let listing;
  try {
    listing = await listAll(await ready(), at, false, MAX_PAGES);
  } catch (error) {
    if (generation === moving.generation) {
      $("#move-note").textContent = "Listing failed: " + describe(error);
      list.removeAttribute("aria-busy");
    }
    return;
  }
  if (generation !== moving.generation) return;
  list.removeAttribute("aria-busy");
  for (const entry of listing.entries) {
    const path = join(at, entry.name);
    if (entry.type !== "folder" || path === moving.path) continue;  // never into itself
    add(entry.name, "Open folder " + entry.name, path, true);
  }
  if (list.children.length === 0 && !here) $("#move-note").textContent = "No folders in here.";
  if (document.activeElement !== list) return;
  const first = list.querySelector("button");
  (first || $("#move-here:enabled") || $("#move-cancel")).focus();
}

$("#move-here").addEventListener("click", async () => {
  $("#move-dialog").close();
  const from = moving.path;
  if (await move(from, moving.at)) $("#current-folder").focus();
});
// A "close" event is queued, not sent at once: if the dialog was opened
// again before it came (the browser itself puts focus back on close), it
// belongs to the earlier opening and must not end the new one.
$("#move-dialog").addEventListener("close", () => {
  if ($("#move-dialog").open) return;
  moving.generation++;
  if (moving.opener && moving.opener.isConnected) moving.opener.focus();
});

// Deleting a folder says what goes with it, counted first (at most
// COUNT_PAGES pages); Cancel is the default.
let deleting = 0;

async function removeFolder(path) {
  const dialog = $("#delete-dialog");
  const ticket = ++deleting;
  const opener = document.activeElement;
  const text = $("#delete-text");
  const yes = $("#delete-yes");
  $("#delete-title").textContent = "Delete the folder “" + baseName(path) + "”?";
  text.textContent = "Counting what is in it…";
  yes.textContent = "Delete";
  yes.disabled = true;
  dialog.onclose = () => { if (!dialog.open && opener && opener.isConnected) opener.focus(); };
  dialog.showModal();
  let listing;
  try {
    listing = await listAll(await ready(), path, true, COUNT_PAGES);
  } catch (error) {
    if (ticket === deleting) text.textContent = "Could not see what is in it: " + describe(error);
    return;
  }
  if (ticket !== deleting || !dialog.open) return;
  const files = listing.entries.filter((e) => e.type !== "folder");
  const folders = listing.entries.length - files.length;
  const bytes = files.reduce((sum, e) => sum + e.size, 0);
  const empty = listing.entries.length === 0;
  if (empty) {
    text.textContent = "“" + path + "” is empty.";
    yes.textContent = "Delete folder";
  } else {
    const plural = (n, one) => n + " " + one + (n === 1 ? "" : "s");
    const parts = [];
    if (files.length) parts.push(plural(files.length, "file") + " (" + humanSize(bytes) + ")");
    if (folders) parts.push(plural(folders, "folder"));
    text.textContent = "“" + path + "” holds " + (listing.more ? "more than " : "") + parts.join(" and ") +
      ". All of it will be deleted; this cannot be undone.";
    yes.textContent = "Delete folder and contents";
  }
  yes.disabled = false;
  yes.onclick = async () => {
    dialog.onclose = null;
    dialog.close();
    // recursive only when the person saw contents: a folder filled meanwhile is refused (not_empty)
    if (await act("folder:" + path, "Deleting the folder “" + path + "”",
                  { op: "rmdir", path, recursive: !empty })) $("#current-folder").focus();
    else if (opener && opener.isConnected) opener.focus();
  };
}

// -- folders from the desktop: dropped trees and the folder picker -------------------------

// What a drop holds, read in the drop handler itself (its items are gone
// afterwards): null when it holds no folder (then its plain files are used).
function droppedEntries(transfer) {
  const items = Array.from(transfer.items || []).filter((item) => item.kind === "file");
  const entries = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  if (!entries.some((entry) => entry && entry.isDirectory)) return null;
  return items.map((item, i) => (entries[i] && entries[i].isDirectory ? { entry: entries[i] } : { file: item.getAsFile() }))
    .filter((e) => e.entry || e.file);
}

function readBatch(reader) { return new Promise((resolve, reject) => reader.readEntries(resolve, reject)); }
function entryFile(entry) { return new Promise((resolve, reject) => entry.file(resolve, reject)); }

// The whole tree under the dropped entries: folders (parents first) and files,
// named by their path below the drop. readEntries answers in batches until an empty one.
async function walkEntries(dropped) {
  const folders = [], files = [];
  const count = () => {
    if (folders.length + files.length > TREE_LIMIT) {
      throw new ProtocolError({ code: "too_many", message: "more than " + TREE_LIMIT + " files and folders" });
    }
  };
  const visit = async (entry, path) => {
    count();
    if (entry.isDirectory) {
      folders.push(path);
      const reader = entry.createReader();
      for (let batch = await readBatch(reader); batch.length; batch = await readBatch(reader)) {
        for (const child of batch) await visit(child, path + "/" + child.name);
        count();
      }
    } else if (entry.isFile) {
      files.push({ path, file: await entryFile(entry) });
    }
  };
  for (const item of dropped) {
    if (item.entry) await visit(item.entry, item.entry.name);
    else files.push({ path: item.file.name, file: item.file });
  }
  return { folders, files };
}

// The folder picker gives files with webkitRelativePath ("top/sub/a.txt"): no empty folders.
function pickedTree(fileList) {
  const folders = new Set(), files = [];
  for (const file of fileList) {
    const path = file.webkitRelativePath || file.name;
    const parts = path.split("/");
    for (let i = 1; i < parts.length; i++) folders.add(parts.slice(0, i).join("/"));
    files.push({ path, file });
  }
  return { folders: [...folders], files };
}

// Upload a tree into `folder`: each dropped folder asks first if one of that
// name is already here; its folders are made first (parents first, empty ones
// too: and so the folder in view hears of them), then its files are queued.
function uploadTree(tree, folder) {
  const groups = new Map();
  const group = (path) => {
    const top = path.split("/")[0];
    if (!groups.has(top)) groups.set(top, { folders: [], files: [] });
    return groups.get(top);
  };
  for (const path of tree.folders) group(path).folders.push(path);
  for (const entry of tree.files) group(entry.path).files.push(entry);
  for (const [top, g] of groups) {
    if (g.folders.length === 0) {  // a plain file dropped beside the folders
      for (const entry of g.files) uploadTo(entry.file, join(folder, entry.path), folder === view.path);
      continue;
    }
    const existing = folder === view.path && view.entries.get(top);
    if (existing && existing.type === "folder") {
      const item = new TransferItem("upload", join(folder, top) + "/");
      item.ask("A folder named “" + top + "” is already here. Upload into it? Files of the same names in it are replaced.",
               "Upload into", () => { item.element.remove(); sendTree(g, folder); });
    } else {
      sendTree(g, folder);
    }
  }
}

async function sendTree(g, folder) {
  for (const path of g.folders.sort()) {  // "a" sorts before "a/b"
    const target = join(folder, path);
    if (!(await act("folder:" + target, "Creating the folder “" + target + "”", { op: "mkdir", path: target, parents: true }))) return;
  }
  for (const entry of g.files) uploadTo(entry.file, join(folder, entry.path), false);
}

async function dropTree(dropped, folder) {
  try { uploadTree(await walkEntries(dropped), folder); }
  catch (error) { showError("drop", "Reading the dropped folder failed: " + describe(error)); }
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

const folderPicker = $("#folder-picker");
folderPicker.addEventListener("change", () => {
  uploadTree(pickedTree(folderPicker.files), view.path);
  folderPicker.value = "";
});
$("#upload-folder").addEventListener("click", () => folderPicker.click());
$("#new-folder").addEventListener("click", newFolder);
window.addEventListener("hashchange", () => {
  const byPerson = !view.replacing;
  view.replacing = false;
  if (view.folders && link.state === "connected") openFolder(pathFromHash(), byPerson);
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
  const transfer = event.dataTransfer;
  if (Array.from(transfer.types || []).includes(DRAG_TYPE)) return;  // one of our rows: not an upload
  const dropped = view.folders ? droppedEntries(transfer) : null;
  if (dropped) dropTree(dropped, view.path);
  else pick(transfer.files);
});
// A file dropped beside the drop zone must not replace the page with the file.
document.addEventListener("dragover", (event) => event.preventDefault());
document.addEventListener("drop", (event) => event.preventDefault());

connectLoop();

// -- share links (docs/protocol.md, "Share links") ------------------------------------
// "Share…" makes a link anyone can download with, for a time; the list below the
// files shows this client's links, each with Copy link and Revoke.

const SHARE_CHOICES = [[3600, "1 hour"], [86400, "1 day"], [7 * 86400, "7 days"], [30 * 86400, "30 days"]];
const sharing = { path: null, folder: false, opener: null, limits: { default: 86400, max: 30 * 86400 } };

function shareUrl(share) { return location.origin + share.url; }
function shareName(share) { return share.path === "" ? TOP : share.path; }

function untilText(seconds) {
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

// One choice per duration the server allows, the server's default preselected.
function fillExpiryChoices() {
  const select = $("#share-expires");
  const { default: preferred, max } = sharing.limits;
  const choices = SHARE_CHOICES.filter(([seconds]) => seconds <= max);
  if (!choices.some(([seconds]) => seconds === preferred)) choices.push([preferred, humanDuration(preferred)]);
  if (!choices.some(([seconds]) => seconds === max)) choices.push([max, humanDuration(max) + " (the longest)"]);
  choices.sort((a, b) => a[0] - b[0]);
  select.replaceChildren(...choices.map(([seconds, text]) => {
    const option = document.createElement("option");
    option.value = String(seconds);
    option.textContent = text;
    option.selected = seconds === preferred;
    return option;
  }));
}

function humanDuration(seconds) {
  for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (seconds % size === 0) { const n = seconds / size; return n + " " + unit + (n === 1 ? "" : "s"); }
  }
  return seconds + " seconds";
}

function shareDialog(path, isFolder) {
  sharing.path = path;
  sharing.folder = isFolder;
  sharing.opener = document.activeElement;
  $("#share-title").textContent = "Share " + (isFolder ? "folder " : "") + "“" + baseName(path) + "”";
  fillExpiryChoices();
  $("#share-max").value = "";
  $("#share-password").value = "";
  $("#share-result").hidden = true;
  $("#share-copy").hidden = true;
  $("#share-create").hidden = false;
  $("#share-status").textContent = "";
  $("#share-dialog").showModal();
  $("#share-expires").focus();
}

async function createShare() {
  const message = { op: "share", path: sharing.path, expires: Number($("#share-expires").value) };
  const max = $("#share-max").value.trim();
  if (max) {
    if (!/^[1-9][0-9]*$/.test(max)) {
      $("#share-status").textContent = "The download limit must be a whole number of at least 1.";
      $("#share-max").focus();
      return;
    }
    message.max_downloads = Number(max);
  }
  const password = $("#share-password").value;
  if (password) message.password = password;
  $("#share-create").disabled = true;
  $("#share-status").textContent = "Creating the link…";
  try {
    const reply = await (await ready()).request(message);
    $("#share-url").value = shareUrl(reply);
    $("#share-result").hidden = false;
    $("#share-create").hidden = true;
    $("#share-copy").hidden = false;
    $("#share-status").textContent = "Link created; it works until " + untilText(reply.expires_at) + ".";
    $("#share-copy").focus();
    refreshShares();
  } catch (error) {
    $("#share-status").textContent = "Sharing failed: " + describe(error);
  } finally {
    $("#share-create").disabled = false;
  }
}

// The clipboard needs a secure context (https, or localhost); elsewhere the
// link is selected for the person to copy.
async function copyLink(url, status, field) {
  try {
    await navigator.clipboard.writeText(url);
    status("Link copied.");
  } catch {
    if (field) { field.focus(); field.select(); }
    status(field ? "Copy the selected link (Ctrl+C)." : "Copying failed; the link is " + url);
  }
}

async function refreshShares() {
  if (link.state !== "connected" || !link.connection) return;
  let reply;
  try {
    reply = await link.connection.request({ op: "shares" });
  } catch (error) {
    if (error.code === "unknown_op") { $("#shares").hidden = true; return; }  // an older server
    showError("shares", "Listing your share links failed: " + describe(error));
    return;
  }
  clearError("shares");
  sharing.limits = { default: reply.default_expires, max: reply.max_expires };
  renderShares(reply.shares);
}

function renderShares(shares) {
  $("#shares").hidden = false;
  $("#no-shares").hidden = shares.length > 0;
  $("#share-list").replaceChildren(...shares.map((share) => {
    const item = document.createElement("li");
    item.dataset.share = share.share;
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = shareName(share) + (share.kind === "folder" ? " (folder)" : "");
    const when = document.createElement("span");
    when.className = "when muted";
    const limit = share.max_downloads ? share.downloads + " of " + share.max_downloads : String(share.downloads);
    when.textContent = "until " + untilText(share.expires_at) + " · " + limit + " downloads"
      + (share.password ? " · password" : "");
    const buttons = document.createElement("span");
    buttons.className = "buttons";
    const copy = makeButton("Copy link", () => copyLink(shareUrl(share), (text) => { $("#shares-status").textContent = text; }),
      "Copy link to " + shareName(share));
    copy.dataset.action = "copy";
    const revoke = makeButton("Revoke", () => revokeShare(share, item), "Revoke the link to " + shareName(share));
    revoke.dataset.action = "revoke";
    buttons.append(copy, revoke);
    item.append(what, when, buttons);
    return item;
  }));
}

async function revokeShare(share, item) {
  const next = item.nextElementSibling || item.previousElementSibling;
  if (await act("share:" + share.share, "Revoking the link to “" + shareName(share) + "”",
    { op: "unshare", share: share.share })) {
    await refreshShares();
    const focus = next && next.dataset.share
      ? $("#share-list li[data-share=" + JSON.stringify(next.dataset.share) + "] button[data-action='revoke']")
      : null;
    (focus || $("#shares-title")).focus();
  }
}

$("#shares-title").tabIndex = -1;  // focus lands here once the last link is revoked
$("#share-copy").addEventListener("click", () => copyLink($("#share-url").value,
  (text) => { $("#share-status").textContent = text; }, $("#share-url")));
// Create link is the form's default button: Enter in a field creates the
// link (once); only Close (or Escape) closes the dialog.
$("#share-dialog form").addEventListener("submit", (event) => {
  if (event.submitter === $("#share-close")) return;
  event.preventDefault();
  if (!$("#share-create").hidden && !$("#share-create").disabled) createShare();
});
$("#share-dialog").addEventListener("close", () => {
  if ($("#share-dialog").open) return;  // a late event from an earlier opening, as for Move
  $("#shares-status").textContent = "";
  if (sharing.opener && sharing.opener.isConnected) sharing.opener.focus();
});
