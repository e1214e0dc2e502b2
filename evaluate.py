"""
Measure instruction following offline, without an API judge, and write files for AlpacaEval when you have one.

    python evaluate.py --models="gpt2 gpt2+rules out/response_tuning"       # any models, one table
    python evaluate.py --compare                                           # the paper's whole comparison
    python evaluate.py --compare --base=gpt2-medium --eval_set=data/alpaca_eval/alpaca_eval.jsonl

A model is a GPT-2 name, an HF directory or .safetensors file, or a train.py out_dir, optionally followed by
`+rules` (all three rules) or `+rules=eos,uniform` (a subset). For each model this prints and writes:

  stop %         responses that end with <|endoftext|> before --max_new_tokens
  length         mean response length in tokens
  repeat %       share of a response's 4-grams that repeat an earlier 4-gram of it (mean over responses)
  breaks %       responses that open a new <|user|>/<|assistant|> turn or restate the instruction
  ref NLL        mean per-token NLL of the reference responses given their instructions (eval sets with them)
  ranking %      the paper's Table 2: how often an instruction's own reference response is more likely, per
                 token, than another instruction's response under the same instruction (5 random draws each)

--compare runs base, base + rules, the three leave-one-rule-out ablations, and the instruction-, response-
and poetry-tuned models (training any that --out_dir lacks with config/*.toml), and puts the paper's numbers
beside ours. Files in --out_dir: results.md, results.json, results.png, and <model>.json in AlpacaEval's format
(`alpaca_eval --model_outputs out/eval/response-tuned.json --reference_outputs out/eval/instruction-tuned.json`).
"""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
from model import EOT, GPT
from rules import RuleState, parse_rules, product_of_experts
from sample import respond
from train import DEVICE_FLAGS, autocast, parse_flags, pick_device, pick_dtype, pyplot

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "models": ("gpt2 gpt2+rules", "models to evaluate, separated by spaces (NAME, NAME+rules, NAME+rules=eos,...)"),
    "compare": (False, "evaluate the paper's whole comparison at --base instead of --models"),
    "base": ("gpt2", "with --compare: the pretrained model every method starts from"),
    "instruction_data": ("lima", "with --compare: data of the instruction-tuned baseline"),
    "response_data": ("lima_responses", "with --compare: data of the response-tuned model"),
    "poetry_data": ("poetry", "with --compare: data of the poetry-tuned model"),
    "train_args": ("", "with --compare: extra train.py flags for models it has to train, e.g. '--max_iters=5'"),
    "eval_set": ("data/eval/eval.jsonl", "instructions (with 'reference' answers for NLL and ranking): JSONL or JSON"),
    "out_dir": ("out/eval", "where results and AlpacaEval files go; --compare also trains into out/"),
    "max_new_tokens": (512, "generation limit per response"),
    "batch_size": (8, "prompts generated together"),
    "negatives": (5, "ranking: other instructions' responses compared with each instruction's own"),
    "seed": (1337, "seeds the ranking's choice of other responses"),
    **DEVICE_FLAGS,  # --device, --dtype: as in train.py
}
# The paper's numbers (Llama-2-7B, Tables 1-2): AlpacaEval win rate against the instruction-tuned model, and
# response ranking. Ours are other measurements of the same models; the paper's are shown beside them.
PAPER = {"base": (2.4, 80.4), "base + rules": (24.4, None), "no EOS rule": (10.4, None),
         "no diversity rule": (14.3, None), "no uniform rule": (16.3, None),
         "instruction-tuned": (50.0, 77.4), "response-tuned": (43.3, None), "poetry-tuned": (22.9, None)}
# ---------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------ metrics

def repeated_ngram_share(tokens, n=4):
    """Share of the n-grams of `tokens` that already occurred earlier in it (0 for fewer than n + 1 tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def format_break(response, instruction):
    """The model opens a new chat turn, or restates the instruction instead of answering it."""
    if "<|user|>" in response or "<|assistant|>" in response:
        return True
    norm = lambda text: re.sub(r"\W+", " ", text.lower()).strip()  # noqa: E731
    return len(norm(instruction)) > 0 and norm(response).startswith(norm(instruction))


def proxies(outputs, instructions):
    """The generation proxies of a model's responses (lists of new token ids)."""
    n = len(outputs)
    texts = [chat.decode(out) for out in outputs]
    return {"stop": 100 * sum(out[-1:] == [EOT] for out in outputs) / n,
            "length": sum(len(out) - (out[-1:] == [EOT]) for out in outputs) / n,
            "repeat": 100 * sum(repeated_ngram_share([t for t in out if t != EOT]) for out in outputs) / n,
            "breaks": 100 * sum(format_break(t, q) for t, q in zip(texts, instructions)) / n}


