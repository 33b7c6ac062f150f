'use strict';
// A file server on the npm `ws` library (with `bufferutil`): the Node peer of
// bench/throughput.py.  It does wsfiles' job in the plain way ws's README
// shows (WebSocketServer, 'message' events, ws.send with a callback), and was
// frozen as written: it is the baseline, not something to tune.
//
//   node bench/node/ws-server.js ROOT
//
// prints "node-ws listening on 127.0.0.1:PORT (...)" once it listens.
// Wire format, over ws://127.0.0.1:PORT (loopback only, no compression):
//   /up/NAME    the client sends the file as binary messages (one per chunk),
//               then the text message "end"; the server streams them into a
//               temporary file, hashes them (SHA-256), fsyncs, renames the file
//               into place and answers {"size": N, "sha256": HEX}.
//   /down/NAME  the server sends the file as binary messages of 128 KiB, with
//               back-pressure (the next chunk is read once the last one is in
//               the socket), then {"size": N, "sha256": HEX}.
// Stops on SIGTERM or SIGINT.

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const { WebSocketServer } = require('ws');

const CHUNK = 128 * 1024;
const HOST = '127.0.0.1';

function receiveFile(ws, root, name) {
  const temp = path.join(root, `.tmp-${name}`);
  const fd = fs.openSync(temp, 'w', 0o644);
  const file = fs.createWriteStream(temp, { fd, autoClose: false });
  const hash = crypto.createHash('sha256');
  let size = 0;

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
    // "end": everything is written once the stream finishes; then make it
    // durable.  A stream that is ending emits no 'drain', so resume here.
    ws.resume();
    file.end(() => {
      fs.fsync(fd, (err) => {
        fs.closeSync(fd);
        if (err) return ws.close(1011, 'fsync failed');
        fs.rename(temp, path.join(root, name), (err) => {
          if (err) return ws.close(1011, 'rename failed');
          ws.send(JSON.stringify({ size, sha256: hash.digest('hex') }));
        });
      });
    });
  });
}

function sendFile(ws, root, name) {
  const file = path.join(root, name);
  const stream = fs.createReadStream(file, { highWaterMark: CHUNK });
  const hash = crypto.createHash('sha256');
  let size = 0;

  stream.on('data', (chunk) => {
    hash.update(chunk);
    size += chunk.length;
    stream.pause();
    ws.send(chunk, { binary: true }, (err) => {
      if (err) stream.destroy(err);
      else stream.resume();
    });
  });
  stream.on('end', () => ws.send(JSON.stringify({ size, sha256: hash.digest('hex') })));
  stream.on('error', () => ws.close(1011, 'read failed'));
}

function main() {
  const root = process.argv[2];
  if (!root) {
    console.error('usage: node ws-server.js ROOT');
    process.exit(2);
  }
  const wss = new WebSocketServer({ host: HOST, port: 0, perMessageDeflate: false });
  wss.on('connection', (ws, req) => {
    const [, what, name] = req.url.split('/');
    if (what === 'up') receiveFile(ws, root, name);
    else if (what === 'down') sendFile(ws, root, name);
    else ws.close(1008, 'unknown path');
  });
  wss.on('listening', () => {
    let bufferutil = 'no';
    try {
      require('bufferutil');
      bufferutil = process.env.WS_NO_BUFFER_UTIL ? 'installed, disabled' : 'yes';
    } catch (e) {
      bufferutil = 'no (not installed)';
    }
    const ws = require('ws/package.json').version;
    console.log(
      `node-ws listening on ${HOST}:${wss.address().port}` +
        ` (node ${process.version}, ws ${ws}, bufferutil ${bufferutil})`
    );
  });
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
}

main();
