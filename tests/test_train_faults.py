"""train.py under faults and mistakes: the out_dir guard, the lock, resume flags, unfinished runs, a full disk while
checkpointing, bad checkpoints, and one line for every bad flag."""
import errno
import json
import multiprocessing
import os
import resource
import shutil
import signal
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import ROOT

import checkpoint
import train
from model import GPT, GPTConfig

TINY = ["--init_from=scratch", "--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=64", "--data=sample",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--device=cpu", "--preview=0", "--eval_interval=100"]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT)


def one_line_error(r, message):
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 1 and "Traceback" not in r.stderr and last.startswith("error: ") and message in last, r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=0"], "--batch_size=0: expected 1 or more"),
    (["--gradient_accumulation_steps=-1"], "--gradient_accumulation_steps=-1: expected 1 or more"),
    (["--eval_interval=0"], "--eval_interval=0: expected 1 or more"),
    (["--block_size=0"], "--block_size=0: expected 1 or more"),
    (["--max_iters=-3"], "--max_iters=-3: expected 0 or more"),
    (["--epochs=0"], "--max_iters=0, --epochs=0.0: expected max_iters > 0"),
    (["--epochs=inf"], "--epochs=inf: expected 0 or more"),  # was an OverflowError
    (["--learning_rate=nan"], "--learning_rate=nan: expected 0 or more"),
    (["--warmup_ratio=1.5"], "--warmup_ratio=1.5: expected a number in [0, 1]"),
    (["--grad_clip=-1"], "--grad_clip=-1.0: expected 0 or more"),  # trained uphill, and exited 0
    (["--grad_clip=nan"], "--grad_clip=nan: expected 0 or more"),  # was blamed on the learning rate
    (["--dropout=nan"], "--dropout=nan: expected a number in [0, 1)"),
    (["--dropout=1"], "--dropout=1.0: expected a number in [0, 1)"),
    (["--weight_decay=-0.1"], "--weight_decay=-0.1: expected 0 or more"),
    (["--seed=-1"], "--seed=-1: expected a number in [0, 1e18]"),
    (["--threads=-2"], "--threads=-2: expected 0 or more"),
    (["--n_head=3", "--n_embd=32"], "--n_head=3 does not divide --n_embd=32"),  # was an AssertionError
    (["--n_layer=0"], "--n_layer=0: expected 1 or more"),
    (["--device=tpu"], "--device=tpu: not a device"),
    (["--device=cuda:7"], "--device=cuda:7: this machine has"),
    (["--loss=mean"], "--loss=mean: expected example or token"),
])
def test_a_bad_flag_is_refused_before_anything_is_written(flags, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):  # in-process: the command line's wrapper is below
        train.main([*TINY, f"--out_dir={tmp_path / 'run'}", *flags])
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_is_one_line(tmp_path):
    one_line_error(run(*TINY, f"--out_dir={tmp_path / 'run'}", "--grad_clip=-1"), "--grad_clip=-1.0: expected 0 or more")
    assert not (tmp_path / "run").exists()
    missing = tmp_path / "a" / "b" / "run"  # a run refused after the lock: none of the folders it made stay
    one_line_error(run(*TINY, f"--out_dir={missing}", f"--data={tmp_path / 'none.jsonl'}"), "none.jsonl: no such file")
    assert not (tmp_path / "a").exists()


