"""End to end through the Python API: the trainer learns, overfits a tiny text, writes a complete run
folder, and a run that is stopped and resumed ends with the same bytes as one that never stopped."""

import json
import math
import os
import signal

import numpy as np
import pytest

from nanolstm import LanguageModel, TrainConfig, checkpoint
from nanolstm.data import Batches
from nanolstm.errors import NanolstmError
from nanolstm.train import Interrupted, load_data, train

METRIC_KEYS = {"step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}

ADJ = "big small red green old young quiet loud".split()
NOUN = "cat dog bird fox horse mouse child farmer".split()
VERB = "sees chases likes follows finds hears".split()
PREP = "near under behind beside".split()
PLACE = "tree house river barn hill road".split()


def english(n_chars, seed=0):
    """Deterministic English-like prose from a small grammar, about n_chars characters long."""
    rng = np.random.default_rng(seed)

    def pick(words):
        return words[rng.integers(len(words))]

    lines, n = [], 0
    while n < n_chars:
        line = (f"The {pick(ADJ)} {pick(NOUN)} {pick(VERB)} the {pick(NOUN)} "
                f"{pick(PREP)} the {pick(PLACE)}.")
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines) + "\n"


def tiny(tmp_path, text, **overrides):
    """A TrainConfig for a tiny, quick model on text written to tmp_path/corpus.txt."""
    data = tmp_path / "corpus.txt"
    data.write_text(text, encoding="utf-8")
    options = dict(data=str(data), out=str(tmp_path / "out"), num_layers=1, hidden_size=32,
                   embedding_size=16, batch_size=8, seq_length=16, lr=1e-2, eval_every=50,
                   sample_length=0, plot=False, quiet=True)
    options.update(overrides)
    return TrainConfig(**options)


