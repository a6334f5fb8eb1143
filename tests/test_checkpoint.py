"""Tests for nanolstm.checkpoint: round trips, atomic writes, and refusing every kind of bad file."""

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nanolstm.checkpoint as checkpoint
from nanolstm.checkpoint import FORMAT_VERSION, MAGIC, load, save
from nanolstm.errors import CheckpointError

META = {"step": 1200, "val_loss": 1.4375, "vocab": {"level": "char", "tokens": ["\n", " ", "é", "日"]},
        "config": {"layers": [{"hidden": 128, "cell": "lstm"}], "dropout": None, "tied": False}}


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "embedding.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "h64": rng.standard_normal((2, 3, 4)),
        "half": rng.standard_normal(9).astype(np.float16),
        "int8": np.array([-128, 0, 127], dtype=np.int8),
        "uint64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "int16": np.arange(6, dtype=np.int16).reshape(2, 3),
        "big_endian": np.arange(5, dtype=">i4"),
        "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
        "mask": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.uint16),
        "rng_state": np.array([1, 2, 3], dtype=np.uint32),
        "int64": np.array([-(2**63)], dtype=np.int64),
    }


def seal(header, data=b"", version=FORMAT_VERSION):
    """A checkpoint file's bytes with a valid hash around any header (dict, or raw bytes) and data."""
    if not isinstance(header, bytes):
        header = json.dumps(header).encode()
    body = MAGIC + struct.pack("<IQ", version, len(header)) + header + data
    return body + hashlib.sha256(body).digest()


def assert_refused(path, match=None):
    with pytest.raises(CheckpointError, match=match) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    return msg


@pytest.fixture
def valid_bytes(tmp_path):
    path = tmp_path / "valid.ckpt"
    save(path, sample_arrays(), META)
    return path.read_bytes()


# ----------------------------------------------------------------------------------------------------
# round trip and atomic writes


def test_round_trip(tmp_path):
    path = tmp_path / "model.ckpt"
    arrays = sample_arrays()
    save(path, arrays, META)
    loaded, meta = load(path)
    assert meta == META
    assert list(loaded) == list(arrays)
    for name, arr in arrays.items():
        got = loaded[name]
        assert got.shape == arr.shape
        assert got.dtype == arr.dtype.newbyteorder("=")
        assert np.array_equal(got, arr)
        assert got.flags.writeable and got.flags.owndata  # a copy, not a view of the file bytes
    assert os.listdir(tmp_path) == ["model.ckpt"]  # the temporary file was renamed away


def test_save_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    save(path, {"w": np.zeros(3)}, {"step": 1})
    save(path, {"w": np.ones(3)}, {"step": 2})
    arrays, meta = load(path)
    assert meta == {"step": 2} and arrays["w"].tolist() == [1, 1, 1]
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_data_section_is_aligned(tmp_path):
    path = tmp_path / "a.ckpt"
    save(path, {"a": np.zeros(3, dtype=np.int8), "b": np.zeros(2)}, {"odd": "x"})
    raw = path.read_bytes()
    (header_len,) = struct.unpack_from("<Q", raw, 12)
    assert (20 + header_len) % 8 == 0
    offsets = [e["offset"] for e in json.loads(raw[20:20 + header_len])["arrays"]]
    assert offsets == [0, 8]


@pytest.mark.parametrize("fault_after", [0, 5, 20, 100, 400, 700, -1])
def test_full_disk_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch, fault_after, valid_bytes):
    path = tmp_path / "model.ckpt"
    path.write_bytes(valid_bytes)
    if fault_after < 0:
        fault_after = len(valid_bytes) - 1  # fail on the very last byte of the hash
    monkeypatch.setattr(checkpoint, "_fault_after_bytes", fault_after)
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        save(path, {"new": np.ones((50, 50))}, {"step": 99})
    msg = str(err.value)
    assert msg.startswith(f"cannot write checkpoint {path}") and "\n" not in msg
    assert path.read_bytes() == valid_bytes
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt", "valid.ckpt"]  # no temporary file left


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save(tmp_path / "no" / "such" / "dir.ckpt", {"w": np.zeros(2)}, {})


