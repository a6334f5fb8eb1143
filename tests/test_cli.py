"""The command line, in-process through main(argv): bad input gets one line and status 2, word models,
signals (130, 143) and an exact resume, a folder held by another trainer, and `python -m nanolstm`."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanolstm import LanguageModel, checkpoint, optim
from nanolstm.cli import main
from nanolstm.data import tokenize_words
from nanolstm.outdir import OutputLock

TINY = ["--num-layers", "1", "--hidden-size", "32", "--embedding-size", "16", "--batch-size", "8",
        "--seq-length", "16", "--lr", "1e-2", "--sample-length", "0", "--no-plot", "--quiet"]

SENTENCES = ["the cat sat on the mat.", "a dog ran to the red house.", "the bird saw a small fox.",
             "we walk to the river and back.", "she reads the old book at night."]


def prose(n_lines, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(SENTENCES[i] for i in rng.integers(len(SENTENCES), size=n_lines)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "prose.txt"
    path.write_text(prose(120), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A finished tiny run: its folder holds last.ckpt and best.ckpt."""
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--data", corpus, "--out", out, "--max-steps", "20", "--eval-every", "10", *TINY]) == 0
    return out


def one_line_error(capsys, *needles):
    """Assert stderr is exactly one 'nanolstm: error:' line holding every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("nanolstm: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def written(folder):
    """The files in folder other than the trainer's lock."""
    return sorted(set(os.listdir(folder)) - {".lock"}) if os.path.exists(folder) else []


# ---------------------------------------------------------------------------------------------
# Bad input to train: one line, status 2, nothing written


def bad_corpora(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("plain ascii, then caf".encode() + b"\xe9 au lait\n")
    (tmp_path / "small.txt").write_text("too small for a batch " * 5, encoding="utf-8")
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "no_txt" / "notes.md").write_text("not a .txt file", encoding="utf-8")
    (tmp_path / "prose.txt").write_text(prose(120), encoding="utf-8")
    os.mkfifo(tmp_path / "fifo")  # read, it would block for ever



