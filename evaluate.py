"""
Measure instruction following offline, without an API judge, and write files for AlpacaEval when you have one.

    python evaluate.py --models="gpt2 gpt2+rules out/response_tuning"       # any models, one table
    python evaluate.py --compare                                           # the paper's whole comparison
    python evaluate.py --compare --base=gpt2-medium --eval_set=data/alpaca_eval/alpaca_eval.jsonl
    python evaluate.py --similarity                # after --compare: the single-task models' response similarity
    python evaluate.py --tinyworld                 # TinyWorld: every method, 3 seeds, judged exactly, on a CPU
    python evaluate.py --epoch_sweep=response_tuning --eval_set=val.jsonl   # pick a run's epochs (docs/epochs.md)

A model is a GPT-2 name, an HF directory or .safetensors file, or a train.py out_dir, optionally followed by
`+rules` (all three rules) or `+rules=eos,uniform` (a subset). For each model this prints and writes:

  stop %         responses that end with <|endoftext|> before --max_new_tokens (or the context) runs out
  length         mean response length in tokens
  repeat %       share of a response's 4-grams that repeat an earlier 4-gram of it (mean over responses)
  breaks %       responses that open a new <|user|>/<|assistant|> turn or restate the instruction
  ref NLL        mean per-token NLL of the eval set's reference responses given their instructions
  ranking %      the paper's Table 2: how often an instruction's own reference response is more likely, per
                 token, than another instruction's response under the same instruction (5 random draws each)

--compare runs base, base + rules, the three leave-one-rule-out ablations, the instruction- and response-tuned
models and the five single-task models (training any that --out_dir lacks with config/*.toml), ranks on the
paper's 1,000 Stanford Alpaca examples, and puts the paper's numbers beside ours. Files in --out_dir:
results.md, results.json, results.png, and <model>.json in AlpacaEval's format (`alpaca_eval --model_outputs
out/eval/response-tuned.json --reference_outputs out/eval/instruction-tuned.json`). --similarity then draws,
for each single-task model, how close its responses are to its finetuning responses against how close the
instruction is to its finetuning instructions (section 5.2; similarity-<task>.png, similarity.json).

--tinyworld runs the same comparison in a synthetic world (data/tinyworld/README.md) where every answer can be
checked exactly: for each of --seeds, the shipped pretrained base (or one pretrained now, --from_scratch), its
rule models, and the instruction-, response- and poem-tuned models (finetuned now by train.py), each judged on
the world's test (or dev) set: correct % on the held-out and finetuned families, stop %, ranking %; mean ± sd
over seeds in out/tinyworld/results.{md,json,png}, every model's answers in out/tinyworld/seed<N>/.

--epoch_sweep=NAME picks a run's epochs as the official scripts did (finetune_{5,7,10,15,20}e.sh: each count
trained, then judged on the 56 instructions of eval/val_eval/val.jsonl), without their GPT-4 judge: it trains
config/NAME.toml from --base at each of --epoch_counts, a run of its own per count, and reports each one's final
validation loss and the proxies above on --eval_set, in out/epochs/NAME/results.{md,json,png}, with each count's
answers in AlpacaEval's format (NAME-<N>e.json) for the judge, if you have one.
"""
import hashlib
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
from checkpoint import progress, unfinished
from cli import (DEVICE_FLAGS, DEVICE_RANGES, Stopped, autocast, check_ranges, for_inference, on_sigterm, parse_flags,
                 pick_device, pick_dtype, pyplot, read_toml, refuse_overwriting, use_threads)
from model import EOT, GPT, varying_lengths
from rules import NO_RULES, RuleState, parse_rules, product_of_experts, respond

ROOT = Path(__file__).resolve().parent
WORLD = ROOT / "data" / "tinyworld"
sys.path.insert(0, str(WORLD))
import world  # noqa: E402  TinyWorld's task families and their exact checkers

# ----------------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "models": ("gpt2 gpt2+rules", "models to evaluate, separated by spaces (NAME, NAME+rules, NAME+rules=eos,...)"),
    "compare": (False, "evaluate the paper's whole comparison at --base instead of --models"),
    "similarity": (False, "after --compare: the response-similarity analysis of its single-task models (section 5.2)"),
    "base": ("gpt2", "with --compare or --epoch_sweep: the pretrained model every method starts from"),
    "instruction_data": ("lima", "with --compare: data of the instruction-tuned baseline"),
    "response_data": ("lima_responses", "with --compare: data of the response-tuned model"),
    "tasks": ("gsm8k mbpp recipes chess poetry", "with --compare: the single-task models, each trained by config/<task>.toml"),
    "task_data": ("", "with --compare: train every single-task model on this data instead (smoke runs)"),
    "train_args": ("", "with --compare or --epoch_sweep: extra train.py flags for models it has to train, e.g. "
                       "'--max_iters=5'"),
    "eval_set": ("data/eval/eval.jsonl", "instructions to answer (with 'reference' answers for NLL): JSONL or JSON"),
    "ranking_set": ("", "instructions with references to rank: by default the paper's 1,000 Stanford Alpaca "
                        "examples with --compare (data/alpaca, prepared on first use), --eval_set with --models"),
    "out_dir": ("out/eval", "where results and AlpacaEval files go; --compare also trains into out/; "
                            "--epoch_sweep: out/epochs/<name> unless given, its runs in runs/ there"),
    "max_new_tokens": (1024, "generation limit; 1024 = until <|endoftext|> or the end of GPT-2's context, as the "
                             "official evaluation (its context); --compare gives the no-EOS-rule model 512, as it does"),
    "batch_size": (8, "prompts generated, or responses scored, together"),
    "compile": (False, "generate through torch.compile in fixed shapes (CUDA graphs on a GPU; the same tokens)"),
    "negatives": (5, "ranking: other instructions' responses compared with each instruction's own"),
    "seed": (0, "seeds the ranking's draws; 0 is the official ratio_eval.py's random.seed(0): the same pairs"),
    "tinyworld": (False, "TinyWorld's whole comparison over --seeds, judged exactly (data/tinyworld/README.md)"),
    "seeds": ("1 2 3", "with --tinyworld: the pretraining seeds (bases shipped in data/tinyworld/bases/seedN)"),
    "split": ("test", "with --tinyworld: test (the reported table) or dev (the set settings are chosen on)"),
    "from_scratch": (False, "with --tinyworld: pretrain every seed's base (config/tinyworld_pretrain.toml) "
                            "instead of starting from the shipped ones"),
    "lr_sweep": ("", "with --tinyworld: response-tuning learning rates to try instead of the table, e.g. "
                     "'3e-5 1e-4 3e-4 1e-3' (lr_sweep.png)"),
    "epoch_sweep": ("", "a run, config/<name>.toml, to train at each of --epoch_counts and measure on --eval_set: "
                        "how the official scripts picked its epochs, without their judge (docs/epochs.md)"),
    "epoch_counts": ("5 7 10 15 20", "with --epoch_sweep: the epochs to try, each a run of its own (the official "
                                     "finetune_{5,7,10,15,20}e.sh)"),
    **DEVICE_FLAGS,  # --device, --dtype: as in train.py
}
RANGES = {"max_new_tokens": "[1, inf)", "batch_size": "[1, inf)", "negatives": "[1, inf)", "seed": "[0, 1e18]",
          **DEVICE_RANGES}
