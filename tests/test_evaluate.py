"""evaluate.py: metrics on hand-made cases with known answers, and the whole comparison as a CPU smoke run."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_close

import chat
import comparison
import embedding
import evaluate
import scoring
import similarity
from cli import Stopped
from model import EOT, GPT, GPTConfig
from rules import NO_RULES, RuleSet, rule_bias


def test_proxies_on_known_outputs():
    m = evaluate.proxies([[EOT], [EOT]], ["a", "b"])
    assert m == {"stop": 100.0, "length": 0.0, "repeat": 0.0, "breaks": 0.0}
    hello = chat.encode("Hello there.")
    m = evaluate.proxies([hello + [EOT], hello], ["Say hi", "Say hi"])
    assert m["stop"] == 50 and m["length"] == len(hello)


def test_repeated_ngrams():
    assert evaluate.repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 5 grams, 1 repeat
    assert evaluate.repeated_ngram_share([1, 2, 3, 4, 5]) == 0.0
    assert evaluate.repeated_ngram_share([7] * 10) == pytest.approx(6 / 7)
    assert evaluate.repeated_ngram_share([1, 2]) == 0.0


def test_format_breaks():
    assert evaluate.format_break("Sure.\n<|user|>\nmore", "Say hi")
    assert evaluate.format_break("<|assistant|> hi", "Say hi")
    assert evaluate.format_break("Give me a recipe for soup! Here it is...", "Give me a recipe for soup.")
    assert not evaluate.format_break("Hello!", "Say hi")


def test_ranking_on_constructed_scores():
    assert evaluate.ranking_win_rate(lambda i, j: float(i == j), 6, 5, 0) == 100  # own response always likeliest
    assert evaluate.ranking_win_rate(lambda i, j: -float(i == j), 6, 5, 0) == 0
    assert evaluate.ranking_win_rate(lambda i, j: 0.0, 6, 5, 0) == 0  # a tie is not a win
    # score = the drawn response's index: own wins exactly when the draw has a smaller index. The draws are
    # the official code's: randint over all responses, with replacement, a draw of the own one skipped
    import random
    rng, wins, total = random.Random(3), 0, 0
    for i in range(4):
        for _ in range(5):
            j = rng.randint(0, 3)
            wins, total = wins + (j < i) * (j != i), total + (j != i)
    assert evaluate.ranking_win_rate(lambda i, j: float(j), 4, 5, 3) == pytest.approx(100 * wins / total)


def eos_only_model(directory):
    """A tiny GPT whose every next token is <|endoftext|>: ln_f outputs a constant vector v, wte[EOT] = 100 v."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=1, n_embd=16))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.ones(16))
        model.transformer.wte.weight[EOT] = 100.0
    model.save_pretrained(directory)
    return directory


def test_a_model_that_always_stops_at_once(tmp_path):
    directory = eos_only_model(tmp_path / "eos")
    rows = [{"instruction": "Say hi.", "reference": "Hi!", "dataset": "t"},
            {"instruction": "Name a color.", "reference": "Blue.", "dataset": "t"}]
    config = {k: v for k, (v, _) in evaluate.DEFAULTS.items()}
    [(metrics, alpaca)] = evaluate.evaluate_models(str(directory), [(str(directory), 10)], rows, rows, config,
                                                    device="cpu", dtype="float32")
    assert metrics["stop"] == 100 and metrics["length"] == 0 and metrics["breaks"] == 0
    assert [a["output"] for a in alpaca] == ["", ""]
    assert metrics["nll"] > 100  # every reference token other than the final <|endoftext|> is all but impossible


