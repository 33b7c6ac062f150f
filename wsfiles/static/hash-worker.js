// The page's hashing, off its main thread: {id, blob} in, {id, done} as it
// goes and {id, hex} (or {id, error}) at the end; {id, cancel: true} stops a
// job. A Blob (a picked File too) is read in SLICE pieces, the next read
// under way while one is hashed, so memory stays at about two slices
// whatever the file's size.
"use strict";
importScripts("sha256.js");

const SLICE = 4 * 1024 * 1024;
const cancelled = new Set();

async function hash(id, blob) {
  const sha = new Sha256();
  let next = blob.slice(0, SLICE).arrayBuffer();
  for (let offset = 0; offset < blob.size; offset += SLICE) {
    const bytes = await next;
    if (cancelled.delete(id)) return;
    if (offset + SLICE < blob.size) next = blob.slice(offset + SLICE, offset + 2 * SLICE).arrayBuffer();
    sha.update(new Uint8Array(bytes));
    postMessage({ id, done: Math.min(offset + SLICE, blob.size) });
  }
  postMessage({ id, hex: sha.hex() });
}

onmessage = (event) => {
  const { id, blob, cancel } = event.data;
  if (cancel) { cancelled.add(id); return; }
  hash(id, blob).catch((error) => {
    cancelled.delete(id);
    postMessage({ id, error: String((error && error.message) || error) });
  });
};
