"""TinyWorld's model side: the restricted vocabulary against HF transformers, the rules on it, pretraining on
documents, the exact judge on hand-made answers, and the shipped bases. (The world itself: test_tinyworld_data.py.)"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_clear_margins, assert_close

import chat
import checkpoint
import rules
import train
from model import EOT, GPT, GPTConfig

sys.path.insert(0, str(ROOT / "data" / "tinyworld"))
import experiment  # noqa: E402  the TinyWorld comparison (data/tinyworld/experiment.py)
import world  # noqa: E402

EXPERIMENT = ROOT / "data" / "tinyworld" / "experiment.py"
BASES = sorted((ROOT / "data" / "tinyworld" / "bases").glob("seed*"))
# a vocabulary of every id the chat format, the rules and a few world answers use, in a scrambled order
IDS = sorted({*chat.encode_prompt("What colour is a blorp?"), *chat.encode(" blue red green"), EOT,
              *(row[3] for row in rules.UNIFORM), *rules.USER_TAG, *rules.ASSISTANT_TAG}, key=lambda i: (i * 7919) % 50257)


def restricted(seed=0, block_size=64):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=len(IDS), token_ids=tuple(IDS)))
    for p in model.parameters():  # a wide init, so that greedy decoding wanders over many tokens
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_restricted_vocabulary_equals_hf_on_its_rows(tmp_path):
    """transformers loads the exported directory as an ordinary GPT-2 over the model's rows: the same logits for
    the same rows, and our loss on GPT-2 ids equals HF's loss on the rows."""
    from transformers import GPT2LMHeadModel
    model = restricted()
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor(IDS)[torch.randint(len(IDS), (3, 20), generator=torch.Generator().manual_seed(1))]  # GPT-2 ids
    rows = torch.tensor([[IDS.index(i) for i in row] for row in ids.tolist()])
    logits, loss = model(ids, ids)
    with torch.no_grad():
        ref = hf(rows, labels=rows)
    assert_close(logits, ref.logits)
    shifted = F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
    assert_close(shifted, ref.loss)
    again = GPT.from_pretrained(tmp_path)  # and our own loader reads the vocabulary back, from either file
    bare = GPT.from_pretrained(tmp_path / "model.safetensors")
    assert again.config.token_ids == bare.config.token_ids == tuple(IDS)


