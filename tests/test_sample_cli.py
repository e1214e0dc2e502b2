"""sample.py's command line: flags checked where they enter, --instructions resumable and interruptible, the
chat surviving Ctrl-C and over-long messages; rules.py's command line."""
import io
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_clear_margins

import chat
import sample
import rules
from model import GPT
from cli import parse_flags


def command(script, *args):
    return [sys.executable, str(ROOT / script), *args]


def run(*args, script="sample.py"):
    return subprocess.run(command(script, *args), capture_output=True, text=True, cwd=ROOT)


def one_line_error(r, message):
    """Exit status 1 and a single stderr line that names what was wrong (no traceback)."""
    return r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


def config_of(*args):
    """The config sample.py runs with for these flags (a resumable file records some of it)."""
    return sample.check_flags(parse_flags(sample.DEFAULTS, list(args), ""), list(args))


def write_instructions(path, instructions):
    path.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in instructions))
    return path


def expected_answer(model, instruction, max_new_tokens):
    prompt, _ = sample.fit_prompt(chat.encode_prompt(instruction), model.config.block_size, max_new_tokens)
    tokens = model.generate([prompt], max_new_tokens, greedy=True)[0]
    assert_clear_margins(model, prompt, tokens)  # sample.py answers in batches: other kernels, the same tokens
    return chat.decode(tokens).strip()


# 1. flags --------------------------------------------------------------------------------------------------
BAD_FLAGS = [(["--top_k=-1"], "--top_k=-1: expected 0 or more"),
             (["--top_p=0"], "--top_p=0.0: expected a number in (0, 1]"),
             (["--top_p=1.5"], "--top_p=1.5: expected a number in (0, 1]"),
             (["--top_p=nan"], "--top_p=nan: expected"),
             (["--greedy=False", "--temperature=0"], "--temperature=0.0: expected a number above 0 when sampling"),
             (["--greedy=False", "--temperature=-1"], "--temperature=-1.0: expected"),
             (["--greedy=False", "--temperature=nan"], "--temperature=nan: expected"),
             (["--max_new_tokens=0"], "--max_new_tokens=0: expected 1 or more"),
             (["--batch_size=0"], "--batch_size=0: expected 1 or more"),
             (["--what_bias=nan"], "--what_bias=nan: expected a finite number"),
             (["--what_bias=inf"], "--what_bias=inf: expected a finite number"),
             (["--prompt"], "--prompt needs a value: --prompt=..."),
             (["--instructions"], "--instructions needs a value")]


@pytest.mark.parametrize("args, message", BAD_FLAGS)
def test_bad_flags_fail_before_the_model_loads(tmp_path, args, message):
    # --init_from points nowhere: a flag error must come first. In-process: the one-line wrapper is tested below
    with pytest.raises(ValueError, match=re.escape(message)):
        sample.main([f"--init_from={tmp_path}/missing", "--prompt=x", *args])


def test_a_bad_flag_is_one_line(tmp_path):
    r = run(f"--init_from={tmp_path}/missing", "--prompt=x", "--top_p=nan")
    assert one_line_error(r, "--top_p=nan: expected a number in (0, 1]"), r.stderr


def test_bare_rules_is_recorded_as_all(small_hf, tmp_path):
    instructions = write_instructions(tmp_path / "val.jsonl", ["Say hi."])
    out = tmp_path / "answers.json"
    # --temperature=0 is fine while decoding greedily: it is not used
    r = run(f"--init_from={small_hf[1]}", "--rules", f"--instructions={instructions}", f"--out={out}",
            "--max_new_tokens=4", "--temperature=0")
    assert r.returncode == 0, r.stderr
    assert "rules: all" in r.stderr and json.loads(out.read_text())[0]["generator"].endswith("+rules:all")


# 2. --instructions: --out checked first, a partial file resumed, long prompts cut -------------------------
def test_out_is_checked_before_the_model_loads(tmp_path):
    instructions = write_instructions(tmp_path / "val.jsonl", ["Say hi."])
    (tmp_path / "file").write_text("")
    missing = f"--init_from={tmp_path}/missing"  # the model would fail too: --out's error must come first
    for out, message in [(tmp_path, f"--out={tmp_path}: a directory, not a file"),
                         (tmp_path / "file" / "a.json", f"{tmp_path / 'file'} is not a directory")]:
        r = run(missing, f"--instructions={instructions}", f"--out={out}")
        assert one_line_error(r, message), r.stderr
    r = run(missing, f"--instructions={instructions}", f"--out={tmp_path / 'new' / 'a.json'}")
    assert one_line_error(r, "missing: no such file"), r.stderr
    assert list((tmp_path / "new").iterdir()) == []  # nothing written before the model loaded


