#!/usr/bin/env node
// A wsfiles client written from docs/protocol.md alone (no server code read).
//
//   node wsfiles-client.js URL [--token T] ls
//   node wsfiles-client.js URL [--token T] put PATH [NAME]
//   node wsfiles-client.js URL [--token T] get NAME OUTPUT
//
// URL is the server's base, e.g. ws://127.0.0.1:8080. Exit 0 on success,
// 1 with "error CODE: message" on stderr otherwise.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const WebSocket = require("ws");

const CHUNK = 256 * 1024;

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
      this.ws = new WebSocket(`${this.base}/command`, ["wsfiles.v1"], { headers });
      this.ws.on("unexpected-response", (_, response) =>
        reject({ code: "connection_failed", message: `HTTP ${response.statusCode}` }));
      this.ws.on("error", (error) => reject({ code: "connection_failed", message: error.message }));
      this.ws.on("message", (data, isBinary) => {
        if (isBinary) return;
        const message = JSON.parse(data.toString());
        if (message.op === "hello") return resolve(message);
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

  list() {
    return this.command({ op: "list" }, (reply) => reply.files);
  }

  async put(file, name) {
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
  let token = process.env.WSFILES_TOKEN || null;
  const tokenAt = args.indexOf("--token");
  if (tokenAt >= 0) { token = args[tokenAt + 1]; args.splice(tokenAt, 2); }
  const [base, verb, ...rest] = args;
  if (!base || !verb) fail("usage", "wsfiles-client.js URL [--token T] ls|put PATH [NAME]|get NAME OUTPUT");
  const client = new Client(base.replace(/\/$/, ""), token);
  try {
    await client.connect();
    if (verb === "ls") {
      for (const file of await client.list()) process.stdout.write(`${file.size}\t${file.name}\n`);
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
