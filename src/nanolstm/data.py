"""Corpora, vocabularies and batches for truncated backpropagation through time.

Shape legend: T time steps per batch (seq_length), N streams per batch (batch_size).

A corpus is read as one string, turned into a 1-D array of token ids by a `Vocab`, split into a
training part and a validation part (the end of the corpus), and served by `Batches` as time-major
(T, N) pairs of inputs and targets. The batches are cut so that batch k+1 continues every stream of
batch k, which is what lets the trainer carry the hidden state from one batch to the next.
"""

import codecs
import math
import re
import stat
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "read_corpus",
    "default_corpus",
    "tokenize_words",
    "detokenize_words",
    "Vocab",
    "encode_chars",
    "split_ids",
    "Batches",
]

UNK = "<unk>"

# One past the largest Unicode code point: the size of a table indexed by code point.
_N_CODE_POINTS = 0x110000

# Characters per chunk when encoding: 8M characters is 32 MB as UTF-32, small next to the output
# array of a large corpus, and large enough that the per-chunk overhead does not matter.
_CHUNK = 1 << 23


# ----------------------------------------------------------------------------------------------------
# reading a corpus


def read_corpus(path):
    """Read a UTF-8 text file, or a directory of .txt files joined with "\\n" in name order.

    The bytes are decoded as they are, so "\\r\\n" line endings survive; a leading UTF-8 byte order mark
    is dropped from each file. Raises DataError for a missing or unreadable path, one that is neither
    a regular file nor a directory (a FIFO would block for ever), a directory without .txt files, bytes
    that are not UTF-8 (naming the file and the byte offset) and an empty corpus.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            files = sorted((p for p in path.iterdir() if p.suffix == ".txt" and p.is_file()),
                           key=lambda p: p.name)
            if not files:
                raise DataError(f"{path}: directory contains no .txt files; "
                                "put the corpus in .txt files or pass a single file")
        elif stat.S_ISREG(mode):
            files = [path]
        else:
            raise DataError(f"{path}: not a regular file or a directory; give a text file or a folder of them")
    except (FileNotFoundError, ValueError):  # ValueError: a NUL in the path, which no file has
        raise DataError(f"{path}: no such file or directory; check the corpus path") from None
    except OSError as e:  # a folder we may not list, or a path we may not look into
        raise DataError(f"{path}: cannot read: {e.strerror or e}; check the path and its permissions") from None

    text = "\n".join(_read_utf8(f) for f in files)
    if not text:
        raise DataError(f"{path}: the corpus is empty; give a corpus with some text in it")
    return text


def default_corpus():
    """The text of Python's own help topics (`pydoc_data.topics`, about 465,000 characters), joined
    in sorted order. It ships with every Python, so `nanolstm train` needs no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python lacks pydoc_data, the default corpus; pass --data PATH") from None
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def _read_utf8(path):
    """Decode one file as strict UTF-8, without its byte order mark, reporting bad bytes by offset."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}; check the path and its permissions")
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        # e.start counts from the end of the byte order mark; report the offset within the file.
        raise DataError(f"{path}: not valid UTF-8 at byte offset {start + e.start}; "
                        "convert the file to UTF-8 (e.g. with iconv)") from None


# ----------------------------------------------------------------------------------------------------
# words

# A word is a run of letters/digits/underscores with at most one inner apostrophe ("it's" stays whole);
# every other non-space character is a token of its own, and so is a newline, so that line structure
# survives. Other whitespace (spaces, tabs, "\r") only separates tokens and is lost.
_WORD_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]|\n")

# No space is written before a closing mark or after an opening one when words are joined back.
_CLOSING = frozenset(".,;:!?')]}")
_OPENING = frozenset("([{")


def tokenize_words(text):
    """Split text into words, punctuation marks and newlines.

    "Hi, it's me.\\n" -> ["Hi", ",", "it's", "me", ".", "\\n"]. Letters of every script count as word
    characters, so a run of CJK characters without spaces is a single word.
    """
    return _WORD_RE.findall(text)


def detokenize_words(tokens):
    """Join word tokens with single spaces, except before closing marks, after opening ones and
    around newlines. The inverse of tokenize_words for ordinarily spaced prose."""
    parts = []
    prev = None
    for tok in tokens:
        glued = (prev is None or prev == "\n" or tok == "\n"
                 or tok in _CLOSING or prev in _OPENING)
        if not glued:
            parts.append(" ")
        parts.append(tok)
        prev = tok
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------
# vocabularies


class Vocab:
    """A fixed mapping between tokens and integer ids.

    level:  "char" (one token per Unicode code point) or "word" (tokens from tokenize_words)
    tokens: list of V token strings; tokens[i] is the token with id i
    index:  dict token -> id
    unk_id: for word vocabularies the id of "<unk>", which unknown words map to; None for characters
    """

    def __init__(self, level, tokens):
        if level not in ("char", "word"):
            raise ValueError(f"vocabulary level must be 'char' or 'word', not {level!r}")
        self.level = level
        self.tokens = list(tokens)
        self.index = {tok: i for i, tok in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary tokens are not distinct")
        if level == "char":
            self.unk_id = None
        elif UNK in self.index:
            self.unk_id = self.index[UNK]
        else:
            raise ValueError(f"a word vocabulary must contain {UNK!r}")

    @classmethod
    def build_chars(cls, text):
        """The character vocabulary of text: its distinct code points in sorted order, so the same
        text always gives the same ids."""
        return cls("char", [chr(c) for c in _code_points_present(text)])

    @classmethod
    def build_words(cls, text, min_count=1):
        """The word vocabulary of text: "<unk>" first, then every token seen at least min_count times,
        most frequent first and ties in sorted order (so the ids never depend on hashing)."""
        if min_count < 1:
            raise DataError(f"min_count is {min_count}; it must be at least 1")
        counts = Counter(m.group() for m in _WORD_RE.finditer(text))
        kept = sorted((tok for tok, c in counts.items() if c >= min_count),
                      key=lambda tok: (-counts[tok], tok))
        return cls("word", [UNK] + kept)

    def __len__(self):
        return len(self.tokens)

    def encode(self, text):
        """Token ids of text, an int32 array of shape (number of tokens,).

        Characters not in a character vocabulary raise DataError; unknown words map to unk_id.
        """
        if self.level == "char":
            return encode_chars(text, self)[0]
        # A generator, not tokenize_words, so a large corpus is never held as a list of strings.
        get = self.index.get
        return np.fromiter((get(m.group(), self.unk_id) for m in _WORD_RE.finditer(text)),
                           dtype=np.int32)

    def decode(self, ids):
        """The text of a sequence of ids (any integer array-like of shape (n,))."""
        ids = np.asarray(ids).reshape(-1).tolist()
        for i in ids:
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(self.tokens)}")
        toks = [self.tokens[i] for i in ids]
        return "".join(toks) if self.level == "char" else detokenize_words(toks)

    def missing(self, text):
        """The sorted distinct tokens of text that are not in this vocabulary."""
        if self.level == "char":
            present = (chr(c) for c in _code_points_present(text))
        else:
            present = set(tokenize_words(text))
        return sorted(tok for tok in present if tok not in self.index)

    def to_json(self):
        """A JSON-serialisable dict from which from_json rebuilds this vocabulary exactly."""
        return {"level": self.level, "tokens": list(self.tokens)}

    @classmethod
    def from_json(cls, d):
        """Rebuild a vocabulary from to_json's dict, raising ValueError if it is malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("tokens"), list):
            raise ValueError("vocabulary must be a dict with a 'tokens' list")
        tokens = d["tokens"]
        if not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("vocabulary tokens must be non-empty strings")
        if d.get("level") == "char" and not all(len(t) == 1 for t in tokens):
            raise ValueError("character vocabulary tokens must be single characters")
        return cls(d.get("level"), tokens)

    def __repr__(self):
        return f"Vocab(level={self.level!r}, size={len(self)})"


