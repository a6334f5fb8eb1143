"""Parity with PyTorch: every layer's outputs and every gradient, through the "fake loss" sum(out * dout)."""

import numpy as np
import pytest

import nanolstm as nl
from nanolstm.gradcheck import rel_error

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (pip install torch==2.13.0)")

TOL = {np.float64: 1e-10, np.float32: 1e-4}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}


def to_torch_state(ours, kind):
    return tuple(torch.tensor(s, requires_grad=True) for s in ours) if kind == "LSTM" \
        else torch.tensor(ours, requires_grad=True)


def random_case(rng, kind):
    """Random sizes; an RNN draws its nonlinearity too."""
    return dict(T=int(rng.integers(1, 7)), N=int(rng.integers(1, 5)), D=int(rng.integers(1, 9)),
                H=int(rng.integers(1, 9)), L=int(rng.integers(1, 4)),
                batch_first=bool(rng.integers(2)), with_state=bool(rng.integers(2)),
                nonlinearity=("tanh", "relu")[int(rng.integers(2))] if kind == "RNN" else None,
                bidirectional=bool(rng.integers(2)))


def check_against_torch(kind, dtype, rng, x, H, L, state_shape, with_state, lengths=None, **options):
    """Our layer and torch's, with torch's weights, on x and (with_state) a random initial state of
    state_shape (h's last axis P with an LSTM's proj_size): outputs, final states and every gradient
    (into x, the parameters and the initial state, from upstream gradients for out and for the final
    state, so both paths into backward are checked) equal to TOL, and every shape and dtype as
    torch's. lengths: each sequence's length, given to ours, and to torch's packed
    (pack_padded_sequence, unsorted) and its output padded back with zeros (pad_packed_sequence)."""
    ours = getattr(nl, kind)(x.shape[-1], H, num_layers=L, dtype=dtype, **options)
    theirs = getattr(torch.nn, kind)(x.shape[-1], H, num_layers=L, **options).to(TORCH_DTYPE[dtype])
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    # PyTorch's weights into ours, so both start equal and biases are random and non-zero
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    lstm = kind == "LSTM"
    P = options.get("proj_size", 0)
    shapes = (state_shape[:-1] + (P or H,), state_shape)[: 2 if lstm else 1]
    state = tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)
    state = (state if lstm else state[0]) if with_state else None
    out, final = ours.forward(x, state, lengths=lengths)
    xt = torch.tensor(x, requires_grad=True)
    tstate = to_torch_state(state, kind) if with_state else None
    if lengths is None:
        out_t, final_t = theirs(xt, tstate)
    else:
        pack = torch.nn.utils.rnn
        batch_first = options.get("batch_first", False)
        packed = pack.pack_padded_sequence(xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
        out_t, final_t = theirs(packed, tstate)
        T = x.shape[1 if batch_first else 0]
        out_t, _ = pack.pad_packed_sequence(out_t, batch_first=batch_first, total_length=T)
    finals, finals_t = (final, final_t) if lstm else ((final,), (final_t,))

    dout = rng.standard_normal(out.shape).astype(dtype)
    dfinal = tuple(rng.standard_normal(shape).astype(dtype) for shape in shapes)
    fake = (out_t * torch.tensor(dout)).sum() + sum((f * torch.tensor(d)).sum() for f, d in zip(finals_t, dfinal))
    fake.backward()
    dx, dstate0 = ours.backward(dout, dfinal if lstm else dfinal[0])
    d0 = dstate0 if lstm else (dstate0,)

    tol = TOL[dtype]
    assert out.shape == tuple(out_t.shape) and dx.shape == x.shape
    assert out.dtype == dtype and dx.dtype == dtype
    assert rel_error(out, out_t.detach().numpy()) < tol
    for a, b, shape in zip(finals, finals_t, shapes, strict=True):
        assert a.dtype == dtype and a.shape == shape
        assert rel_error(a, b.detach().numpy()) < tol
    assert rel_error(dx, xt.grad.numpy()) < tol
    for name, p in theirs.named_parameters():
        assert ours.grads[name].dtype == dtype
        assert rel_error(ours.grads[name], p.grad.numpy()) < tol, name
    assert [d.shape for d in d0] == list(shapes)
    if with_state:
        for a, b in zip(d0, tstate if lstm else (tstate,)):
            assert rel_error(a, b.grad.numpy()) < tol
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("seed", range(12))
def test_recurrent_matches_torch(kind, dtype, seed):
    rng = np.random.default_rng(seed)
    c = random_case(rng, kind)
    T, N, D, H, L = c["T"], c["N"], c["D"], c["H"], c["L"]
    options = {"nonlinearity": c["nonlinearity"]} if kind == "RNN" else {}
    K = 2 if c["bidirectional"] else 1
    x = rng.standard_normal((N, T, D) if c["batch_first"] else (T, N, D)).astype(dtype)
    check_against_torch(kind, dtype, rng, x, H, L, (L * K, N, H), c["with_state"],
                        batch_first=c["batch_first"], bidirectional=c["bidirectional"], **options)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_one_sequence_without_a_batch_axis_matches_torch(kind, dtype, batch_first, with_state, bidirectional):
    # x (T, D), each part of the state (L, H), whatever batch_first says, as torch takes them
    rng = np.random.default_rng(7)
    T, D, H, L = 5, 3, 4, 2
    K = 2 if bidirectional else 1
    x = rng.standard_normal((T, D)).astype(dtype)
    out = check_against_torch(kind, dtype, rng, x, H, L, (L * K, H), with_state,
                              batch_first=batch_first, bidirectional=bidirectional)
    assert out.shape == (T, K * H)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_deep_bidirectional_layer_matches_torch(kind, dtype, batch_first):
    # three layers, so that a layer takes both directions of the one below (2H wide), with a state;
    # the random cases above draw at most one such layer for the LSTM and GRU
    rng = np.random.default_rng(11)
    T, N, D, H, L = 6, 4, 5, 3, 3
    x = rng.standard_normal((N, T, D) if batch_first else (T, N, D)).astype(dtype)
    out = check_against_torch(kind, dtype, rng, x, H, L, (2 * L, N, H), True,
                              batch_first=batch_first, bidirectional=True)
    assert out.shape == ((N, T, 2 * H) if batch_first else (T, N, 2 * H))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_layer_without_biases_matches_torch(kind, dtype, bidirectional):
    rng = np.random.default_rng(13)
    T, N, D, H, L = 4, 3, 5, 4, 2
    K = 2 if bidirectional else 1
    x = rng.standard_normal((T, N, D)).astype(dtype)
    check_against_torch(kind, dtype, rng, x, H, L, (L * K, N, H), True, bidirectional=bidirectional, bias=False)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("L,batch_first,bidirectional,bias,with_state", [
    (1, False, False, True, True), (3, True, False, True, False), (3, False, True, True, True),
    (2, True, True, False, True), (2, False, False, False, False)])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's float32 note
def test_an_lstm_with_projections_matches_torch(dtype, L, batch_first, bidirectional, bias, with_state, unbatched):
    # proj_size: h_t = m_t W_hr^T of P < H units is the output, the next step's input to W_hh and
    # (2 or 3 layers) the next layer's input, P or 2P wide; c keeps H
    rng = np.random.default_rng(L)
    T, N, D, H, P = 5, 3, 4, 6, 2
    K = 2 if bidirectional else 1
    x = rng.standard_normal((T, D) if unbatched else (N, T, D) if batch_first else (T, N, D)).astype(dtype)
    state_shape = (L * K, H) if unbatched else (L * K, N, H)
    out = check_against_torch("LSTM", dtype, rng, x, H, L, state_shape, with_state, batch_first=batch_first,
                              bidirectional=bidirectional, bias=bias, proj_size=P)
    assert out.shape[-1] == K * P


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["LSTM", "LSTM-proj", "GRU", "RNN"])
@pytest.mark.parametrize("seed", range(4))
def test_sequences_of_different_lengths_match_torchs_packed_sequences(kind, dtype, seed):
    """lengths: PyTorch's packed sequences, unsorted; the output padded with zeros, each final state
    the one after its own sequence's last step, and the gradients (none into the padding)."""
    rng = np.random.default_rng(seed)
    T, N, D, H = 7, 6, 3, 4
    L, batch_first, bidirectional = [(1, False, False), (2, True, True), (3, False, True), (2, True, False)][seed]
    lengths = [rng.integers(1, T + 1, N), np.full(N, T), np.array([1, 7, 3, 7, 1, 2]),
               np.array([5, 5, 2, 5, 2, 5])][seed]
    K = 2 if bidirectional else 1
    x = rng.standard_normal((N, T, D) if batch_first else (T, N, D)).astype(dtype)
    options = {"proj_size": 2} if kind == "LSTM-proj" else {}
    out = check_against_torch(kind.split("-")[0], dtype, rng, x, H, L, (L * K, N, H), seed % 2 == 0,
                              lengths=lengths, batch_first=batch_first, bidirectional=bidirectional, **options)
    steps = np.arange(T)[None, :] if batch_first else np.arange(T)[:, None]
    padding = steps >= (lengths[:, None] if batch_first else lengths[None, :])
    assert padding.any() == (seed != 1) and not out[padding].any() and out[~padding].all()


