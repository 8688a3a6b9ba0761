"""Read TensorFlow 2 checkpoints (the TensorBundle format) with NumPy alone.

A checkpoint ``PREFIX`` is two kinds of file:

* ``PREFIX.index``: a LevelDB-style sorted table. Data blocks of prefix-compressed
  key/value entries (with a restart array), an index block pointing at them, a metaindex
  block and a 48-byte footer ending in the magic number ``0xdb4775248b80fb57``; every block is
  followed by a compression byte and a masked CRC-32C. The empty key holds the bundle header
  (shard count, endianness); every other key is a tensor name whose value describes the tensor
  (dtype, shape, shard, offset, size, CRC-32C).
* ``PREFIX.data-0000S-of-0000N``: the tensors' bytes, little-endian, at those offsets.

The three protobuf messages involved have a handful of integer fields, so they are decoded
here by hand: no TensorFlow, no compiled ``.proto`` files and no protobuf dependency.

Integrity: every block of the index and (unless ``verify=False``) every tensor is checked
against its CRC-32C, computed by the optional ``google-crc32c`` or ``crc32c`` module when
installed, else by NumPy (about 100 MB/s; reading a 100 MB checkpoint then takes about 1.5 s
instead of 0.1 s) or, for small buffers, a byte loop. ``bfloat16`` tensors are returned as
``float32`` (exact: NumPy has no bfloat16); :func:`list_tf_checkpoint` still reports ``bfloat16``.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from ..models.weights import CheckpointError

__all__ = [
    "TFCheckpointError",
    "read_tf_checkpoint",
    "list_tf_checkpoint",
    "resolve_tf_checkpoint",
    "read_tf_checkpoint_entries",
    "TensorEntry",
    "crc32c",
]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER = 5  # compression type byte + masked crc32c


class TFCheckpointError(CheckpointError):
    """A TensorFlow checkpoint that cannot be read; the message names the file at fault."""


# ----------------------------------------------------------------------------- crc32c
def _make_crc_table() -> List[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def _crc32c_python(data, crc: int = 0) -> int:
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_MIN_LANE = 256  # bytes per lane of the vectorised CRC, at least (a power of two)
_SHIFT_TABLES: Dict[int, List[List[int]]] = {}


def _apply(tables: List[List[int]], reg: int) -> int:
    return tables[0][reg & 0xFF] ^ tables[1][(reg >> 8) & 0xFF] ^ tables[2][(reg >> 16) & 0xFF] ^ tables[3][reg >> 24]


def _tables_of(images: List[int]) -> List[List[int]]:
    """Byte tables of the linear map whose images of the 32 register bits are ``images``."""
    out = []
    for k in range(4):
        row = [0] * 256
        for b in range(1, 256):
            low = b & -b
            row[b] = row[b ^ low] ^ images[8 * k + low.bit_length() - 1]
        out.append(row)
    return out


def _shift_tables(lane: int) -> List[List[int]]:
    """Byte tables of the linear map "feed ``lane`` zero bytes" on the CRC register (``lane`` a
    power of two >= ``_MIN_LANE``; built from the smallest by squaring)."""
    if lane not in _SHIFT_TABLES:
        if lane == _MIN_LANE:
            images = []
            for bit in range(32):
                c = 1 << bit
                for _ in range(lane):
                    c = _CRC_TABLE[c & 0xFF] ^ (c >> 8)
                images.append(c)
        else:
            half = _shift_tables(lane // 2)
            images = [_apply(half, _apply(half, 1 << bit)) for bit in range(32)]
        _SHIFT_TABLES[lane] = _tables_of(images)
    return _SHIFT_TABLES[lane]


_SLICE_TABLES = None


def _slice_tables():
    """Tables for feeding four bytes at once: the register after the bytes of ``x = reg ^ word``
    is ``low[x & 0xFFFF] ^ high[x >> 16]`` (slicing-by-4, two bytes per lookup)."""
    global _SLICE_TABLES
    if _SLICE_TABLES is None:
        t = [np.asarray(_CRC_TABLE, dtype=np.uint32)]
        for _ in range(3):
            t.append((t[-1] >> 8) ^ t[0][t[-1] & 0xFF])
        v = np.arange(1 << 16, dtype=np.uint32)
        _SLICE_TABLES = (t[3][v & 0xFF] ^ t[2][v >> 8], t[1][v & 0xFF] ^ t[0][v >> 8])
    return _SLICE_TABLES


def _crc32c_numpy(data, crc: int = 0) -> int:
    """CRC-32C of a large buffer with NumPy. The CRC register is linear in its state and the
    bytes, so the buffer is cut into equal lanes whose CRCs (from a zero register) run side by
    side, four bytes a step, and are then chained: ``reg = shift(reg) ^ lane_crc``, ``shift``
    being the effect of a lane of zero bytes. Lanes of about sqrt(size) bytes balance the two
    loops."""
    buf = np.frombuffer(data, dtype=np.uint8)
    lane = _MIN_LANE
    while lane * lane < len(buf) and lane < 1 << 16:
        lane *= 2
    head = len(buf) % lane
    reg = _crc32c_python(buf[:head].tobytes(), crc) ^ 0xFFFFFFFF
    # (lane/4, n): row j = little-endian word j of every lane
    words = np.ascontiguousarray(buf[head:].view("<u4").reshape(-1, lane // 4).T)
    low, high = _slice_tables()
    c = np.zeros(words.shape[1], dtype=np.uint32)
    for w in words:  # four bytes a step: two lookups in 16-bit tables
        x = c ^ w
        c = np.take(low, x & 0xFFFF) ^ np.take(high, x >> 16)
    t0, t1, t2, t3 = _shift_tables(lane)
    for lane_crc in c.tolist():
        reg = t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF] ^ t3[reg >> 24] ^ lane_crc
    return reg ^ 0xFFFFFFFF


def _fast_crc32c():
    try:
        import google_crc32c

        return lambda data, crc=0: google_crc32c.extend(crc, bytes(data)) if crc else google_crc32c.value(bytes(data))
    except ImportError:
        pass
    try:
        import crc32c as _crc32c_module

        return lambda data, crc=0: _crc32c_module.crc32c(bytes(data), crc)
    except ImportError:
        return None


_FAST_CRC = _fast_crc32c()


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, extending ``crc``: with ``google-crc32c`` or ``crc32c``
    when installed, else NumPy for large buffers (~100 MB/s) and a byte loop for small ones."""
    if _FAST_CRC is not None:
        return _FAST_CRC(data, crc)
    if len(data) >= 64 * _MIN_LANE:
        return _crc32c_numpy(data, crc)
    return _crc32c_python(data, crc)


