"""The TensorFlow checkpoint (TensorBundle) reader, against checkpoints TensorFlow wrote.

The fixtures under tests/fixtures/tf_checkpoint/ and the values TensorFlow read back from them
were made by make_fixtures.py there (in a scratch environment with TensorFlow); these tests
need no TensorFlow. Corrupt copies are made in tmp_path.
"""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
import torch
from torch import nn

from axial_deeplab.convert import core
from axial_deeplab.convert import tf_checkpoint as tfc
from axial_deeplab.convert.core import ConversionError, convert_weights
from axial_deeplab.convert.tf_checkpoint import (
    TFCheckpointError,
    list_tf_checkpoint,
    read_tf_checkpoint,
)
from axial_deeplab.layers.axial_attention import PositionSensitiveAxialAttention
from axial_deeplab.models.weights import CheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf_checkpoint")
BASIC = os.path.join(FIXTURES, "basic", "ckpt-1")
KERAS = os.path.join(FIXTURES, "keras", "ckpt-1")
DATA = ".data-00000-of-00001"


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def load_expected(name):
    """{tensor name: (TensorFlow dtype name, value)} as TensorFlow read them back."""
    z = np.load(os.path.join(FIXTURES, f"{name}_expected.npz"), allow_pickle=False)
    out = {}
    i = 0
    while f"name_{i}" in z:
        key, dtype = str(z[f"name_{i}"]), str(z[f"dtype_{i}"])
        if f"strlen_{i}" in z:
            raw, pos, items = z[f"value_{i}"].tobytes(), 0, []
            for n in z[f"strlen_{i}"]:
                items.append(raw[pos : pos + n])
                pos += n
            value = np.empty(len(items), dtype=object)
            value[:] = items
            value = value.reshape(tuple(z[f"shape_{i}"]))
        else:
            value = z[f"value_{i}"]
        out[key] = (dtype, value)
        i += 1
    if "many" in z:
        for j, row in enumerate(z["many"]):
            out[f"many_{j:03d}/.ATTRIBUTES/VARIABLE_VALUE"] = ("float32", row)
    return out


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for name, (dtype, want) in expected.items():
        value = got[name]
        assert value.shape == want.shape, name
        if dtype == "string":
            assert value.dtype == object
            assert [bytes(v) for v in value.reshape(-1)] == [bytes(v) for v in want.reshape(-1)], name
        else:
            assert value.dtype == (np.float32 if dtype == "bfloat16" else want.dtype), name
            np.testing.assert_array_equal(value, want, err_msg=name)


def test_crc32c_known_value():
    assert tfc._crc32c_python(b"123456789") == 0xE3069283
    assert tfc.crc32c(b"") == 0


def test_reads_every_dtype_exactly_as_tensorflow():
    expected = load_expected("basic")
    dtypes = {e[0] for e in expected.values()}
    assert {
        "float16",
        "float32",
        "float64",
        "bfloat16",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "bool",
        "string",
    } <= dtypes
    got = read_tf_checkpoint(BASIC)
    assert_same(got, expected)
    assert got["scalar/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    assert got["empty/.ATTRIBUTES/VARIABLE_VALUE"].shape == (0, 3)
    assert got["text/.ATTRIBUTES/VARIABLE_VALUE"][()] == b"hello, checkpoint"
    assert got["i64/.ATTRIBUTES/VARIABLE_VALUE"][0] == -(2**63)
    assert got["bf16/.ATTRIBUTES/VARIABLE_VALUE"].flags.writeable


def test_list_gives_names_dtypes_and_shapes():
    expected = load_expected("basic")
    listed = list_tf_checkpoint(BASIC)
    assert {k: (d, v.shape) for k, (d, v) in expected.items()} == listed


@pytest.mark.parametrize("form", ["prefix", "index", "folder"])
def test_path_forms(form):
    path = {"prefix": BASIC, "index": BASIC + ".index", "folder": os.path.dirname(BASIC)}[form]
    assert list_tf_checkpoint(path) == list_tf_checkpoint(BASIC)


def test_keras_object_graph_checkpoint():
    expected = load_expected("keras")
    got = read_tf_checkpoint(KERAS)
    assert_same(got, expected)
    assert any(".OPTIMIZER_SLOT/" in k for k in got)
    assert "model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE" in got


def test_names_subset():
    name = "f32/.ATTRIBUTES/VARIABLE_VALUE"
    got = read_tf_checkpoint(BASIC, names=[name])
    assert list(got) == [name]
    with pytest.raises(TFCheckpointError, match="no tensor named 'nope'"):
        read_tf_checkpoint(BASIC, names=["nope"])


# ----------------------------------------------------------------------------- a small table writer
def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mask(crc):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries, restart_interval):
    out, restarts, prev = bytearray(), [], b""
    for i, (k, v) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(k), len(prev)) and k[shared] == prev[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(k) - shared) + _varint(len(v)) + k[shared:] + v
        prev = k
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def _trailer(block, ctype=0):
    return bytes([ctype]) + struct.pack("<I", _mask(tfc.crc32c(block + bytes([ctype]))))


