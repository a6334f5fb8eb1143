"""How near the cores' own arithmetic rate a training step comes, ours and PyTorch's.

`nanolstm bench` gives each training figure as a share of the BLAS's square product. This script
measures what the cores themselves can do: their float32 multiply-add rate with every operand in
registers (a compiled loop of 16 independent 512-bit multiply-add chains on each core, nothing read
from memory), a ceiling that no product reading its operands from memory reaches. Then, each as a
share of that ceiling, in processes of their own, in turns, `rounds` times:

- the BLAS's float32 2048 x 2048 product (the median of 20, as `nanolstm bench` takes its peak);
- fused.matmul_packed's kernel on one core at a time loop's step (32 x 512 x 2048, one thread's
  rows of configuration c or d), against one core's ceiling;
- a training step of ours and of PyTorch's at configurations of `nanolstm bench` (d by default),
  as `nanolstm bench` measures them, in FLOPs as issue 4 counts them.

    python bench/ceiling.py [--configs d] [--model lstm] [--rounds 3] [--blas default|haswell]

Every process runs in the environment `nanolstm bench --blas` gives it. It needs numba (the
ceiling's loop).
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time

import numpy as np

from nanolstm import bench

SUMS = 256  # float32 sums side by side: sixteen 512-bit registers


def ceiling_worker(quick):
    """In the child process: the multiply-add rate of all cores and of one, and the packed kernel."""
    import numba
    from numba import carray, njit, prange

    from nanolstm import fused

    @njit(fastmath={"contract"}, error_model="numpy")
    def chains(n, seed):
        # Sums s = s * m + b, 256 of them side by side (sixteen 512-bit registers, each a chain of
        # its own), n times over: 512 FLOPs an iteration, no memory touched in the loop. The sums
        # are one run of 256 (as a 2-D block, LLVM vectorised them with gathers from the stack),
        # and the multiply and add may fuse but not be reordered.
        fused._wide_vectors()
        s = carray(fused._block_on_stack(), (SUMS,))  # _block_on_stack holds 8 x 32 float32
        m, b = np.float32(0.9999), np.float32(1e-4)
        for j in range(SUMS):
            s[j] = np.float32(seed + j)
        for _ in range(n):
            for j in range(SUMS):
                s[j] = s[j] * m + b
        total = np.float32(0)
        for j in range(SUMS):
            total += s[j]
        return total  # used, so that the loop is not thrown away

    @njit(parallel=True)
    def multiply_adds(n, out):
        for part in prange(out.shape[0]):  # one chain of sums a thread
            out[part] = chains(n, part)

    def rate(threads, n=20_000 if quick else 20_000_000, repeats=5):
        numba.set_num_threads(threads)
        out = np.zeros(threads, np.float32)
        multiply_adds(1000, out)
        best = min(_seconds(lambda: multiply_adds(n, out)) for _ in range(repeats))
        return 2 * SUMS * n * threads / best / 1e9

    threads = numba.config.NUMBA_NUM_THREADS
    result = {"threads": threads, "ceiling_gflops": rate(threads), "ceiling_one_core_gflops": rate(1)}
    numba.set_num_threads(1)  # the packed kernel on one core, as each thread runs it in a time loop
    rng = np.random.default_rng(0)
    M, K, N = 32, 512, 2048
    x, w = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32)
    panels, out, no_bias = fused.pack(w), np.empty((M, N), np.float32), np.empty(0, np.float32)
    fused._matmul_rows(x, panels, out, no_bias)
    reps = 1 if quick else 50
    best = min(_seconds(lambda: [fused._matmul_rows(x, panels, out, no_bias) for _ in range(reps)])
               for _ in range(7))
    result["packed_one_core_gflops"] = 2 * M * K * N * reps / best / 1e9
    print(json.dumps(result))


def _seconds(call):
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def measure_ceiling(env, quick):
    cmd = [sys.executable, __file__, "--worker"] + ["--quick"] * quick
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"worker exit {proc.returncode}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="d", help="training configurations of `nanolstm bench` (a-d)")
    parser.add_argument("--model", choices=bench.MODELS, default="lstm")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement, in turns")
    parser.add_argument("--blas", choices=("default", "haswell"), default="default",
                        help="OpenBLAS as a user's machine has it (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE "
                             "unset), or with OPENBLAS_CORETYPE=Haswell, as `nanolstm bench` runs them")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: `nanolstm bench --quick`'s sizes (configuration a only), short loops")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return ceiling_worker(args.quick)
    sizes = bench.QUICK if args.quick else bench.FULL
    configs = args.configs.split(",")
    for config in configs:
        if config not in sizes["train"]:
            parser.error(f"unknown configuration {config!r}: give a comma list of {', '.join(sizes['train'])}")
    if importlib.util.find_spec("numba") is None:
        sys.exit("bench/ceiling.py needs numba for the ceiling's loop: pip install nanolstm[fast]")
    env = bench.environments(args.blas)[args.blas]
    best = {}

    def keep(key, value):
        best[key] = max(best.get(key, 0), value)
        return value

    for k in range(args.rounds):
        c = measure_ceiling(env, args.quick)
        ceiling, one_core = keep("ceiling", c["ceiling_gflops"]), keep("one core", c["ceiling_one_core_gflops"])
        packed = keep("packed", c["packed_one_core_gflops"])
        peak = bench.measure("peak", sizes["peak"], env, sizes["timeout"])
        square = keep("square", peak["gflops"]) if bench._ok(peak) else None
        print(f"round {k + 1}: cores' multiply-add ceiling {ceiling:.0f} GFLOP/s ({c['threads']} threads; "
              f"one core {one_core:.0f}); packed kernel on one core {packed:.0f} ({packed / one_core:.0%} of "
              f"one core's); BLAS {sizes['peak']['n']}^2 product "
              + (f"{square:.0f} ({square / ceiling:.0%})" if square else f"failed: {peak['error']}"), flush=True)
        for config in configs:
            layers, hidden, T, N = sizes["train"][config]
            spec = {"model": args.model, "layers": layers, "hidden": hidden, "T": T, "N": N,
                    "steps": sizes["steps"], "warmup": sizes["warmup"]}
            flops = bench.train_flops_per_token(args.model, layers, hidden)
            for who in ("ours", "torch"):
                r = bench.measure(f"train_{who}", spec, env, sizes["timeout"])
                if not bench._ok(r):
                    print(f"  {args.model} {config} {who}: failed: {r['error']}", flush=True)
                    continue
                gflops = keep(f"{config} {who}", r["tokens_per_s"] * flops / 1e9)
                print(f"  {args.model} {config} {who:5s} {r['tokens_per_s']:10,.0f} tok/s {gflops:6.1f} GFLOP/s "
                      f"{gflops / ceiling:5.0%} of the ceiling", flush=True)
    print(f"best of {args.rounds}: ceiling {best['ceiling']:.0f} GFLOP/s; BLAS square product "
          f"{best.get('square', 0):.0f} ({best.get('square', 0) / best['ceiling']:.0%}); packed kernel "
          f"{best['packed'] / best['one core']:.0%} of one core's {best['one core']:.0f}; " + "; ".join(
              f"{args.model} {config} {who} {best[f'{config} {who}'] / best['ceiling']:.0%}"
              for config in configs for who in ("ours", "torch") if f"{config} {who}" in best))


if __name__ == "__main__":
    main()
