"""
Measure instruction following offline, without an API judge, and write files for AlpacaEval when
you have one.

    python evaluate.py --models="gpt2 gpt2+rules out/response_tuning"   # any models, one table
    python evaluate.py --compare                                       # the paper's comparison
    python evaluate.py --compare --base=gpt2-medium --eval_set=data/alpaca_eval/alpaca_eval.jsonl

A model is a GPT-2 name, an HF directory or .safetensors file, or a train.py out_dir, optionally
followed by `+rules` (all three rules) or `+rules=eos,uniform` (a subset). For each model this
prints and writes:

  stop %      responses that end with <|endoftext|> before --max_new_tokens (or the context) ends
  length      mean response length in tokens
  repeat %    share of a response's 4-grams that repeat an earlier 4-gram of it (mean of responses)
  breaks %    responses that open a new <|user|>/<|assistant|> turn or restate the instruction
  ref NLL     mean per-token NLL of the eval set's reference responses given their instructions
  ranking %   the paper's Table 2: how often an instruction's own reference response is more
              likely, per token, than another instruction's response under the same instruction
              (5 random draws each)

--compare runs base, base + rules, the three leave-one-rule-out ablations, the instruction- and
response-tuned models and the five single-task models (training any that --out_dir lacks with
config/*.toml), ranks on the paper's 1,000 Stanford Alpaca examples, and puts the paper's numbers
beside ours. Files in --out_dir: results.md, results.json, results.png, and <model>.json in
AlpacaEval's format (`alpaca_eval --model_outputs out/eval/response-tuned.json --reference_outputs
out/eval/instruction-tuned.json`).

The other experiments have programs of their own: similarity.py (after --compare: the single-task
models' response similarity, section 5.2), epochs.py (a run's epochs picked as the official scripts
did) and data/tinyworld/experiment.py (every method in a synthetic world, judged exactly, on a
CPU).
"""
import json
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import chat
from cli import (DEVICE_FLAGS, DEVICE_RANGES, cell, check_ranges, for_inference, machine,
                 parse_flags, pyplot, refuse_overwriting, run_main)
from comparison import (PAPER, check_finished, file_name, find_run, parse_model, rule_models,
                        train_if_missing)
from model import EOT, GPT
from rules import GREEDY, respond
from scoring import score_pairs

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "models": ("gpt2 gpt2+rules",
               "models to evaluate, separated by spaces (NAME, NAME+rules, NAME+rules=eos,...)"),
    "compare": (False, "evaluate the paper's whole comparison at --base instead of --models"),
    "base": ("gpt2", "with --compare: the pretrained model every method starts from"),
    "instruction_data": ("lima", "with --compare: data of the instruction-tuned baseline"),
    "response_data": ("lima_responses", "with --compare: data of the response-tuned model"),
    "tasks": ("gsm8k mbpp recipes chess poetry",
              "with --compare: the single-task models, each trained by config/<task>.toml"),
    "task_data": ("", "with --compare: train every single-task model on this data instead (smoke "
                      "runs)"),
    "train_args": ("", "with --compare: extra train.py flags for models it has to train, e.g. "
                       "'--max_iters=5'"),
    "eval_set": ("data/eval/eval.jsonl",
                 "instructions to answer (with 'reference' answers for NLL): JSONL or JSON"),
    "ranking_set": ("", "instructions with references to rank: by default the paper's 1,000 "
                        "Stanford Alpaca examples with --compare (data/alpaca, prepared on first "
                        "use), --eval_set with --models"),
    "out_dir": ("out/eval",
                "where results and AlpacaEval files go; --compare also trains into out/"),
    "max_new_tokens": (1024, "generation limit; 1024 = until <|endoftext|> or the end of GPT-2's "
                             "context, as the official evaluation (its context); --compare gives "
                             "the no-EOS-rule model 512, as it does"),
    "batch_size": (8, "rows generating together (one whose answer ends takes the next prompt), or "
                      "responses scored together"),
    "compile": (False, "generate with each step one compiled graph (a CUDA graph on a GPU; the "
                       "same tokens)"),
    "negatives": (5,
                  "ranking: other instructions' responses compared with each instruction's own"),
    "seed": (0, "seeds the ranking's draws; 0 is the official ratio_eval.py's random.seed(0): the "
                "same pairs"),
    **DEVICE_FLAGS,  # --device, --dtype, --threads: as in train.py
}
RANGES = {"max_new_tokens": "[1, inf)", "batch_size": "[1, inf)", "negatives": "[1, inf)",
          "seed": "[0, 1e18]", **DEVICE_RANGES}