def write_table(entries, per_block, restart_interval=4, ctype_of_block=None):
    """A LevelDB-format table of ``entries`` (sorted (key, value) bytes), ``per_block`` entries
    per data block."""
    data, index = bytearray(), []
    for n, start in enumerate(range(0, len(entries), per_block)):
        chunk = entries[start : start + per_block]
        blk = _block(chunk, restart_interval)
        index.append((chunk[-1][0], _varint(len(data)) + _varint(len(blk))))
        data += blk + _trailer(blk, ctype_of_block if n == (1 if ctype_of_block is not None else -1) else 0)
    meta = _block([], 1)
    meta_handle = _varint(len(data)) + _varint(len(meta))
    data += meta + _trailer(meta)
    idx = _block(index, 1)
    index_handle = _varint(len(data)) + _varint(len(idx))
    data += idx + _trailer(idx)
    footer = (meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", tfc.TABLE_MAGIC)
    return bytes(data + footer)


def raw_entries(index_path):
    """The (key, value) records of a TensorFlow-written index, read block by block."""
    table = tfc._Table(index_path)
    _, handle = table.footer()
    out = []
    for _, h in table.entries(table.block(handle, "index"), "index"):
        off, pos = tfc._varint(h, 0, len(h), "h")
        size, _ = tfc._varint(h, pos, len(h), "h")
        out += list(table.entries(table.block((off, size), "data"), "data"))
    return out


def copy_with_index(tmp_path, index_bytes, src=BASIC):
    prefix = str(tmp_path / "ckpt-1")
    shutil.copyfile(src + DATA, prefix + DATA)
    with open(prefix + ".index", "wb") as f:
        f.write(index_bytes)
    return prefix


def test_index_of_many_blocks_and_restarts(tmp_path):
    entries = raw_entries(BASIC + ".index")
    assert len(entries) == 318  # header + 317 tensors, in one 256 kB block as TensorFlow writes
    table = write_table(entries, per_block=23, restart_interval=5)
    prefix = copy_with_index(tmp_path, table)
    assert list_tf_checkpoint(prefix) == list_tf_checkpoint(BASIC)
    assert_same(read_tf_checkpoint(prefix), load_expected("basic"))


# ----------------------------------------------------------------------------- clear errors
def test_missing_index(tmp_path):
    with pytest.raises(TFCheckpointError, match=r"ckpt-9\.index: checkpoint index not found"):
        read_tf_checkpoint(str(tmp_path / "ckpt-9"))
    assert issubclass(TFCheckpointError, CheckpointError)


def test_folder_without_checkpoint_file(tmp_path):
    shutil.copyfile(BASIC + ".index", tmp_path / "ckpt-1.index")
    with pytest.raises(TFCheckpointError, match=r"without TensorFlow's 'checkpoint' file; it holds ckpt-1\.index"):
        read_tf_checkpoint(str(tmp_path))


def test_missing_data_shard(tmp_path):
    shutil.copyfile(BASIC + ".index", tmp_path / "ckpt-1.index")
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.data-00000-of-00001: data shard not found"):
        read_tf_checkpoint(str(tmp_path / "ckpt-1"))
    # the index alone still lists the tensors
    assert len(list_tf_checkpoint(str(tmp_path / "ckpt-1"))) == 317


def test_bad_magic(tmp_path):
    data = bytearray(read_bytes(BASIC + ".index"))
    data[-1] ^= 0xFF
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.index: bad magic number"):
        read_tf_checkpoint(copy_with_index(tmp_path, bytes(data)))


@pytest.mark.parametrize("keep", [0, 30, 2000])
def test_truncated_index(tmp_path, keep):
    data = read_bytes(BASIC + ".index")[:keep]
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.index: (truncated|bad magic)"):
        read_tf_checkpoint(copy_with_index(tmp_path, data))


def test_truncated_index_with_footer(tmp_path):
    """A footer intact but blocks cut away: the block handles run past the file."""
    data = read_bytes(BASIC + ".index")
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.index: truncated or corrupt: the index block"):
        read_tf_checkpoint(copy_with_index(tmp_path, data[:100] + data[-48:]))


def test_truncated_data_shard(tmp_path):
    prefix = copy_with_index(tmp_path, read_bytes(BASIC + ".index"))
    size = os.path.getsize(prefix + DATA)
    os.truncate(prefix + DATA, size - 10)
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.data-00000-of-00001: truncated: '.*' needs bytes"):
        read_tf_checkpoint(prefix)


def test_corrupt_index_block_checksum(tmp_path):
    data = bytearray(read_bytes(BASIC + ".index"))
    data[200] ^= 0x01
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.index: checksum mismatch in data block 0"):
        read_tf_checkpoint(copy_with_index(tmp_path, bytes(data)))


def test_corrupt_tensor_data(tmp_path):
    prefix = copy_with_index(tmp_path, read_bytes(BASIC + ".index"))
    entry = tfc.read_tf_checkpoint_entries(prefix)[1]["big/.ATTRIBUTES/VARIABLE_VALUE"]
    with open(prefix + DATA, "r+b") as f:
        f.seek(entry.offset + 100)
        b = f.read(1)
        f.seek(entry.offset + 100)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(TFCheckpointError, match=r"data-00000-of-00001: checksum mismatch in 'big/"):
        read_tf_checkpoint(prefix)


def test_snappy_block_refused(tmp_path):
    table = write_table(raw_entries(BASIC + ".index"), per_block=100, ctype_of_block=1)
    with pytest.raises(
        TFCheckpointError,
        match=r"ckpt-1\.index: data block 1 at byte \d+ is snappy-compressed.*"
        r"TensorFlow writes checkpoint indexes uncompressed by default",
    ):
        read_tf_checkpoint(copy_with_index(tmp_path, table))


def test_unsupported_dtype(tmp_path):
    entries = raw_entries(BASIC + ".index")
    name = b"f32/.ATTRIBUTES/VARIABLE_VALUE"
    patched = []
    for k, v in entries:
        if k == name:
            assert v[0] == 0x08 and v[1] == 1  # field 1 (dtype) = DT_FLOAT
            v = bytes([0x08, 20]) + v[2:]  # DT_RESOURCE
        patched.append((k, v))
    prefix = copy_with_index(tmp_path, write_table(patched, per_block=1000))
    assert list_tf_checkpoint(prefix)[name.decode()] == ("resource", (3, 4))
    with pytest.raises(TFCheckpointError, match=r"ckpt-1\.index: 'f32/.*' has unsupported dtype resource"):
        read_tf_checkpoint(prefix)


def test_sliced_variable_refused():
    prefix = os.path.join(FIXTURES, "sliced", "ckpt")
    assert read_tf_checkpoint(prefix, names=["whole"])["whole"].tolist() == [1.0, 1.0]
    with pytest.raises(TFCheckpointError, match=r"sliced/ckpt\.index: 'part' is a sliced \(partitioned\) variable"):
        read_tf_checkpoint(prefix)


# ----------------------------------------------------------------------------- deeplab2 -> our modules
ATTENTION = os.path.join(FIXTURES, "attention", "ckpt-1")


class AttentionPair(nn.Module):
    """deeplab2's AxialAttention2D of the fixture (filters 4, 2 heads, key 4, value 8, stride 2)."""

    def __init__(self, reach=None):
        super().__init__()
        kw = {"num_heads": 2, "key_channels": 4, "stride": 2, "bn_eps": 1e-3, "max_relative_distance": reach}
        self.attn_h = PositionSensitiveAxialAttention(6, 8, "height", **kw)
        self.attn_w = PositionSensitiveAxialAttention(8, 8, "width", **kw)

    def forward(self, x):
        return self.attn_w(self.attn_h(x))


def pair_mapping(v, model):
    core.axial_attention_pair(v, "layer", "attn_h", "attn_w", model.attn_h, model.attn_w)


def test_qkv_permutation_by_hand():
    # K = 2 (2 heads x 1), V = 4 (2 heads x 2): deeplab2 columns [q0 q1 | k0 k1 | v0 v0' v1 v1']
    assert core.qkv_permutation(2, 1, 2).tolist() == [0, 2, 4, 5, 1, 3, 6, 7]


@pytest.mark.parametrize("reach", [None, 6, 300])
def test_attention_pair_reproduces_deeplab2(reach):
    """Reach None: deeplab2's 509 rows as they are; 6: the centre 13 rows (the fixture's axes
    are 7 and 5 long, offsets up to 6); 300: edge rows repeated. All give deeplab2's outputs."""
    expected = np.load(os.path.join(FIXTURES, "attention_expected.npz"))
    model = AttentionPair(reach)
    state, report = convert_weights(read_tf_checkpoint(ATTENTION), model, pair_mapping)
    model.load_state_dict(state)
    assert len(report.mapped) == 2 * 16  # qkv, 3 x 4 BN tensors, 3 tables per layer
    assert report.left_out == [("_CHECKPOINTABLE_OBJECT_GRAPH", "object graph (checkpoint structure)")]
    assert len(report.filled) == 2 * 3
    x = torch.from_numpy(expected["input"]).permute(0, 3, 1, 2)
    for training, key in ((False, "output_eval"), (True, "output_train")):
        model.train(training)
        with torch.no_grad():
            y = model(x).permute(0, 2, 3, 1).numpy()
        want = expected[key]
        assert y.shape == want.shape == (2, 4, 3, 8)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=key)


