"""Bad input, fuzzed with hypothesis: checkpoints whose container is valid but whose metadata or arrays
are forged (loaded for sampling and for a resume), corpora of random bytes and random Unicode, the
sampler's options, and random command lines. Whatever the input: a result, or the project's own
one-line error; never another exception, never a traceback, never memory out of proportion to the
file. (tests/test_checkpoint.py fuzzes the container itself: random bytes, truncations, bit flips.)

Each target counts the cases it ran and prints them as a "reliability:" line at the end of the module
(pytest -s); NANOLSTM_RELIABILITY_LOG=path appends them there as JSON lines too.
"""

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanolstm import LanguageModel, TrainConfig, Vocab, checkpoint, train
from nanolstm.cli import build_parser, main
from nanolstm.data import Batches, encode_chars, read_corpus, split_ids
from nanolstm.errors import CheckpointError, DataError, NanolstmError
from nanolstm.model import ModelConfig
from nanolstm.sample import check_sampling, next_tokens

CASES = Counter()
FUNCTION_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

WORDS = "the a cat dog bird fox sees chases likes near under tree house river old red".split()


def prose(n_lines, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=8)) + "." for _ in range(n_lines)) + "\n"


def report(target, **figures):
    print(f"\nreliability: {target}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    log = os.environ.get("NANOLSTM_RELIABILITY_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"target": target, **figures}) + "\n")


@pytest.fixture(scope="module", autouse=True)
def count_cases():
    yield
    for target, n in sorted(CASES.items()):
        report(f"fuzz {target}", cases=n)


@contextlib.contextmanager
def peak_memory():
    """Measure the peak of memory allocated inside the block (NumPy's arrays included)."""
    box = {}
    tracemalloc.start()
    try:
        yield box
    finally:
        box["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def assert_one_line(err, start):
    msg = str(err)
    assert msg.startswith(start) and "\n" not in msg, msg


@contextlib.contextmanager
def scratch():
    """A fresh temporary folder, also the working folder, for one hypothesis example."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(cwd)


# ---------------------------------------------------------------------------------------------
# A small trained run: the source of valid checkpoints to forge


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "corpus.txt").write_text(prose(80), encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    (root / "no_txt").mkdir()
    (root / "a_file").write_text("not a folder", encoding="utf-8")
    config = TrainConfig(data=str(root / "corpus.txt"), out=str(root / "run"), num_layers=1, hidden_size=8,
                         embedding_size=4, batch_size=2, seq_length=8, dropout=0.1, max_steps=6, eval_every=3,
                         sample_length=0, plot=False, quiet=True)
    train(config)
    return root


@pytest.fixture(scope="module")
def valid(files):
    """(arrays, meta, size in bytes) of the run's last.ckpt."""
    path = files / "run" / "last.ckpt"
    arrays, meta = checkpoint.load(path)
    return arrays, meta, path.stat().st_size


# JSON leaves biased toward what breaks things: absurd sizes, wrong types, NaN
leaves = (st.sampled_from([0, 1, 2, -1, 10**9, 10**12, 2**63, 10**30, True, False, None, "", "lstm", "char",
                           "word", "float64", "object", "<U8", 1.5, float("nan"), float("inf"), [], {}])
          | st.integers() | st.floats() | st.text(max_size=4))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)

MODEL_KEYS = ["vocab_size", "model", "num_layers", "hidden_size", "embedding_size", "dropout"]
TRAIN_KEYS = [f for f in TrainConfig.__dataclass_fields__
              if f not in ("max_steps", "epochs", "eval_every", "sample_length", "quiet", "plot", "resume")]
META_PATHS = ([("model_config", k) for k in MODEL_KEYS] + [("train_config", k) for k in TRAIN_KEYS]
              + [("model_config",), ("train_config",), ("vocab",), ("vocab", "tokens"), ("vocab", "level"),
                 ("dtype",), ("step",), ("rng",), ("rng", "state"), ("optimizer",), ("optimizer", "steps"),
                 ("optimizer", "lr"), ("best_val_loss",), ("interval",), ("corpus_sha256",)])


