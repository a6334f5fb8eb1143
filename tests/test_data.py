"""Tests for nanolstm.data: reading corpora, vocabularies, encoding, splitting and batching."""

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from nanolstm.data import (Batches, Vocab, detokenize_words, encode_chars, read_corpus, split_ids,
                           tokenize_words)
from nanolstm.errors import DataError

# Accents (precomposed and with a combining mark), CJK, emoji, a zero-width joiner sequence.
UNICODE_TEXT = "café naïve e\u0301 Ωμέγα 日本語の文章 😀👍🏽 👩\u200d💻 \r\n\ttab"


def assert_one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg and "\r" not in msg


# ----------------------------------------------------------------------------------------------------
# read_corpus


def test_read_corpus_file_keeps_line_endings_and_strips_bom(tmp_path):
    f = tmp_path / "c.txt"
    f.write_bytes(b"\xef\xbb\xbfline one\r\nline two\n")
    assert read_corpus(f) == "line one\r\nline two\n"


def test_read_corpus_directory_joins_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.md").write_text("not a txt file", encoding="utf-8")
    (tmp_path / "d.txt").mkdir()  # a directory named like a text file is not a text file
    assert read_corpus(tmp_path) == "first\nsecond"


def test_read_corpus_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file") as err:
        read_corpus(tmp_path / "nope.txt")
    assert_one_line(err)


def test_read_corpus_directory_without_txt_files(tmp_path):
    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="no .txt files") as err:
        read_corpus(tmp_path)
    assert_one_line(err)


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf"])
def test_read_corpus_empty(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match="empty") as err:
        read_corpus(f)
    assert_one_line(err)


@pytest.mark.parametrize("content, offset", [
    (b"hello \xff world", 6),
    ("héllo".encode() + b"\xc3", 6),  # truncated two-byte sequence at the end
    (b"\xef\xbb\xbfab\x80", 5),  # offsets count the byte order mark: they are offsets in the file
])
def test_read_corpus_invalid_utf8_reports_byte_offset(tmp_path, content, offset):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_corpus(f)
    assert_one_line(err)
    assert str(f) in str(err.value)
    assert f"byte offset {offset};" in str(err.value)


def test_read_corpus_invalid_utf8_in_directory_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"ok\nthen \xfe")
    with pytest.raises(DataError, match=r"b\.txt: not valid UTF-8 at byte offset 8;"):
        read_corpus(tmp_path)