# -------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------- metrics

def repeated_ngram_share(tokens, n=4):
    """Share of the n-grams of `tokens` that already occurred earlier in it (0 for fewer than n + 1
    tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) <= 1:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def words(text):
    """Lower-case words separated by single spaces: how format_break compares texts."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def format_break(response, instruction):
    """The model opens a new chat turn, or restates the instruction instead of answering it."""
    if "<|user|>" in response or "<|assistant|>" in response:
        return True
    return len(words(instruction)) > 0 and words(response).startswith(words(instruction))


def proxies(outputs, instructions):
    """The generation proxies of a model's responses (lists of new token ids)."""
    n = len(outputs)
    texts = [chat.decode(out) for out in outputs]
    stopped = [out[-1:] == [EOT] for out in outputs]
    lengths = [len(out) - stop for out, stop in zip(outputs, stopped)]  # <|endoftext|> not counted
    repeats = [repeated_ngram_share([t for t in out if t != EOT]) for out in outputs]
    breaks = [format_break(text, q) for text, q in zip(texts, instructions)]
    return {"stop": 100 * sum(stopped) / n, "length": sum(lengths) / n,
            "repeat": 100 * sum(repeats) / n, "breaks": 100 * sum(breaks) / n}


# ----------------------------------------------------------------------------------------- ranking

def ranking_draws(n, negatives, seed):
    """The pairs the paper's response ranking compares (Table 2): for each instruction i,
    `negatives` responses j drawn at random from all n, with replacement, as the official
    ratio_eval.py draws them; a draw of i's own response is not a comparison and is skipped
    (plot_ratios.py). Returns [(i, j)]."""
    rng = random.Random(seed)  # ratio_eval.py's random.seed(0): the same draws for seed 0
    draws = []
    for i in range(n):
        for _ in range(negatives):
            j = rng.randint(0, n - 1)
            if j != i:
                draws.append((i, j))
    return draws


def ranking_win_rate(score, n, negatives, seed):
    """The paper's response ranking: for each pair (i, j) of ranking_draws, instruction i's own
    response against response j, both scored under instruction i by score(i, j) (mean log-prob per
    token, so the order of exp(-mean NLL) that the official ratio_eval.py computes). Returns the
    share of comparisons, in %, that the own response wins outright: a tie is not a win."""
    draws = ranking_draws(n, negatives, seed)
    wins = 0
    for i, j in draws:
        wins += score(i, i) > score(i, j)
    return 100 * wins / max(len(draws), 1)


# --------------------------------------------------------------------------------- one model's run

