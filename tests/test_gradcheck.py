"""Numerical gradient checks in float64 for every layer and the loss.

Every parameter is random (biases included), sequences have at least 3 steps, and gradient flows in
through both the output and the final state; the initial state's gradient is checked too.
"""

import numpy as np
import pytest

import nanolstm as nl
from nanolstm.gradcheck import check_gradients, numerical_gradient, rel_error

TOL = 1e-6


def make_layer(kind, D, H, L, dropout, seed, bidirectional=False, bias=True):
    extra = {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
    cls = getattr(nl, kind.split("-")[0])
    return cls(D, H, num_layers=L, dropout=dropout, dtype=np.float64, rng=np.random.default_rng(seed),
               bidirectional=bidirectional, bias=bias, **extra)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "RNN-relu"])
@pytest.mark.parametrize("L,dropout,bidirectional,bias", [(1, 0.0, False, True), (2, 0.0, False, True),
                                                          (3, 0.4, False, True), (1, 0.0, True, True),
                                                          (3, 0.4, True, True), (2, 0.0, True, False)])
def test_recurrent_gradients(kind, L, dropout, bidirectional, bias):
    rng = np.random.default_rng(L)
    T, N, D, H = 4, 3, 5, 4
    K = 2 if bidirectional else 1
    layer = make_layer(kind, D, H, L, dropout, seed=7, bidirectional=bidirectional, bias=bias)
    x = rng.standard_normal((T, N, D))
    n_parts = 2 if kind == "LSTM" else 1
    state = tuple(rng.standard_normal((L * K, N, H)) for _ in range(n_parts))
    dout = rng.standard_normal((T, N, K * H))
    dfinal = tuple(rng.standard_normal((L * K, N, H)) for _ in range(n_parts))
    pack = (lambda parts: parts) if kind == "LSTM" else (lambda parts: parts[0])

    def loss():
        layer.rng = np.random.default_rng(123)  # the same dropout mask at every call
        out, final = layer.forward(x, pack(state))
        finals = final if kind == "LSTM" else (final,)
        return np.sum(out * dout) + sum(np.sum(f * d) for f, d in zip(finals, dfinal))

    loss()
    layer.zero_grad()
    dx, dstate0 = layer.backward(dout, pack(dfinal))
    dstate0 = dstate0 if kind == "LSTM" else (dstate0,)

    arrays = {"x": x, **{f"state{i}": s for i, s in enumerate(state)}, **layer.params}
    grads = {"x": dx, **{f"state{i}": d for i, d in enumerate(dstate0)}, **layer.grads}
    for name, err in check_gradients(loss, arrays, grads).items():
        assert err < TOL, f"{kind} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("L,dropout,bidirectional,bias", [(1, 0.0, False, True), (3, 0.4, False, True),
                                                          (2, 0.0, True, True), (2, 0.4, True, False)])
def test_lstm_with_projections_gradients(L, dropout, bidirectional, bias):
    """proj_size=P: h (L, N, P) and c (L, N, H) take different gradients; W_hr's is checked too."""
    rng = np.random.default_rng(L)
    T, N, D, H, P = 4, 3, 5, 4, 3
    K = 2 if bidirectional else 1
    layer = nl.LSTM(D, H, num_layers=L, dropout=dropout, dtype=np.float64, rng=np.random.default_rng(7),
                    bidirectional=bidirectional, bias=bias, proj_size=P)
    x = rng.standard_normal((T, N, D))
    state = (rng.standard_normal((L * K, N, P)), rng.standard_normal((L * K, N, H)))
    dout = rng.standard_normal((T, N, K * P))
    dfinal = (rng.standard_normal((L * K, N, P)), rng.standard_normal((L * K, N, H)))

    def loss():
        layer.rng = np.random.default_rng(123)  # the same dropout mask at every call
        out, final = layer.forward(x, state)
        return np.sum(out * dout) + sum(np.sum(f * d) for f, d in zip(final, dfinal))

    loss()
    layer.zero_grad()
    dx, dstate0 = layer.backward(dout, dfinal)
    assert sum(name.startswith("weight_hr") for name in layer.grads) == L * K
    arrays = {"x": x, "h0": state[0], "c0": state[1], **layer.params}
    grads = {"x": dx, "h0": dstate0[0], "c0": dstate0[1], **layer.grads}
    for name, err in check_gradients(loss, arrays, grads).items():
        assert err < TOL, f"LSTM proj_size {name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["LSTM", "LSTM-proj", "GRU", "RNN-relu"])
