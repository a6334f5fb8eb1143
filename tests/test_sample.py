"""Sampling: next_tokens' temperature, top-k, top-p and argmax on random logits, and generation from a
trained model, in Python and on the command line: seeds, greedy decoding, Unicode, streaming."""

import os

import numpy as np
import pytest

from nanolstm import LanguageModel, TrainConfig, checkpoint, train
from nanolstm.cli import main
from nanolstm.functional import softmax
from nanolstm.sample import next_tokens

# ---------------------------------------------------------------------------------------------
# next_tokens on random logits


def random_logits(N, V, seed=0, scale=2.0):
    return np.random.default_rng(seed).standard_normal((N, V)) * scale


def clear_winner(logits, gap):
    """Rows whose most likely token leads the second by more than gap."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return logits[top2[:, 1] - top2[:, 0] > gap]


def test_argmax_and_a_temperature_near_zero_take_the_most_likely_token():
    logits = clear_winner(random_logits(3000, 40), gap=0.01)
    assert len(logits) > 2000
    best = logits.argmax(axis=-1)
    assert np.array_equal(next_tokens(logits, np.random.default_rng(0), argmax=True), best)
    assert np.array_equal(next_tokens(logits, np.random.default_rng(1), temperature=1e-4), best)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_draws_outside_the_k_most_likely(k):
    logits = random_logits(4000, 30, seed=k)
    rng = np.random.default_rng(k)
    allowed = np.argsort(-logits, axis=-1)[:, :k]  # (N, k)
    for temperature in (0.5, 1.0, 5.0):
        tok = next_tokens(logits, rng, temperature=temperature, top_k=k)
        assert (tok[:, None] == allowed).any(axis=-1).all()
    # and it is still a draw: every one of the k is taken, as often as its renormalised probability
    row = np.repeat(random_logits(1, 30, seed=99, scale=0.5), 20000, axis=0)
    tok = next_tokens(row, rng, top_k=k)
    top = np.argsort(-row[0])[:k]
    assert set(tok.tolist()) == set(top.tolist())
    expected = softmax(row[0, top])
    observed = np.array([(tok == t).mean() for t in top])
    assert np.abs(observed - expected).max() < 0.015


@pytest.mark.parametrize("top_p, nucleus", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]),
                                            (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_only_the_nucleus(top_p, nucleus):
    # probabilities 0.5, 0.3, 0.15, 0.049, 0.001 in a scrambled order
    p = np.array([0.5, 0.3, 0.15, 0.049, 0.001])
    where = np.array([3, 0, 4, 1, 2])  # token where[i] has probability p[i]
    logits = np.empty(5)
    logits[where] = np.log(p)
    tok = next_tokens(np.repeat(logits[None], 40000, axis=0), np.random.default_rng(5), top_p=top_p)
    assert set(tok.tolist()) <= set(where[nucleus].tolist())
    kept = p[nucleus] / p[nucleus].sum()
    observed = np.array([(tok == where[i]).mean() for i in nucleus])
    assert np.abs(observed - kept).max() < 0.01, (observed, kept)


def test_top_k_and_top_p_combine():
    logits = random_logits(3000, 25, seed=7)
    tok = next_tokens(logits, np.random.default_rng(0), top_k=5, top_p=0.5)
    z = np.sort(logits, axis=-1)[:, ::-1][:, :5]
    p = softmax(z)  # (N, 5) the top 5, renormalised, most likely first
    before = np.cumsum(p, axis=-1) - p
    n_kept = (before < 0.5).sum(axis=-1)
    rank = (logits > logits[np.arange(len(tok)), tok][:, None]).sum(axis=-1)
    assert (rank < n_kept).all()


def test_the_same_seed_draws_the_same_tokens():
    logits = random_logits(500, 20)
    a = next_tokens(logits, np.random.default_rng(42), temperature=0.9, top_k=8, top_p=0.95)
    b = next_tokens(logits, np.random.default_rng(42), temperature=0.9, top_k=8, top_p=0.95)
    c = next_tokens(logits, np.random.default_rng(43), temperature=0.9, top_k=8, top_p=0.95)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# A tiny model trained on Unicode text

UNICODE_TEXT = (
    "Café au lait, crème brûlée, naïve façade; Zoë und Jürgen grüßen Ångström. "
    "日本語の文章を書きます。漢字とかなを混ぜます。中文也可以。 "
    "Emoji too: 🎉 🙂 👍🏽 🚀 — and “quotes” ‘here’ … done.\n"
)


@pytest.fixture(scope="module")
def unicode_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unicode")
    data = folder / "corpus.txt"
    data.write_text(UNICODE_TEXT * 12, encoding="utf-8")
    config = TrainConfig(data=str(data), out=str(folder / "out"), num_layers=1, hidden_size=48,
                         embedding_size=16, batch_size=4, seq_length=32, lr=1e-2, max_steps=80,
                         eval_every=40, sample_length=20, plot=False, quiet=True)
    train(config)
    return config.out


def test_unicode_round_trips_through_vocabulary_checkpoint_and_sample(unicode_run):
    arrays, meta = checkpoint.load(os.path.join(unicode_run, "best.ckpt"))
    chars = sorted(set(UNICODE_TEXT))
    assert meta["vocab"]["tokens"] == chars  # code points, sorted: 🎉 is one token, 👍🏽 two
    assert {"日", "ß", "🎉", "🏽", "—"} <= set(chars)

    model = LanguageModel.load(os.path.join(unicode_run, "best.ckpt"))
    assert model.vocab.tokens == chars
    texts = model.generate(length=300, seed=0, num_samples=3)
    assert all(len(t) == 300 and set(t) <= set(chars) for t in texts)
    primed = model.generate(prime="日本語", length=50, seed=1)[0]
    assert len(primed) == 50 and set(primed) <= set(chars)


def test_the_command_line_samples_unicode_with_a_cjk_prime(unicode_run, capsys):
    assert main(["sample", unicode_run, "--prime", "漢字と", "--length", "40", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("漢字と") and out.endswith("\n")
    assert len(out) == 3 + 40 + 1
    assert set(out[:-1]) <= set(UNICODE_TEXT)


def test_a_seed_makes_sampling_reproducible(unicode_run, capsys):
    model = LanguageModel.load(os.path.join(unicode_run, "last.ckpt"))
    a = model.generate(length=200, seed=11, top_k=10)
    assert a == model.generate(length=200, seed=11, top_k=10)
    assert a != model.generate(length=200, seed=12, top_k=10)

    argv = ["sample", unicode_run, "--length", "200", "--seed", "11", "--top-p", "0.9"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_the_streamed_sample_is_the_generated_text(unicode_run, capsys):
    best = os.path.join(unicode_run, "best.ckpt")
    assert main(["sample", unicode_run, "--length", "120", "--seed", "4", "--temperature", "0.7"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == LanguageModel.load(best).generate(length=120, seed=4, temperature=0.7)[0] + "\n"

    assert main(["sample", best, "--length", "30", "--seed", "4", "--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    texts = LanguageModel.load(best).generate(length=30, seed=4, num_samples=3)
    assert out == "".join(f"---- sample {i + 1} ----\n{t}\n" for i, t in enumerate(texts))


def test_a_temperature_near_zero_equals_argmax(unicode_run, capsys):
    assert main(["sample", unicode_run, "--length", "150", "--argmax", "--prime", "Café"]) == 0
    greedy = capsys.readouterr().out
    assert main(["sample", unicode_run, "--length", "150", "--temperature", "1e-4", "--seed", "9",
                 "--prime", "Café"]) == 0
    assert capsys.readouterr().out == greedy
    assert len(greedy) == len("Café") + 150 + 1
