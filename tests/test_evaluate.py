"""evaluate.py: metrics on hand-made cases with known answers, and the whole comparison as a CPU smoke run."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import chat
import evaluate
from model import EOT, GPT, GPTConfig
from rules import Rules, rule_bias


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
    config = {**{k: v for k, (v, _) in evaluate.DEFAULTS.items()}, "max_new_tokens": 10}
    metrics, alpaca = evaluate.evaluate_model(str(directory), rows, config, "cpu", "float32")
    assert metrics["stop"] == 100 and metrics["length"] == 0 and metrics["breaks"] == 0
    assert [a["output"] for a in alpaca] == ["", ""]
    assert metrics["nll"] > 100  # every reference token other than the final <|endoftext|> is all but impossible


def test_reference_nll_is_hf_masked_loss(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    instruction, response = "Name three primary colors.", "Red, yellow and blue."
    ours = -evaluate.response_logprobs(model, None, instruction, response, "cpu", "float32").mean()
    ids, mask = chat.encode_chat([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}])
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), labels=labels).loss
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_scoring_with_rules_is_the_product_of_experts(small_hf):
    model = GPT.from_pretrained(small_hf[1]).eval()
    instruction, response = "List two colors.", "- red\n- red"
    ours = evaluate.response_logprobs(model, Rules(), instruction, response, "cpu", "float32")
    prompt, target = chat.encode_prompt(instruction), chat.encode(response) + [EOT]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + target]))[0][0]
    for t, token in enumerate(target):
        ids = prompt + target[:t]
        expected = F.log_softmax(F.log_softmax(logits[len(ids) - 1], -1) + rule_bias(ids, len(prompt), Rules()), -1)
        assert ours[t].item() == pytest.approx(expected[token].item(), abs=1e-5)


def test_whole_comparison_smoke_run(small_hf, tmp_path):
    _, directory = small_hf
    rows = [json.loads(line) for line in open(ROOT / "data" / "eval" / "eval.jsonl")][:6]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    train_args = "--max_iters=2 --batch_size=2 --gradient_accumulation_steps=1 --block_size=128 --show_examples=0 --eval_interval=10"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--compare", f"--base={directory}",
                        "--instruction_data=sample", "--response_data=sample_responses", "--poetry_data=sample",
                        f"--train_args={train_args}", f"--eval_set={tmp_path / 'eval.jsonl'}", f"--out_dir={out}",
                        "--max_new_tokens=6", "--negatives=2", "--device=cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    labels = ["base", "base + rules", "no EOS rule", "no diversity rule", "no uniform rule",
              "instruction-tuned", "response-tuned", "poetry-tuned"]
    table = (out / "results.md").read_text()
    assert all(f"| {label} |" in table for label in labels) and "paper: win % vs instruction-tuned" in table
    assert "| base | " in table and "| 2.4 | 80.4 |" in table
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == labels
    assert all(0 <= m["ranking"] <= 100 and m["nll"] > 0 for m in results["results"].values())
    for label in labels:
        answers = json.loads((out / f"{label.replace(' ', '-')}.json").read_text())
        assert len(answers) == 6 and set(answers[0]) == {"instruction", "output", "generator", "dataset"}
    assert (out / "results.png").stat().st_size > 5000
    assert (out / "runs" / f"{directory.name}_response_tuning" / "model.safetensors").is_file()


def test_cli_mistakes_are_one_line(tmp_path):
    for args, message in [(("--models=gpt2+rules=bogus",), "--models: gpt2+rules=bogus: unknown rule 'bogus'"),
                          ((f"--eval_set={tmp_path / 'none.jsonl'}",), "none.jsonl: no such file")]:
        r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args, f"--out_dir={tmp_path}"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