def test_gradients_of_sequences_of_different_lengths(kind):
    """lengths, with two layers both ways, dropout and a batch first: every gradient numerically,
    the padding's (which the output does not read) zero."""
    rng = np.random.default_rng(5)
    T, N, D, H, L = 5, 4, 3, 4, 2
    extra = {"proj_size": 2} if kind == "LSTM-proj" else {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
    layer = getattr(nl, kind.split("-")[0])(D, H, num_layers=L, dropout=0.3, dtype=np.float64, batch_first=True,
                                            rng=np.random.default_rng(2), bidirectional=True, **extra)
    lengths = np.array([3, 5, 1, 3])
    x = rng.standard_normal((N, T, D))
    shapes = [(2 * L, N, layer.output_size), (2 * L, N, H)][: 2 if kind.startswith("LSTM") else 1]
    state = [rng.standard_normal(shape) for shape in shapes]
    dout = rng.standard_normal((N, T, 2 * layer.output_size))
    dfinal = [rng.standard_normal(shape) for shape in shapes]
    pack = tuple if kind.startswith("LSTM") else (lambda parts: parts[0])

    def loss():
        layer.rng = np.random.default_rng(123)  # the same dropout mask at every call
        out, final = layer.forward(x, pack(state), lengths=lengths)
        finals = final if kind.startswith("LSTM") else (final,)
        return np.sum(out * dout) + sum(np.sum(f * d) for f, d in zip(finals, dfinal))

    loss()
    layer.zero_grad()
    dx, dstate0 = layer.backward(dout, pack(dfinal))
    dstate0 = dstate0 if kind.startswith("LSTM") else (dstate0,)
    assert not dx[np.arange(T) >= lengths[:, None]].any()
    arrays = {"x": x, **{f"state{i}": s for i, s in enumerate(state)}, **layer.params}
    grads = {"x": dx, **{f"state{i}": d for i, d in enumerate(dstate0)}, **layer.grads}
    for name, err in check_gradients(loss, arrays, grads).items():
        assert err < TOL, f"{kind} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "RNN-relu"])
def test_cell_gradients_through_a_loop_of_steps(kind):
    rng = np.random.default_rng(4)
    T, N, D, H = 3, 2, 3, 4
    extra = {"nonlinearity": "relu"} if kind == "RNN-relu" else {}
    cell = getattr(nl, kind.split("-")[0] + "Cell")(D, H, dtype=np.float64, rng=np.random.default_rng(9), **extra)
    lstm = kind == "LSTM"
    xs = rng.standard_normal((T, N, D))
    state = [rng.standard_normal((N, H)) for _ in range(2 if lstm else 1)]
    gh = rng.standard_normal((T, N, H))
    gc = rng.standard_normal((N, H))

    def loss():
        s, total = (tuple(state) if lstm else state[0]), 0.0
        for t in range(T):
            s = cell.forward(xs[t], s)
            total += np.sum((s[0] if lstm else s) * gh[t])
        return total + (np.sum(s[1] * gc) if lstm else 0.0)

    loss()
    dh, dc, dxs = np.zeros((N, H)), gc, np.empty_like(xs)
    for t in reversed(range(T)):
        dxs[t], d = cell.backward((dh + gh[t], dc) if lstm else dh + gh[t])
        dh, dc = d if lstm else (d, None)
    cell.eval()  # the numerical gradient's many calls of loss keep nothing
    arrays = {"x": xs, **{f"state{i}": s for i, s in enumerate(state)}, **cell.params}
    grads = {"x": dxs, "state0": dh, **({"state1": dc} if lstm else {}), **cell.grads}
    for name, err in check_gradients(loss, arrays, grads).items():
        assert err < TOL, f"{kind} cell {name}: relative error {err:.2e}"


def test_linear_embedding_and_loss_gradients():
    """A small model: embedding -> linear -> cross-entropy with an ignored position."""
    rng = np.random.default_rng(3)
    emb = nl.Embedding(6, 4, dtype=np.float64)
    lin = nl.Linear(4, 6, dtype=np.float64)
    crit = nl.CrossEntropyLoss(ignore_index=0)
    idx = np.array([[1, 2, 2], [5, 1, 0]])  # a repeated index and an ignored target
    targets = np.array([[2, 0, 3], [4, 4, 1]])

    def loss():
        return crit.forward(lin.forward(emb.forward(idx)), targets)

    loss()
    emb.backward(lin.backward(crit.backward()))
    arrays = {"emb": emb.params["weight"], "w": lin.params["weight"], "b": lin.params["bias"]}
    grads = {"emb": emb.grads["weight"], "w": lin.grads["weight"], "b": lin.grads["bias"]}
    for name, err in check_gradients(loss, arrays, grads).items():
        assert err < TOL, f"{name}: relative error {err:.2e}"
    logits = rng.standard_normal((2, 3, 6))
    crit.forward(logits, targets)
    dlogits = crit.backward()
    assert rel_error(dlogits, numerical_gradient(lambda: crit.forward(logits, targets), logits)) < TOL


def test_gradcheck_catches_a_wrong_gradient():
    """The checker itself must fail on a wrong gradient, or every check above proves nothing."""
    x = np.random.default_rng(0).standard_normal(5)
    assert rel_error(2 * x, numerical_gradient(lambda: np.sum(x**2), x)) < TOL
    assert rel_error(3 * x, numerical_gradient(lambda: np.sum(x**2), x)) > 0.1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_stable_at_extremes(dtype):
    from nanolstm import functional as F
    x = np.array([-1e4, -100, -1, 0, 1, 100, 1e4], dtype)
    s = F.sigmoid(x)
    assert s.dtype == dtype and np.all(np.isfinite(s))
    assert s[0] == 0 and s[-1] == 1 and s[3] == 0.5
    p = F.softmax(np.array([[1e4, -1e4, 0]], dtype))
    assert np.all(np.isfinite(p)) and p[0, 0] == 1
    loss, _ = F.cross_entropy_forward(np.array([[1e4, -1e4, 0]], dtype), np.array([1]))
    assert np.isfinite(loss) and loss == pytest.approx(2e4, rel=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_huge_inputs_stay_finite_and_float32(kind):
    layer = getattr(nl, kind)(3, 4, num_layers=2)
    x = np.full((3, 2, 3), 1e4, np.float64)  # float64 in: the layer computes in its float32
    out, _ = layer.forward(x)
    dx, _ = layer.backward(np.ones_like(out))
    assert out.dtype == np.float32 and dx.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))