def test_lengths_that_do_not_fit_are_refused():
    lstm = nl.LSTM(3, 4)
    x = np.zeros((5, 2, 3))
    for bad in ([5], [0, 5], [6, 1], [2.0, 3.0], [[2, 3]]):
        with pytest.raises(ValueError, match="lengths must be 2 integers from 1 to T = 5"):
            lstm.forward(x, lengths=bad)
    with pytest.raises(ValueError, match="lengths are for a batch"):
        lstm.forward(x[:, 0], lengths=[3])
    out, _ = lstm.forward(x, lengths=[5, 2])  # a list does, as a tensor does for torch
    assert out.shape == (5, 2, 4)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_an_empty_batch_given_lengths_runs_as_without_them(kind):
    """N = 0 with lengths=[]: empty outputs, states and gradients of the usual shapes, as the same
    batch gives without lengths; no thread is given rows to share."""
    layer = getattr(nl, kind)(3, 4, num_layers=2, bidirectional=True)
    for lengths in (np.zeros(0, int), None):
        out, state = layer.forward(np.zeros((5, 0, 3)), lengths=lengths)
        dx, dstate = layer.backward(np.zeros((5, 0, 8)))
        assert out.shape == (5, 0, 8) and dx.shape == (5, 0, 3)
        for s in (state if kind == "LSTM" else (state,)) + (dstate if kind == "LSTM" else (dstate,)):
            assert s.shape == (4, 0, 4)


