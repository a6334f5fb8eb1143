"""The scripts under bench/ and examples/: none named like a standard-library module (a script runs
with its own folder first on sys.path, so a bench/profile.py once broke PyTorch's import of cProfile in
bench/quality.py), bench/warmup.py on a small checkpoint and bench/breakdown.py at small sizes."""

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from nanolstm import LanguageModel, ModelConfig
from nanolstm.data import Vocab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["bench", "examples"])
def test_no_script_shadows_a_standard_module(folder):
    names = {p.stem for p in (ROOT / folder).glob("*.py")}
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))


def test_the_warm_up_benchmark_runs_on_a_checkpoint(tmp_path, capsys):
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
    vocab = Vocab.build_chars(text)
    LanguageModel(ModelConfig(len(vocab), hidden_size=16, embedding_size=8), vocab, seed=0).save(tmp_path / "m.ckpt")
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    script = runpy.run_path(str(ROOT / "bench" / "warmup.py"))
    script["main"]([str(tmp_path / "m.ckpt"), "--data", str(tmp_path / "corpus.txt"), "--starts", "8",
                    "--length", "10", "--context", "20"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r[:28].strip() for r in rows] == ["zero state", "a line break (generate)", "20 tokens of the text"]
    assert all(np.isfinite(float(r.split()[-4])) for r in rows)


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_the_breakdown_times_every_part_and_every_phase(model, capsys):
    script = runpy.run_path(str(ROOT / "bench" / "breakdown.py"))
    script["main"](["--model", model, "--hidden", "16", "--input", "8", "--T", "5", "--N", "3",
                    "--repeats", "2", "--vocab", "10", "--step", "2"])
    lines = capsys.readouterr().out.splitlines()
    rows = [re.fullmatch(r"(.{48}) +(\d+\.\d\d)( .*)?", line) for line in lines]
    timed = {row[1].strip(): float(row[2]) for row in rows if row}
    # the layer's parts (both add their biases in their forward loops; the GRU sums its bias gradient
    # in a pass of its own, the LSTM in its backward loop), the loop's parts alone, sums and wholes,
    # input side, phases, step
    parts = 6 + (model == "gru")
    assert len(timed) == parts + 5 + 4 + 2 + 6 + 1, lines
    assert "forward: the time loop, 5 products and cells" in timed and "5 forward cells, one thread" in timed
    assert all(np.isfinite(ms) for ms in timed.values()) and timed["whole step"] > 0, timed  # tiny parts print 0.00
    assert "Adam step" in timed and "whole step" in timed and "folded in: V rows multiplied (Lookup)" in timed


def test_the_products_benchmark_measures_both_ways_in_turns(capsys):
    """bench/products.py: a process each way at configuration a, the products by the packed kernel
    and by the BLAS, and the best of each; an unknown configuration is refused before any process."""
    pytest.importorskip("numba")
    from nanolstm import functional

    if not functional.use_numba(True) or not functional._compiled["packed_loops"]:
        pytest.skip("no packed loops here (numba's threads not OpenMP's, or OpenBLAS's threads not asleep)")
    script = runpy.run_path(str(ROOT / "bench" / "products.py"))
    with pytest.raises(SystemExit) as refused:
        script["main"](["--configs", "a,e"])
    assert refused.value.code == 2 and "unknown configuration 'e'" in capsys.readouterr().err
    script["main"](["--configs", "a", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[:2]] == ["packed", "BLAS"], lines
    assert all(float(line.split()[3].replace(",", "")) > 0 for line in lines[:2])
    assert lines[2].startswith("lstm a  best: packed ") and "by default here: " in lines[2], lines


def test_the_layers_benchmark_times_every_variant_on_both_sides(capsys):
    pytest.importorskip("torch")
    script = runpy.run_path(str(ROOT / "bench" / "layers.py"))
    script["main"](["--hidden", "16", "--proj", "4", "--input", "8", "--T", "5", "--N", "3", "--rounds", "1",
                    "--repeats", "2"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row[:23].strip() for row in rows] == list(script["VARIANTS"])
    assert all(float(v.rstrip("x")) > 0 for row in rows for v in row[23:].split())


def test_the_classifier_example_learns_with_lengths_and_not_without(capsys):
    """examples/classify.py: a bidirectional LSTM given each sequence's length learns whether its
    last token is greater than its first (at least 90% held out); without the lengths it reads the
    padding as the sequence and stays below 90%."""
    script = runpy.run_path(str(ROOT / "examples" / "classify.py"))
    assert script["main"](["--steps", "200"]) == 0
    with_lengths = float(capsys.readouterr().out.splitlines()[-1].split()[-1].rstrip("%"))
    assert script["main"](["--steps", "200", "--no-lengths"]) == 1
    without = float(capsys.readouterr().out.splitlines()[-1].split()[-1].rstrip("%"))
    assert with_lengths >= 90 > without


def test_the_ceiling_benchmark_gives_every_figure_as_a_share_of_the_cores_rate(capsys):
    """bench/ceiling.py --quick: the cores' multiply-add rate, the BLAS's product and the packed
    kernel, then ours and PyTorch's training steps as shares of that rate; an unknown configuration
    is refused before any process."""
    pytest.importorskip("numba")
    pytest.importorskip("torch")
    script = runpy.run_path(str(ROOT / "bench" / "ceiling.py"))
    with pytest.raises(SystemExit) as refused:
        script["main"](["--configs", "b", "--quick"])  # --quick has configuration a alone
    assert refused.value.code == 2 and "unknown configuration 'b'" in capsys.readouterr().err
    script["main"](["--quick", "--configs", "a", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    ceiling = re.match(r"round 1: cores' multiply-add ceiling (\d+) GFLOP/s \((\d+) threads; one core (\d+)\)", lines[0])
    assert ceiling and int(ceiling[1]) > 0 and int(ceiling[3]) > 0, lines
    assert "packed kernel on one core" in lines[0] and "BLAS 512^2 product" in lines[0], lines  # --quick's
    steps = [re.fullmatch(r"  lstm a (ours|torch) +([\d,]+) tok/s +([\d.]+) GFLOP/s +(\d+)% of the ceiling", line)
             for line in lines[1:3]]
    assert [m[1] for m in steps if m] == ["ours", "torch"], lines
    assert all(float(m[2].replace(",", "")) > 0 for m in steps)
    assert lines[3].startswith("best of 1: ceiling ") and "lstm a ours" in lines[3] and "lstm a torch" in lines[3]
