"""The compiled cells of nanolstm.fused against the NumPy reference cells of nanolstm.functional:
every output and every array a cell overwrites, one cell at a time and through whole layers."""

import os
import subprocess
import sys

import numpy as np
import pytest

import nanolstm as nl
from nanolstm import functional as F
from nanolstm.gradcheck import rel_error
from nanolstm.sample import next_tokens

pytest.importorskip("numba", reason="the compiled cells need numba (pip install numba)")
from nanolstm import fused  # noqa: E402  (importable only with numba)

# float32 agrees to rounding, not bit for bit: fused.py computes exp and tanh its own way, within
# an ulp or two of NumPy's. Measured worst cases: 4e-7 for one cell (200 random draws); 1.9e-6 for a
# 2-layer LSTM's weight gradient over 60 seeds, where the float32 reference itself is 4.3e-6 away
# from float64. So 1e-6 holds for the seeds below but is no margin to add more against.
TOL = {np.float32: 1e-6, np.float64: 1e-12}
SHAPES = [(1, 1), (1, 5), (4, 1), (3, 7), (16, 33)]  # (N, H)


@pytest.fixture
def restore_cells():
    """Put back whichever cells and other kernels the sequence functions used before the test."""
    saved, saved_compiled = dict(F._cells), dict(F._compiled)
    yield
    F._cells.clear()
    F._cells.update(saved)
    F._compiled.clear()
    F._compiled.update(saved_compiled)


def extreme_mask(rng, shape, kind):
    """Where pre-activations are +-1e4 rather than a few units: nowhere, everywhere, or at random."""
    return {"normal": np.zeros(shape, bool), "extreme": np.ones(shape, bool),
            "mixed": rng.random(shape) < 0.5}[kind]


def pre_activations(rng, extreme, dtype):
    normal = 3 * rng.standard_normal(extreme.shape)
    return np.where(extreme, 1e4 * rng.choice([-1.0, 1.0], extreme.shape), normal).astype(dtype)


def lstm_step(rng, N, H, kind, dtype):
    """Arguments for the forward cell, and for the backward cell as the reference forward leaves them."""
    # in "mixed", hw is extreme where a is not, as for the GRU below
    extreme = extreme_mask(rng, (N, 4 * H), kind)
    a = pre_activations(rng, extreme, dtype)
    hw = pre_activations(rng, ~extreme if kind == "mixed" else extreme, dtype)
    c_prev = rng.standard_normal((N, H)).astype(dtype)
    out = np.full((N, H), np.nan, dtype)  # NaN shows any entry a cell fails to write
    fwd = [a, hw, c_prev, out, out.copy(), out.copy()]
    a_act, _, _, _, _, tanh_c = called(F.lstm_cell_forward, fwd)
    dh, dc = (rng.standard_normal((N, H)).astype(dtype) for _ in range(2))
    bwd = [dh, dc, a_act, c_prev, tanh_c, np.full((N, 4 * H), np.nan, dtype)]
    return fwd, bwd


def gru_step(rng, N, H, kind, dtype):
    # In "mixed", hw is extreme where a is not. a_n + r * hn with both at +-1e4 and opposite signs
    # leaves a few units out of two 1e4s, where one ulp of r moves the result by 1e-3: no two float32
    # cells can agree there, and the test would check luck, not the cells.
    extreme = extreme_mask(rng, (N, 3 * H), kind)
    a = pre_activations(rng, extreme, dtype)
    hw = pre_activations(rng, ~extreme if kind == "mixed" else extreme, dtype)
    b_hn = rng.standard_normal(3 * H).astype(dtype)[2 * H :]  # a slice, as gru_forward passes it
    h_prev = rng.standard_normal((N, H)).astype(dtype)
    out = np.full((N, H), np.nan, dtype)
    fwd = [a, hw, b_hn, h_prev, out, out.copy()]
    a_act, _, _, _, _, hn = called(F.gru_cell_forward, fwd)
    dh = rng.standard_normal((N, H)).astype(dtype)
    nan = np.full((N, 3 * H), np.nan, dtype)
    bwd = [dh, a_act, hn, h_prev, nan, nan.copy()]
    return fwd, bwd


STEPS = {  # the argument builder, and the names of the arguments of forward and of backward
    "lstm": (lstm_step, ("a", "hw", "c_prev", "c", "h", "tanh_c"),
             ("dh", "dc", "a", "c_prev", "tanh_c", "da")),
    "gru": (gru_step, ("a", "hw", "b_hn", "h_prev", "h", "hn"),
            ("dh", "a", "hn", "h_prev", "dxa", "dha")),
}


def called(cell, args):
    """Copies of args after cell(*args): the arrays it wrote and the ones it should have left alone."""
    out = [x.copy() for x in args]
    cell(*out)
    return out