def test_out_dir_is_protected_and_resume_honors_or_refuses_flags(tmp_path):
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=2", f"--out_dir={out}").returncode == 0
    assert marks(out) == {"step": 2, "max_iters": 2, "finished": True, "init_from": "scratch", "data": "sample"}
    before = (out / "model.safetensors").read_bytes()
    one_line_error(run(*TINY, "--max_iters=2", f"--out_dir={out}"),
                   f"{out} already holds a run (step 2 of 2); continue it with --init_from=resume")
    assert (out / "model.safetensors").read_bytes() == before  # the finished run is untouched
    one_line_error(run("--init_from=resume", f"--out_dir={out}", "--learning_rate=0.5"),
                   "--learning_rate=0.5: " + f"{out} was trained with learning_rate=5e-05")
    r = run("--init_from=resume", f"--out_dir={out}", "--max_iters=4")  # extending a run is allowed
    assert r.returncode == 0 and f"resuming {out} at step 2" in r.stdout, r.stderr
    assert marks(out) == {"step": 4, "max_iters": 4, "finished": True, "init_from": "scratch", "data": "sample"}
    one_line_error(run("--init_from=resume", f"--out_dir={out}", "--max_iters=3"), f"--max_iters=3: {out} is already at step 4")
    r = run(*TINY, "--max_iters=1", f"--out_dir={out}", "--overwrite")  # the explicit way to start over
    assert r.returncode == 0 and checkpoint.progress(out)["max_iters"] == 1


def marks(out_dir):
    """progress.json without its settings (tested on their own in test_evaluate.py)."""
    state = checkpoint.progress(out_dir)
    return {key: value for key, value in state.items() if key != "settings"}


def test_one_process_per_out_dir_and_a_killed_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import train; lock = train.take_lock(sys.argv[2]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        one_line_error(run(*TINY, "--max_iters=1", f"--out_dir={out}"), f"{out} is in use: train.py (pid {holder.pid})")
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert (out / "train.lock").read_text() == str(holder.pid)  # the file stays; the kernel released its lock
    r = run(*TINY, "--max_iters=1", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert not (out / "train.lock").exists()


def test_two_processes_never_both_take_the_lock(tmp_path):
    """The lock is taken in one step: two processes released together at the same fresh (or stale, or empty)
    lock file, 300 times, and exactly one of them holds it each time. (The lock it replaced, an O_EXCL create and
    then the pid written, let both in 73 times in 300 here: one read the other's still-empty file as stale.)"""
    context = multiprocessing.get_context("fork")
    rounds = 300
    barrier, wins = context.Barrier(2), context.Array("i", rounds)
    for k in range(rounds):
        (tmp_path / f"r{k}").mkdir()
        if k % 3 == 1:
            (tmp_path / f"r{k}" / "train.lock").write_text("999999999")  # a pid that cannot run
        elif k % 3 == 2:
            (tmp_path / f"r{k}" / "train.lock").write_text("")  # a holder killed before it wrote its pid
    workers = [context.Process(target=contend, args=(tmp_path, rounds, barrier, wins)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert list(wins) == [1] * rounds, list(wins)


def contend(tmp_path, rounds, barrier, wins):
    import train
    for k in range(rounds):
        barrier.wait()
        try:
            lock = train.take_lock(tmp_path / f"r{k}")
        except OSError:
            lock = None
        barrier.wait()  # both have tried before either lets go
        if lock is not None:
            with wins.get_lock():
                wins[k] += 1
            train.release_lock(lock)


def tiny_state(model, step):
    return {"model": model.state_dict(), "step": step, "max_iters": 10, "config": {"data": "x"}, "origin": "scratch"}


def tiny_marks(step):
    return {"step": step, "max_iters": 10, "finished": False, "init_from": "scratch", "data": "x", "settings": {}}


@pytest.mark.parametrize("failure, why", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    # what torch.save raises on a full disk: not an OSError (it once escaped as a traceback, leaving .saving/)
    (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 3200 vs 3136"), "unexpected pos"),
])
def test_a_full_disk_while_checkpointing_keeps_the_previous_step_whole(tmp_path, monkeypatch, failure, why):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32))
    checkpoint.save_run(tmp_path, model, tiny_state(model, 1), tiny_marks(1))
    files = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "config.json", "model.safetensors", "progress.json")}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # step 2's weights differ

    def full(*args, **kwargs):
        raise failure
    monkeypatch.setattr(torch, "save", full)  # the export is written; ckpt.pt hits the full disk
    with pytest.raises(OSError, match=rf"could not write the checkpoint of step 2 .*\(.*{why}.*\); nothing of it was kept"):
        checkpoint.save_run(tmp_path, model, tiny_state(model, 2), tiny_marks(2))
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


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_step") / "run"
    assert run(*TINY, "--max_iters=1", f"--out_dir={out}").returncode == 0
    return out


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable checkpoint of train.py"),
    (random.Random(0).randbytes(4096), "not a readable checkpoint of train.py"),
    ("truncated", "not a readable checkpoint of train.py"),
    ("foreign", "not a checkpoint of train.py (missing"),
    ("nan", "tensor 'transformer.wte.weight' holds NaN or Inf"),
])
def test_a_bad_checkpoint_is_one_line(content, message, tmp_path, one_step_run):
    out = tmp_path / "run"
    shutil.copytree(one_step_run, out)
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
    if content == "nan":  # the command line's one line, once; the rest in-process
        one_line_error(run("--init_from=resume", f"--out_dir={out}"), message)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            train.main(["--init_from=resume", f"--out_dir={out}"])
    assert not (out / "train.lock").exists()


