'use strict';
// The clients of the Node peers (ws-server.js, tus-server.js), as one
// long-lived process driven by bench/throughput.py: it reads one JSON request
// per line on stdin, does it, and writes one JSON line back, so the benchmark
// times the transfer alone (not Node's start-up) and reads this process's CPU.
//
//   {"op": "ws-upload", "port": P, "source": PATH, "name": NAME}
//   {"op": "ws-download", "port": P, "name": NAME, "sink": PATH}
//   {"op": "tus-upload", "port": P, "source": PATH, "name": NAME}   -> {"url": ...}
//   {"op": "tus-download", "url": URL, "sink": PATH}
//
// Answers {"ok": true, ...} or {"ok": false, "error": "..."}.  The ws client
// hashes what it sends and receives (SHA-256) and checks the server's digest,
// like wsfiles.client; the tus client does not hash (tus-js-client, one PATCH,
// no retries).  The first line it prints is {"ready": true, "tus": ...}: tus
// is false (with the reason) when @tus/server or tus-js-client do not load.

const crypto = require('crypto');
const fs = require('fs');
const http = require('http');
const readline = require('readline');
const { pipeline } = require('stream');
const WebSocket = require('ws');

const CHUNK = 128 * 1024;
const HOST = '127.0.0.1';

function wsUpload({ port, source, name }) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://${HOST}:${port}/up/${name}`, { perMessageDeflate: false });
    const hash = crypto.createHash('sha256');
    let reply = null;
    ws.on('error', reject);
    ws.on('open', () => {
      const stream = fs.createReadStream(source, { highWaterMark: CHUNK });
      stream.on('data', (chunk) => {
        hash.update(chunk);
        stream.pause();
        ws.send(chunk, { binary: true }, (err) => {
          if (err) stream.destroy(err);
          else stream.resume();
        });
      });
      stream.on('end', () => ws.send('end'));
      stream.on('error', reject);
    });
    ws.on('message', (data) => {
      reply = JSON.parse(data.toString());
      ws.close();
    });
    ws.on('close', () => {
      if (reply === null) reject(new Error('ws upload: closed before the reply'));
      else if (reply.sha256 !== hash.digest('hex')) reject(new Error('ws upload: digest differs'));
      else resolve(reply);
    });
  });
}

function wsDownload({ port, name, sink }) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://${HOST}:${port}/down/${name}`, { perMessageDeflate: false });
    const file = fs.createWriteStream(sink);
    const hash = crypto.createHash('sha256');
    let size = 0;
    let reply = null;
    ws.on('error', reject);
    file.on('error', reject);
    ws.on('message', (data, isBinary) => {
      if (isBinary) {
        hash.update(data);
        size += data.length;
        if (!file.write(data)) {
          ws.pause();
          file.once('drain', () => ws.resume());
        }
        return;
      }
      reply = JSON.parse(data.toString());
      ws.resume(); // an ending stream emits no 'drain'
      file.end(() => ws.close());
    });
    ws.on('close', () => {
      if (reply === null) reject(new Error('ws download: closed before the digest'));
      else if (reply.sha256 !== hash.digest('hex') || reply.size !== size)
        reject(new Error('ws download: received other bytes than the server sent'));
      else resolve(reply);
    });
  });
}

function tusUpload({ port, source, name }) {
  const tus = require('tus-js-client');
  return new Promise((resolve, reject) => {
    const upload = new tus.Upload(fs.createReadStream(source), {
      endpoint: `http://${HOST}:${port}/files`,
      metadata: { filename: name },
      retryDelays: null,
      onError: reject,
      onSuccess: () => resolve({ url: upload.url }),
    });
    upload.start();
  });
}

function tusDownload({ url, sink }) {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          reject(new Error(`tus download: HTTP ${res.statusCode}`));
          return;
        }
        pipeline(res, fs.createWriteStream(sink), (err) => (err ? reject(err) : resolve({})));
      })
      .on('error', reject);
  });
}

const OPS = {
  'ws-upload': wsUpload,
  'ws-download': wsDownload,
  'tus-upload': tusUpload,
  'tus-download': tusDownload,
};

function tusStatus() {
  try {
    require('@tus/server');
    require('@tus/file-store');
    require('tus-js-client');
    return { tus: true };
  } catch (e) {
    return { tus: false, why: String(e.message).split('\n')[0] };
  }
}

function main() {
  const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
  say({ ready: true, node: process.version, ...tusStatus() });
  const lines = readline.createInterface({ input: process.stdin });
  let queue = Promise.resolve();
  lines.on('line', (line) => {
    queue = queue.then(async () => {
      try {
        const request = JSON.parse(line);
        const op = OPS[request.op];
        if (!op) throw new Error(`unknown op ${request.op}`);
        say({ ok: true, ...(await op(request)) });
      } catch (e) {
        say({ ok: false, error: String((e && e.message) || e) });
      }
    });
  });
  lines.on('close', () => queue.then(() => process.exit(0)));
}

main();