def evaluate_models(init_from, specs, rows, ranked, config, *, device, dtype):
    """Every spec [(spec, max_new_tokens)] over one model (init_from alone, or with rules):
    generate for every instruction of `rows`, then score their references and rank the responses of
    `ranked` (rows with references) for all specs in one pass of the model -> [(metrics, AlpacaEval
    rows)], one per spec."""
    model = for_inference(GPT.from_pretrained(init_from), device, dtype)
    rule_sets = [parse_model(spec)[1] for spec, _ in specs]
    batch_size = config["batch_size"]
    # 1) greedy answers to every instruction, and their proxies
    metrics = []
    alpaca = []
    for (spec, max_new_tokens), rule_set in zip(specs, rule_sets):
        settings = {**config, **GREEDY, "max_new_tokens": max_new_tokens}
        prompts = [chat.encode_prompt(r["instruction"]) for r in rows]
        with tqdm(total=len(rows), desc=f"{spec}: generating", file=sys.stderr) as bar:
            outputs = respond(model, prompts, settings, rule_set, device, dtype,
                              batch_size=batch_size, answered=lambda i, tokens: bar.update(1))
        metrics.append(proxies(outputs, [r["instruction"] for r in rows]))
        answers = []
        for r, out in zip(rows, outputs):
            answers.append({"instruction": r["instruction"], "output": chat.decode(out).strip(),
                            "generator": spec, "dataset": r["dataset"]})
        alpaca.append(answers)
    # 2) the ranking: its draws depend on the seed alone, so every pair is scored at once, batched
    tables = []
    if len(ranked) >= 2:
        negatives = config["negatives"]
        draws = ranking_draws(len(ranked), negatives, config["seed"])  # [(i, j)], j != i
        own = [(i, i) for i in range(len(ranked))]
        tables = score_pairs(model, rule_sets, ranked, own + draws,
                             device=device, dtype=dtype, batch_size=batch_size)
        for m, table in zip(metrics, tables):
            def score(i, j):  # response j's mean log-prob per token under instruction i
                return table[(i, j)].mean().item()
            m["ranking"] = ranking_win_rate(score, len(ranked), negatives, config["seed"])
    # 3) the references' NLL: the ranking scored every own response already if it ranked these rows
    references = [r for r in rows if r["reference"] is not None]
    if references:
        own = [(i, i) for i in range(len(references))]
        if ranked == references and tables:
            owns = tables
        else:
            owns = score_pairs(model, rule_sets, references, own,
                               device=device, dtype=dtype, batch_size=batch_size)
        for m, table in zip(metrics, owns):
            m["nll"] = -torch.cat([table[pair] for pair in own]).mean().item()
    return list(zip(metrics, alpaca))


# ---------------------------------------------------------------------------------- the comparison

def finetuned_runs(config):
    """The finetuned models of --compare: [(label, config/<run>.toml, data)]."""
    runs = [("instruction-tuned", "instruction_tuning", config["instruction_data"]),
            ("response-tuned", "response_tuning", config["response_data"])]
    for task in config["tasks"].split():
        runs.append((f"{task}-tuned", task, config["task_data"] or task))
    return runs


def compared_models(config):
    """The paper's models at --base: [(label, spec, max_new_tokens)], training the finetuned ones
    missing and finishing the ones stopped."""
    base = config["base"]
    limit = config["max_new_tokens"]
    models = rule_models(base, limit)
    for label, run, data in finetuned_runs(config):
        toml = str(ROOT / "config" / f"{run}.toml")
        args = [toml, f"--init_from={base}", f"--data={data}", *config["train_args"].split()]
        out = find_run(config, run, args)
        train_if_missing(f"{label} ({data})", args, out, config)
        models.append((label, str(out), limit))
    return models


def ranking_set(config, rows):
    """(rows with references to rank, their file): --ranking_set; else, with --compare, the paper's
    1,000 Stanford Alpaca examples (data/alpaca/alpaca.jsonl, prepared on first use); else the eval
    set's rows."""
    path = config["ranking_set"]
    if not path and config["compare"]:
        path = ROOT / "data" / "alpaca" / "alpaca.jsonl"
        chat.prepare_data("alpaca", path)
    if not path:
        return [r for r in rows if r["reference"] is not None], config["eval_set"]
    return [r for r in chat.read_instructions(path) if r["reference"] is not None], str(path)


def markdown(results, compare, ranked_on):
    """The table: one row per model, with the paper's numbers beside ours after --compare."""
    head = f"| model | stop % | length | repeat % | breaks % | ref NLL | ranking % ({ranked_on}) |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if compare:
        head += " paper: win % vs instruction-tuned | paper: ranking % |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    for label, m in results.items():
        line = (f"| {label} | {m['stop']:.0f} | {m['length']:.0f} | {m['repeat']:.1f} | "
                f"{m['breaks']:.0f} | {cell(m.get('nll'), '.3f')} | "
                f"{cell(m.get('ranking'), '.1f')} |")
        if compare:
            win, ranking = PAPER.get(label, (None, None))
            line += f" {cell(win, '.1f')} | {cell(ranking, '.1f')} |"
        lines.append(line)
    return "\n".join(lines)