def test_save_refuses_unsupported_dtypes_before_writing(tmp_path):
    for bad in [np.array(["text"]), np.array([object()]), np.zeros(2, dtype=np.complex64)]:
        with pytest.raises(ValueError):
            save(tmp_path / "x.ckpt", {"bad": bad}, {})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# refusing bad files


def test_missing_file_and_directory(tmp_path):
    assert "no such checkpoint" in assert_refused(tmp_path / "absent.ckpt")
    assert "is a directory" in assert_refused(tmp_path)


def test_truncation_at_many_points(tmp_path, valid_bytes):
    path = tmp_path / "cut.ckpt"
    size = len(valid_bytes)
    # Every cut inside the preamble and the hash, and every 7th byte between (writing files is slow).
    cuts = sorted({*range(40), *range(40, size - 40, 7), *range(size - 40, size)})
    for n in cuts:
        path.write_bytes(valid_bytes[:n])
        expected = "not a nanolstm checkpoint" if n < len(MAGIC) else "truncated or corrupted"
        assert_refused(path, match=expected)


def test_appended_garbage(tmp_path, valid_bytes):
    path = tmp_path / "long.ckpt"
    path.write_bytes(valid_bytes + b"\0")
    assert_refused(path, match="truncated or corrupted")


def test_wrong_magic(tmp_path, valid_bytes):
    path = tmp_path / "magic.ckpt"
    path.write_bytes(b"NANOLSTN" + valid_bytes[8:])
    assert_refused(path, match="not a nanolstm checkpoint")


def test_newer_format_version(tmp_path):
    path = tmp_path / "new.ckpt"
    path.write_bytes(seal({"meta": {}, "arrays": []}, version=FORMAT_VERSION + 1))
    assert_refused(path, match=rf"format {FORMAT_VERSION + 1}, this one reads up to {FORMAT_VERSION}\)"
                               "; upgrade nanolstm")


def entry(**changes):
    e = {"name": "w", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8}
    e.update(changes)
    return e


@pytest.mark.parametrize("header, data", [
    ({"meta": {}, "arrays": [entry(shape=[2**40, 2**40, 2**40], nbytes=8)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(shape=[2**62, 2**62], nbytes=2**66)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(shape=[0, 2**62, 2**62], nbytes=0)]}, b""),
    (b'{"meta": {}, "arrays": [{"name": "w", "dtype": "<f4", "shape": [1' + b"0" * 5000
     + b'], "offset": 0, "nbytes": 8}]}', bytes(8)),
    ({"meta": {}, "arrays": [entry(shape=[-2, -1])]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(shape=[True, True], nbytes=4)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(shape=[2.0])]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(nbytes=4)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(offset=4)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(offset=-8)]}, bytes(16)),
    ({"meta": {}, "arrays": [entry(dtype="|O", shape=[1], nbytes=8)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(dtype="<c8", shape=[1])]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(dtype=["<f4"])]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(name=7)]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(), entry()]}, bytes(8)),
    ({"meta": {}, "arrays": [entry(dtype="|b1", nbytes=2)]}, b"\x01\x02"),
    ({"meta": {}, "arrays": [{"name": "w"}]}, b""),
    ({"meta": {}, "arrays": ["w"]}, b""),
    ({"meta": [], "arrays": []}, b""),
    ({"meta": {}, "arrays": {}}, b""),
    ({"meta": {}}, b""),
    ([1, 2, 3], b""),
    (b"{not json", b""),
    (b"\xff\xfe", b""),
    (b"[" * 100_000 + b"]" * 100_000, b""),
])
def test_forged_headers_with_valid_hash(tmp_path, header, data):
    path = tmp_path / "forged.ckpt"
    path.write_bytes(seal(header, data))
    assert_refused(path, match="corrupted checkpoint header")