NO_EOS_LIMIT = 512  # official README: the models without the EOS rule generate at most 512 new tokens
# The paper's numbers (Llama-2-7B, Tables 1-2): AlpacaEval win rate against the instruction-tuned model, and
# response ranking (on Stanford Alpaca). Ours are other measurements of the same models, shown beside them.
PAPER = {"base": (2.4, 80.4), "base + rules": (24.4, None), "no EOS rule": (10.4, None),
         "no diversity rule": (14.3, None), "no uniform rule": (16.3, None),
         "instruction-tuned": (50.0, 77.4), "response-tuned": (43.3, None), "gsm8k-tuned": (23.7, None),
         "mbpp-tuned": (16.9, None), "recipes-tuned": (14.6, None), "chess-tuned": (2.1, None),
         "poetry-tuned": (22.9, None)}
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


def encode_pair(instruction, response, block_size):
    """(ids, prompt_len) of a one-turn conversation in the chat format, cut to block_size + 1 tokens: the
    response's end is cut (as the official max_seq_length does), and a prompt too long alone loses its start."""
    # the training format, instruction stripped: the official ratio_eval.py scores with finetune.py's encoder (a
    # generation prompt, chat.encode_prompt, keeps the instruction as given, as eval/templates.py does)
    ids, mask = chat.encode_chat([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}])
    prompt, target = ids[:mask.index(1)], ids[mask.index(1):]  # target: the response and its <|endoftext|>
    target = target[:max(1, block_size + 1 - len(prompt))]
    ids = (prompt + target)[-block_size - 1:]
    return ids, len(ids) - len(target)


@torch.no_grad()
def score_responses(model, rule_sets, pairs, device, dtype, batch_size=8):
    """[(instruction, response)] -> for each of `rule_sets`, the log-probability of each token of each response
    and of the <|endoftext|> closing it, given its instruction in the chat format, under the model (times the
    rules when on: the same product of experts the sampler uses). Pairs of similar length are scored together,
    right-padded; the rule sets share the model's forward passes (base, base + rules and the ablations of
    --compare read the references once)."""
    encoded = [encode_pair(q, r, model.config.block_size) for q, r in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(encoded[k][0]))
    out = [[None] * len(pairs) for _ in rule_sets]
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", file=sys.stderr, leave=False):
        chunk = order[start:start + batch_size]
        for scored, per_rule_set in zip(out, score_batch(model, rule_sets, [encoded[k] for k in chunk], device, dtype)):
            for k, logprobs in zip(chunk, per_rule_set):
                scored[k] = logprobs
    return out


def score_batch(model, rule_sets, batch, device, dtype, chunk=64):
    B, L = len(batch), max(len(ids) for ids, _ in batch) - 1
    x = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, max(len(ids) - p for ids, p in batch)), EOT, dtype=torch.long)  # (B, T), padded
    for b, (ids, p) in enumerate(batch):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[b, :len(ids) - p] = torch.tensor(ids[p:])
    x, targets = x.to(device), targets.to(device)
    rows = model.vocab.rows(targets)  # the targets' rows of lm_head (the ids themselves for GPT-2)
    first = torch.tensor([p - 1 for _, p in batch], device=device)  # the position that predicts each first target
    states = [RuleState([ids[:p] for ids, p in batch], r, device) if r.on else None for r in rule_sets]
    picked = [[] for _ in rule_sets]  # per rule set, (B, n) log-probs of the targets, `chunk` positions at a time
    with autocast(device, dtype), varying_lengths():  # every batch has a length of its own
        h = model.hidden(x)  # (B, L, C): right padding is never seen by the real tokens before it
        for t0 in range(0, targets.size(1), chunk):
            span = torch.arange(t0, min(t0 + chunk, targets.size(1)), device=device)
            positions = (first[:, None] + span[None, :]).clamp(max=L - 1)  # (B, n); past a row's end: ignored
            logits = model.lm_head(h[torch.arange(B, device=device)[:, None], positions]).float()  # (B, n, V)
            plain = F.log_softmax(logits, dim=-1).gather(2, rows[:, span, None])[..., 0] \
                if any(state is None for state in states) else None
            for state, scored in zip(states, picked):
                if state is None:
                    scored.append(plain)
                    continue
                for k, t in enumerate(span.tolist()):  # the rules' scores depend on the response so far: in steps
                    # over a restricted vocabulary's own ids: the rule LM's normalizer there differs by a
                    # constant, which the product's renormalization removes
                    logprobs = product_of_experts(logits[:, k], model.vocab.own(state.scores()))  # (B, V)
                    scored.append(logprobs.gather(1, rows[:, t:t + 1]))
                    state.update(targets[:, t])
    picked = [torch.cat(scored, dim=1).cpu() for scored in picked]  # each (B, T)
    return [[scored[b, :len(ids) - p] for b, (ids, p) in enumerate(batch)] for scored in picked]


def ranking_draws(n, negatives, seed):
    """The pairs the paper's response ranking compares (Table 2): for each instruction i, `negatives`
    responses j drawn at random from all n, with replacement, as the official ratio_eval.py draws them; a
    draw of i's own response is not a comparison and is skipped (plot_ratios.py). Returns [(i, j)]."""
    rng = random.Random(seed)
    draws = []
    for i in range(n):
        for _ in range(negatives):
            j = rng.randint(0, n - 1)
            if j != i:
                draws.append((i, j))
    return draws


def ranking_win_rate(score, n, negatives, seed):
    """The paper's response ranking: for each pair (i, j) of ranking_draws, instruction i's own response
    against response j, both scored under instruction i by score(i, j) (mean log-prob per token, so the order
    of exp(-mean NLL) that the official ratio_eval.py computes). Returns the share of comparisons, in %, that
    the own response wins outright: a tie is not a win."""
    draws = ranking_draws(n, negatives, seed)
    wins = 0
    for i, j in draws:
        wins += score(i, i) > score(i, j)
    return 100 * wins / max(len(draws), 1)