def assert_all_close(expected, actual, dtype, names):
    for name, e, a in zip(names, expected, actual):
        assert a.dtype == dtype, name
        assert np.all(np.isfinite(a)), name
        assert rel_error(a, e) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["normal", "extreme", "mixed"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_match_reference(cell, kind, dtype):
    make_step, fwd_names, bwd_names = STEPS[cell]
    rng = np.random.default_rng(0)
    for N, H in SHAPES:
        steps = zip(make_step(rng, N, H, kind, dtype), (fwd_names, bwd_names), ("forward", "backward"))
        for i, (args, names, way) in enumerate(steps):
            expected = called(F._reference_cells[cell][i], args)
            actual = called(fused.cells[cell][i], args)
            assert_all_close(expected, actual, dtype, [f"{cell} {way} N={N} H={H}: {n}" for n in names])


def strided(x):
    """x as a view whose last axis has a stride of two elements."""
    wide = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def test_float32_activations_within_their_documented_error():
    """fused.py's own float32 exp (its polynomial with fused multiply-adds), sigmoid and tanh against
    float64, on every 1009th float32 of [-87, 87] (down to the subnormals): within the errors its
    docstring states (exp 1.01 ulp, sigmoid 1.8e-7 relative, tanh 1.51 ulp, 0.73 below |x| = 0.625);
    and exact at +-1e4 and +-inf."""
    from numba import njit

    @njit(error_model="numpy")
    def evaluate(x, e, s, t):
        one = np.float32(1)
        for i in range(x.shape[0]):
            e[i] = fused._exp(-abs(x[i]))
            s[i] = fused._sigmoid(x[i], one)
            t[i] = fused._tanh(x[i], one)

    positive = np.arange(0, 0x42AE0000, 1009, dtype=np.uint32).view(np.float32)  # 0 to 87
    x = np.concatenate([-positive, positive])
    e, s, t = (np.empty_like(x) for _ in range(3))
    evaluate(x, e, s, t)
    x64 = x.astype(np.float64)
    exact = np.exp(-np.abs(x64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(e - exact) / ulp) <= 1.011
    sigmoid = np.where(x64 >= 0, 1 / (1 + exact), exact / (1 + exact))
    assert np.max(np.abs(s - sigmoid) / sigmoid) <= 1.8e-7
    tanh = np.tanh(x64)
    ulp = np.spacing(np.abs(tanh).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(t - tanh) / ulp) <= 1.51
    small = np.abs(x64) < 0.625
    assert np.max(np.abs(t - tanh)[small] / ulp[small]) <= 0.73
    extremes = np.float32([-1e4, 1e4, -np.inf, np.inf])
    e, s, t = (np.empty_like(extremes) for _ in range(3))
    evaluate(extremes, e, s, t)
    np.testing.assert_array_equal(e, 0)
    np.testing.assert_array_equal(s, [0, 1, 0, 1])
    np.testing.assert_array_equal(t, [-1, 1, -1, 1])


def test_float64_tanh_is_libms():
    """float64 takes libm's tanh, as np.tanh does: relative to itself near 0 too."""
    from numba import njit

    @njit(error_model="numpy")
    def evaluate(x, t):
        for i in range(x.shape[0]):
            t[i] = fused._tanh(x[i], 1.0)

    x = np.concatenate([np.geomspace(1e-300, 30, 2000), [0.0, 1e4, np.inf]])
    x = np.concatenate([-x, x])
    t = np.empty_like(x)
    evaluate(x, t)
    np.testing.assert_allclose(t, np.tanh(x), rtol=4.5e-16, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_take_strided_arrays(cell):
    """Any strides work, not only the contiguous rows that functional.py passes."""
    make_step, fwd_names, bwd_names = STEPS[cell]
    rng = np.random.default_rng(7)
    steps = zip(make_step(rng, 3, 5, "mixed", np.float32), (fwd_names, bwd_names))
    for i, (args, names) in enumerate(steps):
        expected = called(F._reference_cells[cell][i], args)
        actual = [strided(x) for x in args]
        fused.cells[cell][i](*actual)
        assert_all_close(expected, actual, np.float32, names)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_nan_goes_through(cell, dtype):
    """A NaN pre-activation in any gate makes NaN wherever it does in the reference: a diverging
    model must not be hidden by an exp that turns NaN into a number."""
    make_step, fwd_names, _ = STEPS[cell]
    H = 4
    fwd, _ = make_step(np.random.default_rng(3), 2, H, "normal", dtype)
    fwd[0][0, ::H] = np.nan  # a: unit 0 of every gate block, in row 0
    expected = called(F._reference_cells[cell][0], fwd)
    actual = called(fused.cells[cell][0], fwd)
    assert np.isnan(expected[fwd_names.index("h")]).any()
    for name, e, a in zip(fwd_names, expected, actual):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=name)


def forward_backward(layer, x, state, dout, dstate):
    layer.zero_grad()
    out, final = layer.forward(x, state)
    dx, dstate0 = layer.backward(dout, dstate)
    return {"out": out, "final": final, "dx": dx, "dstate0": dstate0,
            **{f"grad {k}": v.copy() for k, v in layer.named_grads().items()}}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("seed", range(3))
def test_layers_match_with_and_without_numba(kind, dtype, seed, restore_cells):
    rng = np.random.default_rng(seed)
    T, N, D, H, L = (int(v) for v in rng.integers([3, 1, 1, 1, 2], [7, 6, 9, 9, 3]))
    layer = getattr(nl, kind)(D, H, num_layers=L, dtype=dtype, rng=rng)
    n_parts = 2 if kind == "LSTM" else 1

    def state():
        parts = tuple(rng.standard_normal((L, N, H)).astype(dtype) for _ in range(n_parts))
        return parts if kind == "LSTM" else parts[0]

    x = rng.standard_normal((T, N, D)).astype(dtype)
    dout = rng.standard_normal((T, N, H)).astype(dtype)
    h0, dfinal = state(), state()

    assert nl.use_numba(True)
    assert F._cells == fused.cells
    ours = forward_backward(layer, x, h0, dout, dfinal)
    assert not nl.use_numba(False)
    assert F._cells == F._reference_cells
    theirs = forward_backward(layer, x, h0, dout, dfinal)

    assert ours.keys() == theirs.keys()
    for name in theirs:
        both = (ours[name], theirs[name])
        for a, b in zip(*both) if isinstance(theirs[name], tuple) else [both]:
            assert a.dtype == dtype, name
            assert rel_error(a, b) < TOL[dtype], name


@pytest.mark.parametrize("dtype, scale", [(np.float32, 1e-4), (np.float64, 1e-8)])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_layers_match_with_and_without_numba_near_zero(kind, dtype, scale, restore_cells):
    """Zero biases, small inputs and no initial state: every pre-activation is near 0, where tanh(x)
    is about x and must stay accurate relative to itself, as np.tanh is (an exp-based tanh loses it
    there: it took the float32 LSTM's output 1.6e-4 away from the reference at this scale)."""
    rng = np.random.default_rng(5)
    T, N, D, H, L = 6, 3, 5, 7, 2
    layer = getattr(nl, kind)(D, H, num_layers=L, dtype=dtype, rng=rng)
    for name, value in layer.params.items():
        if name.startswith("bias"):
            value[...] = 0
    x = (scale * rng.standard_normal((T, N, D))).astype(dtype)
    dout = rng.standard_normal((T, N, H)).astype(dtype)
    assert nl.use_numba(True)
    ours = forward_backward(layer, x, None, dout, None)
    assert not nl.use_numba(False)
    theirs = forward_backward(layer, x, None, dout, None)
    for name in theirs:
        both = (ours[name], theirs[name])
        for a, b in zip(*both) if isinstance(theirs[name], tuple) else [both]:
            assert rel_error(a, b) < TOL[dtype], name


def test_other_dtypes_fall_back_to_the_reference_cells(restore_cells):
    """The compiled cells know float32 and float64; a float16 layer still runs, on the NumPy cells."""
    nl.use_numba(True)
    layer = nl.LSTM(3, 4, dtype=np.float16)
    out, _ = layer.forward(np.ones((2, 1, 3)))
    dx, _ = layer.backward(np.ones_like(out))
    assert out.dtype == np.float16 and dx.dtype == np.float16 and np.all(np.isfinite(out))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_rows_sums_the_rows_of_each_index(dtype):
    """fused.add_rows against the NumPy embedding gradient (sort and np.add.reduceat), with indices
    repeated, absent and out of order, and rows G*H wide as the folded first layer passes them."""
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 30, (50, 7))
    idx[idx == 3] = 4  # index 3 absent
    rows = rng.standard_normal((50, 7, 96)).astype(dtype)
    saved = dict(F._compiled)
    F._compiled.clear()
    try:
        expected = F.embedding_backward(rows, (idx, (30, 96)))
    finally:
        F._compiled.update(saved)
    actual = np.zeros((30, 96), dtype)
    fused.add_rows(idx.reshape(-1), rows.reshape(-1, 96), actual)
    assert rel_error(actual, expected) < TOL[dtype]
    assert not actual[3].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("V", [1, 3, 4, 9, 16, 33, 84])
def test_loss_kernels_match_reference(V, dtype):
    """fused.loss against functional's NumPy kernels: rows of ordinary, huge (+-1e4) and equal
    logits; a row with NaN stays NaN, as np.max and np.exp leave it."""
    rng = np.random.default_rng(V)
    z = (3 * rng.standard_normal((40, V))).astype(dtype)
    z[5] = 1e4 * rng.choice([-1.0, 1.0], V)
    z[6] = 7.0
    z[7, V // 2] = np.nan
    y = rng.integers(0, V, 40)
    scale = rng.random(40).astype(dtype)
    out = {}
    for name, (lse_fn, grad_fn) in (("ours", fused.loss), ("numpy", F._reference_loss)):
        lse, grad = np.full(40, -1.0, dtype), np.full((40, V), -1.0, dtype)
        with np.errstate(invalid="ignore"):
            lse_fn(z, lse)
            grad_fn(z, lse, y, scale, grad)
        out[name] = (lse, grad)
    for a, b in zip(out["ours"], out["numpy"]):
        assert a.dtype == dtype
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.isnan(a[7]).all()
        keep = ~np.isnan(b)
        assert rel_error(a[keep], b[keep]) < TOL[dtype]


def test_cross_entropy_takes_the_compiled_kernels(restore_cells):
    logits = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    targets = np.arange(6) % 5
    results = []
    for enable in (True, False):
        nl.use_numba(enable)
        assert (F._loss_kernels(np.float32) == fused.loss) == enable
        loss, cache = F.cross_entropy_forward(logits, targets, ignore_index=3)
        results.append((loss, F.cross_entropy_backward(cache, 2.0)))
    assert rel_error(results[0][0], results[1][0]) < 1e-6
    assert rel_error(results[0][1], results[1][1]) < 1e-6
    assert not results[0][1][3].any()  # the ignored position


# ---------------------------------------------------------------------------------------------
# Drawing tokens: fused.draw_tokens, which sample.next_tokens takes when neither top-k nor top-p is set.


def numpy_tokens(logits, seed, **kwargs):
    """next_tokens by its NumPy path alone."""
    saved = F._compiled.pop("draw", None)
    try:
        return next_tokens(logits, np.random.default_rng(seed), **kwargs)
    finally:
        if saved is not None:
            F._compiled["draw"] = saved


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("V", [1, 2, 5, 84, 300])
def test_compiled_draws_are_numpys(V, dtype):
    """The same tokens from the same draws of the generator: the sums differ from NumPy's by rounding,
    which moves a token only where a draw falls within that rounding of a boundary (not once in the
    thousands of draws here). Rows of ordinary, huge and equal logits, -inf, NaN, +inf, a row all
    -inf."""
    rng = np.random.default_rng(V)
    logits = (rng.standard_normal((400, V)) * rng.uniform(0.1, 8, (400, 1))).astype(dtype)
    logits[0] = 1e30 * rng.choice([-1.0, 1.0], V)
    logits[1] = 2.5
    logits[2, : V // 2] = -np.inf
    logits[3] = -np.inf
    logits[4, V // 2] = np.nan
    logits[5, -1] = np.inf
    assert "draw" in F._compiled
    for seed, temperature in enumerate((1e-4, 0.3, 1.0, 2.5, 1e3)):
        with np.errstate(invalid="ignore"):
            expected = numpy_tokens(logits, seed, temperature=temperature)
            got = next_tokens(logits, np.random.default_rng(seed), temperature=temperature)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
        assert got[3] == got[4] == got[5] == 0
    strided = logits[::3, ::2]
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(next_tokens(strided, np.random.default_rng(9)), numpy_tokens(strided, 9))


def test_top_k_top_p_and_argmax_keep_the_numpy_path(monkeypatch):
    logits = np.random.default_rng(0).standard_normal((50, 20))

    def refuse(*args):
        raise AssertionError("fused.draw_tokens called")

    monkeypatch.setitem(F._compiled, "draw", refuse)
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"argmax": True}):
        next_tokens(logits, np.random.default_rng(0), **kwargs)
    with pytest.raises(AssertionError):  # and the plain draw would have taken it
        next_tokens(logits, np.random.default_rng(0), top_k=20, top_p=1.0)


# ---------------------------------------------------------------------------------------------
# The time loops' products on packed weights (fused.pack, fused.matmul_packed, loop_product).


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 7, 40), (1, 512, 2048), (2, 3, 31), (7, 5, 32), (8, 16, 33),
                                   (9, 64, 84), (17, 128, 512), (64, 512, 2048), (127, 16, 40), (128, 9, 33),
                                   (300, 37, 70), (1030, 512, 96)])
