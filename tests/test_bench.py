"""The benchmark runs end to end and writes what it promises. Speed itself is never asserted here:
`nanolstm bench` prints it."""

import argparse
import json

import numpy as np
import pytest

from nanolstm import bench
from nanolstm.gradcheck import check_gradients


def bench_parser():
    parser = argparse.ArgumentParser(prog="nanolstm")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    return parser


def positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_quick_run_writes_every_number(tmp_path, capsys):
    path = tmp_path / "results" / "speed.json"
    args = bench_parser().parse_args(["bench", "--quick", "--no-torch", "--only", "train,generate",
                                      "--blas", "default", "--json", str(path)])
    assert bench.run(args) == 0
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["failures"] == []
    assert {"cpu", "logical_cpus", "numpy", "numba", "torch"} <= set(result["machine"])
    assert list(result["environments"]) == ["default"]
    env = result["environments"]["default"]
    assert env["env"]["OPENBLAS_CORETYPE"] is None and env["env"]["OPENBLAS_L2_SIZE"] is None
    from nanolstm import functional

    packed = "on packed weights" if functional._compiled.get("packed_products") else "by the BLAS"
    assert env["cells"] in (f"numba fused, loop products on packed weights, input products {packed}",
                            "NumPy reference (numba or nanolstm.fused not available)")
    import nanolstm

    assert env["malloc_set"] is nanolstm.MALLOC_SET  # ours ran with what `import nanolstm` sets
    peak = env["matmul_peak"]
    assert positive(peak["gflops"]) and peak["gflops"] <= peak["gflops_best"]
    assert env["blas"] and {"internal_api", "version", "architecture", "num_threads"} <= set(env["blas"][0])

    assert sorted(env["train"]) == ["gru_a", "lstm_a"]  # --quick runs configuration a only
    for name, entry in env["train"].items():
        ours = entry["ours"]
        for key in ("tokens_per_s", "gflops", "share_of_peak", "peak_rss_mb", "median_step_s"):
            assert positive(ours[key]), (name, key)
        assert ours["page_faults_per_step"] >= 0
        assert isinstance(ours["fused"], bool)
        assert "torch" not in entry and entry["ours_over_torch"] is None
        c = entry["config"]
        assert entry["flops_per_token"] == bench.train_flops_per_token(c["model"], c["layers"], c["hidden"])

    assert sorted(env["generate"]) == ["streams_1", "streams_32"]
    for entry in env["generate"].values():
        assert positive(entry["ours"]["chars_per_s"]) and positive(entry["ours"]["peak_rss_mb"])
    assert "baseline" not in env and "data" not in result

    printed = capsys.readouterr().out
    assert "lstm a" in printed and "gru a" in printed and "generate lstm" in printed
    assert f"^2, the median of {peak['reps']}; the fastest " in printed
    assert ("malloc: freed memory kept" if nanolstm.MALLOC_SET else "malloc: as glibc leaves it") in printed


def test_only_rejects_unknown_parts():
    with pytest.raises(SystemExit):
        bench_parser().parse_args(["bench", "--only", "train,speed"])


def test_configs_choose_the_training_configurations(monkeypatch):
    args = bench_parser().parse_args(["bench", "--only", "train", "--configs", "d, lstm_a,gru_d",
                                      "--no-torch", "--blas", "default"])
    assert args.configs == ("lstm_d", "gru_d", "lstm_a")  # a letter is both models; no repeats
    measured = []
    monkeypatch.setattr(bench, "measure", lambda kind, spec, env, timeout: {"gflops": 100.0, "peak_rss_mb": 1.0})
    monkeypatch.setattr(bench, "train_entry", lambda runner, env_name, env, model, letter, peak:
                        measured.append(f"{model}_{letter}") or {"ours": {"error": "not measured here"}})
    args.argv_shown = bench._shown_argv(args)  # as run() sets it
    result = bench.collect(args, lambda msg: None)
    assert measured == ["lstm_a", "lstm_d", "gru_d"]
    assert sorted(result["environments"]["default"]["train"]) == ["gru_d", "lstm_a", "lstm_d"]
    assert result["command"] == "nanolstm bench --no-torch --only train --configs lstm_d,gru_d,lstm_a --blas default"