def test_mapping_that_misses_keys_is_refused():
    model = AttentionPair()

    def height_only(v, m):
        core.axial_attention(v, "layer/_height_axis", "attn_h", m.attn_h)

    with pytest.raises(ConversionError, match=r"does not map onto AttentionPair \(16 problems\):\n") as e:
        convert_weights(read_tf_checkpoint(ATTENTION), model, height_only)
    assert "\n  missing attn_w.qkv.weight [16, 8, 1, 1]" in str(e.value)
    assert "\n  missing attn_w.value_table [4, 509]" in str(e.value)
    assert "attn_h" not in str(e.value)


def test_wrong_shape_names_the_variable():
    model = AttentionPair()
    model.attn_h = PositionSensitiveAxialAttention(6, 16, "height", num_heads=2, key_channels=4)
    with pytest.raises(
        ConversionError,
        match=r"layer/_height_axis/qkv_kernel is \[6, 16\], attn_h needs \[6, 24\] "
        r"\(2 heads, key depth 2, value depth 8 per head\)",
    ):
        convert_weights(read_tf_checkpoint(ATTENTION), model, pair_mapping)


def test_absent_variable_is_named():
    with pytest.raises(ConversionError, match=r"no variable 'layer/_depth_axis/qkv_kernel'"):
        convert_weights(
            read_tf_checkpoint(ATTENTION),
            AttentionPair(),
            lambda v, m: core.axial_attention(v, "layer/_depth_axis", "attn_h", m.attn_h),
        )