def test_packed_product_matches_numpy(M, K, N):
    """One row (K split four ways, K = 7 leaving 3), rows not a multiple of 8 and columns not a
    multiple of 32 included; from 128 rows on, the large products' chunks of 64 rows, the last one
    partial (300 = 4 x 64 + 44): every entry written, each within float32 rounding of the exact
    product."""
    rng = np.random.default_rng(M + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    out = np.full((M, N), np.nan, np.float32)
    fused.matmul_packed(x, fused.pack(w), out)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    bound = (K + 1) * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)
    assert np.all(np.abs(out - exact) <= bound)
    assert rel_error(out, x @ w.T) < 1e-6


def _compiled_afresh(kernel, **options):
    """kernel compiled again outside numba's cache (whose code cannot be inspected), called once."""
    from numba import njit

    return njit(error_model="numpy", **options)(kernel.py_func)


def test_kernels_ask_llvm_for_512_bit_vectors():
    """Every kernel marks its LLVM function "prefer-vector-width"="512"; where the CPU has AVX-512,
    the packed product's multiply-adds are then 512 bits wide (LLVM's default on Intel is 256 bits,
    at which the 8 x 32 block of sums spilled out of the registers and ran at half speed)."""
    from llvmlite import binding

    rows = _compiled_afresh(fused._matmul_rows, fastmath=True)
    cell = _compiled_afresh(fused.lstm_cell_forward)
    x, w = np.ones((8, 16), np.float32), np.ones((40, 16), np.float32)
    out = np.empty((8, 40), np.float32)
    rows(x, fused.pack(w), out, np.empty(0, np.float32))
    assert np.all(out == 16)
    a, c = np.zeros((2, 4 * 3), np.float32), np.zeros((2, 3), np.float32)
    cell(a, a.copy(), c, c.copy(), c.copy(), c.copy())
    for kernel in (rows, cell):
        llvm = "\n".join(kernel.inspect_llvm().values())
        assert fused._WIDE in llvm
    if "+avx512f" in binding.get_host_cpu_features().flatten().split(","):
        asm = "\n".join(rows.inspect_asm().values())
        fmas = [line for line in asm.splitlines() if "vfmadd" in line]
        assert fmas and all("zmm" in line for line in fmas)