def test_proj_size_is_checked_as_pytorch_checks_it():
    for bad in (-1, 4, 5, 1.5, True):
        with pytest.raises(ValueError, match="proj_size must be"):
            nl.LSTM(3, 4, proj_size=bad)
    lstm = nl.LSTM(3, 4, num_layers=2, proj_size=2)
    assert "proj_size=2" in repr(lstm) and lstm.output_size == 2
    h, c = lstm.zero_state(5)
    assert h.shape == (2, 5, 2) and c.shape == (2, 5, 4)
    with pytest.raises(ValueError, match=r"state as 2 array\(s\) of shape \(2, 5, 2\) and \(2, 5, 4\)"):
        lstm.forward(np.zeros((1, 5, 3)), (np.zeros((2, 5, 4)), np.zeros((2, 5, 4))))
    with pytest.raises(ValueError, match=r"one sequence as 2 array\(s\) of shape \(2, 2\) and \(2, 4\)"):
        lstm.forward(np.zeros((1, 3)), (np.zeros((2, 4)), np.zeros((2, 4))))


def test_a_state_that_does_not_fit_one_sequence_is_refused():
    lstm = nl.LSTM(3, 4, num_layers=2)
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"state for one sequence as 2 array\(s\) of shape \(2, 4\)"):
        lstm.forward(x, (np.zeros((2, 1, 4)), np.zeros((2, 1, 4))))
    with pytest.raises(ValueError, match=r"\(T, N, 3\), or \(T, 3\) for one sequence, got \(5, 2\)"):
        lstm.forward(np.zeros((5, 2)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "RNN-relu"])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_a_cell_in_a_loop_of_ones_own_matches_torch(kind, dtype, unbatched, bias):
    # T steps by hand, a loss on every step's h (and the last c), then backward last step first
    rng = np.random.default_rng(5)
    T, N, D, H = 5, 3, 4, 6
    name, extra = kind.split("-")[0] + "Cell", ({"nonlinearity": "relu"} if kind == "RNN-relu" else {})
    ours = getattr(nl, name)(D, H, dtype=dtype, bias=bias, **extra)
    theirs = getattr(torch.nn, name)(D, H, bias=bias, **extra).to(TORCH_DTYPE[dtype])
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    lstm = kind == "LSTM"
    shape = (H,) if unbatched else (N, H)
    xs = rng.standard_normal((T, D) if unbatched else (T, N, D)).astype(dtype)
    state = tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2 if lstm else 1))
    gh = rng.standard_normal((T, *shape)).astype(dtype)  # the loss's weights on each step's h
    gc = rng.standard_normal(shape).astype(dtype)  # and on the last c

    s, hs = (state if lstm else state[0]), []
    for t in range(T):
        s = ours.forward(xs[t], s)
        hs.append(s[0] if lstm else s)
    xt = [torch.tensor(x, requires_grad=True) for x in xs]
    st = to_torch_state(state if lstm else state[0], kind)
    s_t, hs_t = st, []
    for t in range(T):
        s_t = theirs(xt[t], s_t)
        hs_t.append(s_t[0] if lstm else s_t)
    loss = sum((h * torch.tensor(g)).sum() for h, g in zip(hs_t, gh)) + ((s_t[1] * torch.tensor(gc)).sum() if lstm else 0)
    loss.backward()

    dh, dc, dxs = np.zeros(shape, dtype), gc, [None] * T
    for t in reversed(range(T)):
        dxs[t], d = ours.backward((dh + gh[t], dc) if lstm else dh + gh[t])
        dh, dc = d if lstm else (d, None)
    tol = TOL[dtype]
    for t in range(T):
        assert hs[t].shape == shape and dxs[t].shape == xs[t].shape
        assert rel_error(hs[t], hs_t[t].detach().numpy()) < tol
        assert rel_error(dxs[t], xt[t].grad.numpy()) < tol
    for pname, p in theirs.named_parameters():
        assert rel_error(ours.grads[pname], p.grad.numpy()) < tol, pname
    for a, b in zip((dh, dc) if lstm else (dh,), st if lstm else (st,)):
        assert rel_error(a, b.grad.numpy()) < tol
    with pytest.raises(RuntimeError, match="more times than forward"):
        ours.backward((dh, dc) if lstm else dh)


