"""Faults caused for real, against real `python -m nanolstm train` processes: kill -9 at random moments
and inside checkpoint writes, a disk that fills, a folder made read-only or immutable or removed, a loss
that becomes NaN, two trainers on one folder, SIGINT and SIGTERM at known stages. After each, what the
output folder holds is checked, and a resume is run to the end and compared, bit for bit, with a run
that never failed.

Each test prints its figures as a "reliability:" line (run pytest with -s to see them); with
NANOLSTM_RELIABILITY_LOG=path they are appended there as JSON lines too, which is where the figures in
docs/reliability.md come from. NANOLSTM_KILLS=n sets the number of random kills (default 24): a longer
soak is the same test with a larger n.

Some variants need privileges (mount, chattr) and are skipped, saying why, where the machine refuses.
"""

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nanolstm import LanguageModel, checkpoint
from nanolstm.cli import main
from nanolstm.data import Batches, encode_chars, split_ids
from nanolstm.errors import CheckpointError
from nanolstm.train import Diverged, TrainConfig, train

# A tiny model writing a checkpoint at every step: most of a run's wall time is spent inside writes,
# so random kills land in them often. Dropout makes the random generator part of what must resume.
TINY = ["--num-layers", "1", "--hidden-size", "16", "--embedding-size", "8", "--batch-size", "4",
        "--seq-length", "8", "--lr", "1e-2", "--dropout", "0.2", "--sample-length", "0", "--no-plot"]
STEPS = 80

# One thread per process: the matrices are tiny, and several trainers share two cores here.
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("NANOLSTM_TEST_PAUSE", None)

TEMPORARY = re.compile(r"\.(last\.ckpt|best\.ckpt|metrics\.jsonl)\.tmp-\d+|\.loss\.png\.tmp")

WORDS = ("the a cat dog bird fox sees chases likes finds near under behind tree house river barn "
         "old young red green quiet loud").split()


def prose(n_lines, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=8)) + "." for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "prose.txt"
    path.write_text(prose(200), encoding="utf-8")  # about 9,000 characters
    return str(path)


def report(target, **figures):
    print(f"\nreliability: {target}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    log = os.environ.get("NANOLSTM_RELIABILITY_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"target": target, **figures}) + "\n")


def nanolstm(*args, env=None, **kwargs):
    """Start `python -m nanolstm train args...` as a real process."""
    return subprocess.Popen([sys.executable, "-m", "nanolstm", "train", *map(str, args)],
                            env={**ENV, **(env or {})}, **kwargs)


def run_nanolstm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "nanolstm", "train", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def wait_for_line(proc, needle, count=1, timeout=60):
    """Read proc.stderr until needle has appeared count times; False if the process ended first."""
    timer = threading.Timer(timeout, proc.kill)  # a broken test fails instead of hanging
    timer.start()
    try:
        seen = 0
        for line in proc.stderr:
            if needle in line:
                seen += 1
                if seen == count:
                    return True
        return False
    finally:
        timer.cancel()


def wait_for_file(path, proc, timeout=60):
    t0 = time.monotonic()
    while not os.path.exists(path):
        assert proc.poll() is None, f"the trainer ended (status {proc.returncode}) before writing {path}"
        assert time.monotonic() - t0 < timeout, f"no {path} after {timeout} s"
        time.sleep(0.01)


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if TEMPORARY.fullmatch(n))


def assert_loadable_checkpoints(folder):
    """Every file under a checkpoint name is whole: its hash checks out and the model loads from it.
    Returns the step of last.ckpt, or None if there is none yet."""
    for name in os.listdir(folder):
        if name.endswith(".ckpt"):
            arrays, meta = checkpoint.load(os.path.join(folder, name))
            LanguageModel.load(os.path.join(folder, name))
            assert all(np.isfinite(v).all() for k, v in arrays.items() if k.startswith("model."))
    last = os.path.join(folder, "last.ckpt")
    return checkpoint.load(last)[1]["step"] if os.path.exists(last) else None


def one_error_line(stderr, *needles):
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanolstm: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def read_metrics(folder):
    """metrics.jsonl without its wall-clock fields."""
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
                for line in f]


