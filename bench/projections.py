"""An LSTM with projections (proj_size) beside the plain one, and both beside PyTorch's.

One forward and backward pass of an LSTM stack (float32, the input given as an array, the gradient
of the output all ones), ours and torch.nn.LSTM with the same sizes, with proj_size=P and without.
The projected layer runs functional.py's loops step by step in Python round the compiled cells
(nanolstm.functional.lstmp_forward), where the plain one runs fused.loops compiled whole; PyTorch's
projected LSTM leaves oneDNN for its default implementation. Each side runs in processes of its own,
as `nanolstm bench` runs them (PyTorch's with NANOLSTM_PROCESS_SETTINGS=0: nanolstm's thread
settings would make its OpenMP threads sleep between its many small operations), the two sides in
turns, `--rounds` processes each. A process times each variant after two calls to warm up: the
median of `--repeats`; a variant's figure is its best process.

    python bench/projections.py [--hidden 512 --proj 256 --input 512 --layers 2 --T 100 --N 64]
                                [--rounds 5 --repeats 5]

About two minutes at the default sizes. PyTorch is needed (pip install torch==2.13.0).
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


def ours(args, proj, x):
    layer = nl.LSTM(args.input, args.hidden, num_layers=args.layers, proj_size=proj, rng=np.random.default_rng(0))
    dout = np.ones((args.T, args.N, proj or args.hidden), np.float32)

    def step():
        layer.zero_grad()
        layer.forward(x)
        layer.backward(dout)

    return step


def theirs(args, proj, x):
    import torch

    layer = torch.nn.LSTM(args.input, args.hidden, num_layers=args.layers, proj_size=proj)
    xt = torch.from_numpy(x)

    def step():
        layer.zero_grad()
        out, _ = layer(xt)
        out.sum().backward()  # the gradient of the output all ones, as ours

    return step


def worker(args, who):
    """One process of one side: {proj: median seconds} for proj_size 0 and args.proj."""
    if who == "torch":
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
    x = np.random.default_rng(1).standard_normal((args.T, args.N, args.input)).astype(np.float32)
    result = {}
    for proj in (0, args.proj):
        step = (ours if who == "nanolstm" else theirs)(args, proj, x)
        step()
        step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result[proj] = statistics.median(times)
    return result


SIZES = (("hidden", 512), ("proj", 256), ("input", 512), ("layers", 2), ("T", 100), ("N", 64), ("rounds", 5),
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
            for proj, seconds in json.loads(out).items():
                best[who, int(proj)] = min(best.get((who, int(proj)), float("inf")), seconds)
    tokens = args.T * args.N
    print(f"LSTM {args.layers}x{args.hidden}, input {args.input}, T={args.T} N={args.N}, float32, "
          f"forward and backward; the best of {args.rounds} processes a side, each the median of {args.repeats}")
    print(f"{'proj_size':>10} {'nanolstm ms':>12} {'torch ms':>10} {'nanolstm tok/s':>15} {'torch tok/s':>12} "
          f"{'ours/torch':>11}")
    for proj in (0, args.proj):
        a, b = best["nanolstm", proj], best["torch", proj]
        print(f"{proj or 'none':>10} {a * 1e3:12.1f} {b * 1e3:10.1f} {tokens / a:15,.0f} {tokens / b:12,.0f} "
              f"{b / a:10.2f}x")


if __name__ == "__main__":
    main()