def read_metrics(out, timings=True):
    """The records of out/metrics.jsonl; without the wall-clock fields if timings is False."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    if not timings:
        records = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]
    return records


def assert_same_checkpoint(path_a, path_b):
    arrays_a, meta_a = checkpoint.load(path_a)
    arrays_b, meta_b = checkpoint.load(path_b)
    assert sorted(arrays_a) == sorted(arrays_b)
    assert any(k.startswith("optim.") for k in arrays_a) and any(k.startswith("carry.") for k in arrays_a)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, name
        assert np.array_equal(arrays_a[name], arrays_b[name]), f"{name} differs after resume"
    assert meta_a["step"] == meta_b["step"]
    assert meta_a["rng"] == meta_b["rng"]
    assert meta_a["optimizer"] == meta_b["optimizer"]


# ---------------------------------------------------------------------------------------------
# Learning


def test_validation_loss_falls_and_the_run_folder_is_complete(tmp_path):
    config = tiny(tmp_path, english(6000), hidden_size=48, max_steps=300, plot=True)
    result = train(config)

    history = read_metrics(config.out)
    assert [r["step"] for r in history] == [50, 100, 150, 200, 250, 300]
    for r in history:
        assert METRIC_KEYS | {"val_bpc"} <= set(r), sorted(r)
        assert "val_ppl" not in r
        assert r["tokens"] == r["step"] * config.batch_size * config.seq_length
        assert math.isclose(r["val_bpc"], r["val_loss"] / math.log(2))
        assert r["lr"] == config.lr and r["tokens_per_s"] > 0 and r["elapsed_s"] > 0
    first, last = history[0]["val_loss"], history[-1]["val_loss"]
    assert last < first - 0.5, (first, last)
    assert last < 1.6  # the grammar has little entropy; a unigram model would be near 2.9 nats
    assert result.step == 300 and result.val_loss == last
    assert result.best_val_loss == min(r["val_loss"] for r in history)

    files = set(os.listdir(config.out))
    assert {"last.ckpt", "best.ckpt", "metrics.jsonl", "loss.png"} <= files
    assert not [f for f in files if "tmp" in f], files  # no temporary file left behind
    with open(os.path.join(config.out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    _, best_meta = checkpoint.load(os.path.join(config.out, "best.ckpt"))
    assert best_meta["best_val_loss"] == result.best_val_loss
    _, last_meta = checkpoint.load(os.path.join(config.out, "last.ckpt"))
    assert last_meta["step"] == 300


def test_a_tiny_text_is_overfitted_to_near_zero_loss(tmp_path):
    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps on.\n" \
           "Pack my box with five dozen liquor jugs!\n"
    config = tiny(tmp_path, text, val_frac=0.0, hidden_size=64, batch_size=2, seq_length=16,
                  lr=2e-2, max_steps=300, eval_every=25)
    train(config)
    history = read_metrics(config.out)
    assert history[0]["train_loss"] > 1.0
    assert history[-1]["train_loss"] < 0.05, [round(r["train_loss"], 4) for r in history]
    # the memorised text comes back, character for character, when primed with its start
    model = LanguageModel.load(os.path.join(config.out, "last.ckpt"))
    assert model.generate(prime="The quick", length=20, argmax=True)[0] == text[9:29]


# ---------------------------------------------------------------------------------------------
# Stop and resume


RESUME = dict(num_layers=2, dropout=0.3, max_steps=60, eval_every=25)


def run_uninterrupted(tmp_path, **overrides):
    config = tiny(tmp_path / "a", english(3000), **{**RESUME, **overrides})
    train(config)
    return config


def test_resume_after_sigint_is_bit_identical(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_uninterrupted(tmp_path)
    b = tiny(tmp_path / "b", english(3000), **RESUME, quiet=False)  # quiet would drop the step lines
    stop_at = 30  # not an evaluation step (every 25), and in the middle of the second epoch

    def log(line):
        if line.startswith(f"step {stop_at}/"):
            # the trainer's handler must be in place, or this would stop pytest itself
            assert signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as stopped:
        train(b, log=log)
    assert stopped.value.signum == signal.SIGINT and stopped.value.step == stop_at
    arrays, meta = checkpoint.load(os.path.join(b.out, "last.ckpt"))
    assert meta["step"] == stop_at
    _, train_ids, _, _ = load_data(b)
    assert stop_at % len(Batches(train_ids, b.batch_size, b.seq_length)) != 0  # mid-epoch
    assert any(k.startswith("carry.") and np.abs(v).sum() > 0 for k, v in arrays.items())

    result = train(TrainConfig(resume=b.out, quiet=True))
    assert result.step == RESUME["max_steps"] and result.out == os.path.abspath(b.out)
    assert_same_checkpoint(os.path.join(a.out, "last.ckpt"), os.path.join(b.out, "last.ckpt"))
    # the metrics too, but for the clock: the loss averaged since the last evaluation was carried over
    assert read_metrics(b.out, timings=False) == read_metrics(a.out, timings=False)


def test_a_finished_run_extended_with_resume_is_bit_identical(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_uninterrupted(tmp_path, model="gru")
    b = tiny(tmp_path / "b", english(3000), **{**RESUME, "model": "gru", "max_steps": 33})
    train(b)
    train(TrainConfig(resume=os.path.join(b.out, "last.ckpt"), max_steps=RESUME["max_steps"], quiet=True))
    assert_same_checkpoint(os.path.join(a.out, "last.ckpt"), os.path.join(b.out, "last.ckpt"))


def test_from_python_an_option_counts_as_given_when_it_differs_from_the_default_or_is_named(tmp_path):
    config = tiny(tmp_path, english(3000), max_steps=4, eval_every=2)
    train(config)
    # hidden_size=256 is the default: from Python, without `given`, it cannot be told from one left alone
    result = train(TrainConfig(resume=config.out, hidden_size=256, max_steps=6, quiet=True))
    assert result.step == 6
    with pytest.raises(NanolstmError, match="--hidden-size 256 .checkpoint: 32."):
        train(TrainConfig(resume=config.out, hidden_size=256, max_steps=8), given={"resume", "hidden_size"})
    # a resumable option named in `given` is taken even at its default value
    train(TrainConfig(resume=config.out, eval_every=250, max_steps=8), given={"resume", "eval_every", "max_steps"})
    assert checkpoint.load(os.path.join(config.out, "last.ckpt"))[1]["train_config"]["eval_every"] == 250
    # quiet and plot, which the command line can only set, can be switched back from Python
    train(TrainConfig(resume=config.out, max_steps=10), given={"resume", "max_steps", "quiet", "plot"},
          log=lambda line: None)
    saved = checkpoint.load(os.path.join(config.out, "last.ckpt"))[1]["train_config"]
    assert (saved["quiet"], saved["plot"]) == (False, True) and os.path.exists(os.path.join(config.out, "loss.png"))


def test_adamw_decays_weights_by_default_and_older_runs_resume_with_what_they_had(tmp_path):
    """AdamW without weight decay is Adam: PyTorch's AdamW and optim.AdamW default to 1e-2."""
    (tmp_path / "adam").mkdir()
    adam = tiny(tmp_path / "adam", english(3000), max_steps=2, eval_every=2)
    train(adam)
    assert checkpoint.load(os.path.join(adam.out, "last.ckpt"))[1]["train_config"]["weight_decay"] == 0.0
    config = tiny(tmp_path, english(3000), optimizer="adamw", max_steps=2, eval_every=2)
    train(config)
    last = os.path.join(config.out, "last.ckpt")
    assert checkpoint.load(last)[1]["train_config"]["weight_decay"] == 0.01
    # given as the default it resolves to, it fits the checkpoint
    train(TrainConfig(resume=config.out, weight_decay=0.01, max_steps=4, quiet=True))
    # a run from before the default changed says 0.0 in its checkpoint: it resumes with 0.0, as it trained
    arrays, meta = checkpoint.load(last)
    meta["train_config"]["weight_decay"] = 0.0
    checkpoint.save(last, arrays, meta)
    train(TrainConfig(resume=config.out, max_steps=6, quiet=True))
    assert checkpoint.load(last)[1]["train_config"]["weight_decay"] == 0.0
    with pytest.raises(NanolstmError, match="--weight-decay 0.01 .checkpoint: 0.0."):
        train(TrainConfig(resume=config.out, weight_decay=0.01, max_steps=8))


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("vocab,layers,hidden,batch,seq", [(84, 2, 64, 8, 16), (300, 1, 32, 4, 8), (50, 3, 128, 32, 64)])
def test_step_memory_is_a_lower_bound_of_what_a_training_step_holds(model, vocab, layers, hidden, batch, seq):
    # what the trainer's memory check counts must never exceed what a step really takes (else it would
    # refuse runs that fit), and should be most of it (else it would let through runs that do not)
    import tracemalloc

    from nanolstm import functional as F
    from nanolstm.model import ModelConfig
    from nanolstm.train import step_memory

    config = ModelConfig(vocab, model, layers, hidden, 16)
    x, y = np.random.default_rng(0).integers(0, vocab, (2, seq, batch))
    LanguageModel(config, seed=0).forward(x)  # compiled code loaded before counting
    tracemalloc.start()
    try:
        lm = LanguageModel(config, seed=0)
        loss, cache = F.cross_entropy_forward(lm.forward(x)[0], y)
        lm.backward(F.cross_entropy_backward(cache))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    counted = sum(step_memory(config, batch, seq))
    assert 0.5 * peak < counted <= peak


def test_a_training_step_beyond_the_machines_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import importlib

    trainer = importlib.import_module("nanolstm.train")  # the module, not the function nanolstm.train
    monkeypatch.setattr(trainer, "physical_memory", lambda: 2**30)
    # a model built means the check let the run through: stopped there, so that no test trains it
    monkeypatch.setattr(trainer, "LanguageModel", lambda *a, **k: (_ for _ in ()).throw(NanolstmError("built")))
    config = tiny(tmp_path, english(140_000), hidden_size=1024, batch_size=512, seq_length=256)
    with pytest.raises(NanolstmError) as err:
        train(config)
    msg = str(err.value)
    assert msg.startswith("a training step needs at least 4.") and "\n" not in msg, msg
    assert "512 x 256 tokens" in msg and "--batch-size" in msg and "1.0 GiB" in msg
    assert not os.path.exists(config.out)  # not even an empty folder
    # the same run on a machine with room for it passes the check
    monkeypatch.setattr(trainer, "physical_memory", lambda: 8 * 2**30)
    with pytest.raises(NanolstmError, match="^built$"):
        train(config)
