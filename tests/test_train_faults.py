"""train.py under faults and mistakes: the out_dir guard, the lock, resume flags, unfinished runs, a full disk while
checkpointing, bad checkpoints, and one line for every bad flag."""
import errno
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import ROOT

import checkpoint
from model import GPT, GPTConfig

TINY = ["--init_from=scratch", "--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=64", "--data=sample",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--device=cpu", "--preview=0", "--eval_interval=100"]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT)


def one_line_error(r, message):
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 1 and "Traceback" not in r.stderr and last.startswith("error: ") and message in last, r.stderr


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "--batch_size=0: expected a positive number"),
    ("--gradient_accumulation_steps=-1", "--gradient_accumulation_steps=-1: expected a positive number"),
    ("--eval_interval=0", "--eval_interval=0: expected a positive number"),
    ("--block_size=0", "--block_size=0: expected a positive number"),
    ("--max_iters=-3", "--max_iters=-3, --epochs=1.0: expected max_iters > 0"),
    ("--epochs=0", "--max_iters=0, --epochs=0.0: expected max_iters > 0"),
    ("--learning_rate=nan", "--learning_rate=nan"),
    ("--device=tpu", "--device=tpu: not a device"),
    ("--device=cuda:7", "--device=cuda:7: this machine has"),
    ("--loss=mean", "--loss=mean: expected example or token"),
])
def test_a_bad_flag_is_one_line(flag, message, tmp_path):
    one_line_error(run(*TINY, f"--out_dir={tmp_path / 'run'}", flag), message)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_out_dir_is_protected_and_resume_honors_or_refuses_flags(tmp_path):
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=2", f"--out_dir={out}").returncode == 0
    assert checkpoint.progress(out) == {"step": 2, "max_iters": 2, "finished": True, "init_from": "scratch", "data": "sample"}
    before = (out / "model.safetensors").read_bytes()
    one_line_error(run(*TINY, "--max_iters=2", f"--out_dir={out}"),
                   f"{out} already holds a run (step 2 of 2); continue it with --init_from=resume")
    assert (out / "model.safetensors").read_bytes() == before  # the finished run is untouched
    one_line_error(run("--init_from=resume", f"--out_dir={out}", "--learning_rate=0.5"),
                   "--learning_rate=0.5: " + f"{out} was trained with learning_rate=5e-05")
    r = run("--init_from=resume", f"--out_dir={out}", "--max_iters=4")  # extending a run is allowed
    assert r.returncode == 0 and f"resuming {out} at step 2" in r.stdout, r.stderr
    assert checkpoint.progress(out) == {"step": 4, "max_iters": 4, "finished": True, "init_from": "scratch", "data": "sample"}
    one_line_error(run("--init_from=resume", f"--out_dir={out}", "--max_iters=3"), f"--max_iters=3: {out} is already at step 4")
    r = run(*TINY, "--max_iters=1", f"--out_dir={out}", "--overwrite")  # the explicit way to start over
    assert r.returncode == 0 and checkpoint.progress(out)["max_iters"] == 1


def test_one_process_per_out_dir_and_a_dead_holder_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "train.lock").write_text(str(holder.pid))
        one_line_error(run(*TINY, "--max_iters=1", f"--out_dir={out}"), f"{out} is in use: train.py (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    r = run(*TINY, "--max_iters=1", f"--out_dir={out}")  # its process is gone: the stale lock is taken over
    assert r.returncode == 0, r.stderr
    assert not (out / "train.lock").exists()


def tiny_state(model, step):
    return {"model": model.state_dict(), "step": step, "max_iters": 10, "config": {"data": "x"}, "origin": "scratch"}


def test_a_full_disk_while_checkpointing_keeps_the_previous_step_whole(tmp_path, monkeypatch):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32))
    checkpoint.save_run(tmp_path, model, tiny_state(model, 1), False)
    files = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "config.json", "model.safetensors", "progress.json")}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # step 2's weights differ

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)  # the export is written; ckpt.pt hits the full disk
    with pytest.raises(OSError, match=r"could not write the checkpoint of step 2 .*\(No space left on device\); the previous checkpoint is intact"):
        checkpoint.save_run(tmp_path, model, tiny_state(model, 2), False)
    assert {name: (tmp_path / name).read_bytes() for name in files} == files  # never a newer export beside an older ckpt
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # the temporary files are gone


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=2048) | st.binary(min_size=1, max_size=64).map(lambda b: b"PK\x03\x04" + b * 40))
def test_any_bytes_are_refused_as_a_checkpoint_in_one_line(data):
    """Whatever bytes ckpt.pt holds (random, or the start of a zip archive, torch.save's format), loading it is a
    ValueError naming the file, never another exception (it once raised IndexError from the unpickler)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt.pt"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"ckpt\.pt: not a (readable )?checkpoint of train\.py"):
            checkpoint.load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable checkpoint of train.py"),
    (random.Random(0).randbytes(4096), "not a readable checkpoint of train.py"),
    ("truncated", "not a readable checkpoint of train.py"),
    ("foreign", "not a checkpoint of train.py (missing"),
    ("nan", "tensor 'transformer.wte.weight' holds NaN or Inf"),
])
def test_a_bad_checkpoint_is_one_line(content, message, tmp_path):
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=1", f"--out_dir={out}").returncode == 0
    ckpt = out / "ckpt.pt"
    if content == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif content == "foreign":
        torch.save({"weights": torch.ones(2)}, ckpt)
    elif content == "nan":
        state = torch.load(ckpt, weights_only=True)
        state["model"]["transformer.wte.weight"][0, 0] = float("nan")
        torch.save(state, ckpt)
    else:
        ckpt.write_bytes(content)
    one_line_error(run("--init_from=resume", f"--out_dir={out}"), message)


def test_a_diverging_run_stops_in_one_line_naming_the_cause(tmp_path):
    r = run(*TINY, "--learning_rate=1e30", "--grad_clip=0", "--max_iters=5", f"--out_dir={tmp_path / 'run'}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr and "loss is nan" in last, r.stderr
    assert "lower --learning_rate" in last  # huge finite weights, or infinite ones: both the learning rate's doing