@pytest.mark.parametrize("configs", ["e", "lstm_e", "rnn_a", "lstm", ","])
def test_configs_rejects_what_is_not_a_configuration(configs):
    with pytest.raises(SystemExit):
        bench_parser().parse_args(["bench", "--configs", configs])


def test_configs_that_quick_does_not_have_are_one_line_and_status_2(capsys):
    assert bench.main(["--quick", "--no-torch", "--configs", "c,d"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--quick has configuration a only" in err


def test_flops_per_token_counts_every_layer_and_the_decoder():
    # layer 0 reads the embedding (64), layer 1 the hidden state; times 3 for training; decoder 6*H*V
    assert bench.train_flops_per_token("lstm", 1, 128) == 3 * 2 * (64 + 128) * 4 * 128 + 6 * 128 * 84
    assert bench.train_flops_per_token("gru", 2, 256) == (3 * 2 * (64 + 256) * 3 * 256
                                                          + 3 * 2 * (256 + 256) * 3 * 256 + 6 * 256 * 84)



def test_the_matmul_peak_is_the_median_product_with_the_fastest_beside_it(monkeypatch):
    """The shares of the peak divide medians of steps by it: so it is a median too, not a burst."""
    calls = []

    def timed(step, warmup, steps):  # the products run; their seconds are these
        step()
        calls.append((warmup, steps))
        return [5.0, 1.0, 3.0, 2.0, 4.0], 0

    monkeypatch.setattr(bench, "_timed", timed)
    peak = bench.measure_peak({"n": 8, "reps": 5}, {})
    assert calls == [(1, 5)]
    assert peak["reps"] == 5 and peak["median_s"] == 3.0 and peak["best_s"] == 1.0
    assert peak["gflops"] == pytest.approx(2 * 8**3 / 3.0 / 1e9)
    assert peak["gflops_best"] == pytest.approx(2 * 8**3 / 1.0 / 1e9)


def test_tutorial_baseline_computes_true_gradients():
    # the baseline must be a real LSTM, or "n times faster" compares against nothing
    model = bench.TutorialLSTM(vocab_size=5, hidden_size=3, seed=0)
    rng = np.random.default_rng(1)
    for p in model.p.values():
        p[...] = rng.standard_normal(p.shape) * 0.5
    inputs, targets = [0, 3, 1, 4], [3, 1, 4, 2]
    h0, c0 = rng.standard_normal((3, 1)), rng.standard_normal((3, 1))
    _, grads, _, _ = model.loss_and_grads(inputs, targets, h0, c0)
    errors = check_gradients(lambda: model.loss_and_grads(inputs, targets, h0, c0)[0], model.p, grads)
    assert max(errors.values()) < 1e-6, errors


def test_child_environments_leave_out_the_thread_settings_nanolstm_made(monkeypatch):
    """PyTorch's processes run as the user's environment has them; ours set the values again on import."""
    import nanolstm

    monkeypatch.setattr(nanolstm, "THREAD_ENV_SET", {"GOMP_SPINCOUNT": "10000", "OPENBLAS_THREAD_TIMEOUT": "1"})
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")  # as nanolstm set it
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")  # the user's own value, not nanolstm's
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Zen")
    envs = bench.environments("both")
    for env in envs.values():
        assert "GOMP_SPINCOUNT" not in env and env["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert "OPENBLAS_CORETYPE" not in envs["default"] and envs["haswell"]["OPENBLAS_CORETYPE"] == "Haswell"


def test_pytorchs_and_the_blas_processes_run_without_nanolstms_process_settings(monkeypatch):
    """The child processes import nanolstm (the worker is in it); only ours may keep what the import
    sets. Seen before: PyTorch's processes ran with GOMP_SPINCOUNT=10000 set by that import."""
    import nanolstm

    for name in ("GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", *nanolstm.MALLOC_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = bench.environments("default")["default"]
    spec = {"n": 64, "reps": 1}
    theirs = bench.measure("peak", spec, env, timeout=120)  # the BLAS as the user's machine has it
    ours = bench.measure("train_ours", {"model": "lstm", "layers": 1, "hidden": 8, "T": 4, "N": 2,
                                        "steps": 1, "warmup": 1, "numba": True}, env, timeout=300)
    assert theirs["env"]["GOMP_SPINCOUNT"] is None and theirs["env"]["OPENBLAS_THREAD_TIMEOUT"] is None
    assert theirs["malloc_set"] is False
    if nanolstm.THREAD_ENV_SET:  # numba is installed: ours set the thread settings again
        assert ours["env"]["GOMP_SPINCOUNT"] == nanolstm.THREAD_ENV_SET["GOMP_SPINCOUNT"]
    assert ours["malloc_set"] is nanolstm.MALLOC_SET


def test_generations_ratio_by_round_takes_pytorchs_faster_path_of_each_round(monkeypatch):
    args = bench_parser().parse_args(["bench", "--only", "generate", "--rounds", "2"])
    speeds = iter([100.0, 50.0, 80.0, 120.0, 60.0, 30.0])  # ours, nn.LSTMCell, nn.LSTM, in each round
    monkeypatch.setattr(bench, "measure",
                        lambda kind, spec, env, timeout: {"chars_per_s": next(speeds), "peak_rss_mb": 1.0})
    runner = bench.Runner(args, lambda msg: None)
    runner.use_torch = True  # the processes are the fakes above: PyTorch need not be installed
    entry = bench.generate_entry(runner, "default", {}, 1)
    assert entry["ours_over_torch"] == pytest.approx(1.5)  # ours' fastest, 120, over PyTorch's, 80
    assert entry["ours_over_torch_by_round"] == pytest.approx([1.25, 2.0])
    assert bench._generate_line(entry).endswith("ours/torch best 1.50x, by round 1.62 (1.25-2.00)")


def test_the_ratio_by_round_pairs_each_rounds_two_processes(monkeypatch):
    args = bench_parser().parse_args(["bench", "--configs", "lstm_a", "--rounds", "3"])
    speeds = iter([100.0, 50.0, 120.0, 100.0, 90.0, 30.0])  # ours, then PyTorch's, in each round
    monkeypatch.setattr(bench, "measure",
                        lambda kind, spec, env, timeout: {"tokens_per_s": next(speeds), "peak_rss_mb": 1.0})
    runner = bench.Runner(args, lambda msg: None)
    runner.use_torch = True  # the processes are the fakes above: PyTorch need not be installed
    entry = bench.train_entry(runner, "default", {}, "lstm", "a", 1000.0)
    assert entry["ours"]["runs"] == [100.0, 120.0, 90.0] and entry["torch"]["runs"] == [50.0, 100.0, 30.0]
    assert entry["ours_over_torch"] == pytest.approx(1.2)  # the fastest of each side
    assert entry["ours_over_torch_by_round"] == pytest.approx([2.0, 1.2, 3.0])
    row = bench._train_table({"lstm_a": entry})[2]
    assert "1.20x" in row and "2.00 (1.20-3.00)" in row
    assert bench._by_round([1.3, None]) == "-"  # a round that failed leaves one ratio: no spread to show


def test_a_json_path_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    """--json naming a folder, or a path under a file, is one line and status 2 before the minutes
    of measurements; nothing is measured."""
    monkeypatch.setattr(bench, "collect", lambda *a: pytest.fail("measured before checking --json"))
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path, tmp_path / "a_file" / "speed.json"):
        assert bench.main(["--quick", "--no-torch", "--only", "baseline", "--json", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("nanolstm: error: --json") and "\n" not in err and "choose another path" in err
    assert (tmp_path / "a_file").read_text() == "x"