def chart(results, path):
    """Each measurement a panel, a bar per model."""
    plt = pyplot(path)
    if plt is None:
        return
    panels = [("stop", "stop %"), ("repeat", "repeated 4-grams %"), ("breaks", "format breaks %"),
              ("ranking", "ranking %")]
    size = (4 * len(panels), 0.45 * len(results) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=size, sharey=True)
    labels = list(results)
    for ax, (key, title) in zip(axes, panels):
        values = [results[label].get(key) or 0 for label in labels]  # no ranking: an empty bar
        bars = ax.barh(labels, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.set(xlim=(0, 105))
        ax.set_title(title, fontsize=10)
    axes[0].invert_yaxis()  # first model on top
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_ranges(config, RANGES)
    device, dtype = machine(config)
    out_dir = Path(config["out_dir"])
    limit = config["max_new_tokens"]
    # 1) the instructions, the ranking set and every file this command writes, checked before
    #    anything is trained
    rows = chat.read_eval_set(config["eval_set"])
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked, ranked_file = ranking_set(config, rows)  # a missing file fails now, not after training
    if not config["compare"] and not config["models"].split():
        raise ValueError("--models is empty: name at least one model (e.g. "
                         "--models='gpt2 gpt2+rules')")
    if config["compare"]:
        labels = [label for label, _, _ in rule_models(config["base"], limit)]
        labels += [label for label, _, _ in finetuned_runs(config)]
    else:
        labels = config["models"].split()
    outputs = {}
    for name in ("results.md", "results.json", "results.png"):
        outputs[f"--out_dir's {name}"] = out_dir / name
    for label in labels:
        outputs[f"--out_dir's {file_name(label)}.json"] = out_dir / f"{file_name(label)}.json"
    refuse_overwriting(outputs, {"--eval_set": config["eval_set"], "--ranking_set": ranked_file})
    # 2) the models: --compare trains the missing ones; a typo or a half-trained run fails now, not
    #    after an hour of generation
    if config["compare"]:
        models = compared_models(config)
    else:
        models = [(spec, spec, limit) for spec in config["models"].split()]
    for _, spec, _ in models:
        check_finished(spec)
    # 3) measure, one group per model: base, base + rules and the ablations share its passes
    groups = {}
    for label, spec, max_new_tokens in models:
        groups.setdefault(parse_model(spec)[0], []).append((label, spec, max_new_tokens))
    results = {}
    for init_from, members in groups.items():
        specs = [(spec, n) for _, spec, n in members]
        evaluated = evaluate_models(init_from, specs, rows, ranked, config,
                                    device=device, dtype=dtype)
        for (label, spec, max_new_tokens), (metrics, alpaca) in zip(members, evaluated):
            results[label] = {"model": spec, "max_new_tokens": max_new_tokens, **metrics}
            answers = json.dumps(alpaca, indent=2, ensure_ascii=False)
            chat.write_atomic(out_dir / f"{file_name(label)}.json", answers)
    # 4) the table in the order asked, the chart and the files
    results = {label: results[label] for label, _, _ in models}
    table = markdown(results, config["compare"], f"{Path(ranked_file).stem}, {len(ranked):,}")
    print(table)
    chat.write_atomic(out_dir / "results.md", table + "\n")
    paper = PAPER if config["compare"] else None
    summary = {"eval_set": config["eval_set"], "ranking_set": ranked_file, "results": results,
               "paper": paper}
    chat.write_atomic(out_dir / "results.json", json.dumps(summary, indent=2))
    chart(results, out_dir / "results.png")
    print(f"wrote {out_dir}/results.md, results.json, results.png and one AlpacaEval file per "
          f"model", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "the files written so far are kept (each model's answers, finetuned runs to "
                   "resume); the table was not written")