def test_generation_speaks_gpt2_ids_and_equals_hf_greedy(tmp_path):
    from transformers import GPT2LMHeadModel
    model = restricted(seed=2)
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = chat.encode_prompt("What colour is a blorp?")
    ours = model.generate([prompt], 12, greedy=True, eos=None)[0]
    rows = hf.generate(torch.tensor([[IDS.index(i) for i in prompt]]), max_new_tokens=12, do_sample=False,
                       pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert_clear_margins(model, prompt, ours)  # ours and HF's kernels differ: no near-tie to flip
    assert ours == [IDS[r] for r in rows] and set(ours) <= set(IDS)
    with pytest.raises(ValueError, match="lacks: \\[1000\\]"):
        model.generate([[1000] + prompt], 2)


def test_each_rule_bias_lands_on_its_gpt2_id():
    """The rules work in GPT-2 ids; a restricted model sees each bias on the row of the same id, and the product
    of experts over its rows equals the one over all 50,257 ids (the absent ids have probability 0)."""
    model = restricted(seed=3)
    prompt = chat.encode_prompt("What colour is a blorp?")
    state = rules.RuleState([prompt], rules.RuleSet())
    for token in chat.encode(" blue blue red"):
        state.update(torch.tensor([token]))
    scores = state.scores()  # (1, 50257)
    own = model.vocab.own(scores)  # (1, V)
    for _, _, _, gpt2_id, bias in rules.UNIFORM:  # the uniform rule (plus diversity where the id was seen)
        assert own[0, IDS.index(gpt2_id)] == scores[0, gpt2_id] and scores[0, gpt2_id] <= bias
    assert own[0, IDS.index(EOT)] == pytest.approx(15 * 3 / 250)  # the EOS ramp after 3 tokens
    assert own[0, IDS.index(chat.encode(" blue")[0])] == -1.5  # the diversity rule, once per distinct id
    logits = model(torch.tensor([prompt]))[0][:, -1]  # (1, V)
    rowwise = rules.product_of_experts(logits, own)
    full = rules.product_of_experts(model.vocab.full(F.log_softmax(logits, -1)), scores)  # over GPT-2's ids
    assert_close(model.vocab.full(rowwise), full)
    assert torch.isinf(full[0, 1000]) and torch.isfinite(full[0, EOT])


def test_a_huge_bias_on_an_absent_id_never_makes_generate_emit_it():
    model = restricted(seed=4)
    present, absent = chat.encode(" red")[0], 1000
    def hook(logprobs, generated):
        bias = torch.zeros_like(logprobs)
        bias[:, absent], bias[:, present] = 1e4, 50.0
        return bias
    out = model.generate([chat.encode_prompt("What colour is a blorp?")], 3, greedy=True, hook=hook, eos=None)[0]
    assert out == [present] * 3


def write_documents(path, n, seed):
    rows = [{"text": text} for text in world.pretraining_documents(n, seed)]
    chat.write_jsonl(path, rows)
    return rows


def test_pretraining_packs_documents_and_its_loss_falls(tmp_path):
    docs = write_documents(tmp_path / "docs.jsonl", 400, seed=5)
    val = write_documents(tmp_path / "val.jsonl", 20, seed=6)
    ids = sorted({t for d in docs + val for t in chat.encode(d["text"])} | {EOT})
    (tmp_path / "vocab.json").write_text(json.dumps(ids))
    examples = train.pack([d["text"] for d in docs[:3]], 16)
    stream = [t for d in docs[:3] for t in chat.encode(d["text"]) + [EOT]]
    assert examples[1] == (stream[16:32], stream[17:33]) and len(examples) == (len(stream) - 1) // 16
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from=scratch", f"--data={tmp_path / 'docs.jsonl'}",
                        f"--val_data={tmp_path / 'val.jsonl'}", f"--vocab={tmp_path / 'vocab.json'}", "--n_layer=2",
                        "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=16", "--gradient_accumulation_steps=1",
                        "--max_iters=30", "--learning_rate=3e-3", "--eval_interval=30", "--threads=1", "--device=cpu",
                        f"--out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["loss"] < log[0]["loss"] - 1.0 and log[-1]["val_loss"] < log[0]["loss"] - 1.0
    model = GPT.from_pretrained(tmp_path / "run")
    assert model.config.token_ids == tuple(ids) and model.lm_head.weight.shape == (len(ids), 32)
    # data with a token the vocabulary lacks is refused in one line naming the file
    (tmp_path / "vocab.json").write_text(json.dumps(ids[:-5]))
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--init_from=scratch", f"--data={tmp_path / 'docs.jsonl'}",
                        f"--vocab={tmp_path / 'vocab.json'}", "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=32",
                        "--max_iters=1", "--device=cpu", f"--out_dir={tmp_path / 'run2'}"], capture_output=True, text=True, cwd=ROOT)
    last = r.stderr.strip().splitlines()[-1]  # (above it: the tokenizing progress bar)
    assert r.returncode == 1 and "Traceback" not in r.stderr and last.startswith("error: ")
    assert "docs.jsonl: 5 token ids outside the model's vocabulary" in last


class Scripted:
    """A stand-in model for the judge: answers each prompt with the text scripted for its instruction."""
    def __init__(self, answers):
        self.answers = {tuple(chat.encode_prompt(q)): a for q, a in answers.items()}

    def generate(self, prompts, max_new_tokens, **kwargs):
        return [self.answers[tuple(p)][:max_new_tokens] for p in prompts]


def test_the_judge_on_hand_made_answers():
    rng = __import__("random").Random(0)
    rows = [world.make_instance(f, rng, "test") for f in world.FAMILIES]
    answers = {}
    for k, row in enumerate(rows):
        text = row["answer"] if k % 4 != 3 else rows[(k + 1) % len(rows)]["answer"]  # every 4th: another family's
        answers[row["instruction"]] = chat.encode(text) + ([EOT] if k % 4 != 2 else [])  # every 4th: never stops
    judged = experiment.judge(Scripted(answers), rules.NO_RULES, rows, "cpu", "float32")
    assert [j["correct"] for j in judged] == [k % 4 in (0, 1) for k in range(len(rows))]
    assert [j["stopped"] for j in judged] == [k % 4 != 2 for k in range(len(rows))]
    metrics = experiment.world_metrics(judged, ranking=50.0)
    held = [k for k, r in enumerate(rows) if r["family"] in world.HELD_OUT]
    assert metrics["held-out"] == pytest.approx(100 * sum(k % 4 in (0, 1) for k in held) / len(held))
    assert metrics["stop"] == 100 * 6 / 8 and metrics[rows[0]["family"]] == 100.0
    # an answer that opens a new turn is not correct, but it was answered: the text before the turn passes
    answers = {rows[0]["instruction"]: chat.encode(rows[0]["answer"] + "\n<|user|>\nmore"),
               rows[1]["instruction"]: chat.encode(rows[1]["answer"] + "\nThe weather was mild.") + [EOT]}
    judged = experiment.judge(Scripted(answers), rules.NO_RULES, rows[:2], "cpu", "float32")
    assert [(j["correct"], j["answered"]) for j in judged] == [(False, True), (False, False)]