def test_reference_nll_is_hf_masked_loss(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    instruction, response = "Name three primary colors.", " Red, yellow and blue.\n"
    ours = -scoring.score_responses(model, [NO_RULES], [(instruction, response)], "cpu", "float32")[0][0].mean()
    ids, mask = chat.encode_chat([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), labels=labels).loss
    assert_close(ours, ref)


def test_scoring_with_rules_is_the_product_of_experts(small_hf):
    model = GPT.from_pretrained(small_hf[1]).eval()
    instruction, response = "List two colors.", "- red\n- red"
    ours = scoring.score_responses(model, [RuleSet()], [(instruction, response)], "cpu", "float32")[0][0]
    prompt, target = chat.encode_prompt(instruction), chat.encode(response) + [EOT]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target]))[0][0]
    for t, token in enumerate(target):
        ids = prompt + target[:t]
        expected = F.log_softmax(F.log_softmax(logits[len(ids) - 1], -1) + rule_bias(ids, len(prompt), RuleSet()), -1)
        assert_close(ours[t], expected[token], scale=expected.abs().max())  # the log-probs' magnitude, not this one's


def test_scoring_reads_the_instruction_as_training_does():
    # ratio_eval.py scores with finetune.py's encoder, which strips the instruction: half of the Alpaca ranking
    # set's templated instructions end in "\n" or "\n\n", which a generation prompt keeps (eval/templates.py)
    instruction, response = "Name three primary colors.\n\n", " Red, yellow and blue.\n"
    ids, prompt_len = scoring.encode_pair(instruction, response, 128)
    expected, mask = chat.encode_chat([{"role": "user", "content": instruction},
                                       {"role": "assistant", "content": response}])
    assert ids == expected and prompt_len == mask.index(1)


@pytest.mark.parametrize("rule_set", [NO_RULES, RuleSet()], ids=["model", "model+rules"])
def test_batched_scoring_equals_one_at_a_time(small_hf, rule_set):
    model = GPT.from_pretrained(small_hf[1]).eval()
    rows = [json.loads(line) for line in open(ROOT / "data" / "eval" / "eval.jsonl")][:7]
    pairs = [(a["instruction"], b["reference"]) for a in rows for b in rows[:3]]  # 21 pairs of varied lengths
    pairs.append(("x " * 50, "y " * 100))  # longer than the 128-token context: the response's end is cut
    pairs.append(("x " * 150, "y " * 10))  # a prompt longer than the context alone: it loses its start
    batched = scoring.score_responses(model, [rule_set], pairs, "cpu", "float32", batch_size=5)[0]
    alone = [scoring.score_responses(model, [rule_set], [pair], "cpu", "float32", batch_size=1)[0][0] for pair in pairs]
    scored_prompt = chat.encode_prompt(("x " * 50).strip())  # scoring strips the instruction, as training does
    assert [len(a) for a in alone][-2:] == [128 + 1 - len(scored_prompt), 1]
    for a, b in zip(alone, batched):
        assert_close(a, b)


def test_rule_sets_scored_together_equal_each_scored_alone(small_hf):
    """--compare scores base, base + rules and the three ablations in one pass of the base model."""
    model = GPT.from_pretrained(small_hf[1]).eval()
    rows = [json.loads(line) for line in open(ROOT / "data" / "eval" / "eval.jsonl")][:4]
    pairs = [(a["instruction"], b["reference"]) for a in rows for b in rows[:2]]
    rule_sets = [NO_RULES, RuleSet(), RuleSet(eos=False), RuleSet(diversity=False), RuleSet(uniform=False)]
    together = scoring.score_responses(model, rule_sets, pairs, "cpu", "float32", batch_size=3)
    for rule_set, scored in zip(rule_sets, together):
        alone = scoring.score_responses(model, [rule_set], pairs, "cpu", "float32", batch_size=3)[0]
        for a, b in zip(alone, scored):
            assert_close(a, b)
    assert not torch.allclose(together[0][0], together[1][0])  # the rules do change the scores


