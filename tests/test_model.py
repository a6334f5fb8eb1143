"""The language model: its backward against numerical gradients, and the one-step path against forward."""

import numpy as np
import pytest

from nanolstm import functional as F
from nanolstm.data import Vocab
from nanolstm.functional import cross_entropy_backward, cross_entropy_forward
from nanolstm.gradcheck import check_gradients
from nanolstm.model import WARM_BY_STEPS, LanguageModel, ModelConfig

VOCAB = Vocab.build_chars("abcdefghij klmnop\n")


def make(kind, dropout=0.0, layers=2):
    config = ModelConfig(len(VOCAB), model=kind, num_layers=layers, hidden_size=6, embedding_size=5,
                         dropout=dropout)
    return LanguageModel(config, VOCAB, seed=1, dtype=np.float64)


@pytest.mark.parametrize("T, N", [(4, 3), (6, 4)])  # 12 tokens < V = 18: unfolded; 24: folded
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_model_gradients(kind, T, N):
    model = make(kind, dropout=0.3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, len(VOCAB), (T, N))
    y = rng.integers(0, len(VOCAB), (T, N))

    def loss():
        model.rng.bit_generator.state = np.random.default_rng(5).bit_generator.state  # fixed masks
        logits, _ = model.forward(x)
        value, cache = cross_entropy_forward(logits, y)
        loss.cache = cache
        return value

    loss()
    model.zero_grad()
    model.backward(cross_entropy_backward(loss.cache))
    errors = check_gradients(loss, model.state_dict(), model.named_grads())
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_the_folded_embedding_gives_the_unfolded_results(kind, dtype, tol, monkeypatch):
    """With a batch of more tokens than the vocabulary has, forward hands the first layer a Lookup
    (when the compiled row sums are in use): the same logits, state and gradients as the embedding
    looked up first. A token the batch lacks has an infinite row, which must touch nothing."""

    config = ModelConfig(len(VOCAB), model=kind, num_layers=2, hidden_size=8, embedding_size=5)
    model = LanguageModel(config, VOCAB, seed=2, dtype=dtype)
    rng = np.random.default_rng(3)
    x = rng.integers(1, len(VOCAB), (7, 5))  # token 0 is not in the batch
    y = rng.integers(0, len(VOCAB), (7, 5))
    model.embedding.params["weight"][0] = np.inf
    results = []
    for fold in (True, False):
        monkeypatch.setattr(F, "fold_lookup", lambda vocab_size, tokens: fold)
        model.zero_grad()
        logits, state = model.forward(x)
        assert model._folded == fold
        loss, cache = cross_entropy_forward(logits, y)
        model.backward(cross_entropy_backward(cache))
        results.append((logits, state, {k: g.copy() for k, g in model.named_grads().items()}))
    (logits, state, grads), (logits_ref, state_ref, grads_ref) = results
    np.testing.assert_allclose(logits, logits_ref, rtol=tol, atol=tol)
    for s, s_ref in zip(state if kind == "lstm" else (state,), state_ref if kind == "lstm" else (state_ref,)):
        np.testing.assert_allclose(s, s_ref, rtol=tol, atol=tol)
    for name, g_ref in grads_ref.items():
        assert np.isfinite(grads[name]).all(), name
        np.testing.assert_allclose(grads[name], g_ref, rtol=tol, atol=tol, err_msg=name)
    assert not grads["embedding.weight"][0].any()