def test_readme_example_runs_and_passes():
    """examples/layers.py, which the README shows, must keep working and keep its gradients right."""
    import runpy
    from pathlib import Path

    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "layers.py"), run_name="__main__")
    assert done.value.code == 0


def test_wrong_state_shapes_are_refused():
    layer = nl.LSTM(3, 4, num_layers=2)
    x = np.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="state"):
        layer.forward(x, (np.zeros((2, 5, 4)),))  # an LSTM state needs (h0, c0)
    out, _ = layer.forward(x)
    with pytest.raises(ValueError, match="dstate_n"):
        layer.backward(np.zeros_like(out), (np.zeros((1, 5, 4)), np.zeros((1, 5, 4))))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_zero_state_is_what_forward_starts_from(kind):
    """zero_state(N): zeros in the form forward takes and returns, (h0, c0) for the LSTM and h0 for
    the others; forward from it gives what forward from None gives."""
    rng = np.random.default_rng(0)
    layer = getattr(nl, kind)(3, 4, num_layers=2, rng=rng)
    zeros = layer.zero_state(5)
    _, returned = layer.forward(rng.standard_normal((2, 5, 3)))
    parts = zeros if kind == "LSTM" else (zeros,)
    assert isinstance(zeros, tuple) == isinstance(returned, tuple) == (kind == "LSTM")
    assert all(p.shape == (2, 5, 4) and p.dtype == layer.dtype and not p.any() for p in parts)
    x = rng.standard_normal((2, 5, 3))
    np.testing.assert_array_equal(layer.forward(x, zeros)[0], layer.forward(x)[0])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_layers_reuse_their_large_arrays_but_not_what_they_return(kind):
    """A layer keeps the pre-activations and their gradient from one call to the next
    (functional._scratch), and a call gives what a fresh layer gives; what it returns is new."""
    rng = np.random.default_rng(0)
    layer = getattr(nl, kind)(4, 5, num_layers=2, dtype=np.float32, rng=rng)
    twin = getattr(nl, kind)(4, 5, num_layers=2, dtype=np.float32, rng=rng)
    twin.load_state_dict(layer.state_dict())
    x1, x2 = rng.standard_normal((2, 6, 3, 4)).astype(np.float32)
    dout = rng.standard_normal((6, 3, 5)).astype(np.float32)
    out1, _ = layer.forward(x1)
    dx1, _ = layer.backward(dout)
    returned = [out1.copy(), dx1.copy()]
    kept = [w["a"] for w in layer._work_forward] + list(layer._work_backward.values())

    layer.zero_grad()
    out2, _ = layer.forward(x2)
    dx2, _ = layer.backward(dout)
    now = [w["a"] for w in layer._work_forward] + list(layer._work_backward.values())
    assert len(now) == len(kept) and all(a is b for a, b in zip(now, kept))
    np.testing.assert_array_equal(out1, returned[0])
    np.testing.assert_array_equal(dx1, returned[1])
    out_twin, _ = twin.forward(x2)
    dx_twin, _ = twin.backward(dout)
    np.testing.assert_array_equal(out2, out_twin)
    np.testing.assert_array_equal(dx2, dx_twin)
    for name, g in twin.named_grads().items():
        np.testing.assert_array_equal(layer.named_grads()[name], g, err_msg=name)

    layer.forward(x2[:, :2])  # another batch size: new arrays, of its shape
    assert all(w["a"].shape[1] == 2 for w in layer._work_forward)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("options", [{}, {"batch_first": True}, {"bidirectional": True}])