def parse_model(spec):
    """'NAME', 'NAME+rules' or 'NAME+rules=eos,uniform' -> (NAME, RuleSet; NO_RULES without +rules)."""
    init_from, with_rules, rule_text = spec.partition("+rules")
    try:
        return init_from, parse_rules(rule_text.removeprefix("=") or "all") if with_rules else NO_RULES
    except ValueError as e:
        raise ValueError(f"--models: {spec}: {str(e).split(': ', 1)[1]}") from None


def score_pairs(model, rule_sets, rows, pairs, config, device, dtype):
    """For each of `rule_sets`, {(i, j): log-probs of row j's reference response under row i's instruction} for
    the pairs asked."""
    unique = sorted(set(pairs))
    scored = score_responses(model, rule_sets, [(rows[i]["instruction"], rows[j]["reference"]) for i, j in unique],
                             device, dtype, config["batch_size"])
    return [dict(zip(unique, logprobs)) for logprobs in scored]


def evaluate_models(init_from, specs, rows, ranked, config, device, dtype):
    """Every spec [(spec, max_new_tokens)] over one model (init_from alone, or with rules): generate for every
    instruction of `rows`, then score their references and rank the responses of `ranked` (rows with
    references) for all specs in one pass of the model -> [(metrics, AlpacaEval rows)], one per spec."""
    model = for_inference(GPT.from_pretrained(init_from), device, dtype)
    rule_sets, metrics, alpaca = [parse_model(spec)[1] for spec, _ in specs], [], []
    for (spec, max_new_tokens), rule_set in zip(specs, rule_sets):
        outputs = []
        for i in tqdm(range(0, len(rows), config["batch_size"]), desc=f"{spec}: generating", file=sys.stderr):
            batch = rows[i:i + config["batch_size"]]
            outputs += respond(model, [chat.encode_prompt(r["instruction"]) for r in batch],
                               {**config, "max_new_tokens": max_new_tokens, "greedy": True, "temperature": 1.0,
                                "top_k": 0, "top_p": 1.0}, rule_set, device, dtype)
        metrics.append(proxies(outputs, [r["instruction"] for r in rows]))
        alpaca.append([{"instruction": r["instruction"], "output": chat.decode(out).strip(), "generator": spec,
                        "dataset": r["dataset"]} for r, out in zip(rows, outputs)])
    tables = []
    if len(ranked) >= 2:  # the ranking's draws depend on the seed alone: score every pair at once, batched
        draws = ranking_draws(len(ranked), config["negatives"], config["seed"])  # [(i, j)], j != i
        own = [(i, i) for i in range(len(ranked))]
        tables = score_pairs(model, rule_sets, ranked, own + draws, config, device, dtype)
        for m, table in zip(metrics, tables):
            def score(i, j):  # response j's mean log-prob per token under instruction i (used at once)
                return table[(i, j)].mean().item()
            m["ranking"] = ranking_win_rate(score, len(ranked), config["negatives"], config["seed"])
    references = [r for r in rows if r["reference"] is not None]
    if references:  # the ranking scored every own response already when it ranked these same rows
        owns = tables if ranked == references and tables else \
            score_pairs(model, rule_sets, references, [(i, i) for i in range(len(references))], config, device, dtype)
        for m, own in zip(metrics, owns):
            m["nll"] = -torch.cat([own[(i, i)] for i in range(len(references))]).mean().item()
    return list(zip(metrics, alpaca))


# ------------------------------------------------------------------------------------------- the comparison

def rule_models(base, limit):
    """The base model, with all rules, and without each rule: [(label, spec, max_new_tokens)]. As the official
    README says, the models without the EOS rule (which rarely stop) generate at most 512 new tokens."""
    return [("base", base, limit), ("base + rules", f"{base}+rules", limit),
            ("no EOS rule", f"{base}+rules=diversity,uniform", min(limit, NO_EOS_LIMIT)),
            ("no diversity rule", f"{base}+rules=eos,uniform", limit), ("no uniform rule", f"{base}+rules=eos,diversity", limit)]


def run_train(args, config):
    """python train.py ARGS in a process of its own (a script does not import another); fails loudly. Ctrl-C or
    SIGTERM here is passed on: train.py finishes its step, checkpoints and exits, and we wait for it (a second
    Ctrl-C stops it at once), so a stopped comparison can be resumed where its training stopped."""
    command = [sys.executable, str(ROOT / "train.py"), *args, f"--device={config['device']}", f"--threads={config['threads']}"]
    child = subprocess.Popen(command)
    try:
        code = child.wait()
    except (KeyboardInterrupt, Stopped) as e:
        child.send_signal(signal.SIGTERM if isinstance(e, Stopped) else signal.SIGINT)
        try:
            child.wait()
        except (KeyboardInterrupt, Stopped):
            child.kill()
            child.wait()
        raise
    if code != 0:
        raise OSError(f"training failed: {' '.join(command)}")


