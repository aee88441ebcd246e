"""Compact, self-describing encoding of a teacher's per-position top-k (ids, log-probs).

One call encodes one cache row of P positions into two blobs (one per Parquet column):

ids blob       Each position's k ids are sorted ascending and delta-coded: the first id
               raw, then (gap - 1) >= 0, since ids within a position are distinct. The
               first ids and the gaps each go into a uint32 and are stored as byte planes
               (all low bytes of the stream, then all second bytes, ...), keeping only
               as many planes as the row's largest value needs. zstd then entropy-codes
               each plane: the high planes are nearly constant and shrink to almost
               nothing, the low plane carries the information.
logprobs blob  -logprob quantized to an unsigned code with `logprob_step`, at most 16
               bits, stored as byte planes and zstd-compressed the same way
               (logprob_quantizer = "fixed", the default). Or, "sqrt-prob": sqrt(p)
               on a uniform grid of `sqrt_prob_levels` steps, a precision that follows
               what the loss needs (below).

Why this layout: measured on teacher-like data (Zipf-prior logits + noise, full-vocab
log-softmax, P=2048, V=151936, k=64; zstd level 3; bytes per position):
  ids       per-row bit width 97.6, per-position bit width 96.2, byte planes 79.9,
            plain uint16/uint32 109.7, raw int32 127.8.
  logprobs  uint16 112.5 as byte planes, 120.4 as plain uint16 or row-width bit-packed,
            118.3 re-sorted by rank and delta-coded plus a uint8 rank permutation.
Byte planes + zstd is the smallest and the fastest to decode (one zstd call, then a
couple of contiguous numpy passes). On uniformly random top-k sets (the worst case) it
is within 2-9% of the entropy bound log2(C(V, k)). zstd here, not only in Parquet: same
size on the ids, up to 8% smaller on the logprobs at small k (per-plane blocks, below),
and the blob size no longer depends on the writer's settings.
Parquet zstd on top of these blobs gains nothing (same file size as with none).
Logprobs in id order are near-incompressible below ~14 bits at step 2**-10; they, not
the ids, are the larger stream (step 2**-8 saves ~2 bits per value).

Why sqrt(p): a log-probability error d on a token of probability p costs the student
about 1/2 p d^2 nats of KL (pipeline/cache/fidelity.py). A uniform step in u = sqrt(p)
gives d ~ 2 du / u, so p d^2 ~ 4 du^2 whatever p: every token costs the same, likely ones
get fine steps and unlikely ones coarse steps, and most codes are small (most of the k
tokens are unlikely), which zstd packs tightly. Code 0 (p below (0.5/L)^2) decodes as
p = (0.25/L)^2. There is no bound on the absolute log-prob error of unlikely tokens: the
measured KL distortion (recorded in the manifest) is what states its fidelity.

Ragged supports (ragged=True: cache.top_p, or a sampled support). A position keeps
n <= k entries; the input marks the unused slots with id -1 (any log-prob there is
ignored). The ids blob ("R") stores each position's n - 1 as a byte plane before the
first ids and gaps, so no padding is stored; the logprobs blob holds the sum(n) codes
(layout byte 1). Decode pads back to [P, k] with id -1 and log-prob -inf after each
position's entries, the contract of both kernels (kernels/sparse_kl.py).

"counts" (sampled supports, ragged only): each entry's number of draws out of k
(cache.k draws per position from the teacher's full distribution), stored exactly as a
code 1..k and decoded as log(count / k): the target of the Sparse Logit Sampling
estimator (pipeline/teachers/support.py).

Decoded positions are ordered by id ascending, NOT by rank: consumers that need the
teacher's ranking must sort by logprob themselves.

Blob = fixed header (format version, blob kind, plane widths, P, k, and the params needed
to decode: vocab size or step/floor, so a blob decoded with the wrong codec is refused)
followed by one zstd frame with its content checksum. Every length is checked on
decode; a corrupt or truncated blob raises ValueError rather than returning garbage.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import zstandard

FORMAT_VERSION = 1
_IDS_TAG = ord("I")
_LP_TAG = ord("L")
_LP_SQRT_TAG = ord("Q")  # a logprobs blob of the sqrt-prob quantizer
_RAGGED_IDS_TAG = ord("R")  # an ids blob of a ragged support (per-position entry counts)
_COUNTS_TAG = ord("C")  # a logprobs blob of draw counts (sampled supports)
LOGPROB_QUANTIZERS = ("fixed", "sqrt-prob", "counts")
# version, tag, first-id planes, gap planes, P, k, vocab_size, payload length
_IDS_HEADER = struct.Struct("<BBBBIIII")
# version, tag, count planes, first-id planes, gap planes, pad, P, k, vocab_size, entries, payload length
_RAGGED_IDS_HEADER = struct.Struct("<BBBBBBIIIII")
# version, tag, code planes, layout (0 dense, 1 ragged), P, k, step, floor, payload length
_LP_HEADER = struct.Struct("<BBBBIIddI")
_CODE_MAX = 0xFFFF  # logprob codes are at most uint16
# The floor stage one writes with: inside the uint16 code range at the default step
# (65535 * 2**-10 = 63.999).
DEFAULT_LOGPROB_FLOOR = -63.0


def _planes_needed(max_value: int) -> int:
    """Bytes (0..4) needed to hold values up to max_value; 0 when every value is 0."""
    return (int(max_value).bit_length() + 7) // 8


def _to_planes(values: np.ndarray, nplanes: int) -> np.ndarray:
    """uint32 values -> [nplanes, n] uint8: row 0 holds all low bytes, row 1 the next, ..."""
    values = values.reshape(-1).astype(np.uint32, copy=False)
    planes = np.empty((nplanes, values.size), np.uint8)
    for i in range(nplanes):
        planes[i] = (values >> np.uint32(8 * i)).astype(np.uint8)  # astype keeps the low byte
    return planes


def _from_planes(buf: np.ndarray, count: int, nplanes: int) -> np.ndarray:
    """Inverse of _to_planes: uint8 buffer of nplanes*count bytes -> uint32 [count]."""
    if nplanes == 0:
        return np.zeros(count, np.uint32)
    planes = buf.reshape(nplanes, count)
    # Horner from the top plane: contiguous passes, ~8x faster than a strided byte scatter.
    out = planes[-1].astype(np.uint32)
    for i in range(nplanes - 2, -1, -1):
        out <<= np.uint32(8)
        out |= planes[i]
    return out


def _compress(planes: list[np.ndarray], level: int) -> bytes:
    """All planes into one zstd frame, each plane in its own block(s).

    A zstd block has one Huffman table for its literals; a low plane (near-uniform) and a
    high plane (near-constant) sharing a 128 KiB block would get one compromise table.
    Ending the block after each plane saves ~7% on the logprobs at k=16 (P=2048).
    write_checksum: zstd verifies the decompressed bytes, so payload corruption is
    detected instead of decoding to plausible-looking wrong ids.
    """
    size = sum(p.size for p in planes)
    z = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(size=size)
    chunks = []
    for plane in planes:
        for row in plane:
            chunks.append(z.compress(row))
            chunks.append(z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    chunks.append(z.flush())
    return b"".join(chunks)


def _decompress(payload, expected: int, what: str) -> np.ndarray:
    try:
        frame = zstandard.get_frame_parameters(payload)
        # Insist on what encode writes: the exact size (so a corrupt size cannot make us
        # allocate wildly) and a checksum (so its flag cannot be flipped off silently).
        if frame.content_size != expected or not frame.has_checksum:
            raise ValueError(
                f"{what}: zstd frame says {frame.content_size} bytes, checksum={frame.has_checksum}; "
                f"header implies {expected} bytes with a checksum"
            )
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as e:
        raise ValueError(f"{what}: corrupt zstd payload ({e})") from None
    if len(raw) != expected:
        raise ValueError(f"{what}: payload decompresses to {len(raw)} bytes, header implies {expected}")
    return np.frombuffer(raw, np.uint8)


def _split(blob, header: struct.Struct, tag: int, what: str) -> tuple[tuple, memoryview]:
    """Parse and sanity-check a blob's header; return its fields and the exact payload."""
    blob = memoryview(blob).cast("B")  # bytes, bytearray or a pyarrow buffer; no copy
    if len(blob) < header.size:
        raise ValueError(f"{what}: truncated, {len(blob)} bytes is shorter than the {header.size}-byte header")
    fields = header.unpack_from(blob)
    if fields[0] != FORMAT_VERSION:
        raise ValueError(f"{what}: unsupported format version {fields[0]} (expected {FORMAT_VERSION})")
    if fields[1] != tag:
        raise ValueError(f"{what}: wrong blob kind {fields[1]!r} (expected {tag!r}; ids and logprobs blobs swapped, "
                         f"or decoded with another logprob quantizer than it was written with?)")
    payload_len = fields[-1]
    if len(blob) != header.size + payload_len:
        raise ValueError(
            f"{what}: length {len(blob)} != header {header.size} + payload {payload_len} (truncated or trailing bytes)"
        )
    return fields, blob[header.size:]  # a view: zstd reads it in place