# ----------------------------------------------------------------------------------------------------
# fast character encoding


def _code_point_chunks(text):
    """Yield (start, code points) for successive chunks of text, code points as uint32 arrays.

    "surrogatepass" lets a lone surrogate (which a str built with "surrogateescape" can hold) through
    as its own code point instead of raising.
    """
    for start in range(0, len(text), _CHUNK):
        chunk = text[start:start + _CHUNK].encode("utf-32-le", "surrogatepass")
        yield start, np.frombuffer(chunk, dtype=np.uint32)


def _code_points_present(text):
    """The sorted distinct code points of text, as an int64 array."""
    present = np.zeros(_N_CODE_POINTS, dtype=bool)
    for _, cps in _code_point_chunks(text):
        present[cps] = True
    return np.flatnonzero(present)


def encode_chars(text, vocab=None):
    """Encode text one id per code point, building the character vocabulary if none is given.

    Returns (ids, vocab), ids an int32 array of shape (len(text),). Works chunk by chunk through a
    lookup table indexed by code point, so a 100 MB corpus takes about a second and little memory
    beyond the output. Raises DataError naming up to 10 characters that are not in a given vocab.
    """
    if vocab is None:
        vocab = Vocab.build_chars(text)
    elif vocab.level != "char":
        raise ValueError("encode_chars needs a character vocabulary")

    lut = np.full(_N_CODE_POINTS, -1, dtype=np.int32)  # code point -> id, -1 for unknown
    lut[[ord(t) for t in vocab.tokens]] = np.arange(len(vocab), dtype=np.int32)

    ids = np.empty(len(text), dtype=np.int32)
    for start, cps in _code_point_chunks(text):
        out = ids[start:start + len(cps)]
        out[:] = lut[cps]
        if (out < 0).any():
            unknown = ", ".join(repr(c) for c in vocab.missing(text)[:10])
            raise DataError(f"characters not in the vocabulary: {unknown}; "
                            "remove them or use a model trained on text that has them")
    return ids, vocab


