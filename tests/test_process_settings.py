"""What `import nanolstm` sets in the process: malloc's thresholds (and the threads' settings, whose
tests are in test_fused.py), unless the user set them, and nothing at all with
NANOLSTM_PROCESS_SETTINGS=0. Each case imports nanolstm in a fresh process."""

import json
import os
import platform
import subprocess
import sys

import pytest

import nanolstm

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
USER_VARS = ("NANOLSTM_PROCESS_SETTINGS", "NANOLSTM_NUMBA", "GLIBC_TUNABLES", "OPENBLAS_THREAD_TIMEOUT",
             "GOMP_SPINCOUNT", *nanolstm.MALLOC_VARS)


def run(code, **env):
    """Run `code` after `import nanolstm` in a new process whose environment has none of the
    variables above but `env`; what it prints, as JSON."""
    base = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    out = subprocess.run([sys.executable, "-c", "import json, os, nanolstm\n" + code], env={**base, **env},
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("env, expected", [
    ({}, GLIBC),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, False),  # the user's own malloc settings are left alone
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, False),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=4096"}, GLIBC),  # not malloc's
    ({"NANOLSTM_PROCESS_SETTINGS": "0"}, False),
])
def test_malloc_thresholds_set_on_import_unless_the_user_set_them(env, expected):
    assert run("print(json.dumps(nanolstm.MALLOC_SET))", **env) is expected


def test_no_process_settings_at_all_when_asked():
    set_, env = run("print(json.dumps([nanolstm.THREAD_ENV_SET, [os.environ.get(k) for k in "
                    "('OPENBLAS_THREAD_TIMEOUT', 'GOMP_SPINCOUNT')]]))", NANOLSTM_PROCESS_SETTINGS="0")
    assert set_ == {} and env == [None, None]


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_arrays_freed_and_allocated_again_take_no_new_pages():
    """As a training step does: a few arrays of 1 MB allocated, written and freed, again and again.
    Once the first round has taken the memory, the next rounds find it in malloc's heap."""
    code = """
import resource
import numpy as np
def one_round():
    arrays = [np.empty(1 << 18, np.float32) for _ in range(6)]  # 1 MB each
    for a in arrays:
        a.fill(1.0)
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""
    faults = run(code)
    assert faults < 100, faults  # 6 MB a round is 1,536 pages: 20 rounds took them all again before
