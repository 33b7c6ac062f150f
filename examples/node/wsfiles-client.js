#!/usr/bin/env node
// A wsfiles client written from docs/protocol.md alone (no server code read).
//
//   node wsfiles-client.js URL [--token T] ls [FOLDER]
//   node wsfiles-client.js URL [--token T] mkdir [-p] FOLDER
//   node wsfiles-client.js URL [--token T] put PATH [NAME]
//   node wsfiles-client.js URL [--token T] get NAME OUTPUT
//   node wsfiles-client.js --help
//
// URL is the server's base, e.g. ws://127.0.0.1:8080. Exit 0 on success,
// 1 with "error CODE: message" on stderr otherwise. It offers protocol 1.2
// (subprotocol wsfiles.v1.2, then wsfiles.v1): on a server with folders, NAME
// and FOLDER may be paths such as docs/2026/report.pdf; on a 1.1 server they
// must be plain names. Runs on Node 18 or later.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const WebSocket = require("ws");

const CHUNK = 256 * 1024;
// Offered in this order: protocol 1.2 (folders) first, then 1.1.
const SUBPROTOCOLS = ["wsfiles.v1.2", "wsfiles.v1"];
const NO_FOLDERS = { code: "not_supported", message: "this server does not support folders (protocol 1.2)" };

const USAGE = `usage: wsfiles-client.js URL [--token T] COMMAND

A wsfiles client written from docs/protocol.md alone.

commands:
  ls [FOLDER]          list a folder (default: the top); folders end in "/"
  mkdir [-p] FOLDER    create a folder (-p: and its parents; an existing folder is fine)
  put PATH [NAME]      upload the local file PATH as NAME (a path: its folders are created)
  get NAME OUTPUT      download NAME (a path) into the local file OUTPUT

URL is the server's base, e.g. ws://127.0.0.1:8080. The token comes from
--token or WSFILES_TOKEN. Paths below the top need a server with folders
(protocol 1.2). Exit status 0 on success, 1 with "error CODE: message" on stderr.
`;

function fail(code, message) {
  process.stderr.write(`error ${code}: ${message}\n`);
  process.exit(1);
}

class Client {
  constructor(base, token) {
    this.base = base;
    this.token = token;
    this.nextId = 1;
    this.handlers = new Map();
    this.fileSocket = null;
    this.onFileMessage = null;
  }

  connect() {
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    return new Promise((resolve, reject) => {
      this.ws = new WebSocket(`${this.base}/command`, SUBPROTOCOLS, { headers });
      this.ws.on("unexpected-response", (_, response) =>
        reject({ code: "connection_failed", message: `HTTP ${response.statusCode}` }));
      this.ws.on("error", (error) => reject({ code: "connection_failed", message: error.message }));
      this.ws.on("message", (data, isBinary) => {
        if (isBinary) return;
        const message = JSON.parse(data.toString());
        if (message.op === "hello") {
          // 1.2 only when the server selected wsfiles.v1.2 and announces folders.
          this.folders = this.ws.protocol === "wsfiles.v1.2" && (message.features || []).includes("folders");
          return resolve(message);
        }
        const handler = this.handlers.get(message.id);
        if (handler) handler(message);
        else if (message.op === "error") fail(message.code, message.message);
      });
    });
  }