@torch.no_grad()
def response_logprobs(model, rules, instruction, response, device, dtype):
    """Log-probability of each token of `response` and the <|endoftext|> closing it, given `instruction` in the
    chat format, under the model (times the rules when on: the same product of experts the sampler uses)."""
    prompt = chat.encode_prompt(instruction)
    target = chat.encode(response) + [EOT]
    target = target[:max(1, model.config.block_size + 1 - len(prompt))]  # what fits in the context after the prompt
    ids = (prompt + target)[-model.config.block_size - 1:]  # a prompt too long alone loses its start
    prompt_len = len(ids) - len(target)
    with autocast(device, dtype):
        logits = model(torch.tensor([ids[:-1]], device=device))[0][0, prompt_len - 1:].float()  # (len(target), V)
    logprobs = F.log_softmax(logits, dim=-1)
    if rules is not None:
        state = RuleState([ids[:prompt_len]], rules, device)
        rows = []
        for t, token in enumerate(target):
            rows.append(product_of_experts(logits[t], state.scores()[0]))
            state.update(torch.tensor([token], device=device))
        logprobs = torch.stack(rows)
    return logprobs.gather(1, torch.tensor(target, device=device)[:, None])[:, 0]


def ranking_win_rate(score, n, negatives, seed):
    """The paper's response ranking (Table 2): for each instruction i, its own response against `negatives`
    responses drawn at random, all scored under instruction i by score(i, j) (mean log-prob per token, so the
    order of exp(-mean NLL) that the official ratio_eval.py computes); returns the share of comparisons, in %,
    that the own response wins outright. As in the official code, draws are with replacement from all
    responses, and a draw of the instruction's own response is not a comparison (plot_ratios.py)."""
    rng = random.Random(seed)
    wins, total = 0, 0
    for i in range(n):
        own = score(i, i)
        for _ in range(negatives):
            j = rng.randint(0, n - 1)
            if j != i:
                wins += own > score(i, j)  # a tie is not a win
                total += 1
    return 100 * wins / max(total, 1)


def parse_model(spec):
    """'NAME', 'NAME+rules' or 'NAME+rules=eos,uniform' -> (NAME, Rules or None)."""
    init_from, with_rules, rule_text = spec.partition("+rules")
    try:
        return init_from, parse_rules(rule_text.removeprefix("=") or "all") if with_rules else None
    except ValueError as e:
        raise ValueError(f"--models: {spec}: {str(e).split(': ', 1)[1]}") from None


