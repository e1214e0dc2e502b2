"""evaluate.py: metrics on hand-made cases with known answers, and the whole comparison as a CPU smoke run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import chat
import evaluate
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
    [(metrics, alpaca)] = evaluate.evaluate_models(str(directory), [(str(directory), 10)], rows, rows, config, "cpu", "float32")
    assert metrics["stop"] == 100 and metrics["length"] == 0 and metrics["breaks"] == 0
    assert [a["output"] for a in alpaca] == ["", ""]
    assert metrics["nll"] > 100  # every reference token other than the final <|endoftext|> is all but impossible


def test_reference_nll_is_hf_masked_loss(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    instruction, response = "Name three primary colors.", " Red, yellow and blue.\n"
    ours = -evaluate.score_responses(model, [NO_RULES], [(instruction, response)], "cpu", "float32")[0][0].mean()
    ids, mask = chat.encode_chat([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), labels=labels).loss
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_scoring_with_rules_is_the_product_of_experts(small_hf):
    model = GPT.from_pretrained(small_hf[1]).eval()
    instruction, response = "List two colors.", "- red\n- red"
    ours = evaluate.score_responses(model, [RuleSet()], [(instruction, response)], "cpu", "float32")[0][0]
    prompt, target = chat.encode_prompt(instruction), chat.encode(response) + [EOT]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target]))[0][0]
    for t, token in enumerate(target):
        ids = prompt + target[:t]
        expected = F.log_softmax(F.log_softmax(logits[len(ids) - 1], -1) + rule_bias(ids, len(prompt), RuleSet()), -1)
        assert ours[t].item() == pytest.approx(expected[token].item(), abs=1e-5)


@pytest.mark.parametrize("rule_set", [NO_RULES, RuleSet()], ids=["model", "model+rules"])
def test_batched_scoring_equals_one_at_a_time(small_hf, rule_set):
    model = GPT.from_pretrained(small_hf[1]).eval()
    rows = [json.loads(line) for line in open(ROOT / "data" / "eval" / "eval.jsonl")][:7]
    pairs = [(a["instruction"], b["reference"]) for a in rows for b in rows[:3]]  # 21 pairs of varied lengths
    pairs.append(("x " * 50, "y " * 100))  # longer than the 128-token context: the response's end is cut
    pairs.append(("x " * 150, "y " * 10))  # a prompt longer than the context alone: it loses its start
    batched = evaluate.score_responses(model, [rule_set], pairs, "cpu", "float32", batch_size=5)[0]
    alone = [evaluate.score_responses(model, [rule_set], [pair], "cpu", "float32", batch_size=1)[0][0] for pair in pairs]
    assert [len(a) for a in alone][-2:] == [128 + 1 - len(chat.encode_prompt("x " * 50)), 1]
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rule_sets_scored_together_equal_each_scored_alone(small_hf):
    """--compare scores base, base + rules and the three ablations in one pass of the base model."""
    model = GPT.from_pretrained(small_hf[1]).eval()
    rows = [json.loads(line) for line in open(ROOT / "data" / "eval" / "eval.jsonl")][:4]
    pairs = [(a["instruction"], b["reference"]) for a in rows for b in rows[:2]]
    rule_sets = [NO_RULES, RuleSet(), RuleSet(eos=False), RuleSet(diversity=False), RuleSet(uniform=False)]
    together = evaluate.score_responses(model, rule_sets, pairs, "cpu", "float32", batch_size=3)
    for rule_set, scored in zip(rule_sets, together):
        alone = evaluate.score_responses(model, [rule_set], pairs, "cpu", "float32", batch_size=3)[0]
        for a, b in zip(alone, scored):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(together[0][0], together[1][0])  # the rules do change the scores


def test_similarity_axes_on_constructed_vectors():
    e = torch.eye(4)  # four orthogonal unit directions
    task_asked, task_answered, reference = e[[0, 0]], e[[1, 1, 1]], e[[2]]
    asked = torch.stack([e[0], F.normalize(e[0] + e[3], dim=0), e[3]])  # close to, halfway from, far from the task
    answered = torch.stack([e[1], F.normalize(e[1] + e[2], dim=0), e[2]])  # in the task's style ... in the reference's
    x, y = evaluate.similarity_axes(asked, answered, task_asked, task_answered, reference)
    torch.testing.assert_close(x, torch.tensor([1.0, 0.5 ** 0.5, 0.0]))
    torch.testing.assert_close(y, torch.tensor([1.0, 0.0, -1.0]))


def test_embedding_is_hf_mean_pooled_hidden_states(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    texts = ["A short one.", "A somewhat longer text, so that the batch is padded on the right.", ""]
    ours = evaluate.embed(model, texts, "cpu", "float32", batch_size=3)
    for text, vector in zip(texts, ours):
        ids = chat.encode(text) or [EOT]
        with torch.no_grad():
            ref = hf.transformer(torch.tensor([ids])).last_hidden_state[0].mean(0)  # after ln_f, as ours
        torch.testing.assert_close(vector, ref, atol=1e-5, rtol=0)


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
    assert (out / "runs" / f"{directory.name}_chess" / "model.safetensors").is_file()
    # then the response-similarity analysis of the five single-task models, against other reference responses
    reference = ROOT / "data" / "sample" / "sample_val.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--similarity", *common, f"--instruction_data={reference}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    similarity = json.loads((out / "similarity.json").read_text())["tasks"]
    assert list(similarity) == ["gsm8k", "mbpp", "recipes", "chess", "poetry"]
    assert all(len(m["x"]) == 6 and -1 <= m["r"] <= 1 for m in similarity.values())
    assert "| poetry-tuned | 6 |" in r.stdout and (out / "similarity-poetry.png").stat().st_size > 5000


def test_only_the_model_without_the_eos_rule_is_limited_to_512_tokens():
    limits = {label: n for label, _, n in evaluate.rule_models("gpt2", 1024)}
    assert limits == {"base": 1024, "base + rules": 1024, "no EOS rule": 512, "no diversity rule": 1024,
                      "no uniform rule": 1024}
    assert {n for _, _, n in evaluate.rule_models("gpt2", 100)} == {100}
    assert [spec for _, spec, _ in evaluate.rule_models("gpt2", 9)][2] == "gpt2+rules=diversity,uniform"


def test_cli_mistakes_are_one_line(tmp_path):
    for args, message in [(("--models=gpt2+rules=bogus",), "--models: gpt2+rules=bogus: unknown rule 'bogus'"),
                          ((f"--eval_set={tmp_path / 'none.jsonl'}",), "none.jsonl: no such file"),
                          (("--compare", f"--ranking_set={tmp_path / 'none.jsonl'}"), "none.jsonl: no such file"),
                          (("--similarity",), "gsm8k-tuned.json: no answers of the gsm8k-tuned model; run python "
                                              "evaluate.py --compare first"),
                          (("--models=",), "--models is empty"), (("--negatives=0",), "--negatives=0"),
                          ((f"--models=gpt2 {unfinished(tmp_path)}+rules",), f"{tmp_path / 'half'} is an unfinished run "
                                                                           "(step 3 of 10); finish it with")]:
        r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args, f"--out_dir={tmp_path}"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert not (tmp_path / "runs").exists()  # nothing was trained before the mistake was found


def unfinished(tmp_path):
    (tmp_path / "half").mkdir(exist_ok=True)
    (tmp_path / "half" / "progress.json").write_text(json.dumps({"step": 3, "max_iters": 10, "finished": False}))
    return tmp_path / "half"


def test_compare_uses_finished_runs_where_the_readme_puts_them_and_resumes_stopped_ones(tmp_path, monkeypatch):
    """--compare never scores a half-trained run: it resumes it. A finished run in a config's own out_dir (the
    README's command put it there) is used if it started from this base on this data; anything else is trained."""
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(evaluate, "run_train", lambda args, config: calls.append(args))
    def mark(directory, finished, init_from="gpt2", data="lima_responses"):
        directory.mkdir(parents=True)
        (directory / "progress.json").write_text(json.dumps({"step": 5, "max_iters": 5 if finished else 9,
                                                            "finished": finished, "init_from": init_from, "data": data}))
    mark(tmp_path / "out" / "response_tuning", True)  # python train.py config/response_tuning.toml put it here
    mark(tmp_path / "out" / "instruction_tuning", True, data="dolly")  # another data set: not this comparison's
    mark(tmp_path / "eval" / "runs" / "gpt2_poetry", False)  # stopped half way
    config = {**{k: v for k, (v, _) in evaluate.DEFAULTS.items()}, "out_dir": str(tmp_path / "eval"), "tasks": "poetry"}
    models = dict((label, spec) for label, spec, _ in evaluate.comparison(config))
    assert models["response-tuned"] == str(Path("out") / "response_tuning")
    assert models["instruction-tuned"] == str(tmp_path / "eval" / "runs" / "gpt2_instruction_tuning")
    assert models["poetry-tuned"] == str(tmp_path / "eval" / "runs" / "gpt2_poetry")
    assert calls == [[str(ROOT / "config" / "instruction_tuning.toml"), "--init_from=gpt2", "--data=lima",
                      f"--out_dir={tmp_path / 'eval' / 'runs' / 'gpt2_instruction_tuning'}"],
                     ["--init_from=resume", f"--out_dir={tmp_path / 'eval' / 'runs' / 'gpt2_poetry'}"]]
