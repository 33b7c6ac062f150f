'use strict';
// @tus/server with @tus/file-store, as their README shows them: a reference
// for bench/throughput.py.  It does less than wsfiles: no hash, no fsync (the
// upload is written into place as it arrives).  Downloads are its GET of a
// finished upload.
//
//   node bench/node/tus-server.js ROOT
//
// prints "tus listening on 127.0.0.1:PORT (...)" once it listens; uploads go
// to http://127.0.0.1:PORT/files.  Stops on SIGTERM or SIGINT.
//
// @tus/server 2.x needs Node >= 20.19, so package.json pins the 1.x line,
// which runs on Debian 12's Node 18 too.

const HOST = '127.0.0.1';

function main() {
  const root = process.argv[2];
  if (!root) {
    console.error('usage: node tus-server.js ROOT');
    process.exit(2);
  }
  const { Server } = require('@tus/server');
  const { FileStore } = require('@tus/file-store');
  const server = new Server({ path: '/files', datastore: new FileStore({ directory: root }) });
  const http = server.listen({ host: HOST, port: 0 }, () => {
    const version = require('@tus/server/package.json').version;
    console.log(
      `tus listening on ${HOST}:${http.address().port}` +
        ` (node ${process.version}, @tus/server ${version})`
    );
  });
  for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
}

main();