def test_similarity_axes_on_constructed_vectors():
    e = torch.eye(4)  # four orthogonal unit directions
    task_asked, task_answered, reference = e[[0, 0]], e[[1, 1, 1]], e[[2]]
    asked = torch.stack([e[0], F.normalize(e[0] + e[3], dim=0), e[3]])  # close to, halfway from, far from the task
    answered = torch.stack([e[1], F.normalize(e[1] + e[2], dim=0), e[2]])  # in the task's style ... in the reference's
    x, y = similarity.similarity_axes(asked, answered, task_asked, task_answered, reference)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5 ** 0.5, 0.0]))
    torch.testing.assert_close(y, torch.tensor([1.0, 0.0, -1.0]))


def test_embedding_is_hf_mean_pooled_hidden_states(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    texts = ["A short one.", "A somewhat longer text, so that the batch is padded on the right.", ""]
    ours = embedding.embed(model, texts, "cpu", "float32", batch_size=3)
    for text, vector in zip(texts, ours):
        ids = chat.encode(text) or [EOT]
        with torch.no_grad():
            ref = hf.transformer(torch.tensor([ids])).last_hidden_state[0].mean(0)  # after ln_f, as ours
        assert_close(vector, ref)


def test_whole_comparison_smoke_run(small_hf, tmp_path):
    _, directory = small_hf
    rows = [json.loads(line) for line in open(ROOT / "data" / "eval" / "eval.jsonl")][:6]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rank.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:6]))
    out = tmp_path / "eval"
    train_args = ("--max_iters=2 --batch_size=2 --gradient_accumulation_steps=1 --block_size=128 --preview=0 "
                  "--eval_interval=10")
    common = [f"--base={directory}", "--instruction_data=sample", "--response_data=sample_responses", "--task_data=sample",
              f"--out_dir={out}", "--device=cpu"]
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--compare", *common, f"--train_args={train_args}",
                        f"--eval_set={tmp_path / 'eval.jsonl'}", f"--ranking_set={tmp_path / 'rank.jsonl'}",
                        "--max_new_tokens=6", "--negatives=2"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    labels = ["base", "base + rules", "no EOS rule", "no diversity rule", "no uniform rule", "instruction-tuned",
              "response-tuned", "gsm8k-tuned", "mbpp-tuned", "recipes-tuned", "chess-tuned", "poetry-tuned"]
    table = (out / "results.md").read_text()
    assert all(f"| {label} |" in table for label in labels) and "paper: win % vs instruction-tuned" in table
    assert "| 2.4 | 80.4 |" in table and "| 23.7 | – |" in table and "| 2.1 | – |" in table
    assert "ranking % (rank, 4)" in table  # the column names the set it ranked
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == labels and results["ranking_set"] == str(tmp_path / "rank.jsonl")
    assert all(0 <= m["ranking"] <= 100 and m["nll"] > 0 for m in results["results"].values())
    assert [m["max_new_tokens"] for m in results["results"].values()] == [6] * 12  # 512 only caps more than 512
    for label in labels:
        answers = json.loads((out / f"{label.replace(' ', '-')}.json").read_text())
        assert len(answers) == 6 and set(answers[0]) == {"instruction", "output", "generator", "dataset"}
    assert (out / "results.png").stat().st_size > 5000
    [chess] = (out / "runs").glob(f"{directory.name}_chess_*")  # named by its settings' hash
    assert (chess / "model.safetensors").is_file()
    # then the response-similarity analysis of the five single-task models, against other reference responses
    reference = ROOT / "data" / "sample" / "sample_val.jsonl"
    similarity_flags = [f"--base={directory}", "--task_data=sample", f"--out_dir={out}", "--device=cpu"]
    r = subprocess.run([sys.executable, str(ROOT / "similarity.py"), *similarity_flags, f"--instruction_data={reference}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = json.loads((out / "similarity.json").read_text())["tasks"]
    assert list(tasks) == ["gsm8k", "mbpp", "recipes", "chess", "poetry"]
    assert all(len(m["x"]) == 6 and -1 <= m["r"] <= 1 for m in tasks.values())
    assert "| poetry-tuned | 6 |" in r.stdout and (out / "similarity-poetry.png").stat().st_size > 5000


def test_only_the_model_without_the_eos_rule_is_limited_to_512_tokens():
    limits = {label: n for label, _, n in comparison.rule_models("gpt2", 1024)}
    assert limits == {"base": 1024, "base + rules": 1024, "no EOS rule": 512, "no diversity rule": 1024,
                      "no uniform rule": 1024}
    assert {n for _, _, n in comparison.rule_models("gpt2", 100)} == {100}
    assert [spec for _, spec, _ in comparison.rule_models("gpt2", 9)][2] == "gpt2+rules=diversity,uniform"


def test_cli_mistakes_are_one_line(tmp_path):
    cases = [(("--models=gpt2+rules=bogus",), "--models: gpt2+rules=bogus: unknown rule 'bogus'"),
             ((f"--eval_set={tmp_path / 'none.jsonl'}",), "none.jsonl: no such file"),
             (("--compare", f"--ranking_set={tmp_path / 'none.jsonl'}"), "none.jsonl: no such file"),
             (("--models=",), "--models is empty"), (("--negatives=0",), "--negatives=0"),
             ((f"--models=gpt2 {unfinished(tmp_path)}+rules",), f"{tmp_path / 'half'} is an unfinished run "
                                                                "(step 3 of 10)"),
             (("--seed=-1",), "--seed=-1: expected a number in [0, 1e18]"),
             (("--batch_size=0",), "--batch_size=0: expected 1 or more")]
    with ThreadPoolExecutor(max_workers=4) as pool:  # a few at a time: each is a torch import
        results = pool.map(lambda args: subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args,
                                                        f"--out_dir={tmp_path}"], capture_output=True, text=True,
                                                       cwd=ROOT), [args for args, _ in cases])
    for r, (args, message) in zip(results, cases):
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "runs").exists()  # nothing was trained before a mistake was found
    # similarity.py before --compare has written the single-task models' answers
    r = subprocess.run([sys.executable, str(ROOT / "similarity.py"), f"--out_dir={tmp_path}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "gsm8k-tuned.json: no answers of the gsm8k-tuned model; run python evaluate.py --compare first" \
        in r.stderr


def test_an_output_may_not_be_an_input(tmp_path):
    """--eval_set or --ranking_set that is a file evaluate.py would write (an earlier run's AlpacaEval answers, say):
    one line before any model is loaded, and the file untouched."""
    answers = tmp_path / "gpt2.json"
    answers.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!"}]))
    before = answers.read_bytes()
    for args in ([f"--eval_set={answers}"], [f"--ranking_set={answers}"]):
        r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--models=gpt2 nowhere", *args,
                            f"--out_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--out_dir's gpt2.json=" in r.stderr, r.stderr
        assert "is the input" in r.stderr and answers.read_bytes() == before
    base = tmp_path / "base.json"  # --compare writes base.json: refused before any training
    base.write_bytes(before)
    with pytest.raises(ValueError, match="--out_dir's base.json=.* is the input --eval_set="):
        evaluate.main(["--compare", f"--eval_set={base}", f"--ranking_set={answers}", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "runs").exists() and base.read_bytes() == before


def unfinished(tmp_path):
    (tmp_path / "half").mkdir(exist_ok=True)
    (tmp_path / "half" / "progress.json").write_text(json.dumps({"step": 3, "max_iters": 10, "finished": False}))
    return tmp_path / "half"


def test_compare_uses_finished_runs_where_the_readme_puts_them_and_resumes_stopped_ones(tmp_path, monkeypatch):
    """--compare never scores a half-trained run: it resumes it. A finished run in a config's own out_dir (the
    README's command put it there) is used only if every setting that defines it is what the comparison would
    train (a 1-step smoke run there used to pass for the paper's model); anything else is trained in a directory
    named by its settings, so that runs with other settings never stand in for each other."""
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(comparison, "run_train", lambda args, config: calls.append(args))

    def mark(directory, finished, settings):
        directory.mkdir(parents=True)
        (directory / "progress.json").write_text(json.dumps({"step": 5, "max_iters": 5 if finished else 9,
                                                            "finished": finished, "init_from": "gpt2",
                                                            "data": settings["data"], "settings": settings}))
        if not finished:
            (directory / "ckpt.pt").write_bytes(b"")  # resumable: evaluate asks train.py to resume it

    def settings(run, data, *flags):
        return comparison.train_settings([str(ROOT / "config" / f"{run}.toml"), "--init_from=gpt2", f"--data={data}", *flags])
    response = settings("response_tuning", "lima_responses")
    assert response["learning_rate"] == 5e-5 and response["data"] == "lima_responses" and "out_dir" not in response
    mark(tmp_path / "out" / "response_tuning", True, response)  # python train.py config/response_tuning.toml
    smoke = settings("instruction_tuning", "lima", "--max_iters=1")
    mark(tmp_path / "out" / "instruction_tuning", True, smoke)  # a smoke run where the README's run goes
    config = {**{k: v for k, (v, _) in evaluate.DEFAULTS.items()}, "out_dir": str(tmp_path / "eval"), "tasks": "poetry"}

    def args(run, data, *flags):
        return [str(ROOT / "config" / f"{run}.toml"), "--init_from=gpt2", f"--data={data}", *flags]
    poetry = comparison.find_run(config, "poetry", args("poetry", "poetry"))
    mark(poetry, False, settings("poetry", "poetry"))  # stopped half way
    instruction = comparison.find_run(config, "instruction_tuning", args("instruction_tuning", "lima"))
    assert instruction.parent == poetry.parent == tmp_path / "eval" / "runs"
    assert instruction != comparison.find_run(config, "instruction_tuning", args("instruction_tuning", "lima", "--max_iters=1"))
    mbpp = comparison.find_run(config, "mbpp", args("mbpp", "mbpp"))
    mark(mbpp, True, {**settings("mbpp", "mbpp"), "learning_rate": 1.0})  # trained by a train.py of other defaults
    with pytest.raises(ValueError, match="holds a run with other settings than train.py .* move it away"):
        comparison.find_run(config, "mbpp", args("mbpp", "mbpp"))
    with monkeypatch.context() as m:
        m.setattr(comparison, "unfinished", lambda out: "stopped" if (Path(out) / "ckpt.pt").exists() else None)
        models = dict((label, spec) for label, spec, _ in evaluate.compared_models(config))
    assert models == {**models, "response-tuned": str(Path("out") / "response_tuning"),
                      "instruction-tuned": str(instruction), "poetry-tuned": str(poetry)}
    assert calls == [[str(ROOT / "config" / "instruction_tuning.toml"), "--init_from=gpt2", "--data=lima",
                      f"--out_dir={instruction}"],
                     ["--init_from=resume", f"--out_dir={poetry}"]]


@pytest.mark.parametrize("code", [130, 143, 1, 2])
def test_a_child_stopped_by_a_signal_stops_the_comparison(tmp_path, code):
    """train.py exits 130 or 143 when a Ctrl-C or SIGTERM stopped it at a step's end (checkpointed). If the
    signal reached the child and not us (sent to it alone, or taken by a thread of ours while the main thread
    waited), the comparison stops as on a Ctrl-C of its own, not with "training failed"; any other failure is
    still one."""
    script = tmp_path / "child.py"
    script.write_text(f"import sys\nsys.exit({code})\n")
    if code in (130, 143):
        with pytest.raises(Stopped) as stopped:
            comparison.run_script(str(script), [], "training")
        assert stopped.value.code == code
    else:
        with pytest.raises(OSError, match="training failed"):
            comparison.run_script(str(script), [], "training")