def test_pack_lays_out_panels_of_32_columns():
    w = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)  # N=40: one whole panel and 8 columns
    panels = fused.pack(w)
    assert panels.shape == (2, 3, 32) and panels.flags.c_contiguous
    np.testing.assert_array_equal(panels[0], w[:32].T)
    np.testing.assert_array_equal(panels[1, :, :8], w[32:].T)
    assert not panels[1, :, 8:].any()
    np.testing.assert_array_equal(fused.pack(np.ascontiguousarray(w.T).T), panels)  # from a view


@pytest.mark.parametrize("shape, dtype", [((2, 3, 32), np.float32), ((64, 512, 32), np.float32),
                                          ((5, 7), np.float64), ((0, 32), np.float32), ((3,), np.int64)])
def test_aligned_zeros_start_at_a_cache_line(shape, dtype):
    """Whatever malloc returns beneath them: several arrays in a row, each at a 64-byte boundary (an
    empty one has no first byte to place)."""
    for _ in range(8):
        a = fused.aligned_zeros(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert not a.any() and (a.ctypes.data % 64 == 0 or a.size == 0)
    for n, k in [(1, 1), (40, 3), (2048, 512)]:  # weights of any size: their panels too
        assert fused.pack(np.ones((n, k), np.float32)).ctypes.data % 64 == 0


@pytest.fixture
def packed_loops(monkeypatch, restore_cells):
    """The loop products, and the products over all steps, on packed weights whatever the BLAS's
    threads do and whichever CPU this is (only speed depends on them); the BLAS ones with
    packed_loops(False)."""
    assert nl.use_numba(True)

    def choose(packed):
        monkeypatch.setitem(F._compiled, "packed_loops", packed)
        monkeypatch.setitem(F._compiled, "packed_products", packed)

    choose(True)
    return choose


def test_loop_product_packs_float32_weights(packed_loops):
    w = np.ones((5, 3), np.float32)
    x = np.ones((2, 3), np.float32)
    for rows, dtype, packed in [(2, np.float32, True), (1, np.float32, True), (2, np.float64, False)]:
        product = F.loop_product(w.astype(dtype), rows)
        assert ("panels" in product.__code__.co_freevars) == packed, (rows, dtype)
        out = np.empty((rows, 5), dtype)
        assert product(x[:rows].astype(dtype), out) is out
        np.testing.assert_array_equal(out, 3)
        fresh = product(x[:rows].astype(dtype))  # no out: a new array of the input's dtype
        assert fresh.shape == (rows, 5) and fresh.dtype == dtype
        np.testing.assert_array_equal(fresh, 3)
    packed_loops(False)
    assert "panels" not in F.loop_product(w, 2).__code__.co_freevars


def test_products_over_all_steps_packed_where_they_can_be(packed_loops, monkeypatch):
    """functional.product: fused.matmul_packed for C-contiguous float32 operands while the loops'
    products are packed; the BLAS for a strided x, for float64, and with packed_loops(False).
    Every way within rounding of NumPy's product."""
    calls = []
    monkeypatch.setitem(F._compiled, "matmul_packed", lambda *args: calls.append(1) or fused.matmul_packed(*args))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 24)).astype(np.float32)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    strided = np.asfortranarray(x)
    for args, packed in [((x, w), True), ((x, np.asfortranarray(w)), True), ((strided, w), False),
                         ((x.astype(np.float64), w.astype(np.float64)), False)]:
        del calls[:]
        out = F.product(*args)
        assert len(calls) == packed and out.shape == (200, 40) and out.dtype == args[0].dtype
        assert rel_error(out, args[0] @ args[1].T) < 1e-6
    given = np.empty((200, 40), np.float32)
    assert F.product(x, w, given) is given
    packed_loops(False)
    del calls[:]
    F.product(x, w)
    assert not calls


