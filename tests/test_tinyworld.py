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
import report  # noqa: E402  its tables and charts
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


def test_scoring_with_rules_on_a_restricted_vocabulary_is_the_product_over_its_rows():
    """The ranking's scores with rules (the official set and a world-like one with a short ramp and its own
    table), computed for all positions at once, are the product of experts stepped token by token over the
    model's own rows: RuleState's scores restricted to them, as generation uses them."""
    import scoring
    model = restricted()
    world_like = rules.RuleSet(eos_max=15.0, eos_length=4, diversity_penalty=1.5,
                               uniform_table=((198, -4.0), (chat.encode(" blue")[0], 1.0)))
    pairs = [("What colour is a blorp?", "What blue"), ("What colour is a blorp?", "What red green red blue red"),
             ("", "What green green<|user|>\nWhat colour is a blorp?\n<|assistant|>\nWhat blue red")]  # new turns
    for rule_set in (rules.RuleSet(), world_like):
        scored = scoring.score_responses(model, [rule_set], pairs, "cpu", "float32", batch_size=2)[0]
        for (instruction, response), ours in zip(pairs, scored):
            ids, p = scoring.encode_pair(instruction, response, model.config.block_size)
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[:-1]]))  # (1, L, V') over the model's rows
            state = rules.RuleState([ids[:p]], rule_set)
            expected = []
            for t, token in enumerate(ids[p:]):
                product = rules.product_of_experts(logits[0, p - 1 + t], model.vocab.own(state.scores())[0])
                expected.append(product[IDS.index(token)])
                state.update(torch.tensor([token]))
            assert len(ours) == len(expected) > 1
            assert_close(ours, torch.stack(expected), scale=torch.stack(expected).abs().max())


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
    # grades: 2 right and stopped, 1 right but never stopped, 0 another family's answer
    assert [j["grade"] for j in judged] == [(2, 2, 1, 0)[k % 4] for k in range(len(rows))]
    metrics = experiment.world_metrics(judged, ranking=50.0, reference=judged)
    held = [k for k, r in enumerate(rows) if r["family"] in world.HELD_OUT]
    assert metrics["held-out"] == pytest.approx(100 * sum(k % 4 in (0, 1) for k in held) / len(held))
    assert metrics["answered"] == pytest.approx(100 * sum(k % 4 != 3 for k in held) / len(held))
    assert metrics["stop"] == pytest.approx(100 * sum(k % 4 != 2 for k in range(len(rows))) / len(rows))
    assert metrics[rows[0]["family"]] == 100.0 and metrics["win"] == metrics["win held-out"] == 50.0
    # an answer that opens a new turn, or adds a filler line, is not correct, but it was answered: grade 1
    answers = {rows[0]["instruction"]: chat.encode(rows[0]["answer"] + "\n<|user|>\nmore"),
               rows[1]["instruction"]: chat.encode(rows[1]["answer"] + "\nThe weather was mild.") + [EOT]}
    judged = experiment.judge(Scripted(answers), rules.NO_RULES, rows[:2], "cpu", "float32")
    assert [(j["correct"], j["grade"]) for j in judged] == [(False, 1), (False, 1)]


def test_win_rate_is_the_higher_grade_with_ties_one_half():
    rng = __import__("random").Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        a = [{"grade": rng.randint(0, 2)} for _ in range(n)]
        b = [{"grade": rng.randint(0, 2)} for _ in range(n)]
        wins = sum(x["grade"] > y["grade"] for x, y in zip(a, b))
        ties = sum(x["grade"] == y["grade"] for x, y in zip(a, b))
        assert experiment.win_rate(a, b) == pytest.approx(100 * (wins + ties / 2) / n)
        assert experiment.win_rate(a, b) + experiment.win_rate(b, a) == pytest.approx(100.0)
    assert experiment.win_rate(a, a) == 50.0


def test_first_divergence_is_the_first_token_that_differs():
    assert experiment.first_divergence([5, 6, 7], [5, 6, 7]) is None
    assert experiment.first_divergence([5, 9, 7], [5, 6, 7]) == (9, 6)
    assert experiment.first_divergence([5, 6, 7, 8], [5, 6, 7]) is None  # the reference is all there
    assert experiment.first_divergence([5], [5, 6, EOT]) == (None, 6)  # ended first
    assert experiment.first_divergence([198, 1], [5]) == (198, 5)