@dataclass(frozen=True)
class TopKCodec:
    """Encodes/decodes one row's top-k ids and log-probs; see the module docstring.

    Log-probs are stored as code = round(-logprob / logprob_step), clipped to
    [0, min(round(-logprob_floor / logprob_step), 65535)] and decoded as -code * step.
    So values >= min_logprob come back within max_abs_error_bound(); values below it
    (including -inf) come back as min_logprob. With the defaults the uint16 code range,
    not the floor, is the limit: min_logprob = -65535 * 2**-10 = -63.9990234375.
    """

    vocab_size: int
    k: int
    logprob_step: float = 2**-10  # fixed-point step for -logprob; max abs error = step/2 in range
    logprob_floor: float = -64.0  # log-probs below are clamped (see min_logprob)
    zstd_level: int = 3  # level 9 saves ~1-3% more at 2-12x the encode time
    logprob_quantizer: str = "fixed"  # "fixed": -logprob / step; "sqrt-prob": sqrt(p) * levels
    sqrt_prob_levels: int = 255  # sqrt-prob: codes 0..levels (255: one byte per value)
    ragged: bool = False  # positions keep 1..k entries, id -1 marks an unused slot

    @classmethod
    def from_params(cls, c: dict) -> "TopKCodec":
        """The codec of a plan's or manifest's `codec` dict (older ones lack the newer keys:
        fixed-step quantizer, full top-k support)."""
        support = c.get("support", "topk")
        return cls(vocab_size=c["vocab_size"], k=c["k"], logprob_step=c["logprob_step"], logprob_floor=c["logprob_floor"],
                   logprob_quantizer="counts" if support == "sampled" else c.get("logprob_quantizer", "fixed"),
                   sqrt_prob_levels=c.get("sqrt_prob_levels", 255),
                   ragged=support == "sampled" or bool(c.get("top_p", 0.0)) or bool(c.get("fold_padded", False)))

    def __post_init__(self):
        if self.logprob_quantizer not in LOGPROB_QUANTIZERS:
            raise ValueError(f"logprob_quantizer must be one of {LOGPROB_QUANTIZERS}, got {self.logprob_quantizer!r}")
        if self._counts and not self.ragged:
            raise ValueError("logprob_quantizer 'counts' (a sampled support) needs ragged=True")
        if self._counts and self.k > _CODE_MAX:
            raise ValueError(f"logprob_quantizer 'counts' stores up to k={self.k} draws in 16 bits; k must be <= {_CODE_MAX}")
        if not 1 <= self.sqrt_prob_levels <= _CODE_MAX:
            raise ValueError(f"sqrt_prob_levels must be in [1, {_CODE_MAX}], got {self.sqrt_prob_levels}")
        if not 1 <= self.vocab_size <= 2**31 - 1:
            raise ValueError(f"vocab_size must be in [1, 2**31 - 1] (ids decode to int32), got {self.vocab_size}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be in [1, vocab_size={self.vocab_size}], got {self.k}")
        if not (math.isfinite(self.logprob_step) and self.logprob_step > 0):
            raise ValueError(f"logprob_step must be finite and > 0, got {self.logprob_step}")
        if not (math.isfinite(self.logprob_floor) and self.logprob_floor < 0):
            raise ValueError(f"logprob_floor must be finite and < 0, got {self.logprob_floor}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be in [1, 22], got {self.zstd_level}")
        if self._code_max < 1:
            raise ValueError(f"logprob_floor {self.logprob_floor} is within half a step of 0; no range left")

    @property
    def _sqrt(self) -> bool:
        return self.logprob_quantizer == "sqrt-prob"

    @property
    def _counts(self) -> bool:
        return self.logprob_quantizer == "counts"

    @property
    def _code_max(self) -> int:
        if self._counts:
            return self.k
        if self._sqrt:
            return self.sqrt_prob_levels
        return min(round(-self.logprob_floor / self.logprob_step), _CODE_MAX)

    @property
    def _step_is_pow2(self) -> bool:
        # Then -code * step (code < 2**16) has <= 16 significant bits: exact in float32.
        return math.frexp(self.logprob_step)[0] == 0.5 and 2**-100 < self.logprob_step < 2**100

    @property
    def min_logprob(self) -> float:
        """Lowest decodable log-prob; everything below (and -inf) decodes to it."""
        if self._counts:
            return float(np.float32(-math.log(self.k)))
        if self._sqrt:
            return float(np.float32(2 * math.log(0.25 / self.sqrt_prob_levels)))
        return float(np.float32(-self._code_max * self.logprob_step))

    def clamped(self, logprobs: np.ndarray) -> np.ndarray:
        """Which log-probs the quantizer cannot represent (they decode as min_logprob)."""
        if self._counts:  # a count below one draw
            return np.rint(np.exp(np.asarray(logprobs, np.float64)) * self.k) < 1
        if self._sqrt:
            with np.errstate(over="ignore"):
                return np.rint(np.exp(np.asarray(logprobs, np.float64) / 2) * self.sqrt_prob_levels) == 0
        return np.rint(-np.asarray(logprobs, np.float64) / self.logprob_step) > self._code_max

    def max_abs_error_bound(self) -> float:
        """Max |decoded - input| for finite inputs >= min_logprob (sqrt-prob: none, +inf;
        counts: exact for inputs log(c / k), up to float32 rounding)."""
        if self._counts:
            return float(np.spacing(np.float32(math.log(max(self.k, 2)))))
        if self._sqrt:
            return math.inf
        bound = self.logprob_step / 2
        # Any step but a power of two adds the float32 rounding of the decoded value.
        if not self._step_is_pow2:
            bound += float(np.spacing(np.float32(-self.min_logprob))) / 2
        return bound

    def describe(self) -> dict:
        return {
            "codec": "ddk.topk",
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "k": self.k,
            "ids_layout": "sorted ids, first id + (gap-1), uint32 byte planes, zstd",
            "logprobs_layout": ("draw counts out of k, byte planes, zstd" if self._counts else
                                "round(sqrt(p) * levels), byte planes, zstd" if self._sqrt
                                else "round(-logprob/step) <= uint16, byte planes, zstd"),
            "support_layout": ("ragged: 1..k entries per position, n - 1 as a byte plane; decoded with id -1 / "
                               "log-prob -inf padding" if self.ragged else "k entries per position"),
            "logprob_quantizer": self.logprob_quantizer,
            "sqrt_prob_levels": self.sqrt_prob_levels,
            "order_within_position": "id ascending (not rank)",
            "logprob_step": self.logprob_step,
            "logprob_floor": self.logprob_floor,
            "min_logprob": self.min_logprob,
            "clamping": "log-probs below min_logprob, including -inf, decode as min_logprob",
            "max_abs_logprob_error": self.max_abs_error_bound(),
            "zstd_level": self.zstd_level,
        }

    # ---------------------------------------------------------------- encode
    def _validate(self, ids, logprobs) -> tuple[np.ndarray, np.ndarray]:
        """Check encode's inputs; returns (ids int64, logprobs float64), original order.
        Ragged: slots with id -1 are unused (their log-prob is ignored, returned as -inf)."""
        ids = np.asarray(ids)
        logprobs = np.asarray(logprobs)
        if ids.ndim != 2 or ids.shape[1] != self.k:
            raise ValueError(f"ids must have shape [positions, k={self.k}], got {ids.shape}")
        if ids.shape[0] == 0:
            raise ValueError("ids has no positions")
        if logprobs.shape != ids.shape:
            raise ValueError(f"logprobs shape {logprobs.shape} != ids shape {ids.shape}")
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
        if not np.issubdtype(logprobs.dtype, np.floating):
            raise ValueError(f"logprobs must be a float array, got dtype {logprobs.dtype}")
        used = ids != -1 if self.ragged else None
        lo, hi = (ids[used].min(initial=0), ids.max()) if self.ragged else (ids.min(), ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = int(lo) if lo < 0 else int(hi)
            raise ValueError(f"id {bad} out of range [0, vocab_size={self.vocab_size})"
                             + ("" if self.ragged else " (a ragged support's -1 padding needs ragged=True)"))
        if self.ragged:
            if not used.any(axis=1).all():
                raise ValueError(f"position {int(np.argmin(used.any(axis=1)))} has no entries (every id is -1)")
            logprobs = np.where(used, logprobs, -np.inf)
        logprobs = logprobs.astype(np.float64, copy=False)
        if np.isnan(logprobs).any():
            raise ValueError(f"NaN logprob at position {int(np.argwhere(np.isnan(logprobs))[0, 0])}")
        # +step/2 of slack: rounding in the teacher's log-softmax can leave the top
        # token a hair above 0; such values round to code 0 anyway (sqrt-prob: to levels).
        slack = self.logprob_step / 2 if self.logprob_quantizer == "fixed" else 1e-4
        if (logprobs > slack).any():
            p = int(np.argwhere(logprobs > slack)[0, 0])
            raise ValueError(f"logprobs must be <= 0, got {logprobs[p].max()} at position {p}")
        return ids.astype(np.int64, copy=False), logprobs

    def _codes(self, logprobs: np.ndarray) -> np.ndarray:
        if self._counts:  # log(c / k) -> c; unused slots (-inf) are dropped by the caller
            return np.clip(np.rint(np.exp(logprobs) * self.k), 1, self.k).astype(np.int64)
        if self._sqrt:  # -inf -> sqrt(p) = 0 -> code 0
            return np.clip(np.rint(np.exp(logprobs / 2) * self.sqrt_prob_levels), 0, self.sqrt_prob_levels).astype(np.int64)
        # -inf -> +inf -> clipped to the max code, like any other value below the floor.
        q = np.rint(-logprobs / self.logprob_step)
        return np.clip(q, 0, self._code_max).astype(np.int64)

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[bytes, bytes]:
        """ids [P, k] int, logprobs [P, k] float -> (ids_blob, logprobs_blob)."""
        ids, logprobs = self._validate(ids, logprobs)
        positions = ids.shape[0]
        used = ids >= 0
        # Sort by id carrying the code along: one sort of (id << 16 | code) keys is
        # ~2x faster than argsort + two gathers. Unused slots sort last.
        keys = (ids << 16) | self._codes(logprobs)
        if self.ragged:
            keys = np.where(used, keys, np.int64(1) << 62)
        keys = np.sort(keys, axis=1)
        ids, codes = keys >> 16, keys & _CODE_MAX
        entries = used.sum(axis=1)
        kept = np.arange(self.k) < entries[:, None] if self.ragged else None

        gaps = np.diff(ids, axis=1)
        if self.ragged:
            gaps = gaps[kept[:, 1:]]
        if (gaps == 0).any():
            dup = np.diff(ids, axis=1) == 0
            if self.ragged:
                dup &= kept[:, 1:]
            p = int(np.argwhere(dup)[0, 0])
            raise ValueError(f"duplicate id {int(ids[p][np.argmax(dup[p])])} within position {p}")
        gaps -= 1
        first = ids[:, 0]
        first_planes = _planes_needed(first.max())
        gap_planes = _planes_needed(gaps.max()) if gaps.size else 0
        if self.ragged:
            n_minus_1 = entries - 1
            count_planes = _planes_needed(n_minus_1.max())
            payload = _compress([_to_planes(n_minus_1, count_planes), _to_planes(first, first_planes),
                                 _to_planes(gaps, gap_planes)], self.zstd_level)
            ids_blob = _RAGGED_IDS_HEADER.pack(
                FORMAT_VERSION, _RAGGED_IDS_TAG, count_planes, first_planes, gap_planes, 0, positions, self.k,
                self.vocab_size, int(entries.sum()), len(payload)) + payload
            codes = codes[kept]
        else:
            payload = _compress([_to_planes(first, first_planes), _to_planes(gaps, gap_planes)], self.zstd_level)
            ids_blob = _IDS_HEADER.pack(
                FORMAT_VERSION, _IDS_TAG, first_planes, gap_planes, positions, self.k, self.vocab_size, len(payload)
            ) + payload

        code_planes = _planes_needed(codes.max())
        payload = _compress([_to_planes(codes, code_planes)], self.zstd_level)
        lp_blob = _LP_HEADER.pack(
            FORMAT_VERSION, *self._lp_header_fields(code_planes, positions), len(payload),
        ) + payload
        return ids_blob, lp_blob

    def _lp_header_fields(self, code_planes: int, positions: int) -> tuple:
        """(tag, planes, layout, P, k, step, floor) of a logprobs blob; sqrt-prob stores its
        levels where the fixed quantizer stores its step, counts the draws; both a floor of 0."""
        layout = int(self.ragged)
        if self._counts:
            return _COUNTS_TAG, code_planes, layout, positions, self.k, float(self.k), 0.0
        if self._sqrt:
            return _LP_SQRT_TAG, code_planes, layout, positions, self.k, float(self.sqrt_prob_levels), 0.0
        return _LP_TAG, code_planes, layout, positions, self.k, self.logprob_step, self.logprob_floor

    # ---------------------------------------------------------------- decode
    def _check_shape(self, what: str, blob_positions: int, blob_k: int, positions: int):
        if positions < 1:
            raise ValueError(f"positions must be >= 1, got {positions}")
        if blob_k != self.k:
            raise ValueError(f"{what}: blob has k={blob_k}, codec has k={self.k}")
        if blob_positions != positions:
            raise ValueError(f"{what}: blob has {blob_positions} positions, caller expects {positions}")

    def decode(self, ids_blob: bytes, logprobs_blob: bytes, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """-> ids [P, k] int32 and logprobs [P, k] float32, each position ordered by id ascending
        (ragged: a position's entries first, then id -1 / log-prob -inf padding)."""
        if self.ragged:
            ids, kept = self._decode_ragged_ids(ids_blob, positions)
            entries = int(kept.sum())
        else:
            ids, kept, entries = self._decode_dense_ids(ids_blob, positions), None, positions * self.k

        what = "logprobs blob"
        expected = self._lp_header_fields(0, positions)
        fields, payload = _split(logprobs_blob, _LP_HEADER, expected[0], what)
        _, _, code_planes, layout, blob_p, blob_k, step, floor, _ = fields
        self._check_shape(what, blob_p, blob_k, positions)
        if layout != expected[2]:
            raise ValueError(f"{what}: layout byte is {layout}, expected {expected[2]} "
                             f"({'ragged' if self.ragged else 'dense'} support)")
        if (step, floor) != expected[5:]:
            raise ValueError(
                f"{what}: encoded with step={step}, floor={floor}; codec has {expected[5]}, {expected[6]}"
            )
        if code_planes > 2:
            raise ValueError(f"{what}: bad plane count {code_planes} (max 2)")
        raw = _decompress(payload, entries * code_planes, what)
        codes = _from_planes(raw, entries, code_planes)
        if codes.max(initial=0) > self._code_max:
            raise ValueError(f"{what}: code {int(codes.max())} exceeds the max code {self._code_max}")
        values = self._values(codes)
        if kept is None:
            return ids, values.reshape(positions, self.k)
        logprobs = np.full((positions, self.k), -np.inf, np.float32)
        logprobs[kept] = values
        return ids, logprobs

    def _values(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> float32 log-probs."""
        if self._counts:
            if codes.min(initial=1) < 1:
                raise ValueError("logprobs blob: a draw count of 0 (sampled entries are drawn at least once)")
            return (np.log(codes.astype(np.float64)) - math.log(self.k)).astype(np.float32)
        if self._sqrt:
            u = np.maximum(codes.astype(np.float64), 0.25) / self.sqrt_prob_levels
            return (2 * np.log(u)).astype(np.float32)
        if self._step_is_pow2:  # code * step is exact in float32: skip the float64 detour
            logprobs = codes.astype(np.float32)
            logprobs *= np.float32(-self.logprob_step)
            return logprobs
        return (codes * -self.logprob_step).astype(np.float32)

    def _id_dtype(self):
        # Each step of the running sum adds gap+1 <= vocab_size, so it stays below
        # k * vocab_size: int32 cannot overflow unless that product reaches 2**31.
        return np.int32 if self.k * self.vocab_size < 2**31 else np.int64

    def _decode_dense_ids(self, ids_blob, positions: int) -> np.ndarray:
        what = "ids blob"
        fields, payload = _split(ids_blob, _IDS_HEADER, _IDS_TAG, what)
        _, _, first_planes, gap_planes, blob_p, blob_k, vocab, _ = fields
        self._check_shape(what, blob_p, blob_k, positions)
        self._check_vocab(what, vocab, first_planes, gap_planes)
        n_gaps = positions * (self.k - 1)
        raw = _decompress(payload, positions * first_planes + n_gaps * gap_planes, what)
        first = _from_planes(raw[: positions * first_planes], positions, first_planes)
        gaps = _from_planes(raw[positions * first_planes:], n_gaps, gap_planes)
        if max(first.max(), gaps.max(initial=0)) >= self.vocab_size:
            raise ValueError(f"{what}: first id or gap >= vocab_size={self.vocab_size}")
        ids = np.empty((positions, self.k), self._id_dtype())
        ids[:, 0] = first
        ids[:, 1:] = gaps.reshape(positions, self.k - 1)
        ids[:, 1:] += 1
        np.cumsum(ids, axis=1, out=ids)
        if ids[:, -1].max() >= self.vocab_size:  # rows are increasing, so the last id is the max
            raise ValueError(f"{what}: decodes to id {int(ids[:, -1].max())} >= vocab_size={self.vocab_size}")
        return ids.astype(np.int32, copy=False)

    def _decode_ragged_ids(self, ids_blob, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """-> ids [P, k] (-1 after each position's entries) and the [P, k] mask of entries."""
        what = "ids blob"
        fields, payload = _split(ids_blob, _RAGGED_IDS_HEADER, _RAGGED_IDS_TAG, what)
        _, _, count_planes, first_planes, gap_planes, pad, blob_p, blob_k, vocab, entries, _ = fields
        self._check_shape(what, blob_p, blob_k, positions)
        self._check_vocab(what, vocab, first_planes, gap_planes)
        if count_planes > 4 or pad != 0:
            raise ValueError(f"{what}: bad header (count planes {count_planes}, reserved byte {pad})")
        if not positions <= entries <= positions * self.k:
            raise ValueError(f"{what}: {entries} entries for {positions} positions of at most k={self.k}")
        n_gaps = entries - positions
        raw = _decompress(payload, positions * (count_planes + first_planes) + n_gaps * gap_planes, what)
        c0, c1 = positions * count_planes, positions * (count_planes + first_planes)
        n = _from_planes(raw[:c0], positions, count_planes).astype(np.int64) + 1
        if n.max() > self.k or int(n.sum()) != entries:
            raise ValueError(f"{what}: entry counts (max {int(n.max())}, sum {int(n.sum())}) disagree with k={self.k}, "
                             f"{entries} entries")
        first = _from_planes(raw[c0:c1], positions, first_planes)
        gaps = _from_planes(raw[c1:], n_gaps, gap_planes)
        if max(first.max(), gaps.max(initial=0)) >= self.vocab_size:
            raise ValueError(f"{what}: first id or gap >= vocab_size={self.vocab_size}")
        kept = np.arange(self.k) < n[:, None]
        ids = np.zeros((positions, self.k), self._id_dtype())
        ids[:, 0] = first
        inner = kept.copy()
        inner[:, 0] = False
        ids[inner] = gaps
        ids[inner] += 1
        np.cumsum(ids, axis=1, out=ids)  # the padding repeats its position's last id, then is overwritten
        if ids[:, -1].max() >= self.vocab_size:  # the last column holds each position's largest id
            raise ValueError(f"{what}: decodes to id {int(ids[:, -1].max())} >= vocab_size={self.vocab_size}")
        ids[~kept] = -1
        return ids.astype(np.int32, copy=False), kept

    def _check_vocab(self, what: str, vocab: int, first_planes: int, gap_planes: int):
        if vocab != self.vocab_size:
            raise ValueError(f"{what}: encoded for vocab_size={vocab}, codec has {self.vocab_size}")
        if first_planes > 4 or gap_planes > 4:
            raise ValueError(f"{what}: bad plane counts {first_planes}/{gap_planes} (max 4)")


def measure_fidelity(codec: TopKCodec, ids: np.ndarray, logprobs: np.ndarray,
                     blobs: tuple[bytes, bytes] | None = None, tail_logmass: np.ndarray | None = None) -> dict:
    """Round-trip (ids, logprobs) through `codec` and report what actually came back.

    `blobs`: the (ids_blob, logprobs_blob) already encoded from these inputs, so a writer
    checks what it stores without encoding twice. `tail_logmass` ([P]): also report the
    summed KL distortion over the positions (fidelity.kl_distortion, the one definition).

    max_abs_error is over values at or above codec.min_logprob (the ones the bound
    covers); clamped counts the values below it, -inf included, which decode as
    min_logprob. max_abs_error_finite also includes finite clamped values.
    """
    ref_ids, ref_lp = codec._validate(ids, logprobs)
    used = ref_ids >= 0
    # decode returns id order (ragged: each position's entries first, then the padding)
    order = np.argsort(np.where(used, ref_ids, np.iinfo(np.int64).max), axis=1, kind="stable")
    ref_ids, ref_lp, used = (np.take_along_axis(a, order, 1) for a in (ref_ids, ref_lp, used))
    ids_blob, lp_blob = blobs if blobs is not None else codec.encode(ids, logprobs)
    out_ids, out_lp = codec.decode(ids_blob, lp_blob, ref_ids.shape[0])

    clamped = codec.clamped(ref_lp) & used  # i.e. the clip changed the code
    with np.errstate(invalid="ignore"):  # -inf - -inf at unused slots
        err = np.where(used, np.abs(out_lp.astype(np.float64) - ref_lp), 0.0)
    finite = np.isfinite(ref_lp) & used
    in_range = err[~clamped & used]
    extra = {}
    if tail_logmass is not None:
        from .fidelity import kl_distortion

        extra["kl_distortion_sum"] = float(kl_distortion(ref_lp, tail_logmass, out_lp).sum())
    return {
        **extra,
        "ids_exact": bool(np.array_equal(out_ids, ref_ids)),
        "values": int(used.sum()),
        "clamped": int(clamped.sum()),
        "neg_inf": int((~finite & used).sum()),
        "max_abs_error": float(in_range.max()) if in_range.size else 0.0,
        "max_abs_error_finite": float(err[finite].max()) if finite.any() else 0.0,
        "bound": codec.max_abs_error_bound(),
        "within_bound": bool(in_range.size == 0 or in_range.max() <= codec.max_abs_error_bound()),
        "ids_bytes": len(ids_blob),
        "logprobs_bytes": len(lp_blob),
        "bytes_per_position": (len(ids_blob) + len(lp_blob)) / ref_ids.shape[0],
    }
