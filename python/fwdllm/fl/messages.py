"""The FwdLLM protocol's messages: small typed records with an explicit, versioned byte encoding.

Wire format (little-endian), every message:

    magic  b"FWDL" (4 bytes) | format version u8 | message type u8 | body | crc32 u32 of all before it

Bodies (``[T]`` = u32 count followed by that many T):

    RoundStart      1  round u32 | round_seed u64 | model_version u32 | request u32 | lr f32 | Ks [u32]
    Update          2  round u32 | model_version u32 | seeds [i64] | groups [u8] | coefficients [f32]
    ClientUpload    3  round u32 | client u32 | model_version u32 | seeds [i64] | groups [u8] | jvps [f32] |
                       num_examples u32 | loss f32

``groups[i]`` is the perturbation group of seed i (its direction is perturb(seed) restricted to that
group's parameters; see ``fwdllm.TrainableLayout.subset``), 0 when there is one group.
    ParamsDownload  4  model_version u32 | params [f32] | optimizer_state [f32]
    DenseUpload     5  round u32 | client u32 | model_version u32 | delta [f32] | num_examples u32 |
                       loss f32        (the FedAvg-backprop baseline: a dense parameter delta)

``decode`` rejects anything malformed with :class:`MessageError` naming the problem (bad magic,
unknown version or type, truncated or trailing bytes, checksum mismatch, count mismatches).
``validate`` checks the semantic rules a receiver needs (finite values, matching lengths, sizes).
An ``Update`` carries the server's whole step: the gradient estimate
g = sum_j coefficients[j] v_{groups[j]}(seeds[j]), which the
client feeds to the same deterministic optimizer as the server (``fwdllm.fl.optim``), so it catches
up on a round with a few bytes per perturbation instead of the parameters. ``model_version`` of an
Update is the version it applies to (it produces model_version + 1).
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"FWDL"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sBB")
_CRC = struct.Struct("<I")
MAX_ITEMS = 1 << 26  # a sanity bound on any array length (64M items)


class MessageError(ValueError):
    """A message could not be decoded or failed validation."""


class _Reader:
    def __init__(self, buf: bytes, start: int, end: int):
        self.buf, self.pos, self.end = buf, start, end

    def take(self, fmt: str):
        s = struct.Struct("<" + fmt)
        if self.pos + s.size > self.end:
            raise MessageError(f"truncated message: needed {s.size} more bytes at offset {self.pos}")
        v = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v[0] if len(v) == 1 else v

    def array(self, dtype: str, what: str) -> np.ndarray:
        n = self.take("I")
        if n > MAX_ITEMS:
            raise MessageError(f"{what}: {n} items exceeds the limit of {MAX_ITEMS}")
        dt = np.dtype(dtype).newbyteorder("<")
        nbytes = n * dt.itemsize
        if self.pos + nbytes > self.end:
            raise MessageError(f"truncated message: {what} declares {n} items but the message is too short")
        a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).astype(dt.newbyteorder("="))
        self.pos += nbytes
        return a


def _arr(a, dtype) -> bytes:
    a = np.ascontiguousarray(np.asarray(a, dtype=np.dtype(dtype).newbyteorder("<")))
    if a.ndim != 1:
        raise MessageError(f"arrays in messages are 1-D, got shape {a.shape}")
    return struct.pack("<I", a.size) + a.tobytes()


def _u32(name, v):
    if not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**32:
        raise MessageError(f"{name} must be an integer in [0, 2**32), got {v!r}")
    return int(v)


def _finite(name, a):
    a = np.asarray(a)
    if a.size and not np.isfinite(a).all():
        raise MessageError(f"{name} contains NaN or Inf")


@dataclass
class RoundStart:
    """Server -> client: request ``request`` of round t. The client computes, for each perturbation
    group g, perturbations j = request*Ks[g] .. (request+1)*Ks[g]-1, perturbation j of group g of
    client c being derive_seed(round_seed, c, g, j) (request > 0: the server's pacing asks for more)."""
    TYPE = 1
    round: int
    round_seed: int
    model_version: int
    Ks: np.ndarray
    request: int = 0
    lr: float = 0.0

    def body(self) -> bytes:
        return (struct.pack("<IQIIf", _u32("round", self.round), self.round_seed % 2**64,
                            _u32("model_version", self.model_version), _u32("request", self.request), self.lr)
                + _arr(self.Ks, np.uint32))

    @classmethod
    def parse(cls, r: _Reader):
        t, s, mv, req, lr = r.take("IQIIf")
        s = s - 2**64 if s >= 2**63 else s
        return cls(t, s, mv, r.array("u4", "Ks"), req, lr)

    def validate(self):
        if len(self.Ks) == 0 or len(self.Ks) > 255 or int(np.min(self.Ks)) < 0 or int(np.sum(self.Ks)) < 1:
            raise MessageError(f"RoundStart: Ks must list 1..255 group sizes with at least one perturbation, got {list(self.Ks)}")
        if not math.isfinite(self.lr):
            raise MessageError("RoundStart: lr is NaN or Inf")


@dataclass
class Update:
    """Server -> clients: the step applied at ``round``: theta += sum_j coefficients[j] v(seeds[j])."""
    TYPE = 2
    round: int
    model_version: int
    seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    coefficients: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    groups: np.ndarray | None = None

    def __post_init__(self):
        if self.groups is None:
            self.groups = np.zeros(len(self.seeds), np.uint8)

    def body(self) -> bytes:
        return (struct.pack("<II", _u32("round", self.round), _u32("model_version", self.model_version))
                + _arr(self.seeds, np.int64) + _arr(self.groups, np.uint8) + _arr(self.coefficients, np.float32))

    @classmethod
    def parse(cls, r: _Reader):
        t, mv = r.take("II")
        seeds, groups = r.array("i8", "seeds"), r.array("u1", "groups")
        return cls(t, mv, seeds, r.array("f4", "coefficients"), groups)

    def validate(self):
        if len(self.seeds) != len(self.coefficients) or len(self.groups) != len(self.seeds):
            raise MessageError(f"Update: {len(self.seeds)} seeds, {len(self.groups)} groups, "
                               f"{len(self.coefficients)} coefficients")
        _finite("Update.coefficients", self.coefficients)


@dataclass
class ClientUpload:
    """Client -> server: the directional derivatives of its perturbations, a few bytes each."""
    TYPE = 3
    round: int
    client: int
    model_version: int
    seeds: np.ndarray
    jvps: np.ndarray
    num_examples: int
    loss: float
    groups: np.ndarray | None = None

    def __post_init__(self):
        if self.groups is None:
            self.groups = np.zeros(len(self.seeds), np.uint8)

    def body(self) -> bytes:
        return (struct.pack("<III", _u32("round", self.round), _u32("client", self.client),
                            _u32("model_version", self.model_version))
                + _arr(self.seeds, np.int64) + _arr(self.groups, np.uint8) + _arr(self.jvps, np.float32)
                + struct.pack("<If", _u32("num_examples", self.num_examples), self.loss))

    @classmethod
    def parse(cls, r: _Reader):
        t, c, mv = r.take("III")
        seeds = r.array("i8", "seeds")
        groups = r.array("u1", "groups")
        jvps = r.array("f4", "jvps")
        n, loss = r.take("If")
        return cls(t, c, mv, seeds, jvps, n, loss, groups)

    def validate(self, expect_K: int | None = None):
        if len(self.seeds) != len(self.jvps) or len(self.groups) != len(self.seeds):
            raise MessageError(f"ClientUpload: {len(self.seeds)} seeds, {len(self.groups)} groups, "
                               f"{len(self.jvps)} jvps")
        if len(self.seeds) == 0:
            raise MessageError("ClientUpload: no perturbation in the upload")
        if expect_K is not None and len(self.seeds) != expect_K:
            raise MessageError(f"ClientUpload: {len(self.seeds)} seeds, expected K = {expect_K}")
        if self.num_examples < 1:
            raise MessageError("ClientUpload: num_examples must be >= 1")
        _finite("ClientUpload.jvps", self.jvps)
        if not math.isfinite(self.loss):
            raise MessageError("ClientUpload: loss is NaN or Inf")


@dataclass
class ParamsDownload:
    """Server -> a new or stale client: the trainable parameters, flattened in layout order, and the
    optimizer's state (empty for plain SGD) so later updates can be replayed."""
    TYPE = 4
    model_version: int
    params: np.ndarray
    optimizer_state: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def body(self) -> bytes:
        return (struct.pack("<I", _u32("model_version", self.model_version)) + _arr(self.params, np.float32)
                + _arr(self.optimizer_state, np.float32))

    @classmethod
    def parse(cls, r: _Reader):
        mv = r.take("I")
        return cls(mv, r.array("f4", "params"), r.array("f4", "optimizer_state"))

    def validate(self):
        _finite("ParamsDownload.params", self.params)
        _finite("ParamsDownload.optimizer_state", self.optimizer_state)


@dataclass
class DenseUpload:
    """Client -> server in the FedAvg-backprop baseline: the dense change of the trainable vector."""
    TYPE = 5
    round: int
    client: int
    model_version: int
    delta: np.ndarray
    num_examples: int
    loss: float

    def body(self) -> bytes:
        return (struct.pack("<III", _u32("round", self.round), _u32("client", self.client),
                            _u32("model_version", self.model_version)) + _arr(self.delta, np.float32)
                + struct.pack("<If", _u32("num_examples", self.num_examples), self.loss))

    @classmethod
    def parse(cls, r: _Reader):
        t, c, mv = r.take("III")
        delta = r.array("f4", "delta")
        n, loss = r.take("If")
        return cls(t, c, mv, delta, n, loss)

    def validate(self, expect_numel: int | None = None):
        if expect_numel is not None and len(self.delta) != expect_numel:
            raise MessageError(f"DenseUpload: delta has {len(self.delta)} values, expected {expect_numel}")
        if self.num_examples < 1:
            raise MessageError("DenseUpload: num_examples must be >= 1")
        _finite("DenseUpload.delta", self.delta)
        if not math.isfinite(self.loss):
            raise MessageError("DenseUpload: loss is NaN or Inf")


TYPES = {cls.TYPE: cls for cls in (RoundStart, Update, ClientUpload, ParamsDownload, DenseUpload)}


def encode(msg) -> bytes:
    """Bytes of a message (see the module docstring for the format)."""
    if type(msg) not in TYPES.values():
        raise MessageError(f"not a protocol message: {type(msg).__name__}")
    data = _HEAD.pack(MAGIC, FORMAT_VERSION, msg.TYPE) + msg.body()
    return data + _CRC.pack(zlib.crc32(data))


def decode(data: bytes, validate: bool = True):
    """The message in ``data``; raises MessageError naming what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size + _CRC.size:
        raise MessageError(f"message too short ({len(data)} bytes)")
    magic, version, mtype = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise MessageError(f"bad magic {magic!r} (not an fwdllm message)")
    if version != FORMAT_VERSION:
        raise MessageError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    if mtype not in TYPES:
        raise MessageError(f"unknown message type {mtype}")
    end = len(data) - _CRC.size
    (crc,) = _CRC.unpack_from(data, end)
    if zlib.crc32(data[:end]) != crc:
        raise MessageError("checksum mismatch: the message is corrupted")
    r = _Reader(data, _HEAD.size, end)
    msg = TYPES[mtype].parse(r)
    if r.pos != end:
        raise MessageError(f"{end - r.pos} trailing bytes after a {TYPES[mtype].__name__}")
    if validate:
        msg.validate()
    return msg