def test_the_table_reports_mean_and_sample_sd_over_seeds():
    by_seed = {s: {"base": {"held-out": v, "finetuned": 0.0, "answered": 0.0, "stop": 0.0, "ranking": 0.0,
                            **dict.fromkeys(world.FAMILIES, v)}}
               for s, v in ((1, 10.0), (2, 20.0), (3, 60.0))}
    table = experiment.world_markdown(by_seed)
    assert "| base | 30.0 ± 26.5 | 0.0 ± 0.0 |" in table and "| 2.4 |" in table  # the paper's base win rate beside


@pytest.mark.skipif(not BASES, reason="no shipped TinyWorld bases")
@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
def test_a_shipped_base_loads_and_knows_its_world(base):
    """Each shipped base is small, carries its vocabulary, and has learned the world's facts from pretraining:
    asked in the Q:/A: form of its internet, it answers most creatures' colours (none were ever finetuned)."""
    assert (base / "model.safetensors").stat().st_size < 3_000_000
    model = GPT.from_pretrained(base).eval()
    assert model.config.token_ids is not None and EOT in model.config.token_ids
    prompts = [chat.encode(f"Q: What colour is a {name}?\nA:") for name, _ in world.CREATURES]
    answers = model.generate(prompts, 3, greedy=True)
    right = sum(world.words(chat.decode(a))[:1] == [colour] for a, (_, colour) in zip(answers, world.CREATURES))
    assert right >= len(world.CREATURES) // 2, right


@pytest.mark.parametrize("args, message", [
    (["--seeds=x"], "--seeds='x': expected ints"), (["--split=train"], "--split=train: expected test or dev"),
    (["--seeds=1 1"], "--seeds='1 1': expected distinct seeds"),  # counted seed 1 twice
    (["--lr_sweep=1e-3 nan"], "--lr_sweep='1e-3 nan': expected learning rates above 0"),
    (["--seeds=99"], "seed99: no shipped base for seed 99; add --from_scratch")])
def test_bad_tinyworld_flags_are_refused(args, message, tmp_path):
    with pytest.raises((ValueError, OSError), match=re.escape(message)):  # in-process; the command line below
        experiment.main([*args, f"--out_dir={tmp_path}"])


def test_a_bad_tinyworld_flag_is_one_line():
    r = subprocess.run([sys.executable, str(EXPERIMENT), "--seeds=1 1"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: --seeds='1 1': expected distinct seeds"), r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("how, code, word", [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_a_stopped_comparison_stops_its_training_and_keeps_what_it_has(tmp_path, how, code, word):
    """Ctrl-C (to the terminal's process group) or SIGTERM (to experiment.py alone) while train.py pretrains a
    base: the training child finishes its step, checkpoints and exits; experiment.py exits 130 or 143 in one line, no
    traceback, no process left behind. (Ctrl-C printed a KeyboardInterrupt traceback; SIGTERM left train.py
    running.)"""
    out = tmp_path / "tw"
    with open(tmp_path / "stderr", "w") as err:  # a file: a pipe nobody reads could fill and stall the processes
        p = subprocess.Popen([sys.executable, str(EXPERIMENT), "--from_scratch", "--seeds=1",
                              f"--out_dir={out}", "--threads=1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                             start_new_session=True)
    base, deadline = out / "seed1" / "base", time.time() + 180
    try:
        while time.time() < deadline and not ((base / "log.jsonl").exists() and
                                              (base / "log.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.05)
        child = int((base / "train.lock").read_text())
        if how == "ctrl-c":
            os.killpg(p.pid, signal.SIGINT)
        else:
            p.send_signal(signal.SIGTERM)
        p.wait(timeout=180)
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    finally:  # whatever failed, no process of this test outlives it
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stderr = (tmp_path / "stderr").read_text()
    assert p.returncode == code and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(f"{word}: the files written so far are kept")
    state = checkpoint.progress(base)  # the pretraining stopped at a checkpoint: it can be resumed
    assert state is not None and 2 <= state["step"] < state["max_iters"] and not (base / "train.lock").exists()