def test_a_cell_in_eval_mode_keeps_nothing_and_refuses_a_wrong_state():
    cell = nl.LSTMCell(3, 4).eval()
    h, c = cell.forward(np.ones((2, 3)))
    assert h.shape == c.shape == (2, 4) and cell._caches == []
    with pytest.raises(ValueError, match=r"state as 2 array\(s\) of shape \(2, 4\)"):
        cell.forward(np.ones((2, 3)), np.zeros((2, 4)))  # an array where (h, c) belongs
    with pytest.raises(ValueError, match=r"input of shape \(N, 3\) or \(3,\), got \(2, 5\)"):
        cell.forward(np.ones((2, 5)))
    cell.train()
    cell.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"dstate as 2 array\(s\) of shape \(2, 4\)"):
        cell.backward((np.zeros((2, 5)), None))
    dx, (dh, dc) = cell.backward((np.ones((2, 4)), None))  # the step was kept for a right call
    assert dx.shape == (2, 3) and dh.shape == dc.shape == (2, 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_matches_torch(dtype):
    rng = np.random.default_rng(0)
    V, E = 7, 5
    ours = nl.Embedding(V, E, dtype=dtype)
    theirs = torch.nn.Embedding(V, E).to(TORCH_DTYPE[dtype])
    ours.load_state_dict({"weight": theirs.weight.detach().numpy()})
    idx = rng.integers(0, V - 1, (6, 4))  # index V - 1 never used: its gradient row must be zero
    idx[0, :] = 3  # repeated indices must add up
    out = ours.forward(idx)
    out_t = theirs(torch.tensor(idx))
    dout = rng.standard_normal(out.shape).astype(dtype)
    (out_t * torch.tensor(dout)).sum().backward()
    ours.backward(dout)
    assert rel_error(out, out_t.detach().numpy()) < TOL[dtype]
    assert rel_error(ours.grads["weight"], theirs.weight.grad.numpy()) < TOL[dtype]
    assert not ours.grads["weight"][V - 1].any()


def test_embedding_of_no_tokens():
    emb = nl.Embedding(7, 5, dtype=np.float64)
    out = emb.forward(np.zeros((0, 3), np.int64))
    assert out.shape == (0, 3, 5)
    emb.backward(out)
    assert emb.grads["weight"].shape == (7, 5) and not emb.grads["weight"].any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(dtype, bias):
    rng = np.random.default_rng(1)
    ours = nl.Linear(6, 4, bias=bias, dtype=dtype)
    theirs = torch.nn.Linear(6, 4, bias=bias).to(TORCH_DTYPE[dtype])
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = rng.standard_normal((3, 5, 6)).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    out, out_t = ours.forward(x), theirs(xt)
    dout = rng.standard_normal(out.shape).astype(dtype)
    (out_t * torch.tensor(dout)).sum().backward()
    dx = ours.backward(dout)
    tol = TOL[dtype]
    assert rel_error(out, out_t.detach().numpy()) < tol
    assert rel_error(dx, xt.grad.numpy()) < tol
    for name, p in theirs.named_parameters():
        assert rel_error(ours.grads[name], p.grad.numpy()) < tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ignore_index", [None, 2])
def test_cross_entropy_matches_torch(dtype, ignore_index):
    rng = np.random.default_rng(2)
    logits = (3 * rng.standard_normal((5, 4, 9))).astype(dtype)
    targets = rng.integers(0, 9, (5, 4))
    targets[0, :] = 2
    ours = nl.CrossEntropyLoss(ignore_index=ignore_index)
    loss = ours.forward(logits, targets)
    lt = torch.tensor(logits, requires_grad=True)
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    loss_t = torch.nn.functional.cross_entropy(lt.reshape(-1, 9), torch.tensor(targets).reshape(-1), **kwargs)
    loss_t.backward()
    assert np.asarray(loss).dtype == dtype
    assert rel_error(loss, loss_t.item()) < TOL[dtype]
    assert rel_error(ours.backward(), lt.grad.numpy()) < TOL[dtype]
