"""A small JPEG Lossless (Process 14, Selection Value 1) encoder for grayscale frames.

pydicom has decoders but no encoder for DICOM's most common lossless JPEG syntax
(1.2.840.10008.1.2.4.70), which older CR/DX archives are full of; test fixtures and
the demo data need it. The encoder is vectorised numpy: predictions, difference
categories and Huffman codes are computed for all pixels at once, then bit-packed.
"""
from __future__ import annotations

import heapq
import struct

import numpy as np


def _huffman_bits(freq: np.ndarray) -> tuple[list[int], list[int]]:
    """JPEG BITS/HUFFVAL for symbol frequencies (ITU-T T.81 Annex K.2, max 16 bits).

    A reserved pseudo-symbol of frequency 1 keeps any real code from being all ones.
    """
    symbols = [s for s in range(len(freq)) if freq[s] > 0]
    reserved = len(freq)
    counts = {s: int(freq[s]) for s in symbols}
    counts[reserved] = 1
    # Optimal code lengths via a heap of (weight, tie-breaker, members).
    heap = [(w, s, [s]) for s, w in counts.items()]
    heapq.heapify(heap)
    length = dict.fromkeys(counts, 0)
    tie = len(freq) + 1
    while len(heap) > 1:
        w1, _, m1 = heapq.heappop(heap)
        w2, _, m2 = heapq.heappop(heap)
        for s in m1 + m2:
            length[s] += 1
        heapq.heappush(heap, (w1 + w2, tie, m1 + m2))
        tie += 1
    bits = [0] * 33
    for s in counts:
        bits[length[s]] += 1
    # Annex K.3 "Adjust_BITS": limit code lengths to 16.
    i = 32
    while i > 16:
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        i -= 1
    while bits[i] == 0:  # drop the reserved symbol from the longest length
        i -= 1
    bits[i] -= 1
    order = sorted(symbols, key=lambda s: (length[s], -counts[s], s))
    return bits[1:17], order


def _canonical_codes(bits: list[int], huffval: list[int], n_symbols: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Code value and length per symbol from BITS/HUFFVAL (Annex C)."""
    codes = np.zeros(n_symbols, np.uint64)
    lengths = np.zeros(n_symbols, np.int64)
    code, k = 0, 0
    for size in range(1, 17):
        for _ in range(bits[size - 1]):
            codes[huffval[k]], lengths[huffval[k]] = code, size
            code += 1
            k += 1
        code <<= 1
    return codes, lengths


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate the low ``lengths[i]`` bits of ``values[i]`` MSB-first, 1-padded, stuffed."""
    width = 32
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bit_matrix = ((values[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
    keep = np.arange(width)[None, :] >= (width - lengths)[:, None]
    stream = bit_matrix[keep]
    pad = (-stream.size) % 8
    stream = np.concatenate([stream, np.ones(pad, np.uint8)])
    data = np.packbits(stream)
    # Byte stuffing: every 0xFF in entropy-coded data is followed by 0x00.
    ff = data == 0xFF
    out = np.zeros(data.size + int(ff.sum()), np.uint8)
    positions = np.arange(data.size) + np.concatenate([[0], np.cumsum(ff)[:-1]])
    out[positions] = data
    return out.tobytes()


def encode_jpeg_lossless_sv1(frame: np.ndarray, precision: int) -> bytes:
    """Encode one grayscale frame as a JPEG Lossless SV1 (predictor 1) codestream.

    Args:
        frame: (H, W) unsigned integers below ``2**precision`` (a signed frame is passed
            as its two's complement bits masked to ``precision``, as DICOM stores it).
        precision: sample precision in bits, 2..16.

    Returns:
        The complete codestream, SOI to EOI.
    """
    if frame.ndim != 2 or not 2 <= precision <= 16:
        raise ValueError("need an (H, W) frame and a precision of 2..16 bits")
    x = frame.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() >= 1 << precision):
        raise ValueError(f"samples do not fit {precision} unsigned bits")
    rows, cols = x.shape
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # predictor 1: the sample to the left ...
    pred[1:, 0] = x[:-1, 0]  # ... except the first column, predicted from above
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff).ravel()  # range -32767..32768
    magnitude = np.abs(diff)
    ssss = np.zeros(diff.shape, np.int64)
    nz = magnitude > 0
    ssss[nz] = np.floor(np.log2(magnitude[nz])).astype(np.int64) + 1
    freq = np.bincount(ssss, minlength=17)
    bits, huffval = _huffman_bits(freq)
    codes, code_len = _canonical_codes(bits, huffval, 17)
    extra_len = np.where(ssss == 16, 0, ssss)  # category 16 (32768) has no extra bits
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << extra_len) - 1)
    values = (codes[ssss] << extra_len.astype(np.uint64)) | extra.astype(np.uint64)
    scan = _pack_bits(values, code_len[ssss] + extra_len)

    sof = struct.pack(">HHBHHBBBB", 0xFFC3, 11, precision, rows, cols, 1, 1, 0x11, 0)
    dht_body = bytes([0x00]) + bytes(bits) + bytes(huffval)
    dht = struct.pack(">HH", 0xFFC4, 2 + len(dht_body)) + dht_body
    sos = struct.pack(">HHBBBBBB", 0xFFDA, 8, 1, 1, 0x00, 1, 0, 0)
    return b"\xff\xd8" + sof + dht + sos + scan + b"\xff\xd9"