def evaluate_model(spec, rows, config, device, dtype):
    """Generate for every instruction, then score the references: -> (metrics, AlpacaEval rows)."""
    init_from, rules = parse_model(spec)
    model = GPT.from_pretrained(init_from).to(device).eval()
    outputs = []
    for i in tqdm(range(0, len(rows), config["batch_size"]), desc=f"{spec}: generating", file=sys.stderr):
        batch = rows[i:i + config["batch_size"]]
        outputs += respond(model, [chat.encode_prompt(r["instruction"]) for r in batch],
                           {**config, "greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}, rules, device, dtype)
    metrics = proxies(outputs, [r["instruction"] for r in rows])
    scored = [r for r in rows if r["reference"] is not None]
    if len(scored) >= 2:
        own = [response_logprobs(model, rules, r["instruction"], r["reference"], device, dtype)
               for r in tqdm(scored, desc=f"{spec}: reference NLL", file=sys.stderr)]
        metrics["nll"] = -torch.cat(own).mean().item()
        cache = {(i, i): lp.mean().item() for i, lp in enumerate(own)}  # the ranking's own responses, scored above

        def score(i, j):  # mean log-prob per token of response j under instruction i
            if (i, j) not in cache:
                cache[(i, j)] = response_logprobs(model, rules, scored[i]["instruction"], scored[j]["reference"],
                                                  device, dtype).mean().item()
            return cache[(i, j)]
        metrics["ranking"] = ranking_win_rate(score, len(scored), config["negatives"], config["seed"])
    alpaca = [{"instruction": r["instruction"], "output": chat.decode(out).strip(), "generator": spec,
               "dataset": r["dataset"]} for r, out in zip(rows, outputs)]
    return metrics, alpaca


# ------------------------------------------------------------------------------------------- the comparison

def comparison(config):
    """The paper's models at --base: [(label, spec)], training the finetuned ones that are missing."""
    base = config["base"]
    models = [("base", base), ("base + rules", f"{base}+rules"),
              ("no EOS rule", f"{base}+rules=diversity,uniform"), ("no diversity rule", f"{base}+rules=eos,uniform"),
              ("no uniform rule", f"{base}+rules=eos,diversity")]
    for label, run, data in (("instruction-tuned", "instruction_tuning", config["instruction_data"]),
                             ("response-tuned", "response_tuning", config["response_data"]),
                             ("poetry-tuned", "poetry", config["poetry_data"])):
        out = Path(config["out_dir"]) / "runs" / f"{Path(base).name}_{run}"
        if not (out / "model.safetensors").is_file():
            print(f"training {label} ({data}) into {out}", file=sys.stderr)
            command = [sys.executable, str(ROOT / "train.py"), str(ROOT / "config" / f"{run}.toml"), f"--init_from={base}",
                       f"--data={data}", f"--out_dir={out}", f"--device={config['device']}", *config["train_args"].split()]
            if subprocess.run(command).returncode != 0:
                raise OSError(f"training {label} failed: {' '.join(command)}")
        models.append((label, str(out)))
    return models


def markdown(results, compare):
    head = "| model | stop % | length | repeat % | breaks % | ref NLL | ranking % |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if compare:
        head += " paper: win % vs instruction-tuned | paper: ranking % |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for label, m in results.items():
        line = (f"| {label} | {m['stop']:.0f} | {m['length']:.0f} | {m['repeat']:.1f} | {m['breaks']:.0f} | "
                f"{fmt(m.get('nll'), '.3f')} | {fmt(m.get('ranking'), '.1f')} |")
        if compare:
            win, ranking = PAPER.get(label, (None, None))
            line += f" {fmt(win, '.1f')} | {fmt(ranking, '.1f')} |"
        lines.append(line)
    return "\n".join(lines)


def chart(results, path):
    plt = pyplot(path)
    if plt is None:
        return
    panels = [("stop", "stop %"), ("repeat", "repeated 4-grams %"), ("breaks", "format breaks %"), ("ranking", "ranking %")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.45 * len(results) + 1.5), sharey=True)
    labels = list(results)
    for ax, (key, title) in zip(axes, panels):
        bars = ax.barh(labels, [results[label].get(key) or 0 for label in labels], color="tab:blue")
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.set(xlim=(0, 105))
        ax.set_title(title, fontsize=10)
    axes[0].invert_yaxis()  # first model on top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    device = pick_device(config["device"])
    dtype = pick_dtype(device, config["dtype"])
    rows = chat.read_instructions(config["eval_set"])
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    models = comparison(config) if config["compare"] else [(spec, spec) for spec in config["models"].split()]
    for _, spec in models:  # a typo fails now, not after an hour of generation
        parse_model(spec)
    results = {}
    for label, spec in models:
        metrics, alpaca = evaluate_model(spec, rows, config, device, dtype)
        results[label] = {"model": spec, **metrics}
        name = re.sub(r"[^\w.+=,-]+", "_", label.replace(" ", "-"))
        chat.write_atomic(out_dir / f"{name}.json", json.dumps(alpaca, indent=2, ensure_ascii=False))
    table = markdown(results, config["compare"])
    print(table)
    chat.write_atomic(out_dir / "results.md", table + "\n")
    chat.write_atomic(out_dir / "results.json", json.dumps({"eval_set": config["eval_set"], "results": results,
                                                           "paper": PAPER if config["compare"] else None}, indent=2))
    chart(results, out_dir / "results.png")
    print(f"wrote {out_dir}/results.md, results.json, results.png and one AlpacaEval file per model", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
