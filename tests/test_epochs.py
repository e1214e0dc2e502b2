"""epochs.py: a run trained at each epoch count, a run of its own per count, each measured
offline; the official picks it stands in for (docs/epochs.md)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import comparison
import epochs
from checkpoint import progress
from cli import read_toml

# tiny runs: 35 sample conversations, one per step, so 0.1 epochs is 4 steps and 0.2 epochs 7
TRAIN_ARGS = ("--data=sample_responses --batch_size=1 --gradient_accumulation_steps=1 --block_size=64 "
              "--preview=0")
# Llama-2-7B's picks, as the official finetune_seed1.sh to finetune_seed5.sh set `epochs=`
# (scripts/iclr2025/expt1_llama/{ins,res}/ and expt2_llama/{gsm,mbpp,pgn,poetry,recipe}/)
LLAMA_PICKS = {"instruction_tuning": 15, "response_tuning": 5, "gsm8k": 7, "mbpp": 15, "chess": 15,
               "poetry": 15, "recipes": 20}


def sweep(base, tmp_path, counts):
    return ["--run=response_tuning", f"--base={base}", f"--counts={counts}",
            f"--train_args={TRAIN_ARGS}", f"--eval_set={tmp_path / 'eval.jsonl'}", "--max_new_tokens=4",
            f"--out_dir={tmp_path / 'out'}", "--device=cpu"]


def test_each_count_is_a_run_of_its_own_measured_and_reused(small_hf, tmp_path, monkeypatch, capsys):
    """In-process (the command line is tested below); train.py and evaluate.py run in processes of their
    own, as always."""
    _, base = small_hf
    rows = (ROOT / "data" / "eval" / "eval.jsonl").read_text().splitlines()[:4]  # short, with references
    (tmp_path / "eval.jsonl").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)  # the config's own out_dir, out/response_tuning, would be here
    epochs.main(sweep(base, tmp_path, "0.1 0.2"))
    printed = capsys.readouterr()
    assert printed.err.count("training response_tuning at ") == 2
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["0.1", "0.2"]
    runs = [Path(m["run"]) for m in results.values()]
    assert runs[0] != runs[1] and all(run.parent == out / "runs" for run in runs)
    for (label, m), run in zip(results.items(), runs):
        state = progress(run)
        steps = math.ceil(float(label) * 35)
        assert m["steps"] == state["max_iters"] == state["step"] == steps and state["finished"]
        assert state["settings"]["epochs"] == float(label) and state["settings"]["data"] == "sample_responses"
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == steps and log[-1]["val_loss"] == m["val_loss"]  # the final val loss
        for key in ("val_loss", "stop", "length", "repeat", "breaks", "nll"):
            assert math.isfinite(m[key]), (label, key)
        answers = json.loads((out / f"response_tuning-{label}e.json").read_text())
        assert len(answers) == 4 and answers[0]["generator"] == m["run"]
    # the learning rate reaches 0 at each run's own end: the short run is not the long one's first steps
    lrs = [[json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()] for run in runs]
    assert lrs[0] != lrs[1][:len(lrs[0])]
    table = (out / "results.md").read_text()
    assert table.count("\n| 0.") == 2 and "| 0.1 | 4 |" in table and "| 0.2 | 7 |" in table
    assert "Not the official judge" in printed.out and "GPT-4" in table
    assert (out / "results.png").stat().st_size > 5000
    # run again with one of the counts: its run is reused as it is, and measured the same
    monkeypatch.setattr(comparison, "run_train", lambda args, config: pytest.fail(f"trained again: {args}"))
    weights = (runs[1] / "model.safetensors").stat().st_mtime_ns
    epochs.main(sweep(base, tmp_path, "0.2"))
    assert capsys.readouterr().err.count(f"reusing {runs[1]}") == 1
    assert json.loads((out / "results.json").read_text())["results"] == {"0.2": results["0.2"]}
    assert (runs[1] / "model.safetensors").stat().st_mtime_ns == weights


def test_mistakes_are_one_line_naming_the_flag_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out_dir, out/epochs/<name>, would be here
    out = f"--out_dir={tmp_path / 'out'}"
    cases = [(["--run=nonsense"], "--run=nonsense: no such run; expected one of config/*.toml"),
             (["--run=../config/smoke"], "--run=../config/smoke: no such run"),
             (["--counts=5 0"], "--counts='5 0': expected counts above 0"),
             (["--counts=-5"], "--counts='-5': expected counts above 0"),
             (["--counts=nan"], "--counts='nan': expected counts above 0"),
             (["--counts=five"], "--counts='five': expected floats separated by spaces"),
             (["--counts=5 7 5"], "--counts='5 7 5': a count twice"),
             (["--counts=5 5.0"], "--counts='5 5.0': a count twice"),
             (["--counts= "], "--counts is empty"),
             (["--train_args=--epochs=3"], "--train_args='--epochs=3': sets --epochs"),
             (["--device=nonsense"], "--device=nonsense"),
             (["--train_args=--bogus=1"], "--train_args: unknown argument '--bogus=1'"),  # train.py's own check
             (["--run=smoke"], "--run=smoke: config/smoke.toml or --train_args sets "
                               "max_iters=60, which fixes the steps whatever the epochs; add "
                               "--max_iters=0 to --train_args")]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            epochs.main(["--run=response_tuning", *args, out])
        assert message in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
    # from the command line: exit status 1 and the one line
    r = subprocess.run([sys.executable, str(ROOT / "epochs.py"), "--run=response_tuning",
                        "--counts=5 7 5", out], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == "error: --counts='5 7 5': a count twice (each count is one run)\n"
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing trained


def test_the_configs_carry_llamas_picks():
    """GPT-2's epochs are Llama-2-7B's picks (docs/epochs.md), not picked anew for GPT-2."""
    for run, epochs in LLAMA_PICKS.items():
        assert read_toml(ROOT / "config" / f"{run}.toml")["epochs"] == epochs, run