def train_settings(args):
    """The settings (what defines a run) that train.py ARGS would train with, as train.py itself resolves them."""
    command = [sys.executable, str(ROOT / "train.py"), *args, "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"--train_args: {result.stderr.strip().splitlines()[-1].removeprefix('error: ')}")
    return json.loads(result.stdout)


def comparison(config):
    """The paper's models at --base: [(label, spec, max_new_tokens)], training the finetuned ones missing and
    finishing the ones stopped."""
    base, limit = config["base"], config["max_new_tokens"]
    models = rule_models(base, limit)
    for label, run, data in finetuned_runs(config):
        args = [str(ROOT / "config" / f"{run}.toml"), f"--init_from={base}", f"--data={data}", *config["train_args"].split()]
        out = find_run(config, run, args)
        train_if_missing(f"{label} ({data})", args, out, config)
        models.append((label, str(out), limit))
    return models


def finetuned_runs(config):
    """The finetuned models of --compare: [(label, config/<run>.toml, data)]."""
    runs = [("instruction-tuned", "instruction_tuning", config["instruction_data"]),
            ("response-tuned", "response_tuning", config["response_data"])]
    return runs + [(f"{task}-tuned", task, config["task_data"] or task) for task in config["tasks"].split()]


def find_run(config, run, args):
    """Where --compare takes the model that `train.py ARGS` trains: the directory the README's command puts it in
    (the config's own out_dir, e.g. out/response_tuning) if the run there has exactly the settings ARGS give
    (base, data, steps, learning rate, seed, loss, --train_args: train_settings); else out_dir/runs/<base>_<run>_
    <a hash of ARGS>, trained there if missing, so that runs with other settings never stand in for each other.
    A run found is checked against the settings, so that one trained by another version of train.py (other
    defaults) is never taken either."""
    own = Path(read_toml(ROOT / "config" / f"{run}.toml").get("out_dir", ""))
    state = progress(own) if str(own) not in ("", ".") else None
    wanted = train_settings(args) if state is not None else None
    if state is not None and state["settings"] == wanted:
        return own
    if state is not None:
        differ = sorted(k for k in wanted.keys() | state["settings"].keys() if state["settings"].get(k) != wanted.get(k))
        print(f"{own} holds a run with other settings ({', '.join(differ[:4])}): not used", file=sys.stderr)
    digest = hashlib.sha256(json.dumps([run, *args[1:]]).encode()).hexdigest()[:8]  # the TOML by name, not path
    out = Path(config["out_dir"]) / "runs" / f"{Path(config['base']).name}_{run}_{digest}"
    state = progress(out)
    if state is not None and state["settings"] != (wanted or train_settings(args)):
        raise ValueError(f"{out} holds a run with other settings than train.py {' '.join(args[1:])} gives now (an "
                         f"older version's defaults?); move it away to train it anew")
    return out


def check_finished(spec):
    """A model that is a train.py run must be a finished one: a half-trained model is not a result."""
    init_from, _ = parse_model(spec)
    why = unfinished(init_from) if Path(init_from).is_dir() else None
    if why:
        raise ValueError(why)


def ranking_set(config, rows):
    """(rows with references to rank, their file): --ranking_set; else, with --compare, the paper's 1,000 Stanford
    Alpaca examples (data/alpaca/alpaca.jsonl, prepared on first use); else the eval set's rows."""
    path = config["ranking_set"]
    if not path and config["compare"]:
        path = ROOT / "data" / "alpaca" / "alpaca.jsonl"
        chat.prepare_data("alpaca", path)
    if not path:
        return [r for r in rows if r["reference"] is not None], config["eval_set"]
    return [r for r in chat.read_instructions(path) if r["reference"] is not None], str(path)


def cell(value, spec):
    """A table cell: the value formatted, or "–" where there is none."""
    if value is None:
        return "–"
    return format(value, spec)


def markdown(results, compare, ranked_on):
    head = f"| model | stop % | length | repeat % | breaks % | ref NLL | ranking % ({ranked_on}) |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if compare:
        head += " paper: win % vs instruction-tuned | paper: ranking % |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    for label, m in results.items():
        line = (f"| {label} | {m['stop']:.0f} | {m['length']:.0f} | {m['repeat']:.1f} | {m['breaks']:.0f} | "
                f"{cell(m.get('nll'), '.3f')} | {cell(m.get('ranking'), '.1f')} |")
        if compare:
            win, ranking = PAPER.get(label, (None, None))
            line += f" {cell(win, '.1f')} | {cell(ranking, '.1f')} |"
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


# ------------------------------------------------------------------------------------- response similarity

@torch.no_grad()
def embed(model, texts, device, dtype, batch_size=8):
    """One vector per text (N, C): the mean of the model's final hidden states over the text's tokens (its first
    block_size). The official plot_embeds.py mean-pools nomic-embed-text-v1 the same way; no such model can be
    downloaded here, so the base GPT-2 stands in for it (the model every compared model started from)."""
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch", file=sys.stderr, leave=False):
        ids = [chat.encode(text)[:model.config.block_size] or [EOT] for text in texts[start:start + batch_size]]
        x, mask = torch.full((len(ids), max(map(len, ids))), EOT), torch.zeros(len(ids), max(map(len, ids)))
        for b, seq in enumerate(ids):
            x[b, :len(seq)], mask[b, :len(seq)] = torch.tensor(seq), 1
        with autocast(device, dtype), varying_lengths():
            h = model.hidden(x.to(device)).float().cpu()  # (B, T, C); right padding: real tokens never see it
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def similarity_axes(asked, answered, task_asked, task_answered, reference_answered):
    """The two numbers the official plot_embeds.py computes for each evaluation instruction, from unit vectors
    (rows): x = its mean cosine similarity to the task's finetuning instructions; y = the mean cosine
    similarity of the model's response to the task's finetuning responses minus that to the reference (LIMA)
    responses. The paper's finding (section 5.2): y falls as x falls, so far from its domain a single-task
    model does not answer in its domain's style."""
    x = (asked @ task_asked.T).mean(1)
    y = (answered @ task_answered.T).mean(1) - (answered @ reference_answered.T).mean(1)
    return x, y


def similarity(config, device, dtype):
    """Section 5.2 for each single-task model of --compare: similarity-<task>.png, and per model the
    correlation of x and y (similarity_axes) and the mean of y, in similarity.json."""
    out_dir, tasks = Path(config["out_dir"]), config["tasks"].split()
    paths = {task: out_dir / f"{file_name(f'{task}-tuned')}.json" for task in tasks}
    for task, path in paths.items():  # before anything is downloaded
        if not path.is_file():
            raise OSError(f"{path}: no answers of the {task}-tuned model; run python evaluate.py --compare first")
    groups = {"reference": [c[1]["content"] for c in chat.read_conversations(chat.data_files(config["instruction_data"])[0])]}
    for task, path in paths.items():
        answers = json.loads(path.read_text(encoding="utf-8"))
        finetuning = chat.read_conversations(chat.data_files(config["task_data"] or task)[0])
        groups |= {(task, "asked"): [a["instruction"] for a in answers], (task, "answered"): [a["output"] for a in answers],
                   (task, "task_asked"): [c[0]["content"] for c in finetuning],
                   (task, "task_answered"): [c[1]["content"] for c in finetuning]}
    model = for_inference(GPT.from_pretrained(config["base"]), device, dtype)
    vectors = embed(model, [text for texts in groups.values() for text in texts], device, dtype, config["batch_size"])
    # GPT-2's hidden states share one large common direction (Ethayarajh, 2019: its last layer's cosines are all
    # near 1), so they are centered on the mean of everything embedded before they are normalized
    vectors = F.normalize(vectors - vectors.mean(0), dim=1).split([len(texts) for texts in groups.values()])
    vectors = dict(zip(groups, vectors))
    results, plt = {}, pyplot("the similarity plots")
    for task in tasks:
        x, y = similarity_axes(*(vectors[(task, k)] for k in ("asked", "answered", "task_asked", "task_answered")),
                               vectors["reference"])
        r = torch.corrcoef(torch.stack([x, y]))[0, 1].item() if len(x) > 1 else float("nan")
        results[task] = {"r": r, "mean_y": y.mean().item(), "x": x.tolist(), "y": y.tolist()}
        if plt is not None:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            ax.scatter(x, y, s=12)
            ax.axhline(0, color="gray", lw=0.5)
            ax.set(title=f"{task}-tuned: response vs instruction similarity (r = {r:.2f})",
                   xlabel=f"instruction similarity to the {task} instructions",
                   ylabel=f"response similarity to {task} over {config['instruction_data']}")
            fig.tight_layout()
            fig.savefig(out_dir / f"similarity-{task}.png", dpi=120)
            plt.close(fig)
    print("| single-task model | instructions | r(instruction sim, response sim) | mean response sim over reference |")
    print("| --- | ---: | ---: | ---: |")
    for task, m in results.items():
        print(f"| {task}-tuned | {len(m['x'])} | {m['r']:.3f} | {m['mean_y']:+.4f} |")
    summary = {"embedding": f"{config['base']}, mean-pooled, centered", "reference": config["instruction_data"],
               "tasks": results}
    chat.write_atomic(out_dir / "similarity.json", json.dumps(summary, indent=2))
    print(f"wrote {out_dir}/similarity.json and similarity-<task>.png", file=sys.stderr)


# ----------------------------------------------------------------------------- the epoch sweep (validation)

# The official scripts pick each run's epochs per base model: finetune_{5,7,10,15,20}e.sh train it at
# each count and judge each model's answers to eval/val_eval/val.jsonl with AlpacaEval
# (weighted_alpaca_eval_gpt4_turbo) against GPT-3.5's (val-gpt3.5-2.json); the best count goes into
# finetune_seed*.sh (official README, "Response Tuning"). Offline we have no judge: the sweep reports
# what can be measured without one.
JUDGE_NOTE = ("Not the official judge: the official pick "
              "(scripts/iclr2025/*/finetune_{{5,7,10,15,20}}e.sh) judged each count's answers to "
              "eval/val_eval/val.jsonl with AlpacaEval's GPT-4 annotator against GPT-3.5's answers. "
              "These are offline proxies; with an OpenAI key, judge the counts as it did: "
              "alpaca_eval --model_outputs {out}/{name}-<N>e.json "
              "--reference_outputs <official repo>/eval/val_eval/val-gpt3.5-2.json")
EPOCH_PANELS = [("val_loss", "final val loss"), ("stop", "stop %"), ("length", "length (tokens)"),
                ("repeat", "repeated 4-grams %"), ("breaks", "format breaks %"), ("nll", "ref NLL")]


def sweep_plan(config):
    """(name, [epochs]) of --epoch_sweep and --epoch_counts, checked: a run of config/, positive
    counts, each once; --train_args may not set the epochs (the counts do)."""
    for flag in ("compare", "similarity", "tinyworld"):
        if config[flag]:
            raise ValueError(f"--epoch_sweep with --{flag}: choose one")
    name = config["epoch_sweep"]
    known = sorted(path.stem for path in (ROOT / "config").glob("*.toml"))
    if name not in known:
        raise ValueError(f"--epoch_sweep={name}: no such run; expected one of config/*.toml: "
                         f"{', '.join(known)}")
    counts = numbers(config, "epoch_counts", float)
    if not counts:
        raise ValueError("--epoch_counts is empty: name at least one count, e.g. "
                         "--epoch_counts='5 7 10 15 20'")
    if not all(0 < epochs < float("inf") for epochs in counts):
        raise ValueError(f"--epoch_counts={config['epoch_counts']!r}: expected counts above 0")
    if len(set(counts)) < len(counts):
        raise ValueError(f"--epoch_counts={config['epoch_counts']!r}: a count twice (each count is "
                         f"one run)")
    if any(arg.startswith("--epochs") for arg in config["train_args"].split()):
        raise ValueError(f"--train_args={config['train_args']!r}: sets --epochs, which "
                         f"--epoch_counts sets here")
    return name, counts


def sweep_args(config, name, epochs):
    """train.py's arguments for config/<name>.toml at `epochs` from --base. Each count is a run of its
    own: the learning rate decays linearly to 0 at a run's last step (train.get_lr, open-instruct's
    linear schedule), so the first 5 epochs of a 20-epoch run are not a 5-epoch run. The official
    scripts train each count separately too (scripts/iclr2025/expt1_llama/res/finetune_5e.sh ...
    finetune_20e.sh, each with its own --num_train_epochs)."""
    toml = str(ROOT / "config" / f"{name}.toml")
    extra = config["train_args"].split()
    return [toml, f"--init_from={config['base']}", *extra, f"--epochs={epochs!r}"]


def train_if_missing(label, args, out, config):
    """Train `train.py ARGS` into `out` if nothing is there, finish it if it was stopped (a run is never
    measured half-trained), keep it if it is done: the runs of --compare and of --epoch_sweep."""
    if progress(out) is None and not (out / "ckpt.pt").exists():
        print(f"training {label} into {out}", file=sys.stderr)
        run_train([*args, f"--out_dir={out}"], config)
    elif why := unfinished(out):  # a stopped run is finished first, never measured half-trained
        print(f"resuming {out}: {why}", file=sys.stderr)
        run_train(["--init_from=resume", f"--out_dir={out}"], config)
    else:
        print(f"reusing {out} ({label}, finished)", file=sys.stderr)


def final_val_loss(out):
    """The validation loss at a run's last step: train.py logs one at every eval_interval and at the
    final step (train.train, into log.jsonl). None if its data has no val split."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return None
    rows = [row for _, row in chat.json_lines(*chat.read_bytes(path))]
    losses = [row["val_loss"] for row in rows if "val_loss" in row]
    return losses[-1] if losses else None


def epochs_markdown(results, title):
    lines = [title, "",
             "| epochs | steps | final val loss | stop % | length | repeat % | breaks % | ref NLL |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, m in results.items():
        lines.append(f"| {label} | {m['steps']} | {cell(m['val_loss'], '.4f')} | {m['stop']:.0f} | "
                     f"{m['length']:.0f} | {m['repeat']:.1f} | {m['breaks']:.0f} | "
                     f"{cell(m.get('nll'), '.3f')} |")
    return "\n".join(lines)


def epochs_chart(results, path, title):
    """Each measurement against the epoch count, a panel each (those measured: no val loss without a
    val split, no ref NLL without references)."""
    plt = pyplot(path)
    if plt is None:
        return
    panels = [(key, name) for key, name in EPOCH_PANELS
              if any(m.get(key) is not None for m in results.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3))
    for ax, (key, name) in zip(axes, panels):
        points = [(m["epochs"], m[key]) for m in results.values() if m.get(key) is not None]
        epochs = [x for x, _ in points]
        ax.plot(epochs, [y for _, y in points], "o-", color="tab:blue")
        ax.set(xlabel="epochs", xticks=epochs)
        ax.ticklabel_format(axis="y", useOffset=False)  # the values themselves, not offsets from one
        if name.endswith("%"):
            ax.set(ylim=(-2, 102))
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def epoch_sweep(config, device, dtype):
    """python evaluate.py --epoch_sweep=NAME: config/NAME.toml trained from --base at each of
    --epoch_counts, and each run measured: its final val loss, and the proxies of its greedy answers to
    --eval_set. A finished run of the same settings is reused (find_run: the config's own out_dir too),
    a stopped one finished, one of other settings refused. Writes results.{md,json,png} and
    NAME-<N>e.json (AlpacaEval's format) into --out_dir (default out/epochs/NAME)."""
    # 1) every flag, the eval set and every run's directory, checked before anything is written
    name, counts = sweep_plan(config)
    if config["out_dir"] == DEFAULTS["out_dir"][0]:
        config = {**config, "out_dir": f"out/epochs/{name}"}
    out_dir = Path(config["out_dir"])
    settings = train_settings(sweep_args(config, name, counts[0]))  # a bad --train_args: one line
    if settings["max_iters"]:
        raise ValueError(f"--epoch_sweep={name}: config/{name}.toml or --train_args sets max_iters="
                         f"{settings['max_iters']}, which fixes the steps whatever the epochs; add "
                         f"--max_iters=0 to --train_args")
    rows = read_eval_set(config["eval_set"])
    labels = [f"{epochs:g}" for epochs in counts]
    files = ["results.md", "results.json", "results.png"]
    files += [f"{name}-{label}e.json" for label in labels]
    refuse_overwriting({f"--out_dir's {file}": out_dir / file for file in files},
                       {"--eval_set": config["eval_set"]})
    args = {label: sweep_args(config, name, epochs) for label, epochs in zip(labels, counts)}
    runs = {label: find_run(config, name, args[label]) for label in labels}  # other settings: refused

    # 2) train every count missing, a run each (sweep_args says why)
    for label in labels:
        train_if_missing(f"{name} at {label} epochs", args[label], runs[label], config)

    # 3) measure every run; each count's answers are kept as it ends
    results = {}
    for label, epochs in zip(labels, counts):
        spec = str(runs[label])
        specs = [(spec, config["max_new_tokens"])]
        [(metrics, alpaca)] = evaluate_models(spec, specs, rows, [], config, device, dtype)
        steps = progress(runs[label])["max_iters"]
        results[label] = {"epochs": epochs, "run": spec, "steps": steps,
                          "val_loss": final_val_loss(runs[label]), **metrics}
        answers = json.dumps(alpaca, indent=2, ensure_ascii=False)
        chat.write_atomic(out_dir / f"{name}-{label}e.json", answers)

    # 4) the table, the note on the judge, the files
    title = (f"{name} from {config['base']} at each epoch count: greedy answers to "
             f"{config['eval_set']} ({len(rows)} instructions)")
    table = epochs_markdown(results, title)
    note = JUDGE_NOTE.format(out=out_dir, name=name)
    print(table)
    print(f"\n{note}")
    chat.write_atomic(out_dir / "results.md", f"{table}\n\n{note}\n")
    summary = {"run": name, "base": config["base"], "train_args": config["train_args"],
               "eval_set": config["eval_set"], "judge": note, "results": results}
    chat.write_atomic(out_dir / "results.json", json.dumps(summary, indent=2))
    epochs_chart(results, out_dir / "results.png", f"{name} from {config['base']}")
    print(f"wrote {out_dir}/results.md, results.json, results.png and {name}-<N>e.json per count",
          file=sys.stderr)


# ----------------------------------------------------------------------------- TinyWorld: the exact judge

WORLD_LIMIT = 64  # new tokens per answer: every reference answer is far shorter
WORLD_BATCH = 64  # prompts generated, or pairs scored, together: the model is tiny
WORLD_RUNS = [("instruction-tuned", "tinyworld_instruction"), ("response-tuned", "tinyworld_responses"),
              ("poetry-tuned", "tinyworld_poem")]  # (label, config/<name>.toml): the single task is the poem


def judge(model, rule_set, rows, device, dtype):
    """Greedy answers to every row's instruction in the chat format, judged exactly: an answer is correct when it
    ends with <|endoftext|> (the model stopped) and its family's checker (data/tinyworld/world.py) accepts it.
    `answered`: the checker accepts the text before any new <|user|> turn, stopped or not (what the model knew)."""
    settings = {"max_new_tokens": WORLD_LIMIT, "greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0,
                "compile": False}
    judged = []
    for i in range(0, len(rows), WORLD_BATCH):
        batch = rows[i:i + WORLD_BATCH]
        answers = respond(model, [chat.encode_prompt(r["instruction"]) for r in batch], settings, rule_set, device, dtype)
        for row, tokens in zip(batch, answers):
            text, stopped = chat.decode(tokens).strip(), tokens[-1:] == [EOT]
            judged.append({"family": row["family"], "instruction": row["instruction"], "response": text,
                           "stopped": stopped, "correct": stopped and world.check(row, text),
                           "answered": world.check(row, text.split("<|user|>")[0])})
    return judged


def world_ranking(model, rule_set, rows, config, device, dtype):
    """The paper's response ranking (Table 2) in the world: under each instruction, its own reference answer
    against one answer of every other family (that family's row at the same index, cycled); the % of
    comparisons the own answer wins on mean log-probability per token."""
    by_family = {f: [k for k, r in enumerate(rows) if r["family"] == f] for f in world.FAMILIES}
    others = [(i, ks[i % len(ks)]) for i, r in enumerate(rows) for f, ks in by_family.items() if f != r["family"] and ks]
    ranked = [{"instruction": r["instruction"], "reference": r["answer"]} for r in rows]
    pairs = others + [(i, i) for i in range(len(rows))]
    table = score_pairs(model, [rule_set], ranked, pairs, {**config, "batch_size": WORLD_BATCH}, device, dtype)[0]
    mean = {pair: logprobs.mean().item() for pair, logprobs in table.items()}
    return 100 * sum(mean[(i, i)] > mean[(i, j)] for i, j in others) / len(others)


def world_metrics(judged, ranking):
    """Correct % on the held-out and the finetuned families and on each family, answered % (held-out), stop %,
    ranking %."""
    share = lambda rows, key: 100 * sum(r[key] for r in rows) / max(1, len(rows))  # noqa: E731
    held_out = [r for r in judged if r["family"] in world.HELD_OUT]
    metrics = {"held-out": share(held_out, "correct"), "answered": share(held_out, "answered"),
               "finetuned": share([r for r in judged if r["family"] in world.FINETUNED], "correct"),
               "stop": share(judged, "stopped"), "ranking": ranking}
    return {**metrics, **{f: share([r for r in judged if r["family"] == f], "correct") for f in world.FAMILIES}}


def world_base(seed, config, out):
    """The pretrained base of a seed: shipped in data/tinyworld/bases/seed<N>, or pretrained now (--from_scratch)."""
    if config["from_scratch"]:
        run_train([str(ROOT / "config" / "tinyworld_pretrain.toml"), f"--seed={seed}", f"--out_dir={out / 'base'}",
                   "--overwrite"], config)
        return out / "base"
    base = WORLD / "bases" / f"seed{seed}"
    if not (base / "model.safetensors").is_file():
        raise FileNotFoundError(f"{base}: no shipped base for seed {seed}; add --from_scratch to pretrain it")
    return base


def world_seed(seed, rows, runs, with_rules, config, device, dtype):
    """Every model of one pretraining seed, judged: {label: metrics}. runs: [(label, config name, lr or None)],
    each finetuned now from the seed's base into out_dir/seed<N>/; each model's judged answers go there too."""
    out = Path(config["out_dir"]) / f"seed{seed}"
    base = world_base(seed, config, out)
    models = [(label, spec) for label, spec, _ in rule_models(str(base), WORLD_LIMIT)] if with_rules else []
    for label, run, lr in runs:
        run_dir = out / file_name(label)
        run_train([str(ROOT / "config" / f"{run}.toml"), f"--init_from={base}", f"--seed={seed}", f"--out_dir={run_dir}",
                   "--overwrite", *([f"--learning_rate={lr}"] if lr else [])], config)  # this command's own runs
        models.append((label, str(run_dir)))
    results = {}
    for label, spec in tqdm(models, desc=f"seed {seed}: judging", file=sys.stderr):
        init_from, rule_set = parse_model(spec)
        model = for_inference(GPT.from_pretrained(init_from), device, dtype)
        judged = judge(model, rule_set, rows, device, dtype)
        results[label] = world_metrics(judged, world_ranking(model, rule_set, rows, config, device, dtype))
        chat.write_jsonl(out / f"{file_name(label)}.jsonl", judged)
    return results


def sd(values):
    """The sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values):
    """'mean ± sd' of one metric over seeds."""
    return f"{statistics.mean(values):.1f} ± {sd(values):.1f}"


def world_markdown(by_seed):
    """The table over seeds: each model's correct % on held-out and finetuned families, stop %, ranking %, the
    paper's number beside it; then correct % per family (means)."""
    labels = list(next(iter(by_seed.values())))
    column = lambda label, key: [by_seed[s][label][key] for s in by_seed]  # noqa: E731
    lines = [f"| model ({len(by_seed)} seeds, mean ± sd) | correct %, held-out families | correct %, finetuned families "
             "| answered %, held-out, stopped or not | stop % | ranking % | paper: win % vs instruction-tuned |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        paper = PAPER.get(label, (None, None))[0]
        lines.append(f"| {label} | {spread(column(label, 'held-out'))} | {spread(column(label, 'finetuned'))} | "
                     f"{spread(column(label, 'answered'))} | {spread(column(label, 'stop'))} | "
                     f"{spread(column(label, 'ranking'))} | {'–' if paper is None else paper} |")
    lines += ["", "| model | " + " | ".join(world.FAMILIES) + " |", "| --- |" + " ---: |" * len(world.FAMILIES)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(column(label, f)):.0f}" for f in world.FAMILIES) + " |")
    return "\n".join(lines)


def world_chart(by_seed, path):
    """Correct % on held-out and finetuned families per model: bars are means, error bars sd, dots the seeds."""
    plt = pyplot(path)
    if plt is None:
        return
    labels = list(next(iter(by_seed.values())))
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(labels) + 1.5))
    for k, (key, color) in enumerate((("held-out", "tab:orange"), ("finetuned", "tab:blue"))):
        values = [[by_seed[s][label][key] for s in by_seed] for label in labels]
        y = [i + (k - 0.5) * 0.4 for i in range(len(labels))]
        ax.barh(y, [statistics.mean(v) for v in values], height=0.4, color=color, label=f"{key} families",
                xerr=[sd(v) for v in values], capsize=3)
        for yi, v in zip(y, values):
            ax.plot(v, [yi] * len(v), "k.", markersize=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()  # first model on top
    ax.set(xlim=(0, 100), xlabel=f"correct % (exact judge): mean ± sd over {len(by_seed)} seeds, dots = seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_chart(by_seed, lrs, path):
    """Response tuning's correct % against its learning rate: where it works and where it collapses."""
    plt = pyplot(path)
    if plt is None:
        return
    labels = list(next(iter(by_seed.values())))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color in (("held-out", "tab:orange"), ("finetuned", "tab:blue")):
        values = [[by_seed[s][label][key] for s in by_seed] for label in labels]
        ax.errorbar(lrs, [statistics.mean(v) for v in values], yerr=[sd(v) for v in values],
                    marker="o", capsize=3, color=color, label=f"{key} families")
    ax.set(xscale="log", ylim=(0, 100), xlabel="response-tuning learning rate (60 steps of 16)",
           ylabel=f"correct %, mean ± sd over {len(by_seed)} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def numbers(config, flag, kind):
    """A flag holding numbers separated by spaces, e.g. --seeds='1 2 3', as a list."""
    try:
        return [kind(x) for x in config[flag].split()]
    except ValueError:
        raise ValueError(f"--{flag}={config[flag]!r}: expected {kind.__name__}s separated by spaces") from None


def tinyworld(config, device, dtype):
    """python evaluate.py --tinyworld: for each seed, the base, base + rules, the three leave-one-rule-out models
    and the instruction-, response- and poem-tuned models (finetuned now), judged exactly on --split; the table
    over seeds (mean ± sd) beside the paper's numbers, in out/tinyworld/results.{md,json,png}. With --lr_sweep,
    response tuning at each learning rate instead (lr_sweep.{md,json,png})."""
    seeds, lrs = numbers(config, "seeds", int), numbers(config, "lr_sweep", float)
    if config["split"] not in ("test", "dev"):
        raise ValueError(f"--split={config['split']}: expected test or dev")
    if not seeds:
        raise ValueError("--seeds: expected at least one seed, e.g. --seeds='1 2 3'")
    if len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds={config['seeds']!r}: expected distinct seeds, 0 or more (a seed twice would count "
                         f"one base twice in the mean and sd)")
    if not all(0 < lr < float("inf") for lr in lrs):
        raise ValueError(f"--lr_sweep={config['lr_sweep']!r}: expected learning rates above 0")
    path = WORLD / f"{config['split']}.jsonl"
    chat.prepare_data("tinyworld", path)
    rows = [row for _, row in chat.json_lines(*chat.read_bytes(path))]
    if config["out_dir"] == DEFAULTS["out_dir"][0]:
        config = {**config, "out_dir": "out/tinyworld"}
    out_dir, start = Path(config["out_dir"]), time.time()
    if lrs:
        runs, name = [(f"response-tuned at lr {lr:.0e}", "tinyworld_responses", lr) for lr in lrs], "lr_sweep"
    else:
        runs, name = [(label, run, None) for label, run in WORLD_RUNS], "results"
    by_seed = {}
    for seed in seeds:  # each seed's results are kept as it ends: a stopped comparison loses only the seed it was on
        by_seed[seed] = world_seed(seed, rows, runs, not lrs, config, device, dtype)
        chat.write_atomic(out_dir / f"seed{seed}" / f"{name}.json", json.dumps(by_seed[seed], indent=2))
    minutes = (time.time() - start) / 60
    table = world_markdown(by_seed)
    print(table)
    print(f"{len(seeds)} seeds ({config['seeds']}), {len(rows)} {config['split']} instructions, {minutes:.1f} minutes "
          f"({'pretrained here' if config['from_scratch'] else 'shipped bases'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    chat.write_atomic(out_dir / f"{name}.md", table + "\n")
    chat.write_atomic(out_dir / f"{name}.json", json.dumps(
        {"split": config["split"], "seeds": seeds, "from_scratch": config["from_scratch"], "minutes": round(minutes, 2),
         "device": device, "results": by_seed, "paper": PAPER}, indent=2))
    if lrs:
        sweep_chart(by_seed, lrs, out_dir / f"{name}.png")
    else:
        world_chart(by_seed, out_dir / f"{name}.png")
    print(f"wrote {out_dir}/{name}.md, {name}.json, {name}.png; each model's answers in {out_dir}/seed<N>/", file=sys.stderr)


def read_eval_set(name):
    """The instructions of --eval_set. A path data/<name>/... is written by data/<name>/prepare.py on
    first use (TinyWorld's dev set)."""
    eval_set = Path(name)
    if not eval_set.is_absolute() and eval_set.parent.parent == Path("data"):
        chat.prepare_data(eval_set.parent.name, ROOT / eval_set)
    return chat.read_instructions(name)


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_ranges(config, RANGES)
    use_threads(config["threads"])
    device = pick_device(config["device"])
    dtype = pick_dtype(device, config["dtype"])
    out_dir = Path(config["out_dir"])
    if config["epoch_sweep"]:
        return epoch_sweep(config, device, dtype)
    if config["similarity"]:
        return similarity(config, device, dtype)
    if config["tinyworld"]:
        return tinyworld(config, device, dtype)
    rows = read_eval_set(config["eval_set"])
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked, ranked_file = ranking_set(config, rows)  # a missing file fails now, not after training
    limit = config["max_new_tokens"]
    if not config["compare"] and not config["models"].split():
        raise ValueError("--models is empty: name at least one model (e.g. --models='gpt2 gpt2+rules')")
    if config["compare"]:  # what this command will write, checked before anything is trained
        labels = [label for label, _, _ in rule_models(config["base"], limit) + finetuned_runs(config)]
    else:
        labels = config["models"].split()
    outputs = {f"--out_dir's {name}": out_dir / name for name in ("results.md", "results.json", "results.png")}
    outputs |= {f"--out_dir's {file_name(label)}.json": out_dir / f"{file_name(label)}.json" for label in labels}
    refuse_overwriting(outputs, {"--eval_set": config["eval_set"], "--ranking_set": ranked_file})
    models = comparison(config) if config["compare"] else [(spec, spec, limit) for spec in config["models"].split()]
    for _, spec, _ in models:  # a typo or a half-trained run fails now, not after an hour of generation
        check_finished(spec)
    results, groups = {}, {}
    for label, spec, max_new_tokens in models:  # one group per model: base, base + rules and the ablations share it
        groups.setdefault(parse_model(spec)[0], []).append((label, spec, max_new_tokens))
    for init_from, members in groups.items():
        evaluated = evaluate_models(init_from, [(spec, n) for _, spec, n in members], rows, ranked, config, device, dtype)
        for (label, spec, max_new_tokens), (metrics, alpaca) in zip(members, evaluated):
            results[label] = {"model": spec, "max_new_tokens": max_new_tokens, **metrics}
            chat.write_atomic(out_dir / f"{file_name(label)}.json", json.dumps(alpaca, indent=2, ensure_ascii=False))
    results = {label: results[label] for label, _, _ in models}  # the table in the order asked
    table = markdown(results, config["compare"], f"{Path(ranked_file).stem}, {len(ranked):,}")
    print(table)
    chat.write_atomic(out_dir / "results.md", table + "\n")
    chat.write_atomic(out_dir / "results.json", json.dumps({"eval_set": config["eval_set"], "ranking_set": ranked_file,
                                                           "results": results,
                                                           "paper": PAPER if config["compare"] else None}, indent=2))
    chart(results, out_dir / "results.png")
    print(f"wrote {out_dir}/results.md, results.json, results.png and one AlpacaEval file per model", file=sys.stderr)


def file_name(label):
    return re.sub(r"[^\w.+=,-]+", "_", label.replace(" ", "-"))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)  # here, not on import: tests import this file
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, Stopped) as e:  # training children have checkpointed and exited (run_train)
        code = e.code if isinstance(e, Stopped) else 128 + signal.SIGINT
        print(f"{'terminated' if code == 128 + signal.SIGTERM else 'interrupted'}: the files written so far are kept "
              f"(finished seeds' results, each model's answers, finetuned runs to resume); the table was not "
              f"written", file=sys.stderr)
        sys.exit(code)