def _unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- varints and protobuf
def _varint(buf, pos: int, end: int, what: str) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"bad varint in {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes, what: str):
    """Yield (field number, wire type, value) of a serialized protobuf message; value is an
    int for varint/fixed fields and bytes for length-delimited ones."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end, what)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end, what)
        elif wire == 1:
            if pos + 8 > end:
                raise ValueError(f"truncated {what}")
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos, end, what)
            if pos + n > end:
                raise ValueError(f"truncated {what}")
            value = bytes(buf[pos : pos + n])
            pos += n
        elif wire == 5:
            if pos + 4 > end:
                raise ValueError(f"truncated {what}")
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire} in {what}")
        yield field, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# DataType enum values (tensorflow/core/framework/types.proto) -> NumPy little-endian dtype
_DTYPES: Dict[int, Tuple[str, Optional[str]]] = {
    1: ("float32", "<f4"),
    2: ("float64", "<f8"),
    3: ("int32", "<i4"),
    4: ("uint8", "|u1"),
    5: ("int16", "<i2"),
    6: ("int8", "|i1"),
    7: ("string", None),
    8: ("complex64", "<c8"),
    9: ("int64", "<i8"),
    10: ("bool", "|b1"),
    14: ("bfloat16", "<u2"),
    17: ("uint16", "<u2"),
    18: ("complex128", "<c16"),
    19: ("float16", "<f2"),
    22: ("uint32", "<u4"),
    23: ("uint64", "<u8"),
}
_DTYPE_NAMES = {
    11: "qint8",
    12: "quint8",
    13: "qint32",
    15: "qint16",
    16: "quint16",
    20: "resource",
    21: "variant",
}


class TensorEntry(NamedTuple):
    """One tensor's record in the index (a BundleEntryProto)."""

    dtype: str  # "float32", "bfloat16", "string", ... (TensorFlow's names)
    shape: Tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: Optional[int]  # masked, as stored
    num_slices: int
    dtype_enum: int


def _parse_shape(buf: bytes, what: str) -> Tuple[int, ...]:
    dims = []
    for field, _, value in _proto_fields(buf, what):
        if field == 2:  # Dim { int64 size = 1; string name = 2; }
            size = 0
            for f2, _, v2 in _proto_fields(value, what):
                if f2 == 1:
                    size = _signed64(v2)
            dims.append(size)
        elif field == 3 and value:
            raise ValueError(f"{what} has an unknown rank")
    if any(d < 0 for d in dims):
        raise ValueError(f"{what} has an unknown dimension: {dims}")
    return tuple(dims)