def assert_same_run(folder, reference):
    """folder's last.ckpt, best.ckpt and metrics are those of the reference run, bit for bit."""
    for name in ("last.ckpt", "best.ckpt"):
        a, meta_a = checkpoint.load(os.path.join(reference, name))
        b, meta_b = checkpoint.load(os.path.join(folder, name))
        assert sorted(a) == sorted(b), name
        for key in a:
            assert np.array_equal(a[key], b[key]), f"{name}: {key} differs from the uninterrupted run"
        assert (meta_a["step"], meta_a["rng"], meta_a["best_val_loss"]) == \
               (meta_b["step"], meta_b["rng"], meta_b["best_val_loss"]), name
    assert read_metrics(folder) == read_metrics(reference)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run of STEPS steps with a checkpoint at every step: its folder, and how long
    it took from start-up to exit."""
    out = tmp_path_factory.mktemp("reference") / "out"
    t0 = time.monotonic()
    done = run_nanolstm("--data", corpus, "--out", out, *TINY, "--max-steps", STEPS, "--eval-every", 1,
                        "--quiet")
    assert done.returncode == 0, done.stderr
    return str(out), time.monotonic() - t0


def resume_all_to_the_end(folders, reference, parallel=4):
    """`--resume` each folder as a real process, a few at a time; each must end as the reference did."""
    pending = list(folders)
    while pending:
        batch, pending = pending[:parallel], pending[parallel:]
        procs = [nanolstm("--resume", f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for f in batch]
        for f, p in zip(batch, procs):
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, (f, err)
            assert temporaries(f) == [], f  # the killed writer's leftovers went with the next lock
            assert_same_run(f, reference)


# ---------------------------------------------------------------------------------------------
# kill -9


def test_kill_9_at_random_moments_and_inside_writes_loses_nothing(corpus, reference, tmp_path):
    reference, run_seconds = reference
    n_random = int(os.environ.get("NANOLSTM_KILLS", 24))
    rng = random.Random(20240605)
    # a run killed in its first evaluation leaves best.ckpt and metrics.jsonl but no last.ckpt to resume:
    # the next starts afresh in its place
    fresh = ["--data", corpus, *TINY, "--max-steps", STEPS, "--eval-every", 1, "--quiet", "--overwrite"]
    snapshots, steps_seen = [], set()
    figures = dict(kills=0, before_first_checkpoint=0, mid_checkpoint_write=0, mid_metrics_write=0,
                   targeted_mid_write=0, runs_that_finished_first=0)

    def after_kill(folder, last_step):
        """Check the folder a kill left; keep a copy to resume later. Returns last.ckpt's step."""
        figures["kills"] += 1
        if not os.path.isdir(folder):  # killed while starting up
            figures["before_first_checkpoint"] += 1
            return None
        left = temporaries(folder)
        figures["mid_checkpoint_write"] += any(".ckpt." in n for n in left)
        figures["mid_metrics_write"] += any("metrics" in n for n in left)
        step = assert_loadable_checkpoints(folder)
        if step is None:
            figures["before_first_checkpoint"] += 1
        else:
            assert last_step is None or step >= last_step  # what was saved stays saved
            steps_seen.add(step)
            snapshots.append(str(tmp_path / f"snapshot{len(snapshots)}"))
            shutil.copytree(folder, snapshots[-1])
        return step

    # Random moments: each run is killed after a random delay (the start-up included), and the next
    # one resumes from what it left, or starts afresh if it left no checkpoint. A run that finishes
    # before its kill starts a new chain in a new folder. The delays scale with the time a whole run
    # takes here, so that a faster or slower disk moves the kills along with the writes.
    chain, folder, step = 0, None, None
    while figures["kills"] < n_random:
        if folder is None or step == STEPS:
            chain, step = chain + 1, None
            folder = str(tmp_path / f"chain{chain}")
        args = ["--resume", folder] if step is not None else [*fresh, "--out", folder]
        p = nanolstm(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            p.communicate(timeout=rng.uniform(0.05, 0.7) * run_seconds)
        except subprocess.TimeoutExpired:
            p.kill()  # SIGKILL
        _, err = p.communicate()
        if p.returncode == 0:  # it finished before its kill came
            figures["runs_that_finished_first"] += 1
            step = STEPS
            continue
        assert p.returncode == -signal.SIGKILL, err
        step = after_kill(folder, step)

    # Inside a write, for certain: the test hook pauses half-way through every checkpoint write and
    # says so; the kill comes at a random one of those pauses.
    folder, step = str(tmp_path / "targeted"), None
    for i in range(4):
        args = ["--resume", folder] if step is not None else [*fresh, "--out", folder]
        p = nanolstm(*args, env={"NANOLSTM_TEST_PAUSE": "write:0.2"}, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, text=True)
        # the first kill lands in the very first write: no checkpoint yet, only a partial temporary
        assert wait_for_line(p, "nanolstm test pause: write", count=1 if i == 0 else rng.randint(1, 6))
        p.kill()
        p.communicate()
        left = [n for n in temporaries(folder) if ".ckpt." in n]
        assert len(left) == 1, os.listdir(folder)
        with pytest.raises(CheckpointError, match="truncated or corrupted"):  # it was cut short...
            checkpoint.load(os.path.join(folder, left[0]))
        figures["targeted_mid_write"] += 1
        step = after_kill(folder, step)  # ...and only ever under a temporary name

    resume_all_to_the_end(snapshots, reference)
    figures["resumed_to_the_end_bit_identical"] = len(snapshots)
    figures["distinct_checkpoint_steps_left"] = len(steps_seen)
    report("kill -9", **figures, seconds_per_whole_run=round(run_seconds, 2))
    assert figures["kills"] >= n_random + 4 and figures["targeted_mid_write"] == 4
    assert len(snapshots) >= 10


# ---------------------------------------------------------------------------------------------
# Two trainers, one folder


def test_a_second_trainer_is_refused_naming_the_holder_and_a_killed_holder_blocks_no_one(corpus, tmp_path):
    out = tmp_path / "out"
    holder = nanolstm("--data", corpus, "--out", out, *TINY, "--max-steps", 100_000, "--eval-every", 5,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_file(out / "last.ckpt", holder)
        t0 = time.monotonic()
        second = run_nanolstm("--data", corpus, "--out", out, *TINY, "--max-steps", 10)
        waited = time.monotonic() - t0
        assert second.returncode == 2 and holder.poll() is None
        one_error_line(second.stderr, str(out), f"in use by a trainer (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text() == str(holder.pid)  # the dead holder's pid is still written there
    step = assert_loadable_checkpoints(out)
    third = run_nanolstm("--resume", out, "--max-steps", step + 3)
    assert third.returncode == 0, third.stderr
    assert checkpoint.load(out / "last.ckpt")[1]["step"] == step + 3
    report("two trainers", refused_after_s=round(waited, 2), stale_lock_blocked=False)


# ---------------------------------------------------------------------------------------------
# Signals at known stages


SIGNAL_RUN = [*TINY, "--max-steps", 15, "--eval-every", 5, "--sample-length", 30]


@pytest.fixture(scope="module")
def signal_reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("signal_reference") / "out"
    done = run_nanolstm("--data", corpus, "--out", out, *SIGNAL_RUN)
    assert done.returncode == 0, done.stderr
    return str(out)


@pytest.mark.parametrize("stage", ["evaluate", "preview", "write"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_evaluation_preview_or_save_ends_with_a_checkpoint(
        corpus, signal_reference, tmp_path, stage, signum):
    out = str(tmp_path / "out")
    p = nanolstm("--data", corpus, "--out", out, *SIGNAL_RUN, env={"NANOLSTM_TEST_PAUSE": f"{stage}:0.5"},
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_line(p, f"nanolstm test pause: {stage}")
    p.send_signal(signum)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"stopped at step 5 by signal {signum}" in stderr
    assert f"resume with: nanolstm train --resume {out}" in stderr
    if stage == "preview":
        assert "---- sample ----" in stdout  # the preview under way was finished, not cut
    assert temporaries(out) == []
    assert assert_loadable_checkpoints(out) == 5
    resumed = run_nanolstm("--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, signal_reference)
    report(f"{signal.Signals(signum).name} during {stage}", status=p.returncode, checkpoint_step=5,
           resumed_bit_identical=True)


# ---------------------------------------------------------------------------------------------
# Writes that fail


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


@pytest.fixture
def mounts():
    """Mount points to undo after the test, innermost last."""
    made = []
    yield made
    for point in reversed(made):
        subprocess.run(["umount", "-l", point], capture_output=True)


def fault_while_training(corpus, out, cause, *needles):
    """Train into out; once a checkpoint is there, cause() the fault; the trainer must stop on its next
    write with one line naming the fault, exit 2, and leave the checkpoint it had whole."""
    p = nanolstm("--data", corpus, "--out", out, *TINY, "--max-steps", 100_000, "--eval-every", 2, "--quiet",
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(os.path.join(out, "last.ckpt"), p)
        cause()
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 2, err
    return one_error_line(err, *needles)


def test_a_full_disk_stops_training_with_one_line_and_the_checkpoint_intact(corpus, tmp_path, mounts):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)):
        pytest.skip("cannot mount a small tmpfs here (no privilege); the fault-hook test covers ENOSPC")
    mounts.append(str(disk))
    out = disk / "out"
    filler = disk / "filler"

    def fill():
        with open(filler, "wb", buffering=0) as f:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        f.write(bytes(size))
                except OSError:
                    pass

    line = fault_while_training(corpus, str(out), fill, "No space left on device", str(out))
    assert temporaries(out) == []
    step = assert_loadable_checkpoints(out)
    filler.unlink()  # space again: the run goes on from where it stopped
    resumed = run_nanolstm("--resume", out, "--max-steps", step + 4, "--eval-every", 2)
    assert resumed.returncode == 0, resumed.stderr
    report("disk full (tmpfs)", message=line, checkpoint_left_at_step=step, resumed=True)


def test_a_folder_made_read_only_stops_training_with_one_line_and_the_checkpoint_intact(
        corpus, tmp_path, mounts):
    out = tmp_path / "out"
    out.mkdir()
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
        root_ignores_modes = True
    except PermissionError:
        root_ignores_modes = False
    figures = {}
    if root_ignores_modes:
        # chmod means nothing to root; a read-only bind mount of the folder onto itself does
        def make_read_only():
            assert sh("mount", "--bind", str(out), str(out))
            mounts.append(str(out))
            # busy while the trainer has a file open for writing through the new mount: try again
            for _ in range(200):
                if sh("mount", "-o", "remount,bind,ro", str(out)):
                    return
                time.sleep(0.005)
            raise AssertionError("could not make the folder read-only")

        if not sh("mount", "--bind", str(probe), str(probe)):
            pytest.skip("running as root, which ignores permissions, and cannot mount here")
        subprocess.run(["umount", str(probe)])
        needle, figures["how"] = "Read-only file system", "read-only bind mount (root ignores chmod)"
    else:
        def make_read_only():
            os.chmod(out, 0o555)

        needle, figures["how"] = "Permission denied", "chmod 555"
    try:
        line = fault_while_training(corpus, str(out), make_read_only, needle)
    finally:
        if not root_ignores_modes:
            os.chmod(out, 0o755)
    step = assert_loadable_checkpoints(out)
    report("folder made read-only", message=line, checkpoint_left_at_step=step, **figures)


def test_an_immutable_folder_stops_training_with_one_line(corpus, tmp_path):
    out = tmp_path / "out"
    probe = tmp_path / "probe"
    probe.mkdir()
    if not sh("chattr", "+i", str(probe)):
        pytest.skip("chattr +i is not available here")
    sh("chattr", "-i", str(probe))
    try:
        line = fault_while_training(corpus, str(out), lambda: sh("chattr", "+i", str(out)),
                                    "Operation not permitted")
    finally:
        sh("chattr", "-i", str(out))
    # a temporary file made just before the folder froze cannot be removed; the next trainer removes it
    step = assert_loadable_checkpoints(out)
    report("folder made immutable (chattr +i)", message=line, checkpoint_left_at_step=step)


def test_the_folder_removed_mid_run_stops_training_with_one_line(corpus, tmp_path):
    out = tmp_path / "out"

    def remove():
        for _ in range(100):  # the trainer may add a file while the tree is going
            try:
                shutil.rmtree(out)
                return
            except OSError:
                time.sleep(0.01)

    line = fault_while_training(corpus, str(out), remove, "No such file or directory", str(out))
    assert not out.exists()
    report("output folder removed", message=line)


def test_the_fault_hook_fails_a_save_midway_and_the_checkpoint_stays(corpus, tmp_path, capsys, monkeypatch):
    """Where nothing can be mounted: the writer's own hook fails the write after some bytes."""
    out = str(tmp_path / "out")
    assert main(["train", "--data", corpus, "--out", out, *TINY, "--max-steps", "4", "--eval-every", "2",
                 "--quiet"]) == 0
    before = Path(out, "last.ckpt").read_bytes()
    sizes = []
    for fault_after in (0, 100, len(before) // 2, len(before) - 1):
        monkeypatch.setattr(checkpoint, "_fault_after_bytes", fault_after)
        assert main(["train", "--resume", out, "--max-steps", "8"]) == 2
        one_error_line(capsys.readouterr().err, "cannot write checkpoint", "No space left on device")
        assert Path(out, "last.ckpt").read_bytes() == before and temporaries(out) == []
        sizes.append(fault_after)
    report("write fault hook", faults_after_bytes=sizes, checkpoint_intact=True)


def test_a_damaged_metrics_log_stops_a_resume_with_one_line(corpus, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["train", "--data", corpus, "--out", out, *TINY, "--max-steps", "4", "--eval-every", "2",
                 "--quiet"]) == 0
    Path(out, "metrics.jsonl").write_text('{"step": 2, "val_loss": 1.0}\n{not json\n', encoding="utf-8")
    assert main(["train", "--resume", out, "--max-steps", "6"]) == 2
    one_error_line(capsys.readouterr().err, "metrics.jsonl is damaged")


def test_a_metrics_log_that_is_a_folder_is_one_line_and_the_run_stays(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "4", "--eval-every", "2",
                 "--quiet"]) == 0
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    before = {n: (out / n).read_bytes() for n in ("last.ckpt", "best.ckpt")}
    assert main(["train", "--resume", str(out), "--max-steps", "6"]) == 2
    one_error_line(capsys.readouterr().err, f"cannot read {out}/metrics.jsonl: Is a directory", "move it away")
    fresh = ["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "4", "--quiet"]
    assert main(fresh) == 2
    one_error_line(capsys.readouterr().err, "already holds a run")
    assert main([*fresh, "--overwrite"]) == 2  # refused before any of the old run's files goes
    one_error_line(capsys.readouterr().err, f"{out}/metrics.jsonl is a folder", "move it away")
    assert {n: (out / n).read_bytes() for n in ("last.ckpt", "best.ckpt")} == before


@pytest.mark.parametrize("record", ['{"step": 2, "val_loss": 3.0}', '{"step": "2", "train_loss": 1.0, "val_loss": 1.0}',
                                    '{"step": 2, "train_loss": "low", "val_loss": 1.0}', '[2, 1.0, 1.0]', '"\\ud800"'])
def test_a_metrics_record_the_trainer_did_not_write_stops_a_plotted_resume_with_one_line(
        corpus, tmp_path, capsys, record):
    """A record without train_loss was a KeyError in plot_history, after the checks."""
    out = tmp_path / "out"
    plotted = [a for a in TINY if a != "--no-plot"]
    assert main(["train", "--data", corpus, "--out", str(out), *plotted, "--max-steps", "4", "--eval-every", "2",
                 "--quiet"]) == 0
    Path(out, "metrics.jsonl").write_text(record + "\n", encoding="utf-8")
    before = {n: (out / n).read_bytes() for n in ("last.ckpt", "best.ckpt", "loss.png")}
    assert main(["train", "--resume", str(out), "--max-steps", "6"]) == 2
    one_error_line(capsys.readouterr().err, "metrics.jsonl is damaged", "line 1", "move it away")
    assert {n: (out / n).read_bytes() for n in before} == before


def test_an_unreadable_corpus_folder_is_one_line_and_leaves_no_output_folder(corpus, tmp_path, capsys, monkeypatch):
    """chmod 000 on the corpus folder was a PermissionError traceback, and the new --out folder was
    left holding only .lock. Raised by hand: root, which CI may run as, ignores permissions."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(corpus, folder / "a.txt")
    iterdir = Path.iterdir

    def denied(self):
        if self == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    out = tmp_path / "out"
    assert main(["train", "--data", str(folder), "--out", str(out), *TINY, "--max-steps", "2", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(folder), "Permission denied")
    assert not out.exists()


def test_ctrl_c_while_the_corpus_loads_leaves_no_output_folder(corpus, tmp_path, capsys, monkeypatch):
    def interrupted(path):  # Ctrl-C lands while a large corpus is read
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["nanolstm.train"], "read_corpus", interrupted)
    out = tmp_path / "out"
    assert main(["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "2", "--quiet"]) == 130
    assert not out.exists()


def test_a_preview_stdout_cannot_encode_is_printed_escaped(tmp_path):
    """Under PYTHONIOENCODING=ascii (or a C locale) the preview of a non-ASCII corpus was a
    UnicodeEncodeError."""
    data = tmp_path / "unicode.txt"
    data.write_text("café über naïve 日本語の文 " * 400, encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "nanolstm", "train", "--data", str(data), "--out", str(out), *TINY,
                           "--max-steps", "4", "--eval-every", "2", "--sample-length", "200"],
                          env={**ENV, "PYTHONIOENCODING": "ascii"}, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode("ascii", "replace")
    stdout = done.stdout.decode("ascii")
    assert stdout.count("---- sample ----") == 2 and ("\\x" in stdout or "\\u" in stdout), stdout
    assert stdout.splitlines()[-1].startswith("done: step 4")


def test_a_reader_that_goes_away_does_not_stop_the_run(corpus, tmp_path):
    """`nanolstm train ... | head -2`: the run used to stop at its next line, with status 0 and no
    checkpoint of the steps it had made. It goes on quietly to its end."""
    out = tmp_path / "out"
    # the pause at each evaluation makes sure that lines come after the reader has gone
    p = nanolstm("--data", corpus, "--out", out, *TINY, "--max-steps", 20, "--eval-every", 5,
                 env={"NANOLSTM_TEST_PAUSE": "evaluate:0.3"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)
    assert p.stdout.readline().startswith("nanolstm: lstm")
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Exception" not in err, err
    assert checkpoint.load(out / "last.ckpt")[1]["step"] == 20
    report("stdout reader gone (| head -2)", status=0, run_completed=True)


# ---------------------------------------------------------------------------------------------
# NaN and infinity


def nan_config(tmp_path, corpus, name, **changes):
    options = dict(data=corpus, out=str(tmp_path / name), num_layers=1, hidden_size=16, embedding_size=8,
                   batch_size=4, seq_length=8, sample_length=0, plot=False, quiet=True, eval_every=1,
                   optimizer="sgd", grad_clip=0.0)
    options.update(changes)
    return TrainConfig(**options)


def diverged_step(config):
    with pytest.raises(Diverged) as err:
        train(config)
    return int(re.search(r"diverged at step (\d+):", str(err.value)).group(1)), str(err.value)


def test_an_absurd_learning_rate_is_stopped_at_the_step_it_diverges(corpus, tmp_path, capsys):
    # lr 1e6 with plain SGD and no clipping does not give a NaN here: the loss climbs to about 1e5
    # nats and stays finite (cross-entropy from log-softmax, saturating gates). It takes ~1e37.
    run = nan_config(tmp_path, corpus, "1e6", lr=1e6, max_steps=60)
    train(run)
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 100 for r in read_metrics(run.out)[1:])

    def argv(out, *more):
        return ["train", "--data", corpus, "--out", out, *TINY, "--eval-every", "1", "--quiet", "--optimizer",
                "sgd", "--grad-clip", "0", "--lr", "1e37", "--max-steps", "100", *more]

    out = str(tmp_path / "1e37")
    assert main(argv(out)) == 2
    line = one_error_line(capsys.readouterr().err, "diverged at step", "is not finite",
                          f"{out}/last.ckpt keeps the last good weights")
    step = int(re.search(r"step (\d+):", line).group(1))
    # the step named is the first update whose loss or gradient is not finite: replay up to it
    replay = dict(lr=1e37, dropout=0.2, max_steps=step - 1)
    train(nan_config(tmp_path, corpus, "replay_before", **replay))
    assert diverged_step(nan_config(tmp_path, corpus, "replay_at", **{**replay, "max_steps": step}))[0] == step
    # and what it left is the last good checkpoint: finite, from before that step
    saved = assert_loadable_checkpoints(out)
    assert saved is not None and saved < step

    # --on-nan skip drops each such update and goes on to the end
    assert main(argv(str(tmp_path / "skip"), "--on-nan", "skip")) == 0
    skipped = read_metrics(tmp_path / "skip")[-1]["skipped_steps"]
    assert skipped >= 1 and assert_loadable_checkpoints(tmp_path / "skip") is not None
    report("NaN from lr 1e37 (SGD, no clipping)", stopped_at_step=step, last_good_checkpoint_step=saved,
           skip_mode_skipped=skipped, lr_1e6="finite")


def test_an_evaluation_interval_whose_updates_were_all_skipped_logs_no_train_loss(corpus, tmp_path):
    """It logged train loss 0.0000; and metrics.jsonl held NaN, which is not JSON."""
    good = nan_config(tmp_path, corpus, "good", optimizer="adam", lr=1e-2, eval_every=5, max_steps=10)
    train(good)
    last = os.path.join(good.out, "last.ckpt")
    arrays, meta = checkpoint.load(last)
    arrays["carry.0"][0, 1, 2] = np.nan  # poisons step 11 alone: its state is dropped after it
    checkpoint.save(last, arrays, meta)

    def records():
        def refuse(constant):
            raise ValueError(f"{constant} is not JSON")

        with open(os.path.join(good.out, "metrics.jsonl"), encoding="utf-8") as f:
            return {r["step"]: r for r in (json.loads(line, parse_constant=refuse) for line in f)}

    assert main(["train", "--resume", good.out, "--max-steps", "12", "--eval-every", "1", "--on-nan", "skip"]) == 0
    logged = records()
    assert logged[11]["train_loss"] is None and logged[11]["skipped_steps"] == 1
    assert math.isfinite(logged[12]["train_loss"])
    # null reads back on resume, and is written back as null
    assert main(["train", "--resume", good.out, "--max-steps", "13", "--eval-every", "1"]) == 0
    assert records()[11]["train_loss"] is None and sorted(records()) == [5, 10, 11, 12, 13]


def poisoned(source, target, poison):
    """Copy source's last.ckpt to target after poison(arrays) changed it; the container stays valid."""
    arrays, meta = checkpoint.load(source)
    poison(arrays)
    checkpoint.save(target, arrays, meta)


def test_a_poisoned_hidden_state_is_caught_at_that_step_and_skip_goes_on(corpus, tmp_path, capsys):
    good = nan_config(tmp_path, corpus, "good", optimizer="adam", lr=1e-2, eval_every=5, max_steps=10)
    train(good)

    def nan_state(arrays):
        arrays["carry.0"][0, 1, 2] = np.nan  # one unit of one stream

    for mode in ("stop", "skip"):
        folder = tmp_path / mode
        shutil.copytree(good.out, folder)
        poisoned(folder / "last.ckpt", folder / "last.ckpt", nan_state)
        before = (folder / "last.ckpt").read_bytes()
        status = main(["train", "--resume", str(folder), "--max-steps", "30", "--on-nan", mode])
        err = capsys.readouterr().err
        if mode == "stop":
            assert status == 2
            one_error_line(err, "diverged at step 11: the loss is not finite")
            assert (folder / "last.ckpt").read_bytes() == before
        else:
            assert status == 0, err
            history = read_metrics(folder)
            assert history[-1]["step"] == 30 and history[-1]["skipped_steps"] == 1
            assert all(math.isfinite(r["train_loss"]) for r in history)
            assert assert_loadable_checkpoints(folder) == 30
    report("NaN hidden state carried into step 11", stopped_at_step=11, skip_mode_skipped=1,
           skip_mode_reached_step=30)


def test_an_infinite_weight_is_caught_exactly_at_the_batches_that_use_it(corpus, tmp_path, capsys):
    """An embedding row made infinite poisons only the batches whose inputs hold its character."""
    text = Path(corpus).read_text(encoding="utf-8")
    good = nan_config(tmp_path, corpus, "good", optimizer="adam", lr=1e-2, eval_every=5, max_steps=10)
    train(good)
    model = LanguageModel.load(os.path.join(good.out, "last.ckpt"))
    ids, _ = encode_chars(text, model.vocab)
    batches = Batches(split_ids(ids, good.val_frac)[0], good.batch_size, good.seq_length)
    inputs = [batches[(s - 1) % len(batches)][0] for s in range(11, 61)]  # those of steps 11 to 60
    steps_using = {t: [s for s, x in zip(range(11, 61), inputs) if (x == t).any()]
                   for t in range(len(model.vocab))}
    token = min((t for t in steps_using if steps_using[t]), key=lambda t: len(steps_using[t]))
    bad_steps = steps_using[token]  # the steps whose inputs hold the character fewest batches hold
    assert 0 < len(bad_steps) < 50

    def inf_row(arrays):
        arrays["model.embedding.weight"][token] = np.inf

    good_files = {n: Path(good.out, n).read_bytes() for n in ("last.ckpt", "best.ckpt")}
    poisoned(os.path.join(good.out, "last.ckpt"), os.path.join(good.out, "poisoned.ckpt"), inf_row)
    assert main(["train", "--resume", os.path.join(good.out, "poisoned.ckpt"), "--max-steps", "60"]) == 2
    one_error_line(capsys.readouterr().err, f"diverged at step {bad_steps[0]}: the loss is not finite")
    # skip: those updates are dropped, every other one is made, and no checkpoint of these
    # non-finite weights ever replaces the good one
    assert main(["train", "--resume", os.path.join(good.out, "poisoned.ckpt"), "--max-steps", "60",
                 "--on-nan", "skip"]) == 0
    history = read_metrics(good.out)
    assert history[-1]["step"] == 60 and history[-1]["skipped_steps"] == len(bad_steps)
    assert {n: Path(good.out, n).read_bytes() for n in good_files} == good_files
    report("infinite embedding row", stopped_at_step=bad_steps[0], skip_mode_skipped=len(bad_steps),
           good_checkpoint_replaced=False)


@pytest.mark.parametrize("where, value", [
    (("optimizer", "steps"), -1), (("optimizer", "steps"), -3), (("optimizer", "steps"), 5), (("step",), -1),
    (("interval",), [0.0, -1, 0]), (("interval",), [-1.0, 0, 0]), (("interval",), [0.0, 0, 99]),
    (("interval",), [float("nan"), 0, 0]), (("best_val_loss",), -1.0), (("best_val_loss",), float("nan")),
])
def test_a_forged_step_count_or_interval_is_refused_in_one_line(corpus, tmp_path, capsys, where, value):
    """Valid hashes around counts no run writes: Adam's bias correction 1 - beta**steps divided by zero
    (steps -1) or took the square root of a negative number (steps -3)."""
    out = tmp_path / "out"
    assert main(["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "4", "--eval-every", "4",
                 "--quiet"]) == 0
    arrays, meta = checkpoint.load(out / "last.ckpt")
    target = meta
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    checkpoint.save(out / "last.ckpt", arrays, meta)
    assert main(["train", "--resume", str(out), "--max-steps", "8"]) == 2
    one_error_line(capsys.readouterr().err, "last.ckpt: cannot be resumed")


# ---------------------------------------------------------------------------------------------
# Security


class _Payload:
    """Unpickling this creates the marker file: what a malicious 'checkpoint' would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_carrying_pickled_payloads_are_refused_without_running_them(tmp_path, capsys):
    import torch  # only here: it takes a second to import

    marker = tmp_path / "payload_ran"
    files = {"pickle": pickle.dumps(_Payload(str(marker)))}
    np.save(tmp_path / "obj.npy", np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    files["npy"] = (tmp_path / "obj.npy").read_bytes()
    torch.save({"model": _Payload(str(marker))}, tmp_path / "torch.pt")
    files["torch.save"] = (tmp_path / "torch.pt").read_bytes()
    # the pickle inside a well-formed container with a valid hash, declared as an object array
    header = json.dumps({"meta": {}, "arrays": [{"name": "w", "dtype": "|O", "shape": [1], "offset": 0,
                                                   "nbytes": len(files["pickle"])}]}).encode()
    body = checkpoint.MAGIC + struct.pack("<IQ", checkpoint.FORMAT_VERSION, len(header)) + header + files["pickle"]
    files["framed"] = body + hashlib.sha256(body).digest()
    for kind, raw in files.items():
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "last.ckpt").write_bytes(raw)
        (folder / "best.ckpt").write_bytes(raw)
        assert main(["sample", str(folder), "--length", "5"]) == 2
        one_error_line(capsys.readouterr().err, "best.ckpt")
        assert main(["train", "--resume", str(folder)]) == 2
        one_error_line(capsys.readouterr().err, "last.ckpt")
        with pytest.raises(CheckpointError):
            LanguageModel.load(folder / "last.ckpt")
    assert not marker.exists()
    report("pickled payloads", refused=len(files) * 3, kinds=sorted(files), ran=False)


@pytest.mark.parametrize("plant", ["symlink", "hard link", "fifo"])
def test_a_lock_file_planted_as_a_link_or_a_fifo_is_refused_and_what_it_points_to_is_untouched(
        corpus, tmp_path, capsys, plant):
    """The trainer writes its pid into out/.lock: through a planted link it would overwrite another
    file (ln -s ../precious.txt out/.lock)."""
    precious = tmp_path / "precious.txt"
    precious.write_text("precious", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".lock"
    if plant == "symlink":
        lock.symlink_to(os.path.join("..", "precious.txt"))
    elif plant == "hard link":
        os.link(precious, lock)
    else:
        os.mkfifo(lock)
    assert main(["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "2", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, str(lock), "remove it or choose another --out")
    assert precious.read_text(encoding="utf-8") == "precious"
    assert os.listdir(out) == [".lock"]
    report(f".lock planted as a {plant}", refused=True, target_untouched=True)


def test_a_folder_that_cannot_be_locked_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    """A file system without flock (some NFS mounts) used to be an OSError traceback."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    assert main(["train", "--data", corpus, "--out", str(out), *TINY, "--max-steps", "2", "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, f"cannot lock {out}: No locks available")
    assert not out.exists()


def tree(root, skip):
    """Every file under root, with its size and modification time, and every folder, except skip and
    what is in it."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) != str(skip)]
        found.update({os.path.join(dirpath, d): "folder" for d in dirnames})
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return found


def test_nothing_is_written_outside_out_whatever_the_checkpoint_or_corpus_names(tmp_path):
    # path-like words in the corpus and a folder of oddly named .txt files
    data = tmp_path / "data"
    data.mkdir()
    (data / "..evil.txt").write_text(prose(60) + "../../escape /tmp/owned ~/x $HOME\n", encoding="utf-8")
    (data / "b.txt").write_text(prose(60, seed=1), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    before = tree(tmp_path, out)
    args = ["--data", data, "--out", out, *TINY, "--max-steps", 6, "--eval-every", 3]
    for level, replace in (("char", []), ("word", ["--overwrite"])):
        done = subprocess.run([sys.executable, "-m", "nanolstm", "train", *map(str, args), "--level", level, *replace],
                              cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert tree(tmp_path, out) == before  # not a byte outside out, not even in the working folder

    # a checkpoint copied from elsewhere names its old folder; resuming it must not write there
    arrays, meta = checkpoint.load(out / "last.ckpt")
    elsewhere = tmp_path / "elsewhere"
    meta["train_config"]["out"] = str(elsewhere)
    copy = tmp_path / "copy"
    copy.mkdir()
    checkpoint.save(copy / "last.ckpt", arrays, meta)
    before = tree(tmp_path, copy)
    done = subprocess.run([sys.executable, "-m", "nanolstm", "train", "--resume", str(copy), "--max-steps", "9"],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not elsewhere.exists() and tree(tmp_path, copy) == before
    assert checkpoint.load(copy / "last.ckpt")[1]["step"] == 9
    report("writes outside --out", runs=3, files_outside_out=0)


# ---------------------------------------------------------------------------------------------
# Numerical robustness: the settings that made the tutorials' own code diverge


TEXT_865 = (
    "The river rises in the hills above the town, where the snow lies late into the spring. "
    "In April the water runs fast and brown, and it carries branches, leaves and the odd lost boot "
    "down past the mill, under the old stone bridge and out across the flat green meadows. "
    "By July it has slowed to a clear and quiet stream, and children wade in it to catch small fish "
    "with their hands, while their parents sit on the bank and talk about the weather. "
    "In autumn the rain comes back, the river fills again, and the ducks return to the reeds by the "
    "ferry. Nobody in the town can remember a year when the river did not flood at least once, "
    "and nobody seems to mind: the fields are richer for it, the mill still turns, and the bridge, "
    "which has stood for three hundred years, has never yet been moved by the water. "
    "People say it will outlast us all, and most of them believe it"
)


@pytest.mark.parametrize("name, settings", [
    ("RNN, Adagrad 0.1, clip by value at 1", dict(model="rnn", optimizer="adagrad", lr=0.1, grad_clip_value=1.0)),
    ("LSTM, Adam 1e-3, clip by norm at 5", dict(model="lstm", optimizer="adam", lr=1e-3, grad_clip=5.0)),
    ("LSTM, plain SGD 0.01, no clipping", dict(model="lstm", optimizer="sgd", lr=0.01, grad_clip=0.0)),
])
def test_the_tutorials_settings_train_to_a_finite_falling_loss(tmp_path, name, settings):
    assert len(TEXT_865) == 865
    data = tmp_path / "text.txt"
    data.write_text(TEXT_865, encoding="utf-8")
    # hidden 100, sequence 25, one sequence (batch 1), 10 passes over the text
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), num_layers=1, hidden_size=100,
                         batch_size=1, seq_length=25, val_frac=0.0, max_steps=340, eval_every=34,
                         sample_length=0, plot=False, quiet=True, **settings)
    train(config)
    losses = [r["train_loss"] for r in read_metrics(config.out)]
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # falls at every evaluation
    assert losses[-1] < losses[0] - 0.2
    assert_loadable_checkpoints(config.out)  # finite weights
    report(f"tutorial settings: {name}", loss_first_34_steps=round(losses[0], 3),
           loss_last_34_steps=round(losses[-1], 3))
