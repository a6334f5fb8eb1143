"""Training speed whether NumPy or nanolstm is imported first.

OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when NumPy loads it, and `import nanolstm` sets it (see
nanolstm/__init__.py); when NumPy came first, nanolstm has the loaded OpenBLAS read it again and
restart its threads. Each measurement is `nanolstm bench`'s training measurement (bench.worker, our
LSTM, the configuration's sizes, 20 timed steps after 3) in a process of its own, started one of
three ways, in turns:

- nanolstm first: `python -m nanolstm.bench --worker SPEC`, as `nanolstm bench` runs it;
- NumPy first: the process imports NumPy and multiplies on OpenBLAS's threads, then runs the same;
- NumPy first, OPENBLAS_THREAD_TIMEOUT=28: as NumPy first, with OpenBLAS's own default timeout (2^28
  cycles) set by hand, which nanolstm keeps: OpenBLAS's threads spin after each product and the time
  loops keep to NumPy's products. This is what a process with NumPy imported first got before
  nanolstm restarted OpenBLAS's threads.

    python bench/import_order.py [--configs a,c] [--rounds 3]

It prints each process's tokens/s and the best of each way. The environment is the one this script
runs in (OPENBLAS_CORETYPE and the like as they are set).
"""

import argparse
import json
import os
import subprocess
import sys

import nanolstm
from nanolstm import bench

NUMPY_FIRST = ("import sys, numpy; numpy.ones((512, 512), numpy.float32) @ numpy.ones((512, 512), numpy.float32); "
               "from nanolstm.bench import main; sys.exit(main(sys.argv[1:]))")
WAYS = {
    "nanolstm first": (["-m", "nanolstm.bench"], {}),
    "NumPy first": (["-c", NUMPY_FIRST], {}),
    "NumPy first, timeout 28": (["-c", NUMPY_FIRST], {"OPENBLAS_THREAD_TIMEOUT": "28"}),
}


def tokens_per_s(config, way):
    layers, hidden, T, N = bench.TRAIN_CONFIGS[config]
    spec = {"kind": "train_ours", "model": "lstm", "layers": layers, "hidden": hidden, "T": T, "N": N,
            "steps": bench.FULL["steps"], "warmup": bench.FULL["warmup"]}
    args, extra = WAYS[way]
    # the user's own environment, without what importing nanolstm here set
    env = {k: v for k, v in os.environ.items() if k not in nanolstm.THREAD_SETTINGS}
    env.update(extra)
    proc = subprocess.run([sys.executable, *args, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    return result["tokens_per_s"], result["packed"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="a,c", help="training configurations of `nanolstm bench` (a-d)")
    parser.add_argument("--rounds", type=int, default=3, help="processes of each way, in turns")
    args = parser.parse_args()
    for config in args.configs.split(","):
        runs = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                tok, packed = tokens_per_s(config, way)
                runs[way].append(tok)
                print(f"lstm {config}  {way:24s} {tok:10,.0f} tok/s  packed loop products: {packed}", flush=True)
        best = {way: max(r) for way, r in runs.items()}
        print(f"lstm {config}  best: " + ", ".join(f"{way} {tok:,.0f}" for way, tok in best.items())
              + f"; NumPy first / nanolstm first {best['NumPy first'] / best['nanolstm first']:.2f}")


if __name__ == "__main__":
    main()