def test_header_length_past_the_end(tmp_path):
    path = tmp_path / "long_header.ckpt"
    body = MAGIC + struct.pack("<IQ", FORMAT_VERSION, 2**63) + b"{}"
    path.write_bytes(body + hashlib.sha256(body).digest())
    assert_refused(path, match="corrupted checkpoint header")


class _Exploit:
    """Unpickling this creates the marker file: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payloads_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)))
    bare = tmp_path / "bare.ckpt"
    bare.write_bytes(payload)
    assert_refused(bare, match="not a nanolstm checkpoint")
    # The same payload inside a well-formed file, declared as an object array.
    framed = tmp_path / "framed.ckpt"
    header = {"meta": {}, "arrays": [entry(dtype="|O", shape=[1], nbytes=len(payload))]}
    framed.write_bytes(seal(header, payload))
    assert_refused(framed, match="corrupted checkpoint header")
    # And as a numpy .npy file of object dtype.
    npy = tmp_path / "obj.ckpt"
    with open(npy, "wb") as f:
        np.save(f, np.array([_Exploit(str(marker))], dtype=object), allow_pickle=True)
    assert_refused(npy, match="not a nanolstm checkpoint")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# fuzzing: whatever the bytes, load either succeeds or raises CheckpointError


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def fuzz_valid(fuzz_dir):
    path = fuzz_dir / "valid.ckpt"
    save(path, sample_arrays(), META)
    return path.read_bytes()


def load_bytes(directory, raw):
    path = directory / "fuzz.ckpt"
    path.write_bytes(raw)
    return load(path)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300), with_magic=st.booleans())
def test_fuzz_random_bytes(fuzz_dir, raw, with_magic):
    with pytest.raises(CheckpointError):
        load_bytes(fuzz_dir, MAGIC + raw if with_magic else raw)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_fuzz_bit_flips(fuzz_dir, fuzz_valid, data):
    raw = bytearray(fuzz_valid)
    flips = data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=4, unique=True))
    for bit in flips:
        raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CheckpointError):
        load_bytes(fuzz_dir, bytes(raw))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=5) | st.sampled_from(["<f4", "|b1", "|O", "name", "shape", "offset"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                     max_size=4),
    max_leaves=20)
random_entries = st.fixed_dictionaries({
    "name": st.sampled_from(["w", "b"]) | json_values,
    "dtype": st.sampled_from(sorted(checkpoint.ALLOWED_DTYPES)) | json_values,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "offset": st.integers(-8, 40) | json_values,
    "nbytes": st.integers(-8, 40) | json_values,
})


@st.composite
def plausible_entries(draw):
    """Entries whose sizes agree, so that the loader's later checks and its success path get fuzzed."""
    dtype = draw(st.sampled_from(sorted(checkpoint.ALLOWED_DTYPES)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    return {"name": draw(st.sampled_from(["w", "b", "c"])), "dtype": dtype, "shape": shape,
            "offset": draw(st.integers(0, 16)), "nbytes": int(np.prod(shape)) * int(dtype[-1])}


headers = json_values | st.fixed_dictionaries({
    "meta": st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values,
    "arrays": st.lists(plausible_entries(), max_size=3)
    | st.lists(random_entries | plausible_entries(), max_size=3),
})


@settings(max_examples=200, deadline=None)
@given(header=headers, data=st.binary(max_size=64))
def test_fuzz_headers_with_valid_hash(fuzz_dir, header, data):
    # The hash is right, so only the header checks stand between these files and the caller.
    try:
        arrays, meta = load_bytes(fuzz_dir, seal(header, data))
    except CheckpointError:
        return
    assert isinstance(meta, dict)
    for arr in arrays.values():
        assert isinstance(arr, np.ndarray) and arr.nbytes <= len(data)