@st.composite
def forgeries(draw, keys):
    """(arrays, meta, what was changed): a valid checkpoint's contents with a few parts forged."""
    arrays, meta, _ = draw(keys)
    arrays, meta = {k: v.copy() for k, v in arrays.items()}, copy.deepcopy(meta)
    changed = []
    for path in draw(st.lists(st.sampled_from(META_PATHS), min_size=1, max_size=3)):
        target = meta
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):  # a copy: a later path must not edit the strategy's own [] or {}
            target[path[-1]] = copy.deepcopy(draw(json_values))
            changed.append(".".join(path))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(arrays)))
        how = draw(st.sampled_from(["drop", "reshape", "retype", "nan", "extra"]))
        if how == "drop":
            del arrays[name]
        elif how == "reshape":
            arrays[name] = np.zeros(draw(st.lists(st.integers(0, 5), max_size=3)), np.float32)
        elif how == "retype":
            arrays[name] = arrays[name].astype(draw(st.sampled_from([np.float16, np.float64, np.int32, np.bool_])))
        elif how == "nan" and arrays[name].dtype.kind == "f" and arrays[name].size:
            arrays[name].flat[0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        else:
            arrays[f"model.extra{len(arrays)}"] = np.ones(3, np.float32)
        changed.append(f"{how} {name}")
    return arrays, meta, changed


@pytest.mark.parametrize("changes", [
    {"hidden_size": 10**9}, {"num_layers": 10**9}, {"vocab_size": 10**12}, {"embedding_size": 10**9},
    {"hidden_size": 10**5, "num_layers": 10**4}, {"hidden_size": 0}, {"hidden_size": -8}, {"hidden_size": 8.0},
    {"hidden_size": True}, {"hidden_size": "8"}, {"model": "transformer"}, {"dropout": float("nan")},
    {"dropout": "0.1"}, {"unexpected": 1}, {"vocab_size": 3},
])
def test_forged_model_sizes_are_refused_before_anything_is_allocated(valid, tmp_path, changes):
    arrays, meta, size = valid
    meta = copy.deepcopy(meta)
    meta["model_config"].update(changes)
    path = tmp_path / "forged.ckpt"
    checkpoint.save(path, arrays, meta)
    with peak_memory() as mem, pytest.raises(CheckpointError) as err:
        LanguageModel.load(path)
    assert_one_line(err.value, str(path))
    assert mem["peak"] < 20 * size + 2**20
    # and the trainer refuses the same sizes in a resume before building anything
    meta["train_config"].update({k: v for k, v in changes.items() if k in TrainConfig.__dataclass_fields__})
    checkpoint.save(path, arrays, meta)
    with peak_memory() as mem:
        status = main(["train", "--resume", str(path), "--max-steps", "8", "--quiet"])
    assert status in (0, 2) and mem["peak"] < 40 * 2**20
    CASES["checkpoint: forged model sizes (explicit)"] += 1


@settings(max_examples=300, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(data=st.data())
def test_fuzz_forged_checkpoints_load_or_are_refused_in_one_line(valid, tmp_path, data):
    arrays, meta, changed = data.draw(forgeries(st.just(valid)))
    path = tmp_path / "forged.ckpt"
    checkpoint.save(path, arrays, meta)
    size = path.stat().st_size
    with peak_memory() as mem:
        try:
            model = LanguageModel.load(path)
        except CheckpointError as err:
            assert_one_line(err, str(path))
            model = None
    assert mem["peak"] < 20 * size + 2**20, changed
    CASES[f"checkpoint: forged and loaded, {'refused' if model is None else 'loaded'}"] += 1
    if model is not None:  # what loads, works
        try:
            text = model.generate(length=3, seed=0)[0]
            assert isinstance(text, str)
        except NanolstmError as err:
            assert_one_line(err, "")
    CASES["checkpoint: forged metadata and arrays, loaded for sampling"] += 1


@settings(max_examples=150, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(data=st.data())
def test_fuzz_forged_checkpoints_resume_or_are_refused_in_one_line(valid, capsys, data):
    arrays, meta, changed = data.draw(forgeries(st.just(valid)))
    with scratch() as d:
        (d / "run").mkdir()
        checkpoint.save(d / "run" / "last.ckpt", arrays, meta)
        capsys.readouterr()
        with peak_memory() as mem:
            status = main(["train", "--resume", "run", "--max-steps", str(valid[1]["step"] + 2),
                           "--eval-every", "1", "--sample-length", "5", "--quiet"])
        out, err = capsys.readouterr()
        assert status in (0, 2) and "Traceback" not in err, (changed, err)
        if status == 2:
            assert err.startswith("nanolstm: error: ") and err.count("\n") == 1, (changed, err)
        assert mem["peak"] < 40 * 2**20, changed  # the default corpus is read if data is forged to None
        assert {p.name for p in d.iterdir()} == {"run"}  # nothing written beside the checkpoint's folder
    CASES["checkpoint: forged metadata and arrays, resumed"] += 1
    CASES[f"checkpoint: forged and resumed, exit {status}"] += 1


# ---------------------------------------------------------------------------------------------
# The corpus reader and the vocabularies


def check_text(text):
    """Everything the trainer does with a corpus's text, checked for round trips."""
    ids, vocab = encode_chars(text)
    assert vocab.decode(ids) == text
    again = Vocab.from_json(json.loads(json.dumps(vocab.to_json())))
    assert again.tokens == vocab.tokens and np.array_equal(again.encode(text), ids)
    words = Vocab.build_words(text)
    word_ids = words.encode(text)
    assert ((0 <= word_ids) & (word_ids < len(words))).all() and isinstance(words.decode(word_ids), str)
    return ids, vocab


@settings(max_examples=300, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(raw=st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"a", b"\x00", b"\xff", b"\xc3", b"\xc3\xa9", b"\xed\xa0\x80", b"\xf0\x9f\x98\x80", b"\r\n", b"\r", b"\n",
     b"\xef\xbb\xbf", b"\xe2\x80\xa8"]), max_size=30).map(b"".join))
def test_fuzz_corpus_bytes_read_or_are_refused_in_one_line(tmp_path, raw):
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    try:
        text = read_corpus(path)
    except DataError as err:
        assert_one_line(err, str(path))
        assert "UTF-8" in str(err) or "empty" in str(err)
        CASES["corpus: random bytes"] += 1
        return
    assert text.encode("utf-8") == raw.removeprefix(b"\xef\xbb\xbf")  # line endings and NULs untouched
    check_text(text)
    CASES["corpus: random bytes"] += 1


lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(exclude_categories=()) | lone_surrogates | st.sampled_from("\r\n\x00"),
                    min_size=1))
