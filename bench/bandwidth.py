"""How fast a core reads arrays of 1 to 64 MB that it reads over and over: the bandwidth of the
caches a step of one-stream generation streams its weights from (2x512 LSTM: 12.8 MB a character).

    python bench/bandwidth.py

Each size is summed in compiled code (numba), 256 sums kept apart so that the additions never wait
for one another, on one thread and on two (halves of the array); best of seven repeats; GB/s =
bytes read / time.
"""

import time

import numpy as np
from numba import njit, prange


_LANES = 256  # sums kept apart: 16 vectors of 16, enough to keep both load ports busy


@njit(fastmath=True)
def _sum(a):
    """The sum of a (a multiple of _LANES long), as _LANES sums of every _LANES-th number: each
    pass of the inner loop is 16 independent vector additions, so reading is what takes the time."""
    rows = a.reshape(-1, _LANES)
    acc = np.zeros(_LANES, np.float32)
    for i in range(rows.shape[0]):
        for j in range(_LANES):
            acc[j] += rows[i, j]
    return acc.sum()


@njit(fastmath=True, parallel=True)
def _sum_halves(a):
    half = a.size // 2
    parts = np.zeros(2, np.float32)
    for p in prange(2):
        parts[p] = _sum(a[p * half:(p + 1) * half])
    return parts.sum()


def main():
    for mb in (1, 2, 4, 6, 12, 24, 64):
        a = np.ones(mb * 2**20 // 4, np.float32)
        for threads, f in ((1, _sum), (2, _sum_halves)):
            f(a)
            reps, best = max(1, 200 // mb), float("inf")
            for _ in range(7):
                t = time.perf_counter()
                for _ in range(reps):
                    f(a)
                best = min(best, (time.perf_counter() - t) / reps)
            print(f"{mb:3d} MB, {threads} thread{'s' if threads > 1 else ' '}: {a.nbytes / best / 1e9:6.1f} GB/s",
                  flush=True)


if __name__ == "__main__":
    main()
