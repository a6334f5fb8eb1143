"""Training speed with the products over all steps by the packed kernel and by the BLAS, in turns.

functional.product takes a layer's products over all steps at once (x W_ih^T before the time loop,
da W_ih after it) by numba's fused.matmul_packed, in chunks of 64 rows, or by the BLAS; which one,
use_numba decides from the CPU and from OpenBLAS's kernel (fused.large_products_packed): the packed
kernel on Zen 4, where it was measured faster, and wherever OpenBLAS runs a kernel without the CPU's
512-bit vectors (OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU). This script measures the choice:
`nanolstm bench`'s training measurement (the configuration's model, 20 timed steps after 3) in a
process of its own, the products one way or the other, in turns; everything else as `import
nanolstm` sets it.

    python bench/products.py [--configs c,d] [--model lstm] [--rounds 3]

It prints each process's tokens/s, the best of each way, and the way this machine takes by default.
The environment is the one this script runs in: `OPENBLAS_CORETYPE=Haswell python bench/products.py`
for the other kernel.
"""

import argparse
import json
import subprocess
import sys

from nanolstm import bench

WAYS = ("packed", "BLAS")


def worker(config, model, way):
    """In the child process: one training measurement with the products taken `way`."""
    from nanolstm import fused, functional

    if not functional.use_numba(True) or not functional._compiled["packed_loops"]:
        sys.exit("the packed products need numba's kernels and its OpenMP threads (functional.use_numba)")
    default = functional._compiled["packed_products"]
    functional._compiled["packed_products"] = way == "packed"
    layers, hidden, T, N = bench.TRAIN_CONFIGS[config]
    spec = {"model": model, "layers": layers, "hidden": hidden, "T": T, "N": N,
            "steps": bench.FULL["steps"], "warmup": bench.FULL["warmup"]}
    result = bench.measure_train_ours(spec, {})
    print(json.dumps({"tokens_per_s": result["tokens_per_s"], "default": "packed" if default else "BLAS",
                      "kernels": fused.openblas_kernels()}))


def measure(config, model, way):
    proc = subprocess.run([sys.executable, __file__, "--worker", config, model, way],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"worker exit {proc.returncode}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="c,d", help="training configurations of `nanolstm bench` (a-d)")
    parser.add_argument("--model", choices=bench.MODELS, default="lstm")
    parser.add_argument("--rounds", type=int, default=3, help="processes of each way, in turns")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "MODEL", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    for config in args.configs.split(","):
        if config not in bench.TRAIN_CONFIGS:
            parser.error(f"unknown configuration {config!r}: give a comma list of {', '.join(bench.TRAIN_CONFIGS)}")
    for config in args.configs.split(","):
        runs = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                result = measure(config, args.model, way)
                runs[way].append(result["tokens_per_s"])
                print(f"{args.model} {config}  {way:6s} {result['tokens_per_s']:10,.0f} tok/s", flush=True)
        best = {way: max(runs[way]) for way in WAYS}
        print(f"{args.model} {config}  best: packed {best['packed']:,.0f}, BLAS {best['BLAS']:,.0f}; "
              f"packed / BLAS {best['packed'] / best['BLAS']:.2f}; OpenBLAS kernel "
              f"{', '.join(str(k) for k in result['kernels']) or 'none'}; by default here: {result['default']}",
              flush=True)


if __name__ == "__main__":
    main()