def test_a_diverging_run_stops_in_one_line_naming_the_cause(tmp_path):
    r = run(*TINY, "--learning_rate=1e30", "--grad_clip=0", "--max_iters=5", f"--out_dir={tmp_path / 'run'}")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr and "loss is nan" in last, r.stderr
    assert "lower --learning_rate" in last  # huge finite weights, or infinite ones: both the learning rate's doing


# ---------------------------------------------------------------------------------- never lose a finished run

def snapshot(out_dir):
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir())}


def test_overwrite_replaces_the_old_run_only_at_the_new_runs_first_checkpoint(tmp_path):
    """--overwrite with a mistake in the new run (bad data, a missing model, a run that diverges before its first
    checkpoint) leaves the old run as it was, byte for byte. (It used to delete ckpt.pt, the model and
    progress.json first, then find the mistake.)"""
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=2", f"--out_dir={out}").returncode == 0
    before = snapshot(out)
    (tmp_path / "bad.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    for args, message in [([f"--data={tmp_path / 'bad.jsonl'}"], "not UTF-8"),
                          ([f"--init_from={tmp_path / 'nowhere'}"], "no such file or directory")]:
        with pytest.raises((ValueError, OSError), match=message):  # in-process: refused before training
            train.main([*TINY, "--max_iters=2", f"--out_dir={out}", "--overwrite", *args])
        assert snapshot(out) == before
    diverging = ["--learning_rate=1e38", "--grad_clip=0", "--eval_interval=5", "--max_iters=5"]
    one_line_error(run(*TINY, f"--out_dir={out}", "--overwrite", *diverging), "loss is nan at step 2")
    assert snapshot(out) == before
    r = run(*TINY, "--max_iters=3", f"--out_dir={out}", "--overwrite")  # a good new run replaces it
    assert r.returncode == 0, r.stderr
    assert marks(out)["max_iters"] == 3 and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_run_killed_before_its_first_checkpoint_gives_the_old_run_back(tmp_path):
    """SIGKILL leaves no chance to clean up: the next train.py in the out_dir finds the old run set aside and no
    checkpoint of the new one, and puts the old run back before it looks at the directory."""
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=2", f"--out_dir={out}").returncode == 0
    before = snapshot(out)
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--max_iters=100000", "--eval_interval=100000",
                          f"--out_dir={out}", "--overwrite"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = out / "log.jsonl", time.time() + 120
    try:
        while time.time() < deadline and not ((out / ".replaced" / "ckpt.pt").exists() and log.exists() and
                                              log.read_text().count("\n") >= 2):
            time.sleep(0.05)  # the old run set aside, and the new one two steps in
    finally:
        p.kill()
        p.wait()
    assert (out / checkpoint.REPLACED).is_dir() and not (out / "ckpt.pt").exists()
    r = run("--init_from=resume", f"--out_dir={out}", "--device=cpu")  # resumes the old run, which is finished
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    assert {k: v for k, v in snapshot(out).items() if k != "loss.png"} == \
        {k: v for k, v in before.items() if k != "loss.png"}