def test_fuzz_unicode_text_with_lone_surrogates_encodes_and_round_trips(text):
    ids, vocab = check_text(text)
    # the vocabulary, surrogates and all, survives a checkpoint
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(os.path.join(d, "v.ckpt"), {"ids": ids}, {"vocab": vocab.to_json()})
        arrays, meta = checkpoint.load(os.path.join(d, "v.ckpt"))
    assert Vocab.from_json(meta["vocab"]).decode(arrays["ids"]) == text
    CASES["corpus: random Unicode with lone surrogates"] += 1


def test_a_file_with_encoded_surrogates_is_refused_in_one_line(tmp_path):
    path = tmp_path / "cesu.txt"
    path.write_bytes("ok \ud800 no".encode("utf-8", "surrogatepass"))
    with pytest.raises(DataError, match="not valid UTF-8 at byte offset 3") as err:
        read_corpus(path)
    assert_one_line(err.value, str(path))
    CASES["corpus: explicit cases"] += 1


@pytest.mark.parametrize("text, level", [
    ("a" * 5000, "char"), ("a " * 3000, "word"), ("\x00" * 5000, "char"), ("ab\r\ncd\ref\n" * 800, "char"),
    ("\u2028x\u0085y" * 1500, "char"),
])
def test_degenerate_corpora_train_and_sample(tmp_path, capsys, text, level):
    """A single repeated character (a vocabulary of one), NUL bytes, mixed and exotic line endings."""
    data = tmp_path / "corpus.txt"
    data.write_bytes(text.encode("utf-8"))
    out = str(tmp_path / "out")
    assert main(["train", "--data", str(data), "--out", out, "--level", level, "--num-layers", "1",
                 "--hidden-size", "8", "--embedding-size", "4", "--batch-size", "2", "--seq-length", "8",
                 "--max-steps", "20", "--eval-every", "10", "--sample-length", "20", "--no-plot", "--quiet"]) == 0
    assert main(["sample", out, "--length", "30", "--seed", "0"]) == 0
    sampled = capsys.readouterr().out
    if level == "char":
        assert len(sampled) == 31 and set(sampled[:-1]) <= set(text)
    CASES["corpus: explicit cases"] += 1


