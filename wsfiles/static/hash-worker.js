// The page's reading and hashing, off its main thread. {id, blob, hash, feed}
// in; {id, done} as it goes and {id, hex} (or {id, error}) at the end
// (hex is null when hash is false). A Blob (a picked File too) is read in
// SLICE pieces, the next read under way while one is hashed, so memory stays
// at a few slices whatever the file's size.
//
// With feed, each slice is also handed to the page ({id, offset, bytes, done},
// the ArrayBuffer transferred, not copied) for sending: the file is read once
// for both the hash and the upload, in a few large reads instead of one per
// WebSocket message. The page pays for what it takes with {id, credit: n}
// (the worker waits when it has no credit, so at most AHEAD slices wait in
// the page); {id, unfeed: true} stops the handing over (the hash goes on);
// {id, cancel: true} stops the job.
"use strict";
importScripts("sha256.js");

const SLICE = 4 * 1024 * 1024;
const AHEAD = 2;  // slices handed over before the page has paid for them
const jobs = new Map();

async function run(id, blob, hash, feed, size) {
  const job = { cancelled: false, feed, credits: feed ? AHEAD : 0, wake: null };
  jobs.set(id, job);
  const sha = hash ? new Sha256() : null;
  const read = (offset) => blob.slice(offset, offset + size).arrayBuffer();
  let next = blob.size > 0 ? read(0) : null;
  for (let offset = 0; offset < blob.size; offset += size) {
    const bytes = await next;
    if (job.cancelled) return;
    if (offset + size < blob.size) next = read(offset + size);
    if (sha) sha.update(new Uint8Array(bytes));
    const done = Math.min(offset + size, blob.size);
    while (job.feed && job.credits === 0 && !job.cancelled) {  // ends with credit, unfeed or cancel
      await new Promise((resolve) => { job.wake = resolve; });
    }
    if (job.cancelled) return;
    if (job.feed) {
      job.credits--;
      postMessage({ id, offset, bytes, done }, [bytes]);
    } else {
      postMessage({ id, done });
    }
  }
  postMessage({ id, hex: sha ? sha.hex() : null });
}

function poke(id, change) {
  const job = jobs.get(id);
  if (!job) return;
  change(job);
  if (job.wake) { job.wake(); job.wake = null; }
}

onmessage = (event) => {
  const { id, blob, cancel, credit, unfeed } = event.data;
  if (cancel) { poke(id, (job) => { job.cancelled = true; }); return; }
  if (credit) { poke(id, (job) => { job.credits += credit; }); return; }
  if (unfeed) { poke(id, (job) => { job.feed = false; }); return; }
  const { hash = true, feed = false, slice = SLICE } = event.data;
  run(id, blob, hash, feed, slice > 0 ? slice : SLICE)
    .catch((error) => { postMessage({ id, error: String((error && error.message) || error) }); })
    .finally(() => { jobs.delete(id); });
};
