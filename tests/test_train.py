"""train.py: the masked loss against HF, training through the CLI, exact resume, atomic checkpoints, DDP."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_close, assert_losses_close

import checkpoint
import chat
import cli
import train
from model import GPT

# a tiny GPT-2-shaped model from scratch on the shipped sample data: seconds per run on a CPU
TINY = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=128", "--data=sample",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--learning_rate=1e-2", "--device=cpu", "--preview=0"]


def run(*args, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          **kwargs)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(out_dir / "log.jsonl")]


def test_masked_batch_loss_equals_hf(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    conversations = chat.read_conversations(ROOT / "data" / "sample" / "sample_train.jsonl")[30:35]  # multi-turn too
    examples, _ = train.tokenize(conversations, block_size=128)
    x, y = train.collate(examples, "cpu", block_size=128)
    assert x.shape[1] == 128 and (y == -1).any() and (y != -1).any()  # padded, and partly masked
    _, loss = model(x, y)
    labels = torch.full_like(x, -100)  # HF shifts labels itself: label t = token t where the mask says train
    for i, (ids, _) in enumerate(examples):
        _, mask = chat.encode_chat(conversations[i])
        labels[i, :len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask[:len(ids)])])
    with torch.no_grad():
        ref = hf(x, labels=labels).loss
    assert_close(loss, ref)


def test_truncation_is_counted():
    conversations = chat.read_conversations(ROOT / "data" / "sample" / "sample_train.jsonl")
    examples, truncated = train.tokenize(conversations, block_size=20)
    assert truncated == sum(len(chat.encode_chat(c)[0]) > 20 for c in conversations) > 0
    assert all(len(ids) <= 20 for ids, _ in examples)


def test_lr_schedule_warms_up_then_decays_to_zero():
    config = {"learning_rate": 1.0, "warmup_ratio": 0.1}
    lrs = [train.get_lr(s, 100, config) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[99] == pytest.approx(1 / 90)


def test_adamw_is_fused_wherever_torch_has_it_and_equals_the_default():
    """The fused kernel (CPU from torch 2.4, CUDA) takes the same steps as the default implementation."""
    from model import GPTConfig
    torch.manual_seed(0)
    fused_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    plain_model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    plain_model.load_state_dict(fused_model.state_dict())
    config = {"learning_rate": 1e-2, "weight_decay": 0.01}
    fused = train.adamw(fused_model, config)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                              foreach=False)
    version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    assert fused.defaults["fused"] is (version >= (2, 4)), (torch.__version__, fused.defaults["fused"])
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            torch.manual_seed(1)  # the same gradients for both
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert_close(a, b)


def test_two_processes_see_what_one_sees_with_double_accumulation():
    examples = [([0] * (1 + (7 * k) % 5), k) for k in range(13)]  # (ids, targets): lengths 1..5, k names it
    one = {"batch_size": 2, "gradient_accumulation_steps": 4, "seed": 5}
    two = {**one, "gradient_accumulation_steps": 2}
    for step in range(5):  # crosses epoch boundaries: 8 examples a step, 13 in an epoch
        single = train.micro_batches(examples, step, one, rank=0, world=1)
        ranks = [train.micro_batches(examples, step, two, r, 2) for r in (0, 1)]
        assert sorted(single) == sorted(ranks[0] + ranks[1]) and ranks[0] != ranks[1]
        # grouped by length: sorted within the step, each process's micro-batches alike in length
        assert [len(ids) for b in single for ids, _ in b] == sorted(len(ids) for b in single for ids, _ in b)
        assert ranks[0] == single[0::2] and ranks[1] == single[1::2]
    steps = [[k for b in train.micro_batches(examples, step, one, 0, 1) for _, k in b] for step in range(13)]
    assert sorted(k for step in steps for k in step) == sorted(list(range(13)) * 8)  # 13 steps: 8 epochs
    assert sorted(steps[0]) != list(range(8))  # each epoch is a shuffled permutation


def test_grouping_by_length_keeps_a_step_s_examples_and_cuts_padding():
    """The grouped micro-batches hold exactly the step's examples, the ungrouped order would hold (the
    seeded permutation), with less padding when lengths vary."""
    lengths = [5, 300, 7, 290, 12, 280, 9, 310] * 4
    examples = [([1] * n, i) for i, n in enumerate(lengths)]
    config = {"batch_size": 2, "gradient_accumulation_steps": 4, "seed": 0}
    padded = lambda batches: sum(len(b) * max(len(ids) for ids, _ in b) for b in batches)  # noqa: E731
    cost = {"grouped": 0, "ungrouped": 0}  # tokens computed, padding included
    for step in range(6):
        grouped = train.micro_batches(examples, step, config, 0, 1)
        order = [torch.randperm(32, generator=torch.Generator().manual_seed(e)).tolist() for e in range(2)]
        data_order = [(order[0] + order[1])[k] for k in range(step * 8, step * 8 + 8)]
        assert sorted(i for b in grouped for _, i in b) == sorted(data_order)
        ungrouped = [[examples[i] for i in data_order[m * 2:m * 2 + 2]] for m in range(4)]
        cost["grouped"] += padded(grouped)
        cost["ungrouped"] += padded(ungrouped)
    assert cost["grouped"] < 0.8 * cost["ungrouped"], cost


def test_cli_training_lowers_loss_and_exports(tmp_path):
    out = tmp_path / "run"
    r = run(*TINY, "--max_iters=30", "--eval_interval=10", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "0 truncated" in r.stdout
    trace = losses(out)
    assert len(trace) == 30 and trace[-1] < trace[0] - 3  # from ~10.8 (uniform over 50257) to well below
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "val_loss" in r] == [10, 20, 30]
    # the out_dir is an HF model directory: ours, transformers and sample.py load it
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours = GPT.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert_close(ours(idx)[0], hf(idx).logits)
    s = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--init_from={out}", "--prompt=Name three primary colors.",
                        "--max_new_tokens=8"], capture_output=True, text=True, cwd=ROOT)
    assert s.returncode == 0 and "loaded" in s.stderr, s.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 30 and ckpt["samples_seen"] == 30 * 8 and ckpt["config"]["data"] == "sample"


def test_stop_and_resume_gives_the_same_losses(tmp_path):
    whole = tmp_path / "whole"
    assert run(*TINY, "--max_iters=24", "--eval_interval=100", f"--out_dir={whole}").returncode == 0
    part = tmp_path / "part"
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--max_iters=24", "--eval_interval=100",
                          f"--out_dir={part}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((part / "log.jsonl").exists() and len(losses(part)) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)  # Ctrl-C: finish the step, checkpoint, exit
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and "stopped at step" in stdout, stderr  # 128 + SIGINT: scripts see the stop
    stopped = torch.load(part / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= stopped < 24
    state = checkpoint.progress(part)
    assert {k: state[k] for k in ("step", "max_iters", "finished", "init_from", "data")} == \
        {"step": stopped, "max_iters": 24, "finished": False, "init_from": "scratch", "data": "sample"}
    assert state["settings"]["max_iters"] == 24 and state["settings"]["data"] == "sample"
    assert not (part / "train.lock").exists()
    r = run("--init_from=resume", f"--out_dir={part}", "--device=cpu")
    assert r.returncode == 0 and f"resuming {part} at step {stopped}" in r.stdout, r.stderr
    assert_losses_close(losses(part), losses(whole), ulps=0)  # the same kernels on the same machine: equal
    assert torch.equal(GPT.from_pretrained(part).lm_head.weight, GPT.from_pretrained(whole).lm_head.weight)


def test_sigkill_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import checkpoint; "
            "checkpoint.save_checkpoint({'step': 2, 'w': torch.zeros(300_000_000, dtype=torch.uint8)}, sys.argv[2])")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(path)])
    tmp = tmp_path / "ckpt.pt.tmp"
    while not (tmp.exists() and tmp.stat().st_size > 0) and p.poll() is None:
        time.sleep(0.001)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("loss", ["example", "token"])
def test_ddp_two_processes_match_one(tmp_path, loss):
    common = [*TINY, "--max_iters=6", "--eval_interval=100", "--batch_size=2", f"--loss={loss}"]
    one = run(*common, "--gradient_accumulation_steps=4", f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                          str(ROOT / "train.py"), *common, "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes; 6 steps of 8 sequences" in two.stdout
    assert_losses_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    # the two models compute the same function. (Not parameter by parameter: Adam divides a gradient by its own
    # size, so a coordinate whose gradient is as small as the summation's rounding moves by up to the learning
    # rate either way, and the gradients of 2 processes are summed in another order. Such a coordinate barely
    # moves the output, by the very smallness of its gradient.)
    a, b = GPT.from_pretrained(tmp_path / "one"), GPT.from_pretrained(tmp_path / "two")
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(b(idx)[0], a(idx)[0])


def hf_step_losses(hf, config, examples):
    """HF's loss of each sequence of step 0, computed one sequence at a time (labels -100 off the response)."""
    losses = []
    for batch in train.micro_batches(examples, 0, config, rank=0, world=1):
        for ids, targets in batch:
            labels = torch.tensor([[-100] + [t if t != -1 else -100 for t in targets[:-1]]])  # HF shifts labels itself
            with torch.no_grad():
                out = hf(torch.tensor([ids]), labels=labels)
            losses.append((out.loss.item(), sum(t != -1 for t in targets)))
    return losses