def test_the_embedding_is_folded_with_more_tokens_than_rows_and_compiled_row_sums(monkeypatch):

    model = make("lstm")
    monkeypatch.setattr(F, "_compiled", {"add_rows": object()})
    model.forward(np.zeros((3, 5), np.int64))  # 15 tokens, 18 rows
    assert not model._folded
    model.forward(np.zeros((3, 6), np.int64))
    assert model._folded
    monkeypatch.setattr(F, "_compiled", {})  # NumPy only: its sum of rows by index is slow
    model.forward(np.zeros((3, 6), np.int64))
    assert not model._folded


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_step_equals_forward(kind, streams):
    """One step, with the weights laid out for one stream (transposed views) or for several
    (row-major copies), gives forward's logits and state."""
    model = make(kind, layers=3).eval()
    x = np.random.default_rng(1).integers(0, len(VOCAB), (5, streams))
    logits_all, state_all = model.forward(x)
    _, state = model.forward(x[:4])
    for weights in (None, model.step_weights(1), model.step_weights(2)):
        logits_step, state_step = model.step(x[4], state, weights)
        np.testing.assert_allclose(logits_step, logits_all[4], rtol=1e-12, atol=1e-12)
        for s_step, s_all in zip(state_step if kind == "lstm" else (state_step,),
                                 state_all if kind == "lstm" else (state_all,)):
            np.testing.assert_allclose(s_step, s_all, rtol=1e-12, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    model = make("lstm")
    model.save(tmp_path / "m.ckpt")
    loaded = LanguageModel.load(tmp_path / "m.ckpt")
    assert loaded.vocab.tokens == VOCAB.tokens and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert np.array_equal(v, loaded.state_dict()[k]) and loaded.state_dict()[k].dtype == v.dtype
    assert loaded.generate(length=30, seed=3) == model.generate(length=30, seed=3)


def greedy(model, ids, length):
    """The greedy continuation of ids, by forward passes over the whole text so far."""
    ids = list(ids)
    for _ in range(length):
        logits, _ = model.forward(np.array(ids)[:, None])
        ids.append(int(logits[-1, 0].argmax()))
    return VOCAB.decode(np.array(ids[-length:])) if model.vocab is VOCAB else ids[-length:]


def test_generation_warms_the_state_on_a_line_break_before_the_prime():
    config = ModelConfig(len(VOCAB), num_layers=2, hidden_size=32, embedding_size=8)
    model = LanguageModel(config, VOCAB, seed=3, dtype=np.float64).eval()
    for p in model.state_dict().values():
        p *= 3  # weights large enough for the greedy path to wander, and to depend on its start
    prime = model.vocab.encode("ko")
    warmed = greedy(model, np.concatenate([[VOCAB.index["\n"]], prime]), 12)
    assert warmed != greedy(model, prime, 12)  # the line break makes a difference here
    assert model.generate(prime="ko", length=12, argmax=True)[0] == warmed
    # no prime: the line break alone
    assert model.generate(length=12, argmax=True)[0] == greedy(model, [VOCAB.index["\n"]], 12)
    # a prime longer than WARM_BY_STEPS is warmed by one forward pass, not step by step: the same
    long_prime = "ko" * (WARM_BY_STEPS // 2 + 1)
    warmed = greedy(model, np.concatenate([[VOCAB.index["\n"]], model.vocab.encode(long_prime)]), 12)
    assert model.generate(prime=long_prime, length=12, argmax=True)[0] == warmed


def test_a_generation_larger_than_the_machine_is_refused_before_it_allocates(monkeypatch):
    """NumPy maps a huge array's pages only as they are written, so without a check up front the
    process is killed, without a word, when the memory runs out. The check counts a lower bound:
    what surely fits is never refused."""
    from nanolstm import model as model_module

    if model_module.physical_memory() is None:
        pytest.skip("this system does not say how much memory it has")
    model = make("lstm")
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(model_module.NanolstmError, match=r"^100,000,000 sample\(s\) of 1 tokens need at least "
                                                          r".* GiB, more than this machine's .*--num-samples"):
        model.generate(length=1, num_samples=10**8)
    monkeypatch.undo()
    monkeypatch.setattr(model_module, "physical_memory", lambda: 10**6)  # a 1 MB machine
    with pytest.raises(model_module.NanolstmError, match="a shorter --length"):
        model.generate(length=200_000)
    assert len(model.generate(length=1000, num_samples=2)) == 2  # 16 KB of tokens and 2 streams fit