def test_what_backward_reads_cannot_be_changed_in_place(kind, options):
    """A layer's output is a view of what its backward reads; changing it in place raises, where it
    would have made the gradients wrong. The final state is a copy and stays writable; a copy of
    the output can be changed. So it is for a cell's new state in train(), and in eval(), which
    keeps nothing, the state is the caller's to change."""
    rng = np.random.default_rng(0)
    layer = getattr(nl, kind)(3, 4, num_layers=2, rng=rng, **options)
    for x in (rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 3))):  # batched and one sequence
        out, final = layer.forward(x)
        with pytest.raises(ValueError, match="read-only"):
            out *= 2
        with pytest.raises(ValueError, match="read-only"):
            out[0] = 0
        for part in final if kind == "LSTM" else (final,):
            part += 1
        copy = out.copy()
        copy *= 2
        dx, _ = layer.backward(np.ones(out.shape))
        assert dx.shape == x.shape
    cell = getattr(nl, kind + "Cell")(3, 4, rng=rng)
    parts = cell.forward(rng.standard_normal((2, 3)))
    for part in parts if kind == "LSTM" else (parts,):
        with pytest.raises(ValueError, match="read-only"):
            part += 1
    parts = cell.eval().forward(rng.standard_normal((2, 3)))
    for part in parts if kind == "LSTM" else (parts,):
        part += 1


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_the_padding_past_each_length_is_never_read(kind):
    """With lengths, whatever the padding holds (NaN here) changes nothing: not the output, not the
    final state, not a gradient."""
    rng = np.random.default_rng(1)
    layer = getattr(nl, kind)(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, rng=rng)
    lengths = np.array([2, 6, 4])
    x = rng.standard_normal((6, 3, 3))
    padded = x.copy()
    padded[np.arange(6)[:, None] >= lengths] = np.nan
    dout = rng.standard_normal((6, 3, 8))
    results = []
    for inputs in (x, padded):
        layer.zero_grad()
        out, final = layer.forward(inputs, lengths=lengths)
        dx, d0 = layer.backward(dout)
        parts = [out, dx, *(final if kind == "LSTM" else (final,)), *(d0 if kind == "LSTM" else (d0,))]
        results.append(parts + [g.copy() for g in layer.grads.values()])
    for a, b in zip(*results):
        assert np.all(np.isfinite(b))
        np.testing.assert_array_equal(a, b)