def test_step_loss_is_the_mean_of_hf_per_example_losses(small_hf, tmp_path):
    hf, directory = small_hf
    args = [f"--init_from={directory}", "--data=sample", "--block_size=128", "--batch_size=4", "--gradient_accumulation_steps=2",
            "--max_iters=1", "--device=cpu", "--preview=0", "--eval_interval=100"]
    config = {"batch_size": 4, "gradient_accumulation_steps": 2, "seed": 1337}
    examples, _ = train.tokenize(chat.read_conversations(ROOT / "data" / "sample" / "sample_train.jsonl"), 128)
    per_example = hf_step_losses(hf, config, examples)
    assert len({n for _, n in per_example}) > 1  # sequences of different lengths: the two modes differ
    example_mean = sum(loss for loss, _ in per_example) / len(per_example)
    token_mean = sum(loss * n for loss, n in per_example) / sum(n for _, n in per_example)
    assert abs(example_mean - token_mean) > 1e-3
    for mode, want in (("example", example_mean), ("token", token_mean)):
        r = run(*args, f"--loss={mode}", f"--out_dir={tmp_path / mode}")
        assert r.returncode == 0, r.stderr
        assert_losses_close(losses(tmp_path / mode)[:1], [want])


@pytest.mark.parametrize("loss", ["example", "token"])
def test_step_loss_does_not_depend_on_the_micro_batch_split(tmp_path, loss):
    common = [*TINY, "--max_iters=4", "--eval_interval=100", f"--loss={loss}"]
    a = run(*common, "--batch_size=4", "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'a'}")
    b = run(*common, "--batch_size=1", "--gradient_accumulation_steps=8", f"--out_dir={tmp_path / 'b'}")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert_losses_close(losses(tmp_path / "a"), losses(tmp_path / "b"))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    """A learning rate that grows to divergence (warmup over the whole run): the first step whose val loss or
    weights are not finite stops the run unsaved, naming the last good checkpoint, whose weights are finite."""
    out = tmp_path / "nan"
    r = run(*TINY, "--max_iters=50", "--eval_interval=1", "--learning_rate=1e6", "--warmup_ratio=1", "--grad_clip=0",
            f"--out_dir={out}")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("is nan at step" in last or "NaN or Inf" in last), last
    assert "stopping, nothing of it saved. Last good checkpoint:" in last and "ckpt.pt (step" in last, last
    step = int(last.split("(step ")[1].split(")")[0])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == step > 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not checkpoint.progress(out)["finished"]