def test_out_may_not_be_an_input(small_hf, tmp_path):
    """--out that is --instructions (by another spelling or a link, too), its partial file, or the model's own files:
    one line, and the input is untouched. (It used to overwrite the instructions with the answers, and a rerun
    scored the model against its own outputs.)"""
    instructions = write_instructions(tmp_path / "val.jsonl", ["Say hi."])
    (tmp_path / "link.jsonl").symlink_to(instructions)
    before = instructions.read_bytes()
    (tmp_path / "sub").mkdir()
    for out, flag in [(tmp_path / "sub" / ".." / "val.jsonl", "--instructions"), (tmp_path / "link.jsonl", "--instructions"),
                      (small_hf[1] / "config.json", "--init_from's config.json")]:
        with pytest.raises(ValueError, match=f"is the input {flag}="):  # in-process; the command line once, below
            sample.main([f"--init_from={small_hf[1]}", f"--instructions={instructions}", f"--out={out}"])
    r = run(f"--init_from={small_hf[1]}", f"--instructions={instructions}", f"--out={instructions}")
    assert one_line_error(r, f"--out={instructions} is the input --instructions={instructions}"), r.stderr
    assert instructions.read_bytes() == before
    partial = write_instructions(tmp_path / "a.json.partial.jsonl", ["Say hi."])  # what --out=a.json resumes from
    with pytest.raises(ValueError, match=re.escape(f"--out's partial file={partial} is the input --instructions=")):
        sample.main([f"--init_from={small_hf[1]}", f"--instructions={partial}", f"--out={tmp_path / 'a.json'}"])


def test_a_partial_file_is_resumed(small_hf, tmp_path):
    _, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    rows = ["Say hi.", "Name a color.", "Count to three.", "Name a fruit."]
    instructions = write_instructions(tmp_path / "val.jsonl", rows)
    out = tmp_path / "answers.json"
    flags = [f"--init_from={directory}", f"--instructions={instructions}", f"--out={out}", "--max_new_tokens=8"]
    settings = {key: config_of(*flags)[key] for key in sample.ANSWER_FLAGS}
    kept = [{"instruction": text, "output": f"KEPT {i}", "generator": "g", "dataset": "val"} for i, text in enumerate(rows[:2])]
    torn = '{"instruction": "Count to th'  # the line a killed run was writing: dropped, answered again
    partial = sample.partial_path(out)
    partial.write_text("".join(json.dumps(row) + "\n" for row in [{"settings": settings}] + kept) + torn)
    r = run(*flags, "--batch_size=1", "--threads=1")  # the batch size may change between runs
    assert r.returncode == 0, r.stderr
    assert f"resuming from {partial}: 2 of 4 instructions already answered" in r.stderr
    answers = json.loads(out.read_text())
    assert [a["output"] for a in answers] == ["KEPT 0", "KEPT 1"] + [expected_answer(model, t, 8) for t in rows[2:]]
    assert [a["instruction"] for a in answers] == rows and not partial.exists()



def test_answers_that_end_out_of_order_are_written_in_order(small_hf, tmp_path, monkeypatch):
    """--instructions with fewer rows than instructions: the longer prompts have less room in the 128-token context,
    so their answers end first and their rows take the next instructions; the partial file still holds the answers
    in the instructions' order, each its answer alone, and is written as they end (not only at the end)."""
    _, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    rows = ["word " * n + "end." for n in (2, 60, 5, 40, 1, 70)]
    out = tmp_path / "answers.json"
    config = config_of(f"--init_from={directory}", f"--out={out}", "--batch_size=2", "--max_new_tokens=1024")
    written, ended = [], []
    respond = sample.respond

    def spied(*args, answered, **kwargs):  # the order in which the answers end
        return respond(*args, answered=lambda i, tokens: (ended.append(i), answered(i, tokens)), **kwargs)
    monkeypatch.setattr(sample, "respond", spied)
    with open(tmp_path / "partial.jsonl", "w") as file:
        class Watched:  # the file as generate_answers writes it: what is written, in order, as it comes
            def write(self, text):
                written.append(json.loads(text)["instruction"])
                return file.write(text)

            def flush(self):
                file.flush()
        answers = []
        sample.generate_answers(model, [{"instruction": r, "dataset": "val"} for r in rows], answers, Watched(),
                                config=config, rule_set=rules.NO_RULES, device="cpu", dtype="float32",
                                generator="g")
    assert ended != sorted(ended) and sorted(ended) == list(range(len(rows))), ended
    assert written == rows and [a["instruction"] for a in answers] == rows
    assert [a["output"] for a in answers] == [expected_answer(model, r, 1024) for r in rows]

@pytest.mark.parametrize("change, message", [
    ("flags", "partial.jsonl: started with --rules=none, now --rules=all; rerun with the same flags"),
    ("instruction", "partial.jsonl:2: answers another instruction than --instructions' item 1"),
])
def test_a_partial_file_of_another_run_is_refused(small_hf, tmp_path, change, message):
    instructions = write_instructions(tmp_path / "val.jsonl", ["Say hi."])
    out = tmp_path / "answers.json"
    flags = [f"--init_from={small_hf[1]}", f"--instructions={instructions}", f"--out={out}"]
    settings = {key: config_of(*flags)[key] for key in sample.ANSWER_FLAGS}
    answer = {"instruction": "Say bye." if change == "instruction" else "Say hi.", "output": "x"}
    sample.partial_path(out).write_text(json.dumps({"settings": settings}) + "\n" + json.dumps(answer) + "\n")
    r = run(*flags, *(["--rules"] if change == "flags" else []))
    assert one_line_error(r, message) and not out.exists(), r.stderr