@pytest.mark.parametrize("max_iters", [1, 3])
def test_a_diverged_update_is_never_saved_or_called_done(tmp_path, max_iters):
    """An update that makes the weights NaN is caught before its checkpoint: no NaN weights on disk, no "done", no
    finished mark, exit 1; the last good checkpoint named holds finite weights. (With --max_iters=1 the run used to
    exit 0, print "done" and mark its NaN weights finished.)"""
    out = tmp_path / "run"
    r = run(*TINY, "--learning_rate=1e38", "--grad_clip=0", f"--max_iters={max_iters}", "--eval_interval=1",
            f"--out_dir={out}")
    one_line_error(r, "the update of step 1 made the weights NaN or Inf; stopping, nothing of it saved. Last good "
                      "checkpoint: none yet")
    assert "done" not in r.stdout
    assert not (out / "ckpt.pt").exists() and checkpoint.progress(out) is None
    assert not (out / "model.safetensors").exists()


def test_resume_repairs_the_marks_of_a_run_killed_while_it_saved(tmp_path):
    """Killed between ckpt.pt's rename and progress.json's: the checkpoint is at the last step, progress.json and
    the export one checkpoint behind. evaluate.py refuses such a run (comparison.check_finished), and resume
    rewrites the marks from the checkpoint (it used to say "done" and leave progress.json unfinished for ever)."""
    from comparison import check_finished  # what evaluate.py, epochs.py run on every model
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=4", "--eval_interval=2", f"--out_dir={out}").returncode == 0
    final = (out / "model.safetensors").read_bytes()
    stale = {**json.loads((out / "progress.json").read_text()), "step": 2, "finished": False}
    (out / "progress.json").write_text(json.dumps(stale))
    (out / "model.safetensors").write_bytes(b"stale")  # the export lags too
    with pytest.raises(ValueError, match="is an unfinished run|does not match its ckpt.pt"):
        check_finished(str(out))
    r = run("--init_from=resume", f"--out_dir={out}", "--device=cpu")
    assert r.returncode == 0 and "done" in r.stdout, r.stderr
    assert marks(out) == {"step": 4, "max_iters": 4, "finished": True, "init_from": "scratch", "data": "sample"}
    assert (out / "model.safetensors").read_bytes() == final
    check_finished(str(out))  # a finished run now
    # and a half-trained run with no progress.json (it used to be scored): its ckpt.pt knows its step and max_iters
    state = torch.load(out / "ckpt.pt", weights_only=True)
    torch.save({**state, "step": 2}, out / "ckpt.pt")
    (out / "progress.json").unlink()
    with pytest.raises(ValueError, match=r"is an unfinished run \(step 2 of 4\); finish it with"):
        check_finished(str(out))


def limit_file_size(size):
    def preexec():  # a full disk, as a process sees it: writes past `size` bytes fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


def test_a_full_disk_is_one_line_and_leaves_no_staging_or_lock(tmp_path):
    """A disk that fills while ckpt.pt is written (torch.save's RuntimeError): one line, .saving/ removed, the lock
    released, the previous checkpoint whole, and the next resume goes on from it. (It used to end in a traceback
    and leave .saving/ and an empty train.lock behind.)"""
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=2", f"--out_dir={out}").returncode == 0
    before = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from=resume", f"--out_dir={out}", "--max_iters=4"],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=limit_file_size(5_000_000))
    one_line_error(r, "could not write the checkpoint of step 4")
    assert not (out / ".saving").exists() and not (out / "train.lock").exists()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == before
    r = run("--init_from=resume", f"--out_dir={out}", "--max_iters=4")
    assert r.returncode == 0 and marks(out)["step"] == 4, r.stderr


