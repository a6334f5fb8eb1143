"""The recurrent layer's paths beside the language model's: projections, and sequences of different
lengths, ours against PyTorch's.

One forward and backward pass of an LSTM stack (float32, the input given as an array, the gradient
of the output all ones), ours and torch.nn.LSTM with the same sizes and weights' shapes, in five
variants: plain; with proj_size=P; given each sequence's length (ours `forward(x, lengths=...)`,
PyTorch's the same batch through pack_padded_sequence and pad_packed_sequence); the same
bidirectional; and with proj_size=P and lengths. The lengths are drawn once, uniformly from 1 to T,
the same on both sides; `row-steps` says what share of the T x N steps they leave to compute.

Ours runs fused.loops compiled whole in every variant (the projected LSTM's own loops,
fused.loops["lstmp"], with projections); PyTorch's projected LSTM leaves oneDNN for its default
implementation. Each side runs
in processes of its own, as `nanolstm bench` runs them (PyTorch's with NANOLSTM_PROCESS_SETTINGS=0:
nanolstm's thread settings would make its OpenMP threads sleep between its many small operations),
the two sides in turns, `--rounds` processes each. A process times each variant after two calls to
warm up: the median of `--repeats`; a variant's figure is its best process.

    python bench/layers.py [--hidden 512 --proj 256 --input 512 --layers 2 --T 100 --N 64]
                           [--rounds 3 --repeats 5]

About four minutes at the default sizes. PyTorch is needed (pip install torch==2.13.0).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np

import nanolstm as nl

# name: (projected, given lengths, bidirectional)
VARIANTS = {
    "plain": (False, False, False),
    "proj_size": (True, False, False),
    "lengths": (False, True, False),
    "lengths, bidirectional": (False, True, True),
    "proj_size, lengths": (True, True, False),
}


def ours(args, variant, x, lengths):
    projected, given, bidirectional = VARIANTS[variant]
    proj = args.proj if projected else 0
    layer = nl.LSTM(args.input, args.hidden, num_layers=args.layers, proj_size=proj, bidirectional=bidirectional,
                    rng=np.random.default_rng(0))
    dout = np.ones((args.T, args.N, layer.num_directions * (proj or args.hidden)), np.float32)

    def step():
        layer.zero_grad()
        layer.forward(x, lengths=lengths if given else None)
        layer.backward(dout)

    return step


def theirs(args, variant, x, lengths):
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    projected, given, bidirectional = VARIANTS[variant]
    layer = torch.nn.LSTM(args.input, args.hidden, num_layers=args.layers, proj_size=args.proj if projected else 0,
                          bidirectional=bidirectional)
    xt, lengths = torch.from_numpy(x), torch.from_numpy(lengths)

    def step():
        layer.zero_grad()
        if given:
            out, _ = layer(pack_padded_sequence(xt, lengths, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, total_length=args.T)
        else:
            out, _ = layer(xt)
        out.sum().backward()  # the gradient of the output all ones, as ours

    return step


def draw(args):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.T, args.N, args.input)).astype(np.float32)
    return x, rng.integers(1, args.T + 1, args.N)


def worker(args, who):
    """One process of one side: {variant: median seconds}."""
    if who == "torch":
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
    x, lengths = draw(args)
    result = {}
    for variant in VARIANTS:
        step = (ours if who == "nanolstm" else theirs)(args, variant, x, lengths)
        step()
        step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result[variant] = statistics.median(times)
    return result


SIZES = (("hidden", 512), ("proj", 256), ("input", 512), ("layers", 2), ("T", 100), ("N", 64), ("rounds", 3),
         ("repeats", 5))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in SIZES:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--worker", choices=("nanolstm", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.proj < args.hidden:
        p.error(f"--proj must be between 0 and --hidden ({args.hidden}), got {args.proj}")
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return
    sizes = [f"--{name}={getattr(args, name)}" for name, _ in SIZES]
    best = {}
    for _ in range(args.rounds):
        for who in ("nanolstm", "torch"):
            env = dict(os.environ, NANOLSTM_PROCESS_SETTINGS="1" if who == "nanolstm" else "0")
            out = subprocess.run([sys.executable, __file__, *sizes, f"--worker={who}"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            for variant, seconds in json.loads(out).items():
                best[who, variant] = min(best.get((who, variant), float("inf")), seconds)
    share = draw(args)[1].sum() / (args.T * args.N)
    print(f"LSTM {args.layers}x{args.hidden}, input {args.input}, proj_size {args.proj}, T={args.T} N={args.N}, "
          f"float32, forward and backward; lengths 1 to T (row-steps {share:.0%} of T x N); "
          f"the best of {args.rounds} processes a side, each the median of {args.repeats}")
    print(f"{'variant':<23} {'nanolstm ms':>12} {'torch ms':>10} {'ours/torch':>11}")
    for variant in VARIANTS:
        a, b = best["nanolstm", variant], best["torch", variant]
        print(f"{variant:<23} {a * 1e3:12.1f} {b * 1e3:10.1f} {b / a:10.2f}x")


if __name__ == "__main__":
    main()