def test_read_corpus_refuses_a_fifo_instead_of_blocking_on_it(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise TimeoutError("read_corpus blocked on the FIFO")

    # opening a FIFO that has no writer blocks for ever: fail instead of hanging
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(DataError, match="not a regular file or a directory") as err:
            read_corpus(fifo)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert_one_line(err)


@pytest.mark.parametrize("denied", ["iterdir", "stat"])
def test_read_corpus_unreadable_folder_is_one_line(tmp_path, monkeypatch, denied):
    """chmod 000 on the folder: listing it (or, given a file inside, looking at that file) is refused.
    Raised by hand, since root, which CI may run as, ignores permissions."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("text", encoding="utf-8")
    real = getattr(Path, denied)

    def refuse(self, *args, **kwargs):
        if self == folder or folder in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, denied, refuse)
    target = folder if denied == "iterdir" else folder / "a.txt"
    with pytest.raises(DataError, match="cannot read: Permission denied") as err:
        read_corpus(target)
    assert_one_line(err)
    assert str(target) in str(err.value)


# ----------------------------------------------------------------------------------------------------
# words


def test_tokenize_words():
    assert tokenize_words("Hello, world! It's\n(fine).") == [
        "Hello", ",", "world", "!", "It's", "\n", "(", "fine", ")", "."]


def test_detokenize_round_trips_ordinary_prose():
    text = "Hello, world! (yes) it's [a] test; ok?\nnew line: {done}.\n\nend"
    assert detokenize_words(tokenize_words(text)) == text


def test_word_vocab_min_count_unk_and_order():
    text = "b a b c b a d ."
    v = Vocab.build_words(text, min_count=2)
    assert v.tokens == ["<unk>", "b", "a"]  # <unk> first, then by falling count
    assert v.unk_id == 0
    ids = v.encode("a b zebra")
    assert ids.dtype == np.int32
    assert ids.tolist() == [2, 1, 0]
    assert v.decode(ids) == "a b <unk>"
    # Ties in count are broken alphabetically, not by first appearance or hashing.
    assert Vocab.build_words("z y x y z x", min_count=1).tokens == ["<unk>", "x", "y", "z"]


def test_word_vocab_missing_and_json_round_trip():
    v = Vocab.build_words("the cat sat.")
    assert v.missing("the dog sat on it.") == ["dog", "it", "on"]
    w = Vocab.from_json(v.to_json())
    assert (w.level, w.tokens, w.unk_id) == (v.level, v.tokens, v.unk_id)


def test_build_words_rejects_min_count_below_one():
    with pytest.raises(DataError):
        Vocab.build_words("a b", min_count=0)


# ----------------------------------------------------------------------------------------------------
# characters


def test_char_vocab_is_sorted_and_independent_of_order():
    v = Vocab.build_chars("hello world")
    assert v.tokens == sorted(set("hello world"))
    assert v.unk_id is None
    assert Vocab.build_chars("dlrow olleh").tokens == v.tokens


def test_char_unicode_round_trip():
    ids, v = encode_chars(UNICODE_TEXT)
    assert ids.dtype == np.int32 and ids.shape == (len(UNICODE_TEXT),)
    assert v.decode(ids) == UNICODE_TEXT
    assert "\u0301" in v.index  # the combining mark is its own code point
    assert Vocab.build_chars(UNICODE_TEXT).tokens == sorted(set(UNICODE_TEXT))
    w = Vocab.from_json(v.to_json())
    assert w.tokens == v.tokens
    assert np.array_equal(w.encode(UNICODE_TEXT), ids)


def test_lone_surrogate_does_not_crash():
    text = b"ab\xffcd".decode("utf-8", "surrogateescape")  # holds the lone surrogate U+DCFF
    ids, v = encode_chars(text)
    assert len(ids) == 5
    assert v.decode(ids) == text


def test_char_encode_with_vocab_rejects_unknown_characters():
    v = Vocab.build_chars("abc")
    assert v.missing("abxyx\n") == ["\n", "x", "y"]
    with pytest.raises(DataError, match="'x', 'y'") as err:
        v.encode("abxyx\n")
    assert_one_line(err)  # the newline is named as '\n', not printed


def test_encode_chars_matches_naive_encoding_on_megabytes():
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefgh ijk\n.,éü日本😀\u0301"))
    # One chunk at the real chunk size; chunk boundaries are tested with a tiny chunk below.
    text = "".join(rng.choice(alphabet, size=3_000_000).tolist())
    ids, v = encode_chars(text)
    naive = [v.index[c] for c in text]
    assert ids.tolist() == naive


def test_encode_chars_across_chunk_boundaries(monkeypatch):
    import nanolstm.data as data
    monkeypatch.setattr(data, "_CHUNK", 7)
    text = "the quick 😀 brown fox jumps over the lazy dog " * 5
    ids, v = encode_chars(text)
    assert ids.tolist() == [v.index[c] for c in text]
    assert v.tokens == sorted(set(text))
    with pytest.raises(DataError, match="'Z'"):
        v.encode(text + "Z")


# ----------------------------------------------------------------------------------------------------
# split_ids


def test_split_ids_takes_the_end_as_views():
    ids = np.arange(100, dtype=np.int32)
    train, val = split_ids(ids, 0.1)
    assert train.tolist() == list(range(90))
    assert val.tolist() == list(range(90, 100))
    assert np.shares_memory(train, ids) and np.shares_memory(val, ids)
    train, val = split_ids(ids, 0.0)
    assert len(train) == 100 and len(val) == 0


def test_split_ids_too_small_for_validation():
    with pytest.raises(DataError, match="at least 20") as err:
        split_ids(np.arange(15), 0.1)
    assert_one_line(err)
    with pytest.raises(DataError):
        split_ids(np.arange(15), 1.0)


# ----------------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("n, N, T", [(101, 4, 5), (1000, 3, 7), (21, 2, 10), (50, 1, 49)])
def test_batches_shapes_shift_and_stream_continuity(n, N, T):
    ids = np.arange(n, dtype=np.int32)
    batches = Batches(ids, N, T)
    L = (n - 1) // N
    assert len(batches) == L // T
    seen = list(batches)
    assert len(seen) == len(batches)
    for k, (x, y) in enumerate(seen):
        assert x.shape == y.shape == (T, N)
        assert x.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert np.array_equal(y, x + 1)  # with ids = arange, the target is the next id
        assert np.array_equal(x[1:], y[:-1])  # within a batch, each target is the next input
        assert np.array_equal(x[0], np.arange(N) * L + k * T)  # stream j starts at j*L
        if k > 0:
            assert np.array_equal(x[0], seen[k - 1][1][-1])  # batch k continues batch k-1


def test_batches_on_shuffled_ids_continue_streams():
    ids = np.random.default_rng(1).permutation(1000).astype(np.int32)
    batches = Batches(ids, 4, 8)
    (x0, y0), (x1, y1) = batches[0], batches[1]
    assert np.array_equal(x1[0], y0[-1])
    assert np.array_equal(np.concatenate([x0, x1]), np.concatenate([x0[:1], y0, y1[:-1]]))
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_batches_minimum_corpus():
    need = Batches.min_tokens(4, 5)
    assert need == 21
    assert len(Batches(np.arange(need), 4, 5)) == 1
    with pytest.raises(DataError, match=f"= {need} tokens, have {need - 1};") as err:
        Batches(np.arange(need - 1), 4, 5)
    assert_one_line(err)