def test_an_instruction_longer_than_the_context_is_cut_from_the_left(small_hf, tmp_path):
    _, directory = small_hf  # a 128-token context
    model = GPT.from_pretrained(directory).eval()
    long = "Some background. " * 60 + "What is the capital of France?"
    rows = [long, "Say hi.", long]
    out = tmp_path / "answers.json"
    r = run(f"--init_from={directory}", f"--instructions={write_instructions(tmp_path / 'v.jsonl', rows)}",
            f"--out={out}", "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert "2 instructions too long for the 128-token context were cut from the left to 120 tokens" in r.stderr
    prompt, cut = sample.fit_prompt(chat.encode_prompt(long), 128, 8)
    assert cut and len(prompt) == 120 and chat.decode(prompt).endswith("What is the capital of France?\n<|assistant|>\n")
    assert chat.decode(prompt).startswith("<|user|>\n")
    assert [a["output"] for a in json.loads(out.read_text())] == [expected_answer(model, t, 8) for t in rows]


# 3. Ctrl-C and SIGTERM during --instructions ---------------------------------------------------------------
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_keeps_the_answers_so_far(small_hf, tmp_path, sig, code, word):
    instructions = write_instructions(tmp_path / "val.jsonl", [f"Question {i}: name a color." for i in range(300)])
    out = tmp_path / "answers.json"
    partial = sample.partial_path(out)
    # a child inherits an ignored SIGINT (pytest run as a background job), in which case Python never raises
    # KeyboardInterrupt; a handled one is reset to the default, as in a terminal
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen(command("sample.py", f"--init_from={small_hf[1]}", f"--instructions={instructions}",
                                     f"--out={out}", "--max_new_tokens=100", "--threads=1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    finally:
        signal.signal(signal.SIGINT, ignored)
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline and (not partial.exists() or partial.read_text().count("\n") < 2):
        time.sleep(0.05)  # until the header and one answer are written
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    kept = partial.read_text().splitlines()[1:]
    assert p.returncode == code, err
    assert err.splitlines()[-1] == (f"{word}: {len(kept)} of 300 answers kept in {partial}; "
                                    "run the same command again to resume")
    assert 1 <= len(kept) < 300 and all(json.loads(line)["output"] is not None for line in kept)
    assert not out.exists()


# 4. the chat ------------------------------------------------------------------------------------------------
class StoppedPrinter(sample.Printer):
    """A reply streamed to the screen, interrupted by Ctrl-C after its third token."""

    def __call__(self, token):
        super().__call__(token)
        if len(self.tokens) == 3:
            raise KeyboardInterrupt


def chat_config(**flags):
    return {**config_of(), "max_new_tokens": 20, **flags}


def test_chat_refuses_an_over_long_message_and_goes_on(small_hf, monkeypatch, capsys):
    model = GPT.from_pretrained(small_hf[1]).eval()
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 200 + "\nHi\n"))
    sample.interactive(model, chat_config(), rules.NO_RULES, "cpu", "float32")
    out, err = capsys.readouterr()
    # 215: the message's trailing space counts, as a prompt keeps the user's text as typed (eval/templates.py 10)
    assert err.count("(message not sent: 215 tokens with the chat tags, and this model's 128-token context "
                     "holds 108 before the reply; shorten it)") == 1, err
    assert out.count("assistant> ") == 1  # the next message is answered


def test_ctrl_c_stops_a_reply_and_keeps_the_conversation(small_hf, monkeypatch, capsys):
    model = GPT.from_pretrained(small_hf[1]).eval()
    earlier = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello!"}]
    prompt = chat.encode_prompt(earlier + [{"role": "user", "content": "Hi"}])
    full = model.generate([prompt], 20, greedy=True)[0]
    assert len(full) > 3  # so the reply is cut short
    monkeypatch.setattr(sample, "Printer", StoppedPrinter)
    messages = sample.chat_turn(model, earlier, "Hi", config=chat_config(), rule_set=rules.NO_RULES,
                                device="cpu", dtype="float32")
    assert messages[:3] == earlier + [{"role": "user", "content": "Hi"}]
    assert messages[3:] == [{"role": "assistant", "content": chat.decode(full[:3])}]  # the part shown is kept
    assert "(reply stopped; the part shown stays in the conversation)" in capsys.readouterr().err
    # in the chat loop, every reply stopped: the chat goes on to the end of its input
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n"))
    sample.interactive(model, chat_config(), rules.NO_RULES, "cpu", "float32")
    assert capsys.readouterr().err.count("(reply stopped") == 2


# 5. rules.py ------------------------------------------------------------------------------------------------
def test_rules_cli_help_and_unknown_flags():
    r = run("--help", script="rules.py")
    assert r.returncode == 0 and "python rules.py [PATH.png]" in r.stdout, r.stderr
    r = run("--bogus", script="rules.py")
    assert one_line_error(r, "unknown argument '--bogus'") and r.stdout == "", r.stderr