def test_a_toml_on_resume_obeys_the_rules_of_flags(tmp_path):
    """A TOML given with --init_from=resume is not ignored: its extensions apply (max_iters), its other changes are
    refused in one line, as flags are. (The whole TOML used to be ignored: the run went to its old end.)"""
    out = tmp_path / "run"
    assert run(*TINY, "--max_iters=2", f"--out_dir={out}").returncode == 0
    (tmp_path / "lr.toml").write_text("max_iters = 3\nlearning_rate = 1.0\n")
    one_line_error(run(str(tmp_path / "lr.toml"), "--init_from=resume", f"--out_dir={out}"),
                   f"--learning_rate=1.0: {out} was trained with learning_rate=5e-05")
    (tmp_path / "data.toml").write_text('data = "dolly"\n')
    with pytest.raises(ValueError, match=re.escape(f"--data=dolly: {out} was trained with data='sample'")):
        train.main([str(tmp_path / "data.toml"), "--init_from=resume", f"--out_dir={out}"])
    (tmp_path / "more.toml").write_text("max_iters = 3\n")
    r = run(str(tmp_path / "more.toml"), "--init_from=resume", f"--out_dir={out}")
    assert r.returncode == 0 and marks(out)["step"] == 3, r.stderr


def test_no_trainable_example_is_one_line_and_leaves_nothing(tmp_path):
    """Every response cut off by --block_size: one line naming the cause, and no out_dir. (--max_iters ended in a
    ZeroDivisionError and a log.jsonl that blocked the next run; --epochs printed "done" with no model.)"""
    out = tmp_path / "run"
    one_line_error(run(*TINY, "--block_size=8", "--max_iters=3", f"--out_dir={out}"),
                   "no example keeps a response token within --block_size=8")
    assert not out.exists()
    with pytest.raises(ValueError, match="no example keeps a response token within --block_size=8"):
        train.main([*TINY, "--block_size=8", "--epochs=1", f"--out_dir={out}"])
    assert not out.exists()


def test_a_cut_down_vocabulary_without_token_ids_is_refused_by_name(tmp_path):
    """A .safetensors model with fewer rows than GPT-2 and no token_ids: the data's ids past its rows are named in
    one line (they used to index past wte: an IndexError)."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64, vocab_size=1000))
    model.save_pretrained(tmp_path / "small")
    assert "token_ids" not in json.loads((tmp_path / "small" / "config.json").read_text())
    args = ["--data=sample", "--block_size=64", "--max_iters=1", "--device=cpu", "--preview=0", f"--out_dir={tmp_path / 'run'}"]
    one_line_error(run(f"--init_from={tmp_path / 'small'}", *args), "token ids outside the model's vocabulary")
    with pytest.raises(ValueError, match="token ids outside the model's vocabulary"):
        train.main([f"--init_from={tmp_path / 'small' / 'model.safetensors'}", *args])
    assert not (tmp_path / "run").exists()


def test_a_kill_while_the_old_run_was_being_set_aside_loses_nothing(tmp_path):
    """Killed half way through set_aside (some files moved, some not): the next train.py puts every file back."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32))
    checkpoint.save_run(tmp_path, model, tiny_state(model, 1), tiny_marks(1))
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    before = snapshot(tmp_path)
    (tmp_path / ".replacing").mkdir()
    for name in ("ckpt.pt", "progress.json"):  # moved before the kill; the rest still in place
        os.replace(tmp_path / name, tmp_path / ".replacing" / name)
    checkpoint.settle(tmp_path)
    assert snapshot(tmp_path) == before
    checkpoint.set_aside(tmp_path)  # and whole: then every run file in out_dir is the new run's
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.REPLACED]
    (tmp_path / "log.jsonl").write_text('{"step": 1, "new": true}\n')
    checkpoint.settle(tmp_path)  # no checkpoint of the new run: the old one comes back, the new log goes
    assert snapshot(tmp_path) == before