def test_a_one_line_50_mb_corpus_is_read_encoded_and_trained_on(tmp_path):
    rng = np.random.default_rng(0)
    chunk = "".join(rng.choice(list("abcdefgh ijklmnop,.é日"), size=2**20 - 2**16).tolist()).encode("utf-8")
    path = tmp_path / "one_line.txt"
    with open(path, "wb") as f:
        for _ in range(50 * 2**20 // len(chunk) + 1):  # 50 MiB, not one line break
            f.write(chunk)
    size = path.stat().st_size
    assert size >= 50 * 2**20
    with peak_memory() as mem:
        result = train(TrainConfig(data=str(path), out=str(tmp_path / "out"), num_layers=1, hidden_size=8,
                                   embedding_size=4, batch_size=4, seq_length=16, val_frac=0.0, max_steps=3,
                                   eval_every=3, sample_length=10, plot=False, quiet=True))
    assert result.step == 3
    # the text, its ids (4 bytes each) and a chunk in UTF-32: some ten times the file, no more
    assert mem["peak"] < 12 * size, (mem["peak"], size)
    report("corpus: one-line 50 MiB file", file_mib=round(size / 2**20, 1), peak_mib=round(mem["peak"] / 2**20),
           peak_over_file_size=round(mem["peak"] / size, 1))
    CASES["corpus: explicit cases"] += 1


# ---------------------------------------------------------------------------------------------
# The sampler's options


temperatures = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, -1.0, 1e-320, 5e-324, 1e-300, 1e300, float("nan"), float("inf"), 0.8, 1.0])
top_ks = st.none() | st.integers(-3, 40) | st.sampled_from([10**12, -(10**12)])
top_ps = st.none() | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 1.0000001, 1e-300, 5e-324, 0.5, float("nan")])


@settings(max_examples=500, deadline=None)
@given(temperature=temperatures, top_k=top_ks, top_p=top_ps, argmax=st.booleans(), data=st.data())
def test_fuzz_sampling_options_draw_a_valid_token_or_are_refused(temperature, top_k, top_p, argmax, data):
    V = data.draw(st.integers(1, 30))
    logits = data.draw(st.lists(st.floats(-1e30, 1e30) | st.sampled_from([1e308, -1e308, 0.0]),
                                min_size=V, max_size=V))
    logits = np.array([logits, logits[::-1]])  # (2, V)
    try:
        check_sampling(temperature, top_k, top_p, V)
    except NanolstmError as err:
        assert_one_line(err, "--")
        CASES["sampler options (next_tokens)"] += 1
        return
    tok = next_tokens(logits, np.random.default_rng(0), temperature, top_k, top_p, argmax)
    assert tok.shape == (2,) and ((0 <= tok) & (tok < V)).all()
    if top_k is not None and not argmax:  # never outside the k most likely (ties may widen the set)
        for row, t in zip(logits, tok):
            assert row[t] >= np.sort(row)[-top_k]
    CASES["sampler options (next_tokens)"] += 1