@pytest.mark.parametrize("cpu,avx512,kernels,packed", [
    ("znver4", True, ["SkylakeX"], True), ("znver4", True, [], True),
    ("emeraldrapids", True, ["SkylakeX"], False), ("emeraldrapids", True, ["SapphireRapids"], False),
    ("emeraldrapids", True, ["Haswell"], True), ("emeraldrapids", True, ["Haswell", "SkylakeX"], False),
    ("emeraldrapids", True, [], False), ("emeraldrapids", True, [None], False),
    ("haswell", False, ["Haswell"], False), ("generic", False, [], False)])
def test_products_over_all_steps_packed_only_where_measured_faster(cpu, avx512, kernels, packed, monkeypatch,
                                                                   restore_cells):
    """use_numba packs the products over all steps on Zen 4, and where OpenBLAS runs a kernel without
    the CPU's 512-bit vectors, and only where the loops' products are packed; elsewhere (another BLAS,
    or a kernel that does not say its name, included) functional.product leaves them to the BLAS."""
    from llvmlite import binding

    monkeypatch.setattr(binding, "get_host_cpu_name", lambda: cpu)
    monkeypatch.setattr(binding, "get_host_cpu_features", lambda: {"avx512f": avx512})
    monkeypatch.setattr(fused, "openblas_kernels", lambda: kernels)
    monkeypatch.setattr(F, "blas_threads_sleep", lambda: True)
    monkeypatch.setattr(fused, "threads_on_openmp", lambda: True)
    assert nl.use_numba(True)
    assert F._compiled["packed_loops"] and F._compiled["packed_products"] == packed
    monkeypatch.setattr(F, "blas_threads_sleep", lambda: False)
    assert nl.use_numba(True)
    assert not F._compiled["packed_loops"] and not F._compiled["packed_products"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loaded libraries are read from /proc")
def test_openblas_kernels_name_the_kernel_threadpoolctl_reports():
    """fused.openblas_kernels finds NumPy's OpenBLAS (its functions renamed in NumPy's wheels) and
    names the kernel it runs, as threadpoolctl does."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    expected = sorted(i["architecture"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas")
    if not expected:
        pytest.skip("NumPy's BLAS is not OpenBLAS")
    assert sorted(fused.openblas_kernels()) == expected


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("seed,N,threads", [(0, 11, None), (1, 11, None), (2, 1, None), (3, 7, None),
                                            (4, 33, None), (5, 33, 1)])
def test_layers_match_with_packed_and_blas_loop_products(kind, seed, N, threads, packed_loops):
    """Whole float32 layers, forward and backward: the LSTM's and GRU's time loops compiled whole
    (fused.loops, the rows shared between the threads: 11 rows as 5 + 6, 33 as 16 + 17; fewer than
    9 rows, or one thread, on one) against the loops of functional.py with the BLAS's products; the
    RNN's step-by-step packed products. Products of 8-row blocks with a partial last one, and panels
    with a partial last one; the LSTM's bias added in its loops' products; layer 2's input products
    over all steps (x W_ih^T and da W_ih, functional.product) packed too, in chunks when N = 33
    (165 rows)."""
    numba = pytest.importorskip("numba")
    if threads is not None:
        saved_threads = numba.get_num_threads()
        numba.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    T, D, H, L = 5, 6, 37, 2
    if kind != "RNN":
        assert F._loop(kind.lower(), np.float32) == fused.loops[kind.lower()]
        assert len(fused._shares(N, None)[0]) - 1 == (1 if N <= 8 or threads == 1 else 2)
    layer = getattr(nl, kind)(D, H, num_layers=L, dtype=np.float32, rng=rng)
    h0 = tuple(rng.standard_normal((L, N, H)).astype(np.float32) for _ in range(2 if kind == "LSTM" else 1))
    state = h0 if kind == "LSTM" else h0[0]
    x = rng.standard_normal((T, N, D)).astype(np.float32)
    dout = rng.standard_normal((T, N, H)).astype(np.float32)
    try:
        packed = forward_backward(layer, x, state, dout, state)
    finally:
        if threads is not None:
            numba.set_num_threads(saved_threads)
    packed_loops(False)
    if kind != "RNN":
        assert F._loop(kind.lower(), np.float32) == F._reference_loops[kind.lower()]
    blas = forward_backward(layer, x, state, dout, state)
    for name in blas:
        both = (packed[name], blas[name])
        for a, b in zip(*both) if isinstance(blas[name], tuple) else [both]:
            assert rel_error(a, b) < 1e-6, name


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("N,threads", [(11, None), (33, None), (33, 1)])
def test_layers_given_a_lookup_match_the_looked_up_input(kind, N, threads, packed_loops):
    """A first layer given its embedding as a Lookup: the LSTM's and GRU's time loops pick each
    step's rows of the table (`gather`), the compiled loops on each thread's share of the rows and
    functional.py's loops step by step; the RNN's input side picks them before its loop. Each equal
    to the layer given the looked-up input itself, forward and backward (the Lookup's gradient is
    the embedding's: the input's gradient summed by token)."""
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(N)
    T, V, D, H, L = 5, 13, 6, 37, 2
    layer = getattr(nl, kind)(D, H, num_layers=L, dtype=np.float32, rng=rng)
    weight = rng.standard_normal((V, D)).astype(np.float32)
    ids = rng.integers(2, V, (T, N))  # rows 0 and 1 unused
    dout = rng.standard_normal((T, N, H)).astype(np.float32)
    state = None
    reference = forward_backward(layer, weight[ids], state, dout, state)
    reference["dx"] = F.embedding_backward(reference["dx"].reshape(T * N, D), (ids.reshape(-1), weight.shape))
    for packed in (True, False):
        packed_loops(packed)
        if kind != "RNN":
            chosen = fused.loops if packed else F._reference_loops
            assert F._loop(kind.lower(), np.float32) == chosen[kind.lower()]
        if threads is not None:
            saved_threads = numba.get_num_threads()
            numba.set_num_threads(threads)
        try:
            folded = forward_backward(layer, F.Lookup(weight, ids), state, dout, state)
        finally:
            if threads is not None:
                numba.set_num_threads(saved_threads)
        for name in reference:
            both = (folded[name], reference[name])
            for a, b in zip(*both) if isinstance(reference[name], tuple) else [both]:
                assert rel_error(a, b) < 1e-6, (packed, name)


@pytest.mark.parametrize("streams", [1, 10])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_generation_steps_match_with_packed_and_blas_products(kind, streams, packed_loops):
    model = nl.LanguageModel(nl.ModelConfig(vocab_size=50, model=kind, num_layers=2, hidden_size=40,
                                            embedding_size=8), seed=0, dtype=np.float32)
    tokens = np.arange(streams) * 3
    _, state = model.forward(tokens[None])
    logits = {}
    for packed in (True, False):
        packed_loops(packed)
        weights, s, out = model.step_weights(len(tokens)), state, []
        for _ in range(4):
            step_logits, s = model.step(tokens, s, weights)
            out.append(step_logits)
        logits[packed] = np.stack(out)
    assert rel_error(logits[True], logits[False]) < 1e-6


_MULTIPLY = "import numpy; numpy.ones((512, 512), numpy.float32) @ numpy.ones((512, 512), numpy.float32)"


@pytest.mark.parametrize("preamble,env,expected", [
    ("import nanolstm", {}, ("1", True)),  # nanolstm first: it sets the timeout before NumPy loads
    (f"{_MULTIPLY}; import nanolstm", {}, ("1", True)),  # NumPy first: its OpenBLAS reads it again
    (f"{_MULTIPLY}; import nanolstm", {"OPENBLAS_THREAD_TIMEOUT": "1"}, ("1", True)),  # the user set it
    ("import nanolstm", {"OPENBLAS_THREAD_TIMEOUT": "28"}, ("28", False)),  # the user's own: kept
    (f"{_MULTIPLY}; import nanolstm", {"OPENBLAS_THREAD_TIMEOUT": "28"}, ("28", False)),
    (f"{_MULTIPLY}; import nanolstm", {"NANOLSTM_NUMBA": "0"}, (None, False)),  # no compiled kernels: nothing set
])
def test_packed_loop_products_only_where_openblas_threads_sleep(preamble, env, expected):
    """What the environment says; whether the loops take the packed products; and, after a product
    on OpenBLAS's threads, whether they sleep: the CPU time the process takes while it sleeps for
    50 ms (a spinning thread takes all of it, less what the host gives to other guests: 19-52 ms seen
    on the Xeon; a sleeping one 0.1-0.3 ms). With NumPy loaded first, the threads were already
    running when nanolstm set the variable."""
    import json
    import os
    import subprocess
    import sys

    code = (f"{preamble}; import os, json, time, numpy as np, threadpoolctl; from nanolstm import functional as F; "
            "layers = [lib.threading_layer for lib in threadpoolctl.ThreadpoolController().select(internal_api='openblas').lib_controllers]; "
            "a = np.ones((512, 512), np.float32); right = bool(np.all(a @ a == 512)); "
            "t = time.process_time(); time.sleep(0.05); busy = time.process_time() - t; "
            "print(json.dumps([os.environ.get('OPENBLAS_THREAD_TIMEOUT'), bool(F._compiled.get('packed_loops')), "
            "layers, right, busy]))")
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "NANOLSTM_NUMBA")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout
    timeout, sleeps, layers, product_right, busy = json.loads(out)
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    assert (timeout, sleeps) == (expected[0], expected[1] and "openblas" in blas.lower() and fused.threads_on_openmp())
    assert product_right
    if layers == ["pthreads"]:  # NumPy's OpenBLAS, on its own threads
        assert (busy < 0.005) == (timeout == "1"), busy


def test_import_beside_a_thread_in_the_blas_leaves_openblas_threads_alone():
    """With NumPy loaded and another thread multiplying, OpenBLAS's threads are not restarted (that
    hung both threads): the import returns, the products stay right, the loops keep to the BLAS."""
    import json
    import os
    import subprocess
    import sys

    code = ("import threading, json, numpy as np; a = np.ones((1024, 1024), np.float32); stop = threading.Event(); "
            "results = []; "
            "worker = threading.Thread(target=lambda: [results.append(bool(np.all(a @ a == 1024))) "
            "for _ in iter(stop.is_set, True)]); worker.start(); "
            "import time; time.sleep(0.1); import nanolstm; from nanolstm import functional as F; "
            "stop.set(); worker.join(); "
            "print(json.dumps([bool(F._compiled.get('packed_loops')), len(results) > 0 and all(results)]))")
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "NANOLSTM_NUMBA")}
    out = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    packed, products_right = json.loads(out)
    assert products_right
    assert not packed


def test_packed_loop_products_only_on_numba_openmp_threads(monkeypatch):
    from numba import config

    monkeypatch.setattr(config, "THREADING_LAYER", "workqueue")
    assert not fused.threads_on_openmp()
    monkeypatch.setattr(config, "THREADING_LAYER", "omp")
    try:
        import numba.np.ufunc.omppool  # noqa: F401
    except ImportError:
        assert not fused.threads_on_openmp()
    else:
        assert fused.threads_on_openmp()


def test_packed_loop_product_leaves_other_input_dtypes_to_numpy(packed_loops):
    """float64 steps beside float32 weights are multiplied as NumPy would, not in float32."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 30)).astype(np.float32)
    x = rng.standard_normal((9, 30))
    out = np.empty((9, 40))
    F.loop_product(w, 9)(x, out)
    assert rel_error(out, x @ w.T.astype(np.float64)) < 1e-14


