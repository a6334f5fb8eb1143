"""Training speed with and without the malloc setting that `import nanolstm` makes, ours or PyTorch's.

On Linux with glibc, `import nanolstm` sets malloc's mmap threshold to 32 MB and its trim threshold
to 512 MB (nanolstm/__init__.py), so that the arrays a training step frees stay in malloc's heap for
the next step instead of going back to the kernel and being faulted in again page by page. Each
measurement is `nanolstm bench`'s training measurement (bench.worker: the configuration's model,
20 timed steps after 3) in a process of its own, one of two ways, in turns:

- malloc set: for nanolstm `python -m nanolstm.bench --worker SPEC`, as `nanolstm bench` runs it;
  for PyTorch (--torch) the process as `nanolstm bench` runs it, with the same two thresholds given
  to glibc through its environment variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_);
- glibc's own: nanolstm's process with NANOLSTM_PROCESS_SETTINGS=0 and the two thread settings that
  the import would have made given by hand; PyTorch's as `nanolstm bench` runs it. Malloc is the
  only difference between the two ways.

    python bench/malloc.py [--configs a,b,c] [--model lstm] [--torch] [--rounds 3]

It prints each process's tokens/s and minor page faults a timed step, and the best of each way.
The environment is the one this script runs in (OPENBLAS_CORETYPE and the like as they are set).
"""

import argparse
import json
import os
import subprocess
import sys

import nanolstm
from nanolstm import bench

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(nanolstm.MMAP_THRESHOLD),
                   "MALLOC_TRIM_THRESHOLD_": str(nanolstm.TRIM_THRESHOLD)}
AS_BENCH_RUNS_THEM = {"NANOLSTM_PROCESS_SETTINGS": "0"}  # PyTorch's processes in `nanolstm bench`
WAYS = {
    "ours": {"malloc set": {}, "glibc's own": {**AS_BENCH_RUNS_THEM, **nanolstm.THREAD_SETTINGS}},
    "torch": {"malloc set": {**AS_BENCH_RUNS_THEM, **MALLOC_SETTINGS}, "glibc's own": AS_BENCH_RUNS_THEM},
}


def measure(config, model, who, way):
    layers, hidden, T, N = bench.TRAIN_CONFIGS[config]
    spec = {"kind": f"train_{who}", "model": model, "layers": layers, "hidden": hidden, "T": T, "N": N,
            "steps": bench.FULL["steps"], "warmup": bench.FULL["warmup"]}
    # the user's own environment, without what importing nanolstm here set
    env = {k: v for k, v in os.environ.items() if nanolstm.THREAD_ENV_SET.get(k) != v}
    env.update(WAYS[who][way])
    proc = subprocess.run([sys.executable, "-m", "nanolstm.bench", "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    return result["tokens_per_s"], result["page_faults_per_step"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="a,b,c", help="training configurations of `nanolstm bench` (a-d)")
    parser.add_argument("--model", choices=bench.MODELS, default="lstm")
    parser.add_argument("--torch", action="store_true", help="PyTorch's training instead of nanolstm's")
    parser.add_argument("--rounds", type=int, default=3, help="processes of each way, in turns")
    args = parser.parse_args()
    who = "torch" if args.torch else "ours"
    ways = WAYS[who]
    for config in args.configs.split(","):
        runs = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way in ways:
                tok, faults = measure(config, args.model, who, way)
                runs[way].append(tok)
                print(f"{who} {args.model} {config}  {way:11s} {tok:10,.0f} tok/s  {faults:9,.0f} page faults a step",
                      flush=True)
        best = [max(runs[way]) for way in ways]
        print(f"{who} {args.model} {config}  best: " + ", ".join(f"{way} {tok:,.0f}" for way, tok in zip(ways, best))
              + f"; malloc set / glibc's own {best[0] / best[1]:.2f}")


if __name__ == "__main__":
    main()