def test_the_frozen_world_rules_are_a_ruleset_of_the_official_code(tmp_path):
    frozen = json.loads((ROOT / "data" / "tinyworld" / "world_rules.json").read_text())
    rule_set = experiment.world_rule_set(ROOT / "data" / "tinyworld" / "world_rules.json")
    assert isinstance(rule_set, rules.RuleSet) and rule_set.eos and rule_set.diversity and rule_set.uniform
    assert (rule_set.eos_length, rule_set.eos_max, rule_set.diversity_penalty) == (
        frozen["eos_length"], frozen["eos_max"], frozen["diversity_penalty"])
    assert rule_set.uniform_table == tuple((t, b) for t, _, b in frozen["uniform"])
    assert len(rule_set.uniform_table) == experiment.UNIFORM_SIZE and EOT not in dict(rule_set.uniform_table)
    assert {b for _, b in rule_set.uniform_table} <= {experiment.OVER_BIAS, experiment.UNDER_BIAS}
    for token, text, _ in frozen["uniform"]:
        assert chat.decode([token]) == text
    bad = {"missing.json": None, "broken.json": "{", "short.json": json.dumps({"eos_max": 15}),
           "negative.json": json.dumps({**frozen, "eos_length": -3})}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"--rules_file={tmp_path / name}:")) as e:
            experiment.world_rule_set(tmp_path / name)
        assert "\n" not in str(e.value)


def test_the_style_correlation_is_pearson_and_spearman_over_families_and_seeds():
    by_seed = {1: {"poetry-tuned": {"sort": {"similarity": 0.1, "form": 0.0},
                                    "add": {"similarity": 0.3, "form": 10.0},
                                    "count": {"similarity": 0.2, "form": 40.0}}},
               2: {"poetry-tuned": {"sort": {"similarity": 0.0, "form": 0.0},
                                    "add": {"similarity": 0.5, "form": 30.0},
                                    "count": {"similarity": 0.4, "form": 20.0}}}}
    summary = report.style_summary(by_seed)["poetry-tuned"]
    x, y = [0.1, 0.3, 0.2, 0.0, 0.5, 0.4], [0.0, 10.0, 40.0, 0.0, 30.0, 20.0]
    assert summary["pearson"] == pytest.approx(float(torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1]))
    ry = [1.5, 3, 6, 1.5, 5, 4]  # y ranks: the two zeros share their mean rank
    assert report.ranks(x) == [2, 4, 3, 1, 6, 5] and report.ranks(y) == ry
    assert summary["spearman"] == pytest.approx(float(torch.corrcoef(torch.tensor([report.ranks(x), ry], dtype=torch.float64))[0, 1]))
    assert summary["families"]["add"] == {"similarity": pytest.approx(0.4), "form": 20.0}
    # no answer in the task's form: r is undefined, and the table says so
    flat = {s: {"letter-tuned": {f: {**p, "form": 0.0} for f, p in m["poetry-tuned"].items()}}
            for s, m in by_seed.items()}
    summary = report.style_summary(flat)
    assert summary["letter-tuned"]["pearson"] is None and summary["letter-tuned"]["spearman"] is None
    assert "undefined" in report.style_markdown(summary) and "nan" not in report.style_markdown(summary)
    json.dumps(summary, allow_nan=False)


def test_the_table_reports_mean_and_sample_sd_over_seeds():
    by_seed = {s: {"base": {"win": v, "held-out": 0.0, "finetuned": 0.0, "answered": 0.0, "stop": 0.0,
                            "ranking": 0.0, **dict.fromkeys(world.FAMILIES, v)}}
               for s, v in ((1, 10.0), (2, 20.0), (3, 60.0))}
    table = report.markdown(by_seed, {"base": 2.4})
    assert "| base | 30.0 ± 26.5 | 0.0 ± 0.0 |" in table and "| 2.4 |" in table  # the paper's base win rate beside
    assert "| base | 30 | 30 |" in table  # each family's mean
    one = report.markdown({1: by_seed[3]}, {})
    assert "(1 seed)" in one and "| base | 60.0 | 0.0 |" in one and "±" not in one  # one seed has no spread


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
    (["--seeds=99"], "seed99: no shipped base for seed 99; add --from_scratch"),
    (["--derive_rules"], "--derive_rules: the world rules are derived on --split=dev only"),
    (["--derive_rules", "--split=dev"], "the frozen world rules exist; deriving them again would overwrite"),
    (["--jobs=0"], "--jobs=0")])
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