# ---------------------------------------------------------------------------------------------
# Generation's compiled sampling loop (fused.sample, model.compiled_sampler).


def sample_model(kind, layers, dtype=np.float32):
    from nanolstm.data import Vocab
    from nanolstm.model import LanguageModel, ModelConfig

    vocab = Vocab("char", ["\n"] + [chr(c) for c in range(ord("a"), ord("a") + 26)])
    model = LanguageModel(ModelConfig(len(vocab), model=kind, num_layers=layers, hidden_size=37, embedding_size=5),
                          vocab, seed=layers, dtype=dtype)
    for p in model.state_dict().values():
        p *= 4  # weights large enough for the draws to depend on every part of the step
    return model


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_compiled_sampling_draws_the_python_loops_tokens(kind, layers, packed_loops, monkeypatch):
    """model.generate through the compiled loop and through model.step and next_tokens in Python (the
    same kernels, one call each): the same tokens, for one and 5 streams (an 8-row block's partial
    rows), no prime, a prime warmed step by step and one longer than WARM_BY_STEPS (forward), at
    two temperatures, in calls of CALL_STEPS tokens and one of 8; and streamed to on_text piece by
    piece, a call each, the same again."""
    from nanolstm.model import CALL_STEPS, WARM_BY_STEPS

    length = CALL_STEPS + 8  # two calls of the loop, the second partial
    model = sample_model(kind, layers)
    long_prime = "abcdefgh" * (WARM_BY_STEPS // 8 + 1)
    runs = [dict(prime=prime, num_samples=N, temperature=temperature, seed=seed)
            for prime, N, temperature, seed in [("", 1, 1.0, 0), ("ab", 5, 0.7, 1), (long_prime, 1, 1.0, 2),
                                                (long_prime, 5, 1.3, 3)]]
    zeros = model.rnn.zero_state(1)  # as generate starts
    assert model.compiled_sampler(None, zeros) is not None
    compiled = [model.generate(length=length, **run) for run in runs]
    streamed = []
    for run in runs:
        pieces = []
        assert model.generate(length=length, on_text=pieces.append, **run)[0] == "".join(pieces)
        streamed.append(pieces)
    monkeypatch.delitem(F._compiled, "sample")
    assert model.compiled_sampler(None, zeros) is None
    python = [model.generate(length=length, **run) for run in runs]
    assert compiled == python
    assert ["".join(pieces) for pieces in streamed] == [texts[0] for texts in python]
    assert len({texts[0] for texts in python}) == len(runs)  # the runs differ: each one tests something


_PRODUCT_ALONE = """
import numpy as np
from nanolstm import fused
out = np.empty((8, 32), np.float32)
fused.matmul_packed(np.ones((8, 16), np.float32), fused.pack(np.ones((32, 16), np.float32)), out)
"""

_GENERATE = """
import sys
import numpy as np
from nanolstm.data import Vocab
from nanolstm.model import LanguageModel, ModelConfig
vocab = Vocab("char", ["\\n"] + [chr(c) for c in range(ord("a"), ord("a") + 26)])
model = LanguageModel(ModelConfig(len(vocab), num_layers=2, hidden_size=37, embedding_size=5), vocab, seed=0,
                      dtype=np.float32)
zeros = model.rnn.zero_state(1)
print("compiled" if model.compiled_sampler(None, zeros) is not None else "python", file=sys.stderr)
print(repr(model.generate(length=40, seed=1)[0]), file=sys.stderr)
"""


def test_generation_runs_when_its_compiled_loop_comes_from_numbas_cache(tmp_path):
    """numba issue 8578: a compiled function loaded from numba's cache does not start numba's threads
    for the parallel=True functions it calls. Three processes on one empty cache: the first compiles
    matmul_packed alone; the second generates, compiling the sampling loop on matmul_packed from
    the cache, and caches it; the third loads that loop and generates. It stopped on a segmentation
    fault (status -11) until fused.sample started the threads itself; now it draws the second's text."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_DEBUG_CACHE="1")
    ran = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
           for code in (_PRODUCT_ALONE, _GENERATE, _GENERATE)]
    assert [r.returncode for r in ran] == [0, 0, 0], [r.stderr[-2000:] for r in ran]
    (path, text), (_, again) = (r.stderr.splitlines()[-2:] for r in ran[1:])
    if path != "compiled":
        pytest.skip("generation does not take the compiled loop here (the BLAS's loop products)")
    loaded = [line for line in ran[2].stdout.splitlines() if "data loaded from" in line]
    assert any("fused._sample-" in line for line in loaded), ran[2].stdout  # the loop came from the cache
    assert not any("fused._sample-" in line for line in ran[1].stdout.splitlines() if "loaded" in line)
    assert again == text and len(text) > 40


def test_compiled_sampling_only_for_a_plain_draw_of_float32_lstm_and_gru(packed_loops):
    """top-k, top-p and argmax, float64, the plain RNN, and the BLAS's loop products keep the Python
    loop; a top-k of the whole vocabulary or a top-p of 1 is the plain draw."""
    state = np.zeros((1, 1, 37), np.float32)
    lstm = sample_model("lstm", 1)
    lstm_state = (state, state)
    assert lstm.compiled_sampler(None, lstm_state, top_k=len(lstm.vocab), top_p=1.0) is not None
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"argmax": True}):
        assert lstm.compiled_sampler(None, lstm_state, **kwargs) is None
    assert sample_model("lstm", 1, np.float64).compiled_sampler(None, lstm_state) is None
    assert sample_model("rnn", 1).compiled_sampler(None, state) is None
    assert sample_model("gru", 1).compiled_sampler(None, state) is not None
    packed_loops(False)
    assert lstm.compiled_sampler(None, lstm_state) is None


def test_pack_stack_stacks_the_panels_of_each_weight():
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((40, 6)).astype(np.float32) for _ in range(3)]
    stacked = fused.pack_stack(ws)
    assert stacked.shape == (3, 2, 6, 32) and stacked.ctypes.data % 64 == 0
    for w, panels in zip(ws, stacked):
        np.testing.assert_array_equal(panels, fused.pack(w))
    assert fused.pack_stack([]).shape[0] == 0


def each_kernel(packed_loops):
    """"packed", "blas" and "numpy" in turn, the time loops and cells switched to each before it is
    yielded: the compiled cells and loops with packed products, with the BLAS's, the NumPy cells."""
    for kernels in ("packed", "blas", "numpy"):
        if kernels == "blas":
            packed_loops(False)
        elif kernels == "numpy":
            assert not nl.use_numba(False)
        yield kernels


def assert_runs_agree(runs, reference):
    """Every float32 result of every run within 1e-6 of the reference run's."""
    for run, result in runs.items():
        for name in reference:
            both = (result[name], reference[name])
            for a, b in zip(*both) if isinstance(reference[name], tuple) else [both]:
                assert a.dtype == np.float32 and rel_error(a, b) < 1e-6, (run, name)


@pytest.mark.parametrize("N", [1, 11, 33])
def test_an_lstm_with_projections_is_the_same_on_every_kernel_and_given_a_lookup(N, packed_loops):
    """proj_size: the projected loops compiled whole (fused.loops["lstmp"], the rows shared between
    the threads: 1 row on one, 11 as 5 + 6, 33 as 16 + 17), functional.py's loops with the BLAS's
    products round the compiled cells, and with the NumPy cells agree to 1e-6 in float32, forward
    and backward, given the input itself or a first layer's Lookup of it (its gradient is then the
    embedding's)."""
    rng = np.random.default_rng(N)
    T, V, D, H, P, L = 5, 13, 6, 37, 11, 2
    layer = nl.LSTM(D, H, num_layers=L, proj_size=P, dtype=np.float32, rng=rng)
    weight = rng.standard_normal((V, D)).astype(np.float32)
    ids = rng.integers(2, V, (T, N))  # rows 0 and 1 unused
    state = (rng.standard_normal((L, N, P)).astype(np.float32), rng.standard_normal((L, N, H)).astype(np.float32))
    dout = rng.standard_normal((T, N, P)).astype(np.float32)
    runs = {}
    for kernels in each_kernel(packed_loops):
        assert (F._cells == fused.cells) == (kernels != "numpy")
        loops = fused.loops if kernels == "packed" else F._reference_loops
        assert F._loop("lstmp", np.float32) == loops["lstmp"]
        given = forward_backward(layer, weight[ids], state, dout, state)
        given["dx"] = F.embedding_backward(given["dx"].reshape(T * N, D), (ids.reshape(-1), weight.shape))
        runs[kernels, "input"] = given
        runs[kernels, "lookup"] = forward_backward(layer, F.Lookup(weight, ids), state, dout, state)
    reference = runs["numpy", "input"]
    assert_runs_agree(runs, reference)


@pytest.mark.parametrize("kind,proj", [("LSTM", 0), ("LSTM", 4), ("GRU", 0), ("RNN", 0)])
@pytest.mark.parametrize("N,threads", [(11, None), (40, None), (40, 1)])
def test_sequences_of_different_lengths_are_the_same_on_every_kernel(kind, proj, N, threads, packed_loops):
    """lengths=: each step runs only the sequences still running (batch_sizes). The compiled loops,
    each thread on its share of the rows sorted longest first, some of whose sequences end before
    others' and while the other thread's still run; the loops of functional.py with the BLAS's
    products; and the NumPy cells: equal to 1e-6 in float32, forward and backward, with two layers,
    both directions, a state, and sequences of length 1, of T and of equal lengths."""
    numba = pytest.importorskip("numba")
    rng = np.random.default_rng(N)
    T, D, H, L = 9, 6, 37, 2
    kwargs = {"proj_size": proj} if proj else {}
    layer = getattr(nl, kind)(D, H, num_layers=L, bidirectional=True, dtype=np.float32, rng=rng, **kwargs)
    R = proj or H
    lengths = rng.integers(1, T + 1, N)
    lengths[:3] = [T, 1, lengths[3]]
    parts = [(2 * L, N, R)] + ([(2 * L, N, H)] if kind == "LSTM" else [])
    state = tuple(rng.standard_normal(s).astype(np.float32) for s in parts)
    state = state if kind == "LSTM" else state[0]
    x = rng.standard_normal((T, N, D)).astype(np.float32)
    dout = rng.standard_normal((T, N, 2 * R)).astype(np.float32)
    runs = {}
    for kernels in each_kernel(packed_loops):
        if threads is not None:
            saved_threads = numba.get_num_threads()
            numba.set_num_threads(threads)
        try:
            layer.zero_grad()
            out, final = layer.forward(x, state, lengths=lengths)
            dx, dstate0 = layer.backward(dout, state)
        finally:
            if threads is not None:
                numba.set_num_threads(saved_threads)
        runs[kernels] = {"out": out, "final": final, "dx": dx, "dstate0": dstate0,
                         **{f"grad {k}": v.copy() for k, v in layer.named_grads().items()}}
        past_end = np.arange(T)[:, None] >= lengths
        assert not out[past_end].any() and not dx[past_end].any()
    reference = runs["numpy"]
    assert_runs_agree(runs, reference)


def test_threads_share_sequences_of_different_lengths_by_their_steps():
    """fused._shares: rows of equal lengths split evenly, as before lengths existed; sequences of
    different lengths, longest first, so that each thread runs about as many row-steps (within one
    sequence's), the first thread then taking fewer rows."""
    numba = pytest.importorskip("numba")
    saved_threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        assert fused._shares(64, None)[0].tolist() == [0, 32, 64]
        assert fused._shares(64, [64] * 10)[0].tolist() == [0, 32, 64]
        lengths = np.sort(np.random.default_rng(0).integers(1, 101, 64))[::-1]
        batch_sizes = np.sum(lengths > np.arange(100)[:, None], axis=1)
        bounds, steps = fused._shares(64, batch_sizes)
        assert steps.tolist() == batch_sizes.tolist() and bounds[0] == 0 and bounds[-1] == 64
        first, second = lengths[: bounds[1]].sum(), lengths[bounds[1] :].sum()
        assert bounds[1] < 32 and abs(int(first) - int(second)) <= lengths.max()
    finally:
        numba.set_num_threads(saved_threads)
