// SHA-256 (FIPS 180-4, section 6.2), incremental: new Sha256(), update(bytes)
// as often as needed, then hex() (or digest()). Plain JavaScript: it runs in
// the page and in hash-worker.js under the page's Content-Security-Policy
// (WebAssembly would need 'wasm-unsafe-eval'), nothing fetched from elsewhere.
// Tested against Python's hashlib on random inputs (tests/test_page_verify.py).
"use strict";

(function (scope) {
  // The first 32 bits of the fractional parts of the cube roots of the first 64 primes (4.2.2).
  const K = new Int32Array([
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
  ]);
  // The initial hash value H(0) (5.3.3).
  const H0 = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

  class Sha256 {
    constructor() {
      this.h = new Int32Array(H0);
      this.w = new Int32Array(64);        // the message schedule
      this.block = new Uint8Array(64);    // a partial block waiting for more bytes
      this.blockView = new DataView(this.block.buffer);
      this.buffered = 0;
      this.length = 0;                    // bytes so far (exact up to 2^53)
      this.finished = false;
    }

    // Add bytes (a Uint8Array, an ArrayBuffer or another typed array view).
    update(data) {
      if (this.finished) throw new Error("SHA-256: update() after the digest was taken");
      const bytes = data instanceof Uint8Array ? data
        : ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
        : new Uint8Array(data);
      const n = bytes.length;
      let i = 0;
      this.length += n;
      if (this.buffered > 0) {
        i = Math.min(64 - this.buffered, n);
        this.block.set(bytes.subarray(0, i), this.buffered);
        this.buffered += i;
        if (this.buffered < 64) return this;
        this.compress(this.blockView, 0, 64);
        this.buffered = 0;
      }
      const whole = i + ((n - i) & ~63);
      if (whole > i) this.compress(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), i, whole);
      if (whole < n) {
        this.block.set(bytes.subarray(whole), 0);
        this.buffered = n - whole;
      }
      return this;
    }

    // The compression function over the 64-byte blocks of view[start, end) (6.2.2).
    compress(view, start, end) {
      const w = this.w, h = this.h;
      let h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3], h4 = h[4], h5 = h[5], h6 = h[6], h7 = h[7];
      for (let p = start; p < end; p += 64) {
        for (let t = 0; t < 16; t++) w[t] = view.getInt32(p + 4 * t);  // big-endian words
        for (let t = 16; t < 64; t++) {
          const x = w[t - 15], y = w[t - 2];
          const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
          const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
          w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
        }
        let a = h0, b = h1, c = h2, d = h3, e = h4, f = h5, g = h6, k = h7;
        for (let t = 0; t < 64; t++) {
          const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
          const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K[t] + w[t]) | 0;
          const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
          const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
          k = g; g = f; f = e; e = (d + t1) | 0;
          d = c; c = b; b = a; a = (t1 + t2) | 0;
        }
        h0 = (h0 + a) | 0; h1 = (h1 + b) | 0; h2 = (h2 + c) | 0; h3 = (h3 + d) | 0;
        h4 = (h4 + e) | 0; h5 = (h5 + f) | 0; h6 = (h6 + g) | 0; h7 = (h7 + k) | 0;
      }
      h[0] = h0; h[1] = h1; h[2] = h2; h[3] = h3; h[4] = h4; h[5] = h5; h[6] = h6; h[7] = h7;
    }

    // The 32-byte digest; the object takes no more bytes afterwards.
    digest() {
      if (!this.finished) {
        // Padding (5.1.1): a 1 bit, zeros, and the length in bits as 64 bits, big-endian.
        const length = this.length;
        const tail = new Uint8Array(this.buffered < 56 ? 64 : 128);
        tail.set(this.block.subarray(0, this.buffered));
        tail[this.buffered] = 0x80;
        const view = new DataView(tail.buffer);
        view.setUint32(tail.length - 8, Math.floor(length / 0x20000000));  // length * 8 >> 32
        view.setUint32(tail.length - 4, (length % 0x20000000) * 8);
        this.compress(view, 0, tail.length);
        this.finished = true;
      }
      const out = new Uint8Array(32);
      const view = new DataView(out.buffer);
      for (let i = 0; i < 8; i++) view.setInt32(4 * i, this.h[i]);
      return out;
    }

    hex() {
      return Array.from(this.digest(), (byte) => byte.toString(16).padStart(2, "0")).join("");
    }
  }

  scope.Sha256 = Sha256;
})(self);
