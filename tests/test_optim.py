"""Optimizers against torch.optim step by step, clipping, and schedules."""

import math

import numpy as np
import pytest

from nanolstm import optim
from nanolstm.gradcheck import rel_error

torch = pytest.importorskip("torch", reason="optimizer parity needs PyTorch (pip install torch==2.13.0)")

CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.1)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01)),
    ("adam", torch.optim.Adam, dict(lr=2e-3)),
    ("adam", torch.optim.Adam, dict(lr=2e-3, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=2e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,torch_cls,kwargs", CASES)
def test_optimizer_matches_torch(name, torch_cls, kwargs):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = optim.OPTIMIZERS[name](params, grads, **kwargs)
    theirs = torch_cls(list(tparams.values()), **kwargs)
    for _ in range(5):
        for k in params:
            g = rng.standard_normal(params[k].shape)
            grads[k][...] = g
            tparams[k].grad = torch.tensor(g.copy())
        ours.step()
        theirs.step()
    for k in params:
        assert rel_error(params[k], tparams[k].detach().numpy()) < 1e-12, k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", [("adam", {}), ("adam", dict(weight_decay=0.1)),
                                         ("adamw", dict(weight_decay=0.1))])
def test_compiled_adam_is_the_numpy_adam_bit_for_bit(name, kwargs, dtype, monkeypatch):
    """fused.adam_update does NumPy's operations in NumPy's order and dtype: the same bits, over
    steps whose bias corrections change."""
    pytest.importorskip("numba")
    from nanolstm import functional as F
    from nanolstm import fused

    rng = np.random.default_rng(1)
    start = {"w": rng.standard_normal((40, 7)).astype(dtype), "b": rng.standard_normal(7).astype(dtype)}
    gradients = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in start.items()} for _ in range(4)]
    results = []
    for kernel in (fused.adam_update, None):
        monkeypatch.setitem(F._compiled, "adam", kernel)
        params = {k: v.copy() for k, v in start.items()}
        grads = {k: np.zeros_like(v) for k, v in start.items()}
        opt = optim.OPTIMIZERS[name](params, grads, lr=2e-3, **kwargs)
        assert (optim._compiled_adam(params["w"], grads["w"], params["w"], params["w"]) is None) == (kernel is None)
        for step in gradients:
            for k in params:
                grads[k][...] = step[k]
            opt.step()
        results.append(params)
    for k in start:
        assert results[0][k].dtype == dtype
        np.testing.assert_array_equal(results[0][k], results[1][k])
        assert not np.array_equal(results[0][k], start[k])


def test_adam_uses_the_squared_gradient():
    """With gradients of opposite signs the second moment must stay positive: one step moves by lr."""
    p = {"w": np.array([0.0, 0.0])}
    g = {"w": np.array([-3.0, 5.0])}
    opt = optim.Adam(p, g, lr=0.1)
    opt.step()
    assert np.allclose(p["w"], [0.1, -0.1], atol=1e-6)


def test_optimizer_keeps_float32():
    p = {"w": np.ones(3, np.float32)}
    g = {"w": np.full(3, 0.5, np.float32)}
    for cls in optim.OPTIMIZERS.values():
        cls(p, g, lr=0.01).step()
        assert p["w"].dtype == np.float32


def test_optimizer_state_round_trip():
    rng = np.random.default_rng(1)
    p1 = {"w": rng.standard_normal(5)}
    g = {"w": rng.standard_normal(5)}
    p2 = {"w": p1["w"].copy()}
    a, b = optim.Adam(p1, g, lr=0.01), optim.Adam(p2, g, lr=0.01)
    a.step()
    b.step()
    arrays, scalars = a.state_dict()
    c = optim.Adam(p2, g, lr=0.5)
    c.load_state_dict({k: v.copy() for k, v in arrays.items()}, scalars)
    a.step()
    c.step()
    assert np.array_equal(p1["w"], p2["w"])


def test_clip_grad_norm_writes_back_and_matches_torch():
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((3, 3)) * 10, "b": rng.standard_normal(4) * 10}
    t = [torch.tensor(v.copy(), requires_grad=True) for v in grads.values()]
    for x, v in zip(t, grads.values()):
        x.grad = torch.tensor(v.copy())
    norm_t = torch.nn.utils.clip_grad_norm_(t, 5.0)
    norm = optim.clip_grad_norm(grads, 5.0)
    assert norm == pytest.approx(norm_t.item(), rel=1e-12)
    assert optim.global_norm(grads) == pytest.approx(5.0, rel=1e-5)
    for x, v in zip(t, grads.values()):
        assert rel_error(v, x.grad.numpy()) < 1e-12


def test_clip_grad_norm_leaves_small_gradients_and_reports_nan():
    grads = {"a": np.array([0.3, 0.4])}
    assert optim.clip_grad_norm(grads, 5.0) == pytest.approx(0.5)
    assert np.array_equal(grads["a"], [0.3, 0.4])
    assert math.isnan(optim.clip_grad_norm({"a": np.array([np.nan, 1.0])}, 5.0))


@pytest.mark.parametrize("norm", [5.0 - 5e-7, 5.0, 5.0 + 5e-7])
def test_clip_grad_norm_scales_as_torch_just_below_max_norm(norm):
    """torch scales by max_norm / (norm + 1e-6) whenever that is below 1: a norm within 1e-6 under
    max_norm is scaled too, and so is it here."""
    grads = {"a": np.array([0.6, 0.8]) * norm}
    t = torch.tensor(grads["a"].copy(), requires_grad=True)
    t.grad = torch.tensor(grads["a"].copy())
    torch.nn.utils.clip_grad_norm_([t], 5.0)
    optim.clip_grad_norm(grads, 5.0)
    np.testing.assert_allclose(grads["a"], t.grad.numpy(), rtol=1e-15, atol=0)
    assert np.all(grads["a"] < np.array([0.6, 0.8]) * norm)


def test_sgd_defaults_are_torchs():
    import inspect

    ours = inspect.signature(optim.SGD).parameters
    theirs = inspect.signature(torch.optim.SGD).parameters
    for name in ("lr", "momentum", "weight_decay"):
        assert ours[name].default == theirs[name].default, name


def test_clip_grad_value():
    grads = {"a": np.array([-3.0, 0.5, 7.0])}
    optim.clip_grad_value(grads, 1.0)
    assert np.array_equal(grads["a"], [-1.0, 0.5, 1.0])


def test_schedules():
    assert optim.lr_at(0, 1.0, "constant", warmup=4) == 0.25
    assert optim.lr_at(3, 1.0, "constant", warmup=4) == 1.0
    assert optim.lr_at(2500, 1.0, "step", step_size=1000, gamma=0.5) == 0.25
    assert optim.lr_at(0, 1.0, "cosine", max_steps=100) == 1.0
    assert optim.lr_at(50, 1.0, "cosine", max_steps=100) == pytest.approx(0.5)
    assert optim.lr_at(100, 1.0, "cosine", max_steps=100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        optim.lr_at(0, 1.0, "linear")