# ----------------------------------------------------------------------------------------------------
# splitting and batching


def split_ids(ids, val_frac):
    """Split ids of shape (n,) into (train, val), val being the last val_frac of the corpus.

    Both are views of ids. With val_frac > 0 the validation part must hold at least 2 tokens
    (one input and its target).
    """
    if not 0 <= val_frac < 1:
        raise DataError(f"validation fraction is {val_frac}; it must be in [0, 1)")
    n_val = int(len(ids) * val_frac)
    if val_frac > 0 and n_val < 2:
        need = 2 / val_frac  # infinite for a fraction as small as 1e-320
        need = f"at least {math.ceil(need)}" if math.isfinite(need) else "more than any corpus has"
        raise DataError(f"corpus too small for a validation split: {len(ids)} tokens, need {need} "
                        f"for a validation fraction of {val_frac}; use a larger corpus or "
                        "a larger validation fraction")
    cut = len(ids) - n_val
    return ids[:cut], ids[cut:]


class Batches:
    """Time-major batches for truncated BPTT over one epoch of a 1-D id array.

    The n ids are cut into N contiguous streams of L = (n - 1) // N tokens each, stream j starting
    at ids[j * L]. Batch k holds steps k*T ... k*T + T - 1 of every stream:
        x: (T, N) int array, x[t, j] = ids[j*L + k*T + t]
        y: (T, N) int array, y[t, j] = ids[j*L + k*T + t + 1], the token that follows x[t, j]
    so the first input of batch k+1 is the last target of batch k, in every stream. The ragged tail
    of each stream that does not fill a whole batch is dropped.
    """

    def __init__(self, ids, batch_size, seq_length):
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 1-D integer array, not {ids.dtype} of shape {ids.shape}")
        if batch_size < 1 or seq_length < 1:
            raise DataError(f"batch size {batch_size} and sequence length {seq_length} "
                            "must both be at least 1")
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.stream_length = (len(ids) - 1) // batch_size
        self.num_batches = self.stream_length // seq_length
        if self.num_batches == 0:
            raise DataError(f"corpus too small for one batch: need at least batch_size*seq_length+1 "
                            f"= {self.min_tokens(batch_size, seq_length)} tokens, have {len(ids)}; "
                            "lower --batch-size or --seq-length")
        # Views, not copies: the targets are the same memory shifted by one token.
        N, L = batch_size, self.stream_length
        self._x_streams = ids[:N * L].reshape(N, L)  # (N, L)
        self._y_streams = ids[1:N * L + 1].reshape(N, L)  # (N, L)

    @staticmethod
    def min_tokens(batch_size, seq_length):
        """The fewest ids that make one batch: every stream needs T inputs, and the last needs a target."""
        return batch_size * seq_length + 1

    def __len__(self):
        return self.num_batches

    def __getitem__(self, k):
        """Batch k as (x, y), both contiguous int arrays of shape (T, N)."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} out of range for {self.num_batches} batches")
        steps = slice(k * self.seq_length, (k + 1) * self.seq_length)
        x = np.ascontiguousarray(self._x_streams[:, steps].T)  # (T, N)
        y = np.ascontiguousarray(self._y_streams[:, steps].T)  # (T, N)
        return x, y

    def __iter__(self):
        for k in range(self.num_batches):
            yield self[k]