BAD = [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n', ":2: malformed JSON"),
    (b'{"text": "hi"}\n', ":1: missing field 'messages'"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', ":1: messages[0].role is 'bot'"),
    (b'{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}\n', ":1: messages[0].content must be a string"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}\n', ":1: messages[1].content is empty"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: no assistant turn"),
    (b'\n{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n', ":2: not UTF-8"),
    (b"", ": empty file"),
    (b"\n\n", ": empty file"),
]


@pytest.mark.parametrize("content, message", BAD)
def test_bad_data_is_one_line_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        chat.read_conversations(path)
    assert str(e.value).startswith(str(path) + message) and "\n" not in str(e.value)


def test_bad_inputs_through_the_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD[2][0])
    for args, message in [((f"--data={bad}",), f"{bad}:1: messages[0].role is 'bot'"),
                          (("--data=nonsense",), "--data=nonsense: unknown data name"),
                          (("--max_iters=ten",), "--max_iters=ten: expected int"),
                          (("--loss=mean",), "--loss=mean: expected example or token"),
                          (("--init_from=resume", f"--out_dir={tmp_path}"), "no checkpoint to resume")]:
        r = run(*TINY, *args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_toml_config_and_flags_override(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "sample"\nmax_iters = 3\nlearning_rate = 1e-3\ncompile = false\n')
    config = cli.parse_flags(train.DEFAULTS, [str(cfg), "--max_iters=5", "--compile"], "")
    assert (config["data"], config["max_iters"], config["learning_rate"], config["compile"]) == ("sample", 5, 1e-3, True)
    cfg.write_text('data = "sample"\nbogus = 1\n')
    with pytest.raises(ValueError, match="run.toml: unknown key 'bogus'"):
        cli.parse_flags(train.DEFAULTS, [str(cfg)], "")
    names = sorted(p.stem for p in (ROOT / "config").glob("*.toml"))
    assert names == ["chess", "gsm8k", "instruction_tuning", "mbpp", "poetry", "recipes", "response_tuning", "smoke",
                     "tinyworld_instruction", "tinyworld_letter", "tinyworld_poem", "tinyworld_pretrain",
                     "tinyworld_responses"]
    for name in names:  # the shipped configs parse, and each single-task one has the official epochs
        config = cli.parse_flags(train.DEFAULTS, [str(ROOT / "config" / f"{name}.toml")], "")
        epochs = {"gsm8k": 7, "mbpp": 15, "poetry": 15, "recipes": 20, "chess": 15}.get(name)
        assert epochs is None or (config["epochs"], config["data"]) == (epochs, name)