class KerasNet(nn.Module):
    """The fixture's tf_keras model: conv 3x3 (no bias), BN, global average pool, dense."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def keras_mapping(v, model):
    core.conv(v, "model/layer_with_weights-0", "conv")
    core.batch_norm(v, "model/layer_with_weights-1", "bn")
    core.dense(v, "model/layer_with_weights-2", "fc")


def test_generic_conv_bn_dense_rules_and_left_out_variables():
    model = KerasNet()
    state, report = convert_weights(read_tf_checkpoint(KERAS), model, keras_mapping)
    model.load_state_dict(state)
    model.eval()
    out = np.load(os.path.join(FIXTURES, "keras_output.npz"))
    with torch.no_grad():
        y = model(torch.from_numpy(out["input"]).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(y, out["output"], rtol=1e-5, atol=1e-6)
    reasons = dict(report.left_out)
    assert reasons.pop("_CHECKPOINTABLE_OBJECT_GRAPH") == "object graph (checkpoint structure)"
    assert reasons.pop("save_counter/.ATTRIBUTES/VARIABLE_VALUE") == "step counter"
    slots = [n for n in reasons if ".OPTIMIZER_SLOT/" in n]
    assert len(slots) == 5 and all(reasons.pop(n) == "optimizer slot" for n in slots)
    assert reasons and set(reasons.values()) == {"optimizer variable"}
    assert all(n.startswith(("optimizer/", "legacy_optimizer/")) for n in reasons)
    assert sorted(k for _, k, _ in report.mapped) == sorted(
        k for k in model.state_dict() if not k.endswith("num_batches_tracked")
    )


# ----------------------------------------------------------------------------- the command
@pytest.fixture
def pair_model(monkeypatch):
    from axial_deeplab.convert import deeplab2
    from axial_deeplab.models import registry

    names = registry.list_models() + ["test_attention_pair"]
    monkeypatch.setattr(registry, "list_models", lambda *a, **k: names)
    original = registry.create_model
    monkeypatch.setattr(
        registry,
        "create_model",
        lambda name, **kw: AttentionPair() if name == "test_attention_pair" else original(name, **kw),
    )
    monkeypatch.setitem(deeplab2._MAPPINGS, "test_attention_pair", pair_mapping)
    return "test_attention_pair"


def test_convert_command_writes_checkpoint_folder(tmp_path, pair_model, capsys):
    from safetensors.torch import load_file

    from axial_deeplab.cli import main

    out = tmp_path / "converted"
    rc = main(["convert", "--from", "deeplab2", ATTENTION + ".index", "--model", pair_model, "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mapped 32 tensors:" in printed
    assert "  layer/_height_axis/qkv_kernel -> attn_h.qkv.weight [16, 6, 1, 1]" in printed
    assert "left out 1 checkpoint tensors:\n  _CHECKPOINTABLE_OBJECT_GRAPH: object graph" in printed
    assert sorted(os.listdir(out)) == ["config.yaml", "info.json", "model.safetensors", "training_state.pt"]
    saved = load_file(str(out / "model.safetensors"))
    expected, _ = convert_weights(read_tf_checkpoint(ATTENTION), AttentionPair(), pair_mapping)
    assert sorted(saved) == sorted(expected)
    for k in saved:
        torch.testing.assert_close(saved[k], expected[k], rtol=0, atol=0)
    assert "name: test_attention_pair" in (out / "config.yaml").read_text()

    # an existing output is refused unless --force
    rc = main(["convert", "--from", "deeplab2", ATTENTION, "--model", pair_model, "--output", str(out)])
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert (
        main(["convert", "--from", "deeplab2", ATTENTION, "--model", pair_model, "--output", str(out), "--force", "-q"])
        == 0
    )
    assert "  layer/" not in capsys.readouterr().out


def test_convert_command_refuses_and_writes_nothing(tmp_path, pair_model, capsys, monkeypatch):
    from axial_deeplab.cli import main
    from axial_deeplab.convert import deeplab2

    out = tmp_path / "converted"
    monkeypatch.setitem(
        deeplab2._MAPPINGS, pair_model, lambda v, m: core.axial_attention(v, "layer/_height_axis", "attn_h", m.attn_h)
    )
    assert main(["convert", "--from", "deeplab2", ATTENTION, "--model", pair_model, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not map onto AttentionPair" in err and "missing attn_w.qkv.weight" in err
    assert not out.exists() and os.listdir(tmp_path) == []
    assert (
        main(["convert", "--from", "deeplab2", str(tmp_path / "nope"), "--model", pair_model, "--output", str(out)])
        == 2
    )
    assert "nope.index: checkpoint index not found" in capsys.readouterr().err
    assert main(["convert", "--from", "deeplab2", ATTENTION, "--model", "no_such_model", "--output", str(out)]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


@pytest.mark.parametrize("size", [0, 5, 256, 16383, 16384, 70001, 300001])
def test_numpy_crc32c_equals_byte_loop(size):
    """The vectorised CRC (lanes of 256 .. 1024 bytes here, chained) against the plain loop."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for start in (0, 0x1234ABCD):
        assert tfc._crc32c_numpy(data, start) == tfc._crc32c_python(data, start)