def _parse_entry(buf: bytes, what: str) -> TensorEntry:
    dtype_enum, shape, shard, offset, size, crc, slices = 0, (), 0, 0, 0, None, 0
    for field, _, value in _proto_fields(buf, what):
        if field == 1:
            dtype_enum = value
        elif field == 2:
            shape = _parse_shape(value, what)
        elif field == 3:
            shard = value
        elif field == 4:
            offset = _signed64(value)
        elif field == 5:
            size = _signed64(value)
        elif field == 6:
            crc = value
        elif field == 7:
            slices += 1
    name = _DTYPES[dtype_enum][0] if dtype_enum in _DTYPES else _DTYPE_NAMES.get(dtype_enum, f"enum {dtype_enum}")
    return TensorEntry(name, shape, shard, offset, size, crc, slices, dtype_enum)


# ----------------------------------------------------------------------------- the sorted table
class _Table:
    """The ``.index`` file's bytes, with block reading and checksum checks."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.data = f.read()
        except FileNotFoundError:
            raise TFCheckpointError(f"{path}: checkpoint index not found") from None
        except OSError as e:
            raise TFCheckpointError(f"{path}: cannot read the checkpoint index ({e.strerror})") from None

    def fail(self, msg: str) -> TFCheckpointError:
        return TFCheckpointError(f"{self.path}: {msg}")

    def footer(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        data = self.data
        if len(data) < FOOTER_SIZE:
            raise self.fail(
                f"truncated: {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte table footer "
                "(not a TensorFlow checkpoint index, or a partial copy)"
            )
        start = len(data) - FOOTER_SIZE
        magic = struct.unpack_from("<Q", data, len(data) - 8)[0]
        if magic != TABLE_MAGIC:
            raise self.fail(
                f"bad magic number 0x{magic:016x} at the end of the file (expected 0x{TABLE_MAGIC:016x}): "
                "not a TensorFlow checkpoint index, or a truncated one"
            )
        try:
            meta_off, pos = _varint(data, start, len(data) - 8, "footer")
            meta_size, pos = _varint(data, pos, len(data) - 8, "footer")
            index_off, pos = _varint(data, pos, len(data) - 8, "footer")
            index_size, pos = _varint(data, pos, len(data) - 8, "footer")
        except ValueError as e:
            raise self.fail(f"corrupt table footer ({e})") from None
        return (meta_off, meta_size), (index_off, index_size)

    def block(self, handle: Tuple[int, int], what: str) -> bytes:
        offset, size = handle
        end = offset + size + BLOCK_TRAILER
        if offset < 0 or end > len(self.data) - FOOTER_SIZE:
            raise self.fail(
                f"truncated or corrupt: {what} at bytes {offset}..{end} runs past the table "
                f"({len(self.data) - FOOTER_SIZE} bytes before the footer)"
            )
        contents = self.data[offset : offset + size]
        ctype = self.data[offset + size]
        stored = struct.unpack_from("<I", self.data, offset + size + 1)[0]
        actual = crc32c(self.data[offset : offset + size + 1])
        if _unmask(stored) != actual:
            raise self.fail(f"checksum mismatch in {what} at byte {offset} (the file is corrupt)")
        if ctype == 1:
            raise self.fail(
                f"{what} at byte {offset} is snappy-compressed, which this reader does not decode; "
                "TensorFlow writes checkpoint indexes uncompressed by default: re-save the "
                "checkpoint with TensorFlow (tf.train.Checkpoint.write) to get one"
            )
        if ctype != 0:
            raise self.fail(f"{what} at byte {offset} has unknown compression type {ctype}")
        return contents

    def entries(self, contents: bytes, what: str):
        """Yield (key, value) of one block, checking the restart array."""
        if len(contents) < 4:
            raise self.fail(f"corrupt {what}: {len(contents)} bytes")
        num_restarts = struct.unpack_from("<I", contents, len(contents) - 4)[0]
        limit = len(contents) - 4 * (num_restarts + 1)
        if num_restarts < 1 or limit < 0:
            raise self.fail(f"corrupt {what}: {num_restarts} restart points in {len(contents)} bytes")
        restarts = set(struct.unpack_from(f"<{num_restarts}I", contents, limit))
        pos, key = 0, b""
        try:
            while pos < limit:
                at = pos
                shared, pos = _varint(contents, pos, limit, what)
                unshared, pos = _varint(contents, pos, limit, what)
                vlen, pos = _varint(contents, pos, limit, what)
                if shared > len(key) or pos + unshared + vlen > limit or (at in restarts and shared):
                    raise ValueError(f"bad entry at block offset {at}")
                key = key[:shared] + contents[pos : pos + unshared]
                pos += unshared
                yield key, contents[pos : pos + vlen]
                pos += vlen
        except ValueError as e:
            raise self.fail(f"corrupt {what} ({e})") from None


def _read_index(index_path: str) -> Tuple[dict, Dict[str, TensorEntry]]:
    table = _Table(index_path)
    _, index_handle = table.footer()
    index_block = table.block(index_handle, "the index block")
    header: Optional[dict] = None
    entries: Dict[str, TensorEntry] = {}
    for n, (_, handle_bytes) in enumerate(table.entries(index_block, "the index block")):
        try:
            off, pos = _varint(handle_bytes, 0, len(handle_bytes), "block handle")
            size, _ = _varint(handle_bytes, pos, len(handle_bytes), "block handle")
        except ValueError as e:
            raise table.fail(f"corrupt index block ({e})") from None
        what = f"data block {n}"
        for key, value in table.entries(table.block((off, size), what), what):
            try:
                if key == b"":
                    header = {"num_shards": 1, "endianness": 0}
                    for field, _, v in _proto_fields(value, "the bundle header"):
                        if field == 1:
                            header["num_shards"] = v
                        elif field == 2:
                            header["endianness"] = v
                else:
                    name = key.decode("utf-8", errors="backslashreplace")
                    entries[name] = _parse_entry(value, f"the entry of {name!r}")
            except ValueError as e:
                raise table.fail(f"corrupt {what} ({e})") from None
    if header is None:
        raise table.fail("no bundle header (empty key): not a TensorFlow 2 (TensorBundle) checkpoint index")
    if header["endianness"] != 0:
        raise table.fail(
            "big-endian checkpoint: only little-endian bundles (what TensorFlow writes on x86 and ARM) are supported"
        )
    return header, entries


# ----------------------------------------------------------------------------- paths
def resolve_tf_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint prefix that ``path`` names: a prefix (``.../ckpt-12``), its ``.index`` or
    data file, or a folder holding TensorFlow's ``checkpoint`` file (its latest checkpoint)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if not os.path.isfile(state):
            indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
            hint = f"; it holds {', '.join(indexes[:5])}: pass one of those prefixes" if indexes else ""
            raise TFCheckpointError(f"{path}: a folder without TensorFlow's 'checkpoint' file{hint}")
        with open(state, encoding="utf-8", errors="replace") as f:
            m = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', f.read(), re.MULTILINE)
        if not m:
            raise TFCheckpointError(f"{state}: no model_checkpoint_path line")
        prefix = m.group(1).encode().decode("unicode_escape")
        return prefix if os.path.isabs(prefix) else os.path.join(path, prefix)
    if path.endswith(".index"):
        return path[: -len(".index")]
    m = re.match(r"^(.*)\.data-\d{5}-of-\d{5}$", path)
    return m.group(1) if m else path


def _shard_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def list_tf_checkpoint(path: str | os.PathLike) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """``{tensor name: (dtype name, shape)}`` of a TensorFlow 2 checkpoint, from its index alone."""
    prefix = resolve_tf_checkpoint(path)
    _, entries = _read_index(prefix + ".index")
    return {name: (e.dtype, e.shape) for name, e in entries.items()}


def read_tf_checkpoint_entries(path: str | os.PathLike) -> Tuple[str, Dict[str, TensorEntry]]:
    """The resolved prefix and the index records of every tensor."""
    prefix = resolve_tf_checkpoint(path)
    return prefix, _read_index(prefix + ".index")[1]


def _decode_strings(raw: bytes, count: int, shard: str, name: str, entry_crc: Optional[int], verify: bool):
    """A DT_STRING tensor: ``count`` varint lengths, the masked CRC-32C of the lengths (each as a
    little-endian uint32), then the bytes. The entry's CRC-32C runs over the lengths (as uint32),
    the stored length checksum and the bytes."""
    pos, lengths = 0, []
    try:
        for _ in range(count):
            n, pos = _varint(raw, pos, len(raw), f"string tensor {name!r}")
            lengths.append(n)
    except ValueError:
        raise TFCheckpointError(f"{shard}: corrupt string tensor {name!r}") from None
    if count:
        if pos + 4 > len(raw):
            raise TFCheckpointError(f"{shard}: corrupt string tensor {name!r}: no length checksum")
        crc = crc32c(struct.pack(f"<{count}I", *[n & 0xFFFFFFFF for n in lengths]))
        if _unmask(struct.unpack_from("<I", raw, pos)[0]) != crc:
            raise TFCheckpointError(
                f"{shard}: checksum mismatch in the lengths of string tensor {name!r} (the file is corrupt)"
            )
        if verify and entry_crc is not None and crc32c(raw[pos:], crc) != _unmask(entry_crc):
            raise TFCheckpointError(f"{shard}: checksum mismatch in {name!r} (the file is corrupt)")
        pos += 4
    if pos + sum(lengths) != len(raw):
        raise TFCheckpointError(f"{shard}: corrupt string tensor {name!r}: lengths do not add up to its size")
    out = np.empty(count, dtype=object)
    for i, n in enumerate(lengths):
        out[i] = raw[pos : pos + n]
        pos += n
    return out


def read_tf_checkpoint(path: str | os.PathLike, names=None, verify: bool = True) -> Dict[str, np.ndarray]:
    """Every tensor of a TensorFlow 2 checkpoint (or only ``names``) as NumPy arrays, keyed by
    TensorFlow's names (e.g. ``model/.../kernel/.ATTRIBUTES/VARIABLE_VALUE``).

    ``path``: the prefix, the ``.index`` file, or a folder with TensorFlow's ``checkpoint`` file.
    Strings come back as object arrays of ``bytes``; bfloat16 as float32 (exact). ``verify``:
    check every tensor against its CRC-32C (the index is always checked). Raises
    :class:`TFCheckpointError` naming the file for a missing or truncated index or data shard, a
    corrupt or compressed index, a checksum mismatch, an unsupported dtype or a sliced
    (partitioned) variable."""
    prefix = resolve_tf_checkpoint(path)
    index_path = prefix + ".index"
    header, entries = _read_index(index_path)
    if names is not None:
        unknown = sorted(set(names) - set(entries))
        if unknown:
            raise TFCheckpointError(f"{index_path}: no tensor named {', '.join(map(repr, unknown[:5]))}")
        entries = {n: entries[n] for n in names}
    num_shards = header["num_shards"]
    by_shard: Dict[int, List[str]] = {}
    for name, e in entries.items():
        if e.num_slices:
            raise TFCheckpointError(
                f"{index_path}: {name!r} is a sliced (partitioned) variable saved in {e.num_slices} slices; "
                "re-save it unpartitioned with TensorFlow"
            )
        if e.dtype_enum not in _DTYPES:
            raise TFCheckpointError(f"{index_path}: {name!r} has unsupported dtype {e.dtype}")
        if e.shard_id >= num_shards:
            raise TFCheckpointError(f"{index_path}: {name!r} lives in shard {e.shard_id} of {num_shards}")
        by_shard.setdefault(e.shard_id, []).append(name)
    out: Dict[str, np.ndarray] = {}
    for shard_id, shard_names in sorted(by_shard.items()):
        shard = _shard_path(prefix, shard_id, num_shards)
        try:
            f = open(shard, "rb")
        except FileNotFoundError:
            raise TFCheckpointError(f"{shard}: data shard not found (the index {index_path} needs it)") from None
        with f:
            length = os.fstat(f.fileno()).st_size
            for name in sorted(shard_names, key=lambda n: entries[n].offset):
                out[name] = _read_tensor(f, shard, length, name, entries[name], verify)
    return {name: out[name] for name in entries}


def _read_tensor(f, shard: str, length: int, name: str, e: TensorEntry, verify: bool) -> np.ndarray:
    if e.offset < 0 or e.size < 0 or e.offset + e.size > length:
        raise TFCheckpointError(
            f"{shard}: truncated: {name!r} needs bytes {e.offset}..{e.offset + e.size}, the file has {length}"
        )
    _, np_dtype = _DTYPES[e.dtype_enum]
    count = int(np.prod(e.shape, dtype=np.int64))
    if np_dtype is not None and count * np.dtype(np_dtype).itemsize != e.size:
        raise TFCheckpointError(
            f"{shard}: {name!r} is {e.size} bytes, expected {count} x {e.dtype} for shape {list(e.shape)}"
        )
    buf = bytearray(e.size)
    f.seek(e.offset)
    if f.readinto(buf) != e.size:
        raise TFCheckpointError(f"{shard}: truncated while reading {name!r}")
    if np_dtype is None:
        return _decode_strings(bytes(buf), count, shard, name, e.crc32c, verify).reshape(e.shape)
    if verify and e.crc32c is not None and crc32c(buf) != _unmask(e.crc32c):
        raise TFCheckpointError(f"{shard}: checksum mismatch in {name!r} (the file is corrupt)")
    arr = np.frombuffer(buf, dtype=np_dtype).reshape(e.shape)
    if e.dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)
