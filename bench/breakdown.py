"""Where the time of one training step goes: each part of one recurrent layer timed on its own.

    python bench/breakdown.py                  # LSTM, H=512, D=512, T=100, N=64 (configuration c's layer 2)
    python bench/breakdown.py --model gru --hidden 128 --input 64 --T 64 --N 32
    python bench/breakdown.py --input 64 --vocab 84    # and the first layer's input side, folded or not
    python bench/breakdown.py --hidden 128 --T 64 --N 32 --step 1   # and a whole training step, by phase

Each part is run exactly as functional.py runs it, on arrays of the same shapes and layouts, and
timed alone (best of --repeats), so the parts add up to about the whole pass, which is timed too.
A part's GFLOP/s is against the BLAS's rate on a large square product, measured in the same run.
Run it on an idle machine: OpenBLAS's threads spin while they wait, so other work distorts it.
"""

import argparse
import time

import numpy as np

from nanolstm import functional as F


def best_ms(fn, repeats):
    fn()  # warm: caches, BLAS threads, numba's compiled code
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("lstm", "gru"), default="lstm")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--input", type=int, default=512)
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-numba", action="store_true", help="the NumPy reference cells")
    p.add_argument("--vocab", type=int, default=0,
                   help="also time the input side of a first layer whose input is an embedding of this "
                        "many rows (--input wide), looked up then multiplied, and folded in (Lookup)")
    p.add_argument("--step", type=int, default=0, metavar="LAYERS",
                   help="also time a whole training step of a language model of this many layers "
                        "(--hidden units, embedding 64, vocabulary 84), phase by phase")
    args = p.parse_args(argv)
    fused = F.use_numba(not args.no_numba)
    H, D, T, N, r = args.hidden, args.input, args.T, args.N, args.repeats
    G = 4 if args.model == "lstm" else 3
    rng = np.random.default_rng(0)

    def f32(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    x, h0, c0 = f32(T, N, D), f32(N, H), f32(N, H)
    w_ih, w_hh, b_ih, b_hh = f32(G * H, D), f32(G * H, H), f32(G * H), f32(G * H)
    dout = f32(T, N, H)
    square = f32(2048, 2048)
    peak = 2 * 2048**3 / best_ms(lambda: square @ square, 3) / 1e6  # GFLOP/s

    rows = []

    def part(name, fn, flops=None):
        ms = best_ms(fn, r)
        rows.append((name, ms, flops / ms / 1e6 if flops else None))

    # the parts, each as the layer functions do it
    hw = np.empty((N, G * H), np.float32)
    a = f32(T, N, G * H)
    da = f32(T, N, G * H)
    dh = np.empty((N, H), np.float32)
    hs = f32(T + 1, N, H)
    per_step = 2 * N * H * G * H
    big = 2 * T * N * D * G * H
    part("forward: input products x W_ih^T, one call",  # into the array the layer keeps, as it does
         lambda: F.product(x.reshape(T * N, D), w_ih, a.reshape(T * N, G * H)), big)
    loop_forward, loop_backward = F._loop(args.model, np.float32)
    dc = f32(N, H)
    if args.model == "lstm":
        cs, tanh_cs = f32(T + 1, N, H), np.empty((T, N, H), np.float32)

        def forward_loop():
            loop_forward(a, b_ih + b_hh, hs, cs, tanh_cs, w_hh)

        def backward_loop():
            dh[...], dc[...] = 0.1, 0.1  # the state of a real pass, not what earlier runs left
            loop_backward(dout, dh, dc, a, cs, tanh_cs, da, w_hh)
    else:
        hns, dha = np.empty((T, N, H), np.float32), f32(T, N, G * H)
        b_hn = b_hh[2 * H :]

        def forward_loop():
            loop_forward(a, F.gru_input_bias(b_ih, b_hh), hs, hns, b_hn, w_hh)

        def backward_loop():
            dh[...] = 0.1
            loop_backward(dout, dh, a, hns, hs, da, dha, w_hh)

    part(f"forward: the time loop, {T} products and cells", forward_loop, T * per_step)
    part(f"backward: the time loop, {T} cells and products", backward_loop, T * per_step)
    da2, x2, h2 = da.reshape(T * N, G * H), x.reshape(T * N, D), hs[:T].reshape(T * N, H)
    part("backward: dx = da W_ih, one call", lambda: F.product(da2, w_ih.T), big)
    part("backward: dW_ih = da^T x, one call", lambda: da2.T @ x2, big)
    part("backward: dW_hh = da^T h, one call", lambda: da2.T @ h2, 2 * T * N * H * G * H)
    if args.model == "gru":  # the LSTM's backward loop sums it as it goes
        part("backward: bias gradient", lambda: da2.sum(axis=0))  # and as much again for dha

    layer = {"lstm": (F.lstm_forward, F.lstm_backward), "gru": (F.gru_forward, F.gru_backward)}
    forward, backward = layer[args.model]
    state = (h0, c0) if args.model == "lstm" else (h0,)
    out = {}

    def whole_forward():
        out["r"] = forward(x, *state, w_ih, w_hh, b_ih, b_hh)

    whole_forward()
    cache = out["r"][-1]
    whole_fwd = best_ms(whole_forward, r)
    whole_bwd = best_ms(lambda: backward(dout, *state, cache), r)

    alone = []  # the loop's two parts, step by step, each without the other

    def alone_part(name, fn, flops=None):
        ms = best_ms(fn, r)
        alone.append((name, ms, flops / ms / 1e6 if flops else None))

    times_w_hh_t, times_w_hh = F.loop_product(w_hh, N), F.loop_product(w_hh.T, N)

    def forward_products():
        for t in range(T):
            times_w_hh_t(hs[t], hw)

    def backward_products():  # the GRU's loop multiplies dha, the gradient of h W_hh^T + b_hh
        d = da if args.model == "lstm" else dha
        for t in range(T):
            times_w_hh(d[t], dh)

    # In the backward cells alone, each step's dh is set to that step's row of dout (a copy of 128
    # KB at c, a few microseconds): the real loop adds the product's dh_{t-1} to it. Without that,
    # dh shrank cell after cell into subnormal numbers (a fifth of the GRU's at c after 100 cells),
    # which the CPU computes with far more slowly: 100 products on the da such cells wrote took 393
    # ms, against 61 on a fresh da, in one process.

    cell_forward, cell_backward = F._cell(args.model, np.float32)
    if args.model == "lstm":
        def forward_cells():
            for t in range(T):
                cell_forward(a[t], hw, cs[t], cs[t + 1], hs[t + 1], tanh_cs[t])

        def backward_cells():
            dc[...] = 0.1
            for t in reversed(range(T)):
                np.copyto(dh, dout[t])
                cell_backward(dh, dc, a[t], cs[t], tanh_cs[t], da[t])
    else:
        def forward_cells():
            for t in range(T):
                cell_forward(a[t], hw, b_hn, hs[t], hs[t + 1], hns[t])

        def backward_cells():
            for t in reversed(range(T)):
                np.copyto(dh, dout[t])
                cell_backward(dh, a[t], hns[t], hs[t], da[t], dha[t])

    alone_part("W_hh packed for a loop, once", lambda: F.loop_product(w_hh, N))
    alone_part(f"{T} products h W_hh^T, both threads on each", forward_products, T * per_step)
    alone_part(f"{T} forward cells, one thread", forward_cells)
    alone_part(f"{T} backward cells, one thread", backward_cells)
    alone_part(f"{T} products da W_hh, both threads on each", backward_products, T * per_step)

    packed = "numba, packed weights" if F._compiled.get("packed_loops") else "BLAS"
    packed += ", input products: " + ("numba, packed weights" if F._compiled.get("packed_products") else "BLAS")
    print(f"{args.model} layer: H={H} D={D} T={T} N={N}, float32, cells: "
          f"{'numba fused' if fused else 'NumPy reference'}, loop products: {packed}; "
          f"large square product {peak:.0f} GFLOP/s")
    print(f"{'part':<48} {'ms':>8} {'GFLOP/s':>8}")
    for name, ms, gflops in rows:
        print(f"{name:<48} {ms:8.2f} {'' if gflops is None else f'{gflops:8.0f}':>8}")
    parts_fwd = sum(ms for name, ms, _ in rows if name.startswith("forward"))
    parts_bwd = sum(ms for name, ms, _ in rows if name.startswith("backward"))
    print(f"{'sum of the forward parts':<48} {parts_fwd:8.2f}")
    print(f"{'whole forward pass':<48} {whole_fwd:8.2f}")
    print(f"{'sum of the backward parts':<48} {parts_bwd:8.2f}")
    print(f"{'whole backward pass':<48} {whole_bwd:8.2f}")
    print("(the whole passes take longer than their parts by caches: a part repeated on the same arrays\n"
          " finds them warm)")
    compiled = F._loop(args.model, np.float32) != F._reference_loops[args.model]
    how = ("shares the rows between the threads, each taking its rows through every step" if compiled
           else "runs them so, one after the other")
    print(f"\nthe time loop's parts alone, step by step (the loop above {how}):")
    for name, ms, gflops in alone:
        print(f"{name:<48} {ms:8.2f} {'' if gflops is None else f'{gflops:8.0f}':>8}")
    if args.vocab:
        input_side(args, f32, w_ih, b_ih + b_hh, da, r)
    if args.step:
        whole_step(args)


def input_side(args, f32, w_ih, bias, da, repeats):
    """The first layer's input side from an embedding, both ways, forward and backward."""
    T, N, V = args.T, args.N, args.vocab
    embedding = f32(V, args.input)
    ids = np.random.default_rng(1).integers(0, V, (T, N))
    lookup = F.Lookup(embedding, ids)

    def looked_up():  # as the Embedding layer and the recurrent layer do it without the fold
        x = F.embedding_forward(ids, embedding)[0]
        F.input_side_forward(x, w_ih, bias if args.model == "gru" else None)
        dx, _ = F.input_side_backward(da, x, w_ih)
        F.embedding_backward(dx, (ids, embedding.shape))

    def folded():  # as the LSTM and GRU layers do it: their time loops then pick each step's rows
        F.input_side_table(lookup, w_ih, bias if args.model == "gru" else None)
        F.input_side_backward(da, lookup, w_ih)

    print(f"\ninput side of a first layer from an embedding of {V} x {args.input}, forward and backward:")
    print(f"{'looked up, then T*N rows multiplied':<48} {best_ms(looked_up, repeats):8.2f}")
    print(f"{'folded in: V rows multiplied (Lookup)':<48} {best_ms(folded, repeats):8.2f}")
    print("(folded in, the rows of the batch are picked from the V by the time loop, step by step)")


def whole_step(args, steps=40):
    """A training step of the whole language model, as train.py runs it and with the settings of
    `nanolstm bench`, timed phase by phase (the median of each over `steps` steps on random tokens,
    after 3 warm-up steps)."""
    from nanolstm import optim
    from nanolstm.bench import CLIP, LR, E as embedding, V as vocab
    from nanolstm.model import LanguageModel, ModelConfig

    T, N = args.T, args.N
    config = ModelConfig(vocab_size=vocab, model=args.model, num_layers=args.step,
                         hidden_size=args.hidden, embedding_size=embedding)
    model = LanguageModel(config, seed=0, dtype=np.float32)
    params, grads = model.state_dict(), model.named_grads()
    opt = optim.Adam(params, grads, lr=LR)
    rng = np.random.default_rng(2)
    xs, ys = rng.integers(0, vocab, (2, 4, T, N), dtype=np.int32)
    phases = {"forward (embedding, layers, decoder)": [], "cross-entropy forward": [],
              "cross-entropy backward": [], "backward (decoder, layers, embedding)": [],
              "gradient clipping": [], "Adam step": []}
    state = None
    for k in range(3 + steps):
        marks = [time.perf_counter()]
        model.zero_grad()
        logits, state = model.forward(xs[k % 4], state)
        marks.append(time.perf_counter())
        loss, cache = F.cross_entropy_forward(logits, ys[k % 4])
        marks.append(time.perf_counter())
        dlogits = F.cross_entropy_backward(cache)
        marks.append(time.perf_counter())
        model.backward(dlogits)
        marks.append(time.perf_counter())
        optim.clip_grad_norm(grads, CLIP)
        float(loss)
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        if k >= 3:
            for times, t0, t1 in zip(phases.values(), marks, marks[1:]):
                times.append(t1 - t0)
    medians = {name: 1e3 * float(np.median(times)) for name, times in phases.items()}
    total = sum(medians.values())
    print(f"\na training step of a {args.step}x{args.hidden} {args.model} language model (T={T} N={N}, "
          f"embedding {embedding}, vocabulary {vocab}), median of {steps}:")
    for name, ms in medians.items():
        print(f"{name:<48} {ms:8.2f} {100 * ms / total:7.1f}%")
    print(f"{'whole step':<48} {total:8.2f}   {T * N / total * 1e3:,.0f} tokens/s")


if __name__ == "__main__":
    main()