@settings(max_examples=200, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(temperature=temperatures, top_k=top_ks, top_p=top_ps, argmax=st.booleans(),
       prime=st.text(st.characters(exclude_categories=()) | lone_surrogates, max_size=6),
       unknown=st.sampled_from(["error", "skip", "replace"]), length=st.integers(-2, 8),
       seed=st.none() | st.integers(-5, 2**70), num_samples=st.integers(-1, 3))
def test_fuzz_generation_options(files, temperature, top_k, top_p, argmax, prime, unknown, length, seed,
                                 num_samples):
    model = LanguageModel.load(files / "run" / "best.ckpt")
    try:
        texts = model.generate(prime=prime, length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                               argmax=argmax, seed=seed, num_samples=num_samples, unknown=unknown)
    except NanolstmError as err:
        assert_one_line(err, "")
    else:
        assert len(texts) == num_samples and all(len(t) == length for t in texts)
    CASES["sampler options (generate)"] += 1


def test_a_prime_the_terminal_cannot_encode_does_not_stop_the_sample(files, capsys):
    """A byte that is not UTF-8 in argv reaches Python as a lone surrogate; a strict stdout (capsys's,
    or a UTF-8 terminal's) cannot encode it. No vocabulary has it: --unknown skip drops it, and the
    prime is printed as the model read it, without it."""
    assert main(["sample", str(files / "run"), "--prime", "the \udcff", "--unknown", "skip", "--length", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and "udcff" not in out
    CASES["sampler options (explicit)"] += 1


# ---------------------------------------------------------------------------------------------
# The command line


TRAIN_BASE = ["--data", "{corpus}", "--out", "out", "--num-layers", "1", "--hidden-size", "8",
              "--embedding-size", "4", "--batch-size", "2", "--seq-length", "8", "--max-steps", "2",
              "--eval-every", "2", "--sample-length", "5", "--no-plot", "--quiet"]

JUNK = ["", "x", "-", "--", "-1", "nan", "inf", "-inf", "1e309", "0x10", "1_000", " 3", "é", "\udcff", "--lr",
        "train", "sample", "--nope", "-x", "--lr=", "--lr=1e-3", "=", "9" * 30]
INTS = ["-1", "0", "1", "2", "3", str(10**12), "1e3", "2.5"]
FLOATS = ["0", "-0", "-1", "1e-3", "0.5", "0.99", "1", "1.5", "1e6", "1e37", "nan", "inf", "1e-320"]
VALUES = {
    "--data": ["{corpus}", "{root}/empty.txt", "{root}/latin1.txt", "{root}/no_txt", "{root}", "missing.txt", ""],
    "--out": ["out", "o u t", ".", "deeper/out", "é", "{root}/a_file", "", "run"],
    "--resume": ["run", "run/best.ckpt", "run/last.ckpt", "missing", "{root}/corpus.txt", "", "."],
    "--level": ["char", "word", "byte"], "--model": ["lstm", "gru", "rnn", "mlp"],
    "--optimizer": ["adam", "adamw", "sgd", "adagrad", "rmsprop", "lbfgs"],
    "--lr-schedule": ["constant", "step", "cosine", "linear"], "--on-nan": ["stop", "skip", "ignore"],
    "--dtype": ["float32", "float64", "float16"],
    "--min-count": INTS, "--num-layers": ["0", "1", "2", "-1", str(10**12)],
    "--hidden-size": ["0", "1", "8", "-1", str(10**9), str(10**12)],
    "--embedding-size": ["0", "1", "4", "-1", str(10**12)],
    "--batch-size": ["0", "1", "2", "-1", str(10**12)], "--seq-length": ["0", "1", "4", "-1", str(10**12)],
    "--max-steps": ["0", "1", "2", "3", "-1"], "--eval-every": ["0", "1", "2", "-1", str(10**12)],
    "--sample-length": ["0", "1", "5", "-1", str(10**12)], "--warmup": INTS, "--lr-step-size": INTS,
    "--seed": ["0", "-1", "7", "9" * 30, "x"], "--epochs": FLOATS,
    "--lr": FLOATS, "--dropout": FLOATS, "--val-frac": FLOATS, "--lr-gamma": FLOATS, "--min-lr": FLOATS,
    "--grad-clip": FLOATS, "--grad-clip-value": FLOATS, "--weight-decay": FLOATS,
    "--length": ["-1", "0", "1", "5", "x"], "--temperature": FLOATS, "--top-p": FLOATS,
    "--top-k": ["-1", "0", "1", "5", "100", str(10**12)], "--num-samples": ["-1", "0", "1", "3"],
    "--prime": ["", "the ", "Zürich ✓", "\udcff", "a\r\nb", "\u2028"], "--unknown": ["error", "skip", "replace"],
}


def parser_flags(command):
    """The option strings of a sub-command, each mapped to whether it takes a value."""
    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict))
    return {o: a.nargs != 0 for a in sub.choices[command]._actions for o in a.option_strings}


def long_run(max_steps):
    """Whether a value of --max-steps asks for more than a few steps (JUNK's "9" * 30 would train for
    ever, "1_000" for 1,000 steps)."""
    try:
        return int(max_steps) > 3
    except ValueError:
        return False


@st.composite
def command_lines(draw, root):
    """argv for main(): a command, then real flags (with fitting, boundary or junk values) and junk."""
    command = draw(st.sampled_from(["train", "train", "train", "sample", "sample", "junk"]))
    if command == "junk":
        return draw(st.lists(st.sampled_from(JUNK) | st.text(max_size=5), max_size=4))
    flags = parser_flags(command)
    argv = [command]
    if command == "train":
        argv += TRAIN_BASE  # a tiny run unless the random flags that follow say otherwise
    else:
        argv.append(draw(st.sampled_from(["run", "run/last.ckpt", "missing.ckpt", "{root}/corpus.txt", "", "."])))
    for _ in range(draw(st.integers(0, 6))):
        flag = draw(st.sampled_from(sorted(flags)) | st.sampled_from(JUNK))
        argv.append(flag)
        if flags.get(flag):
            values = VALUES.get(flag, JUNK) + JUNK
            if flag == "--max-steps":  # a large count is a valid request for a long run, not bad input
                values = [v for v in values if not long_run(v)]
            argv.append(draw(st.sampled_from(values)))
    return [a.format(root=root, corpus=root / "corpus.txt") for a in argv]


@settings(max_examples=400, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(data=st.data())
def test_fuzz_command_line_exits_0_or_2_without_a_traceback(files, capsys, data):
    argv = data.draw(command_lines(files))
    if argv[:1] == ["train"] and "--max-steps" not in argv:  # junk that happens to start a long run
        argv[1:1] = [a.format(corpus=files / "corpus.txt") for a in TRAIN_BASE]
    with scratch() as d:
        shutil.copytree(files / "run", d / "run")
        capsys.readouterr()
        sys.stderr.reconfigure(errors="backslashreplace")  # as Python's own stderr is; stdout stays strict
        status = main(argv)
        out, err = capsys.readouterr()
    assert status in (0, 2), (argv, status, err)
    assert "Traceback" not in err, (argv, err)
    if status == 2:
        assert err.startswith("nanolstm: error: ") and err.count("\n") == 1, (argv, err)
    CASES["command line (random argv)"] += 1
    CASES[f"command line exit {status}"] += 1


def test_every_flag_with_each_boundary_and_junk_value(files, capsys):
    """Not left to chance: every option of both commands alone with each of its listed values."""
    cases = []
    for command in ("train", "sample"):
        for flag, takes_value in sorted(parser_flags(command).items()):
            if flag in ("-h", "--help"):
                continue
            values = VALUES.get(flag, JUNK) + ["x", "", "nan"] if takes_value else [None]
            cases += [(command, flag, v) for v in values]
    for command, flag, value in cases:
        head = ["train", *TRAIN_BASE] if command == "train" else ["sample", "run", "--length", "5"]
        given = [flag] if value is None else [flag, value]
        argv = [a.format(root=files, corpus=files / "corpus.txt") for a in head + given]
        with scratch() as d:
            shutil.copytree(files / "run", d / "run")
            capsys.readouterr()
            sys.stderr.reconfigure(errors="backslashreplace")
            status = main(argv)
            out, err = capsys.readouterr()
        assert status in (0, 2) and "Traceback" not in err, (argv, status, err)
        if status == 2:
            assert err.startswith("nanolstm: error: ") and err.count("\n") == 1, (argv, err)
        CASES["command line (each flag, each listed value)"] += 1