@pytest.mark.parametrize("args, needles", [
    (["--data", "{tmp}/missing.txt"], ["missing.txt", "no such file"]),
    (["--data", "{tmp}/empty.txt"], ["empty.txt", "empty"]),
    (["--data", "{tmp}/latin1.txt"], ["latin1.txt", "not valid UTF-8", "byte offset 21"]),
    (["--data", "{tmp}/no_txt"], ["no .txt files"]),
    (["--data", "{tmp}/small.txt"], ["too small for one batch", "2049"]),
    (["--data", "{tmp}/small.txt", "--batch-size", "4", "--seq-length", "50"], ["at least", "201"]),
    # the validation split took nearly all: the line says so, not only --batch-size and --seq-length
    (["--data", "{tmp}/prose.txt", "--val-frac", "0.999999"], ["too small for one batch", "--val-frac 0.999999",
                                                              "lower --val-frac"]),
    (["--data", "{tmp}/fifo"], ["fifo", "not a regular file"]),
    # an empty path would name the working folder: its .txt files, its last.ckpt
    (["--data", ""], ["--data", "''"]),
    (["--resume", ""], ["--resume", "''"]),
    (["--out", ""], ["--out", "''"]),
    (["--max-steps", "5", "--epochs", "1"], ["--epochs and --max-steps", "one of them"]),
    (["--hidden-size", "0"], ["--hidden-size", "positive"]),
    (["--batch-size", "-1"], ["--batch-size", "positive"]),
    (["--num-layers", "0"], ["--num-layers"]),
    (["--seq-length", "-5"], ["--seq-length"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--max-steps", "0"], ["--max-steps"]),
    (["--dropout", "1"], ["--dropout"]),
    (["--val-frac", "1.5"], ["--val-frac"]),
    (["--model", "foo"], ["--model", "foo"]),
    (["--level", "x"], ["--level", "'x'"]),
    (["--optimizer", "lbfgs"], ["--optimizer"]),
    (["--hidden-size", "many"], ["--hidden-size", "many"]),
    (["--sample-length", str(10**30)], ["--sample-length", "at most 1,000,000"]),  # not at the first evaluation
    (["--no-such-option"], ["--no-such-option"]),
])
def test_bad_training_input_is_one_line_and_status_2(tmp_path, capsys, args, needles):
    bad_corpora(tmp_path)
    out = tmp_path / "out"
    argv = ["train", *[a.format(tmp=tmp_path) for a in args], "--out", str(out), "--max-steps", "5"]
    if "--max-steps" in args:
        argv = argv[:-2]
    if "--out" in args:
        argv = argv[:-4] + argv[-2:]
    assert main(argv) == 2
    one_line_error(capsys, *needles)
    assert not out.exists()  # the folder made for the run goes again with the bad input


def test_a_folder_going_away_while_the_run_stops_leaves_the_one_line(tmp_path, capsys, monkeypatch):
    """The folder made for a run is tidied away after bad input; if it vanishes under that tidying
    (removed while the run stopped), the error is still the one line that stopped the run. Seen in
    the fault test that removes the output folder mid-run: a FileNotFoundError traceback, status 1."""
    listdir = os.listdir

    def gone(path):  # the folder goes as the trainer's tidying looks into it, and not before
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("nanolstm", "train.py")):
            shutil.rmtree(path)
        return listdir(path)

    bad_corpora(tmp_path)
    monkeypatch.setattr(os, "listdir", gone)
    out = tmp_path / "out"
    assert main(["train", "--data", str(tmp_path / "empty.txt"), "--out", str(out), "--max-steps", "5"]) == 2
    one_line_error(capsys, "empty")


def test_bad_sampling_input_is_one_line_and_status_2(run, tmp_path, capsys):
    best = os.path.join(run, "best.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    data = bytearray(Path(best).read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    not_a_ckpt = tmp_path / "notes.txt"
    not_a_ckpt.write_text("hello", encoding="utf-8")
    cases = [
        ([str(corrupt)], ["corrupt.ckpt", "corrupted"]),
        ([str(truncated)], ["truncated.ckpt", "truncated"]),
        ([str(not_a_ckpt)], ["not a nanolstm checkpoint"]),
        ([str(tmp_path / "nowhere.ckpt")], ["nowhere.ckpt", "no such"]),
        ([run, "--prime", "the cat sat on Zürich ✓"], ["'Z'", "'ü'", "'✓'", "--unknown skip"]),
        ([run, "--temperature", "0"], ["--temperature"]),
        ([run, "--temperature", "-1"], ["--temperature"]),
        ([run, "--top-k", "0"], ["--top-k"]),
        ([run, "--top-k", "1000"], ["--top-k"]),
        ([run, "--top-p", "1.5"], ["--top-p"]),
        ([run, "--top-p", "0"], ["--top-p"]),
        ([run, "--length", "-1"], ["--length"]),
        # beyond any memory: refused by the memory check (or as too large an array, without sysconf)
        ([run, "--length", str(10**30)], ["--length"]),
        ([run, "--num-samples", "0"], ["--num-samples"]),
        ([run, "--unknown", "replace"], ["--unknown"]),
    ]
    for args, needles in cases:
        assert main(["sample", *args, "--length", "10"] if "--length" not in args else ["sample", *args]) == 2, args
        one_line_error(capsys, *needles)


def test_unknown_prime_characters_can_be_skipped(run, capsys):
    assert main(["sample", run, "--prime", "the ✓cat", "--unknown", "skip", "--length", "25", "--seed", "0"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    # the prime is printed as the model used it: the state was warmed on it without the unknown character
    assert out.startswith("the cat") and len(out) == len("the cat") + 25 + 1
    model = LanguageModel.load(os.path.join(run, "best.ckpt"))
    assert out[len("the cat"):-1] == model.generate(prime="the cat", length=25, seed=0)[0]
    assert main(["sample", run, "--prime", "the ✓cat", "--unknown", "skip", "--length", "5",
                 "--num-samples", "2"]) == 0
    assert capsys.readouterr().out.startswith("---- sample 1 ----\nthe cat")


def test_sample_prints_nothing_before_its_options_are_checked(run, capsys):
    """The prime used to be printed before generate checked the options, then the error came."""
    for bad in (["--temperature", "0"], ["--top-k", "0"], ["--length", "-1"], ["--prime", "The ✓", "--seed", "-1"]):
        assert main(["sample", run, "--prime", "the ", *bad]) == 2, bad
        assert capsys.readouterr().out == "", bad
    assert main(["sample", run, "--prime", "the ✓", "--length", "5"]) == 2  # a character it lacks
    assert capsys.readouterr().out == ""
    # with nothing to generate, the prime alone
    assert main(["sample", run, "--prime", "the ", "--length", "0"]) == 0
    assert capsys.readouterr().out == "the \n"


def test_resume_with_options_that_do_not_fit_the_checkpoint_is_refused(run, corpus, capsys):
    before = {name: Path(run, name).read_bytes() for name in written(run)}
    assert main(["train", "--resume", run, "--hidden-size", "64", "--max-steps", "30"]) == 2
    one_line_error(capsys, "--hidden-size 64", "checkpoint: 32")
    assert main(["train", "--resume", run, "--model", "gru", "--max-steps", "30"]) == 2
    one_line_error(capsys, "--model gru")
    other = os.path.join(os.path.dirname(corpus), "other.txt")
    Path(other).write_text(prose(120, seed=1), encoding="utf-8")
    assert main(["train", "--resume", run, "--data", other, "--max-steps", "30"]) == 2
    one_line_error(capsys, "--data")
    assert main(["train", "--resume", os.path.join(run, "nothing.ckpt")]) == 2
    one_line_error(capsys, "nothing.ckpt")
    after = {name: Path(run, name).read_bytes() for name in written(run)}
    assert after == before


def snapshot(folder):
    """The bytes of every file in folder but the lock."""
    return {name: Path(folder, name).read_bytes() for name in written(folder) if Path(folder, name).is_file()}


def records(folder):
    """metrics.jsonl's records, read as strict JSON: NaN or Infinity in it fails here."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it(run, corpus, tmp_path, capsys):
    old = str(tmp_path / "old")
    shutil.copytree(run, old)
    before = snapshot(old)
    fresh = ["train", "--data", corpus, "--out", old, *TINY, "--max-steps", "4", "--eval-every", "2"]
    assert main(fresh) == 2
    one_line_error(capsys, f"{old} already holds a run", f"continue it with --resume {old}", "another --out",
                   "--overwrite")
    assert snapshot(old) == before
    # with --overwrite, bad input still leaves the old run as it was
    assert main([*fresh, "--overwrite", "--seq-length", "5000"]) == 2
    one_line_error(capsys, "too small for one batch")
    assert snapshot(old) == before
    # ... and a run that starts replaces it whole: no stale best.ckpt beside a run without validation
    assert main([*fresh, "--overwrite", "--val-frac", "0"]) == 0
    assert written(old) == ["last.ckpt", "metrics.jsonl"]
    assert [r["step"] for r in records(old)] == [2, 4]
    assert checkpoint.load(os.path.join(old, "last.ckpt"))[1]["train_config"]["overwrite"] is False
    # the new run is resumed as usual, without --overwrite
    assert main(["train", "--resume", old, "--max-steps", "6"]) == 0
    assert [r["step"] for r in records(old)] == [2, 4, 6]
    # a run killed in its first evaluation has no last.ckpt: the line does not offer --resume
    os.remove(os.path.join(old, "last.ckpt"))
    assert main(fresh) == 2
    one_line_error(capsys, f"{old} already holds a run that has no last.ckpt to resume", "--overwrite")


def test_a_resume_into_a_folder_holding_another_run_is_refused(run, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    before = snapshot(b)
    assert main(["train", "--resume", a, "--out", b, "--max-steps", "22"]) == 2
    one_line_error(capsys, f"{b} already holds a run", "--overwrite")
    assert snapshot(b) == before
    # --overwrite may not remove the run it resumes
    assert main(["train", "--resume", a, "--overwrite", "--max-steps", "22"]) == 2
    one_line_error(capsys, "--overwrite", "drop --overwrite")
    # its own folder, named as --out, is the same run
    assert main(["train", "--resume", a, "--out", a, "--max-steps", "22"]) == 0
    assert [r["step"] for r in records(a)] == [10, 20, 22]
    # and --overwrite replaces the other run: b's log holds a's continuation alone
    assert main(["train", "--resume", a, "--out", b, "--overwrite", "--max-steps", "24"]) == 0
    assert [r["step"] for r in records(b)] == [24]
    assert checkpoint.load(os.path.join(b, "last.ckpt"))[1]["step"] == 24


def forge(path, **train_config):
    """Rewrite the checkpoint at path with train_config's entries changed; the file stays valid."""
    arrays, meta = checkpoint.load(path)
    meta["train_config"].update(train_config)
    checkpoint.save(path, arrays, meta)


def test_options_given_on_resume_count_even_at_their_default_value(run, tmp_path, capsys, monkeypatch):
    folder = str(tmp_path / "r")
    shutil.copytree(run, folder)
    forge(os.path.join(folder, "last.ckpt"), on_nan="skip")
    before = snapshot(folder)
    # 256 is TrainConfig's default hidden size; the checkpoint's is 32
    assert main(["train", "--resume", folder, "--hidden-size", "256", "--max-steps", "30"]) == 2
    one_line_error(capsys, "--hidden-size 256", "checkpoint: 32")
    assert snapshot(folder) == before
    # options that may change are taken at their default values too: --eval-every 250, --on-nan stop,
    # --out out (relative to the working folder, not the checkpoint's)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", folder, "--eval-every", "250", "--on-nan", "stop", "--out", "out",
                 "--max-steps", "22"]) == 0
    saved = checkpoint.load(tmp_path / "out" / "last.ckpt")[1]["train_config"]
    assert (saved["eval_every"], saved["on_nan"], saved["max_steps"]) == (250, "stop", 22)
    assert snapshot(folder) == before


def test_epochs_or_max_steps_given_on_resume_replaces_the_other(run, corpus, tmp_path, capsys):
    from nanolstm.data import Batches
    from nanolstm.train import TrainConfig, load_data

    _, train_ids, _, _ = load_data(TrainConfig(data=corpus))
    per_epoch = len(Batches(train_ids, 8, 16))
    folder = str(tmp_path / "r")
    shutil.copytree(run, folder)  # trained with --max-steps 20
    assert main(["train", "--resume", folder, "--epochs", "1.5"]) == 0
    _, meta = checkpoint.load(os.path.join(folder, "last.ckpt"))
    assert meta["step"] == int(1.5 * per_epoch) > 20
    assert (meta["train_config"]["epochs"], meta["train_config"]["max_steps"]) == (1.5, None)
    assert main(["train", "--resume", folder, "--max-steps", str(meta["step"] + 2)]) == 0
    _, again = checkpoint.load(os.path.join(folder, "last.ckpt"))
    assert again["step"] == meta["step"] + 2
    assert (again["train_config"]["epochs"], again["train_config"]["max_steps"]) == (None, meta["step"] + 2)
    assert main(["train", "--resume", folder, "--max-steps", "5", "--epochs", "9"]) == 2
    one_line_error(capsys, "--epochs and --max-steps")


def test_a_run_resumes_from_another_folder_and_after_its_corpus_moved(corpus, tmp_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    shutil.copy(corpus, tmp_path / "data" / "prose.txt")
    out = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "data")
    assert main(["train", "--data", "prose.txt", "--out", out, *TINY, "--max-steps", "4", "--eval-every", "2"]) == 0
    last = os.path.join(out, "last.ckpt")
    assert checkpoint.load(last)[1]["train_config"]["data"] == str(tmp_path / "data" / "prose.txt")
    monkeypatch.chdir(tmp_path)  # the relative path given no longer names the corpus from here
    assert main(["train", "--resume", out, "--max-steps", "6"]) == 0
    os.rename(tmp_path / "data" / "prose.txt", tmp_path / "moved.txt")
    before = snapshot(out)
    assert main(["train", "--resume", out, "--max-steps", "8"]) == 2
    one_line_error(capsys, str(tmp_path / "data" / "prose.txt"), "pass --data with that corpus")
    assert snapshot(out) == before
    # --data may change on resume: the corpus is known by its SHA-256
    assert main(["train", "--resume", out, "--max-steps", "8", "--data", "moved.txt"]) == 0
    _, meta = checkpoint.load(last)
    assert meta["step"] == 8 and meta["train_config"]["data"] == str(tmp_path / "moved.txt")
    Path("other.txt").write_text(prose(120, seed=1), encoding="utf-8")
    before = snapshot(out)
    assert main(["train", "--resume", out, "--max-steps", "10", "--data", "other.txt"]) == 2
    one_line_error(capsys, "corpus differs", "pass --data with the corpus the run was trained on")
    assert snapshot(out) == before


def test_without_a_validation_split_the_run_says_so_and_logs_strict_json(corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    loud = [a for a in TINY if a != "--quiet"]
    assert main(["train", "--data", corpus, "--out", out, *loud, "--val-frac", "0", "--max-steps", "4",
                 "--eval-every", "2"]) == 0
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line == f"done: step 4, no validation split (--val-frac 0); sample with: nanolstm sample {out}"
    assert [r["val_loss"] for r in records(out)] == [None, None]  # null, not NaN
    # and null reads back on resume
    assert main(["train", "--resume", out, "--max-steps", "6"]) == 0
    assert [r["val_loss"] for r in records(out)] == [None, None, None]


def test_an_output_folder_held_by_a_live_trainer_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(str(out)):
        assert main(["train", "--data", corpus, "--out", str(out), "--max-steps", "5", *TINY]) == 2
        one_line_error(capsys, str(out), f"pid {os.getpid()}")
        assert written(out) == []
    # released when the holder is done
    assert main(["train", "--data", corpus, "--out", str(out), "--max-steps", "5", *TINY]) == 0
    assert "last.ckpt" in written(out)


# ---------------------------------------------------------------------------------------------
# Word level


def test_word_level_trains_reports_perplexity_and_maps_rare_words_to_unk(tmp_path, capsys):
    data = tmp_path / "words.txt"
    data.write_text(prose(300) + "a zebra and an okapi appear once.\n" + prose(40, seed=2), encoding="utf-8")
    out = str(tmp_path / "out")
    assert main(["train", "--data", str(data), "--out", out, "--level", "word", "--min-count", "2",
                 "--max-steps", "60", "--eval-every", "30", *TINY, "--batch-size", "4"]) == 0
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        history = [json.loads(line) for line in f]
    for r in history:
        assert {"step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_s", "elapsed_s"} <= set(r)
        assert "val_bpc" not in r
        assert np.isclose(r["val_ppl"], np.exp(r["val_loss"]))
    assert history[-1]["val_ppl"] < history[0]["val_ppl"]

    model = LanguageModel.load(os.path.join(out, "best.ckpt"))
    tokens = model.vocab.tokens
    assert tokens[0] == "<unk>" and model.vocab.unk_id == 0
    assert "cat" in tokens and "." in tokens and "\n" in tokens
    assert not {"zebra", "okapi", "appear", "once"} & set(tokens)
    assert list(model.vocab.encode("a zebra sat")) == [tokens.index("a"), 0, tokens.index("sat")]

    capsys.readouterr()
    assert main(["sample", out, "--length", "30", "--seed", "0", "--prime", "the okapi"]) == 0
    text = capsys.readouterr().out
    assert text == "the okapi" + model.generate(prime="the okapi", length=30, seed=0)[0] + "\n"
    assert tokenize_words(text)[:2] == ["the", "okapi"]  # the first sampled word is not glued on
    assert set(tokenize_words(text)[2:]) <= set(tokens)


# ---------------------------------------------------------------------------------------------
# Signals and an exact resume through the command line


@pytest.mark.parametrize("signum, status, model", [(signal.SIGINT, 130, "lstm"), (signal.SIGTERM, 143, "gru")])
def test_a_signal_stops_training_with_a_resume_command_and_resume_is_exact(
        corpus, tmp_path, capsys, monkeypatch, signum, status, model):
    common = ["--data", corpus, "--model", model, "--dropout", "0.25", "--max-steps", "50",
              "--eval-every", "20", *TINY]
    assert main(["train", "--out", str(tmp_path / "a"), *common]) == 0

    stop_after = 27  # not an evaluation step (every 20), mid-epoch
    lr_at = optim.lr_at

    def lr_at_then_signal(step, *args):
        if step == stop_after - 1:  # as update number stop_after begins
            assert signal.getsignal(signum) not in (signal.default_int_handler, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return lr_at(step, *args)

    monkeypatch.setattr(optim, "lr_at", lr_at_then_signal)
    out_b = str(tmp_path / "b")
    assert main(["train", "--out", out_b, *common]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"resume with: nanolstm train --resume {out_b}" in err
    _, meta = checkpoint.load(os.path.join(out_b, "last.ckpt"))
    assert meta["step"] == stop_after
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored

    monkeypatch.setattr(optim, "lr_at", lr_at)
    assert main(["train", "--resume", out_b]) == 0
    a, meta_a = checkpoint.load(os.path.join(tmp_path, "a", "last.ckpt"))
    b, meta_b = checkpoint.load(os.path.join(out_b, "last.ckpt"))
    assert meta_a["step"] == meta_b["step"] == 50
    assert sorted(a) == sorted(b) and any(k.startswith("carry.") for k in a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------
# Help


def test_help_in_process(capsys):
    assert main(["train", "--help"]) == 0
    assert "--hidden-size" in capsys.readouterr().out
    assert main(["sample", "--help"]) == 0
    assert "--top-p" in capsys.readouterr().out


def test_python_dash_m_nanolstm_help():
    done = subprocess.run([sys.executable, "-m", "nanolstm", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "sample" in done.stdout
    assert done.stderr == ""


def test_quiet_and_no_plot_can_be_switched_back_on_at_resume(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "2", "--eval-every", "2"]) == 0
    assert capsys.readouterr().out == "" and not (out / "loss.png").exists()  # TINY: --quiet --no-plot
    assert main(["train", "--resume", str(out), "--max-steps", "4", "--no-quiet", "--plot"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: step 4")
    assert (out / "loss.png").exists()
    # what the resume gave is the run's from then on, until another resume changes it
    assert main(["train", "--resume", str(out), "--max-steps", "6"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done: step 6")
    assert main(["train", "--resume", str(out), "--max-steps", "8", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