  // Send a command; `onReply` gets every message about it until it returns true.
  command(message, onReply) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.handlers.set(id, async (reply) => {
        try {
          if (reply.op === "error") throw reply;
          if (reply.op === "channel") {
            await this.openFileChannel(reply.url);
            return;
          }
          const result = await onReply(reply);
          if (result !== undefined) { this.handlers.delete(id); resolve(result); }
        } catch (error) { this.handlers.delete(id); reject(error); }
      });
      this.ws.send(JSON.stringify({ ...message, id }));
    });
  }

  openFileChannel(url) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.base + url, ["wsfiles.v1"]);
      ws.on("open", () => { this.fileSocket = ws; resolve(); });
      ws.on("error", (error) => reject({ code: "channel_closed", message: error.message }));
      ws.on("message", (data, isBinary) => { if (isBinary && this.onFileMessage) this.onFileMessage(data); });
    });
  }

  // Every entry of a folder: pages are followed by their cursor until the last
  // one (bounded: a page with a cursor must bring entries and a new cursor).
  async list(folder) {
    if (!this.folders) {
      if (folder) throw NO_FOLDERS;
      return this.command({ op: "list" }, (reply) => reply.files);
    }
    const entries = [];
    const seen = new Set();
    let cursor = null;
    for (;;) {
      const message = { op: "list" };
      if (folder) message.path = folder;
      if (cursor !== null) message.cursor = cursor;
      const reply = await this.command(message, (r) => r);
      entries.push(...reply.files);
      if (reply.cursor === undefined) return entries;
      if (reply.files.length === 0 || seen.has(reply.cursor)) {
        throw { code: "bad_reply", message: "the server's list pages do not advance" };
      }
      seen.add(reply.cursor);
      cursor = reply.cursor;
    }
  }

  mkdir(folder, parents) {
    if (!this.folders) return Promise.reject(NO_FOLDERS);
    const message = { op: "mkdir", path: folder };
    if (parents) message.parents = true;
    return this.command(message, (reply) => reply);
  }

  // A path below the top needs folders; say so instead of the server's invalid_name.
  checkPath(name) {
    if (name.includes("/") && !this.folders) throw NO_FOLDERS;
  }

  async put(file, name) {
    this.checkPath(name);
    const size = fs.statSync(file).size;
    const hash = crypto.createHash("sha256");
    const ack = await this.command({ op: "save", name, size }, async (reply) => {
      if (reply.op === "ready") {
        // One binary message, streamed as several frames (fin only on the last).
        let sent = 0;
        if (size === 0) this.fileSocket.send(Buffer.alloc(0), { binary: true, fin: true });
        for await (const chunk of fs.createReadStream(file, { highWaterMark: CHUNK })) {
          sent += chunk.length;
          hash.update(chunk);
          await new Promise((done, error) =>
            this.fileSocket.send(chunk, { binary: true, fin: sent === size }, (e) => (e ? error(e) : done())));
        }
        return undefined;
      }
      if (reply.op === "ack") return reply;
      return undefined;
    });
    if (ack.sha256 !== hash.digest("hex")) fail("checksum_mismatch", "the server stored other bytes");
    return ack;
  }

  async get(name, output) {
    this.checkPath(name);
    let data = null;
    const arrived = new Promise((resolve) => (this.onFileMessage = (buffer) => { data = buffer; resolve(); }));
    const sent = await this.command({ op: "get", name }, (reply) => (reply.op === "sent" ? reply : undefined));
    await arrived;
    if (data.length !== sent.size) fail("channel_closed", "short download");
    if (crypto.createHash("sha256").update(data).digest("hex") !== sent.sha256) fail("checksum_mismatch", "bad data");
    fs.writeFileSync(output, data);
    return sent;
  }

  close() {
    if (this.fileSocket) this.fileSocket.close();
    this.ws.close();
  }
}

async function main() {
  const args = process.argv.slice(2);
  if (args.includes("--help") || args.includes("-h")) {
    process.stdout.write(USAGE);
    return;
  }
  let token = process.env.WSFILES_TOKEN || null;
  const tokenAt = args.indexOf("--token");
  if (tokenAt >= 0) { token = args[tokenAt + 1]; args.splice(tokenAt, 2); }
  const [base, verb, ...rest] = args;
  if (!base || !verb) fail("usage", "wsfiles-client.js URL [--token T] ls|mkdir|put|get ... (see --help)");
  const need = { ls: 0, mkdir: 1, put: 1, get: 2 }[verb];
  const operands = rest.filter((a) => a !== "-p");
  if (need !== undefined && operands.length < need) fail("usage", `${verb}: missing arguments (see --help)`);
  const client = new Client(base.replace(/\/$/, ""), token);
  try {
    await client.connect();
    if (verb === "ls") {
      const folder = (rest[0] || "").replace(/^\/+|\/+$/g, "");
      for (const entry of await client.list(folder)) {
        if (entry.type === "folder") process.stdout.write(`-\t${entry.name}/\n`);
        else process.stdout.write(`${entry.size}\t${entry.name}\n`);
      }
    } else if (verb === "mkdir") {
      const created = await client.mkdir(operands[0].replace(/^\/+|\/+$/g, ""), rest.includes("-p"));
      process.stdout.write(`${created.path}\n`);
    } else if (verb === "put") {
      const ack = await client.put(rest[0], rest[1] || path.basename(rest[0]));
      process.stdout.write(`${ack.sha256}\n`);
    } else if (verb === "get") {
      const sent = await client.get(rest[0], rest[1]);
      process.stdout.write(`${sent.sha256}\n`);
    } else {
      fail("usage", `unknown command ${verb}`);
    }
  } catch (error) {
    fail(error.code || "error", error.message || String(error));
  }
  client.close();
}

main();
