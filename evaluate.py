"""
Measure instruction following offline, without an API judge, and write files for AlpacaEval when you have one.

    python evaluate.py --models="gpt2 gpt2+rules out/response_tuning"       # any models, one table
    python evaluate.py --compare                                           # the paper's whole comparison
    python evaluate.py --compare --base=gpt2-medium --eval_set=data/alpaca_eval/alpaca_eval.jsonl
    python evaluate.py --similarity                # after --compare: the single-task models' response similarity

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
from model import EOT, GPT, varying_lengths
from rules import RuleState, parse_rules, product_of_experts
from sample import respond
from train import DEVICE_FLAGS, autocast, data_files, parse_flags, pick_device, pick_dtype, prepare_data, pyplot

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "models": ("gpt2 gpt2+rules", "models to evaluate, separated by spaces (NAME, NAME+rules, NAME+rules=eos,...)"),
    "compare": (False, "evaluate the paper's whole comparison at --base instead of --models"),
    "similarity": (False, "after --compare: the response-similarity analysis of its single-task models (section 5.2)"),
    "base": ("gpt2", "with --compare: the pretrained model every method starts from"),
    "instruction_data": ("lima", "with --compare: data of the instruction-tuned baseline"),
    "response_data": ("lima_responses", "with --compare: data of the response-tuned model"),
    "tasks": ("gsm8k mbpp recipes chess poetry", "with --compare: the single-task models, each trained by config/<task>.toml"),
    "task_data": ("", "with --compare: train every single-task model on this data instead (smoke runs)"),
    "train_args": ("", "with --compare: extra train.py flags for models it has to train, e.g. '--max_iters=5'"),
    "eval_set": ("data/eval/eval.jsonl", "instructions to answer (with 'reference' answers for NLL): JSONL or JSON"),
    "ranking_set": ("", "instructions with references to rank: by default the paper's 1,000 Stanford Alpaca "
                        "examples with --compare (data/alpaca, prepared on first use), --eval_set with --models"),
    "out_dir": ("out/eval", "where results and AlpacaEval files go; --compare also trains into out/"),
    "max_new_tokens": (1024, "generation limit; 1024 = until <|endoftext|> or the end of GPT-2's context, as the "
                             "official evaluation (limit 8,192); --compare gives the no-EOS-rule model 512, as it does"),
    "batch_size": (8, "prompts generated, or responses scored, together"),
    "negatives": (5, "ranking: other instructions' responses compared with each instruction's own"),
    "seed": (0, "seeds the ranking's draws; 0 is the official ratio_eval.py's random.seed(0): the same pairs"),
    **DEVICE_FLAGS,  # --device, --dtype: as in train.py
}
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
    prompt = chat.encode_prompt(instruction)
    target = chat.encode_chat([{"role": "user", "content": instruction},
                               {"role": "assistant", "content": response}])[0][len(prompt):]  # response + <|endoftext|>
    target = target[:max(1, block_size + 1 - len(prompt))]
    ids = (prompt + target)[-block_size - 1:]
    return ids, len(ids) - len(target)


@torch.no_grad()
def score_responses(model, rules, pairs, device, dtype, batch_size=8):
    """[(instruction, response)] -> the log-probability of each token of each response and of the <|endoftext|>
    closing it, given its instruction in the chat format, under the model (times the rules when on: the
    same product of experts the sampler uses). Pairs of similar length are scored together, right-padded."""
    encoded = [encode_pair(q, r, model.config.block_size) for q, r in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(encoded[k][0]))
    out = [None] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", file=sys.stderr, leave=False):
        chunk = order[start:start + batch_size]
        for k, logprobs in zip(chunk, score_batch(model, rules, [encoded[k] for k in chunk], device, dtype)):
            out[k] = logprobs
    return out


def score_batch(model, rules, batch, device, dtype, chunk=64):
    B, L = len(batch), max(len(ids) for ids, _ in batch) - 1
    x = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, max(len(ids) - p for ids, p in batch)), EOT, dtype=torch.long)  # (B, T), padded
    for b, (ids, p) in enumerate(batch):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[b, :len(ids) - p] = torch.tensor(ids[p:])
    x, targets = x.to(device), targets.to(device)
    first = torch.tensor([p - 1 for _, p in batch], device=device)  # the position that predicts each first target
    state = RuleState([ids[:p] for ids, p in batch], rules, device) if rules is not None else None
    picked = []  # (B, n) log-probs of the targets, `chunk` target positions at a time: logits are (B, chunk, V)
    with autocast(device, dtype), varying_lengths():  # every batch has a length of its own
        h = model.hidden(x)  # (B, L, C): right padding is never seen by the real tokens before it
        for t0 in range(0, targets.size(1), chunk):
            span = torch.arange(t0, min(t0 + chunk, targets.size(1)), device=device)
            positions = (first[:, None] + span[None, :]).clamp(max=L - 1)  # (B, n); past a row's end: ignored
            logits = model.lm_head(h[torch.arange(B, device=device)[:, None], positions]).float()  # (B, n, V)
            if state is None:
                picked.append(F.log_softmax(logits, dim=-1).gather(2, targets[:, span, None])[..., 0])
                continue
            for k, t in enumerate(span.tolist()):  # the rules' scores depend on the response so far: step by step
                logprobs = product_of_experts(logits[:, k], state.scores())  # (B, V)
                picked.append(logprobs.gather(1, targets[:, t:t + 1]))
                state.update(targets[:, t])
    picked = torch.cat(picked, dim=1).cpu()  # (B, T)
    return [picked[b, :len(ids) - p] for b, (ids, p) in enumerate(batch)]


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


def score_pairs(model, rules, rows, pairs, config, device, dtype):
    """{(i, j): log-probs of row j's reference response under row i's instruction} for the pairs asked."""
    unique = sorted(set(pairs))
    logprobs = score_responses(model, rules, [(rows[i]["instruction"], rows[j]["reference"]) for i, j in unique],
                               device, dtype, config["batch_size"])
    return dict(zip(unique, logprobs))


def evaluate_model(spec, rows, ranked, config, device, dtype, max_new_tokens):
    """Generate for every instruction of `rows`, score their references, rank the responses of `ranked` (rows
    with references): -> (metrics, AlpacaEval rows)."""
    init_from, rules = parse_model(spec)
    model = GPT.from_pretrained(init_from).to(device).eval()
    outputs = []
    for i in tqdm(range(0, len(rows), config["batch_size"]), desc=f"{spec}: generating", file=sys.stderr):
        batch = rows[i:i + config["batch_size"]]
        outputs += respond(model, [chat.encode_prompt(r["instruction"]) for r in batch],
                           {**config, "max_new_tokens": max_new_tokens, "greedy": True, "temperature": 1.0,
                            "top_k": 0, "top_p": 1.0}, rules, device, dtype)
    metrics = proxies(outputs, [r["instruction"] for r in rows])
    table = {}
    if len(ranked) >= 2:  # the ranking's draws depend on the seed alone: collect the pairs, score them batched
        wanted = []
        ranking_win_rate(lambda i, j: wanted.append((i, j)) or 0.0, len(ranked), config["negatives"], config["seed"])
        table = score_pairs(model, rules, ranked, wanted, config, device, dtype)
        metrics["ranking"] = ranking_win_rate(lambda i, j: table[(i, j)].mean().item(), len(ranked),
                                              config["negatives"], config["seed"])
    references = [r for r in rows if r["reference"] is not None]
    if references:  # the ranking scored every own response already when it ranked these same rows
        own = table if ranked == references and table else \
            score_pairs(model, rules, references, [(i, i) for i in range(len(references))], config, device, dtype)
        metrics["nll"] = -torch.cat([own[(i, i)] for i in range(len(references))]).mean().item()
    alpaca = [{"instruction": r["instruction"], "output": chat.decode(out).strip(), "generator": spec,
               "dataset": r["dataset"]} for r, out in zip(rows, outputs)]
    return metrics, alpaca


# ------------------------------------------------------------------------------------------- the comparison

def rule_models(base, limit):
    """The base model, with all rules, and without each rule: [(label, spec, max_new_tokens)]. As the official
    README says, the models without the EOS rule (which rarely stop) generate at most 512 new tokens."""
    return [("base", base, limit), ("base + rules", f"{base}+rules", limit),
            ("no EOS rule", f"{base}+rules=diversity,uniform", min(limit, NO_EOS_LIMIT)),
            ("no diversity rule", f"{base}+rules=eos,uniform", limit), ("no uniform rule", f"{base}+rules=eos,diversity", limit)]


def comparison(config):
    """The paper's models at --base: [(label, spec, max_new_tokens)], training the finetuned ones missing."""
    base, limit = config["base"], config["max_new_tokens"]
    models = rule_models(base, limit)
    runs = [("instruction-tuned", "instruction_tuning", config["instruction_data"]),
            ("response-tuned", "response_tuning", config["response_data"])]
    runs += [(f"{task}-tuned", task, config["task_data"] or task) for task in config["tasks"].split()]
    for label, run, data in runs:
        out = Path(config["out_dir"]) / "runs" / f"{Path(base).name}_{run}"
        if not (out / "model.safetensors").is_file():
            print(f"training {label} ({data}) into {out}", file=sys.stderr)
            command = [sys.executable, str(ROOT / "train.py"), str(ROOT / "config" / f"{run}.toml"), f"--init_from={base}",
                       f"--data={data}", f"--out_dir={out}", f"--device={config['device']}", *config["train_args"].split()]
            if subprocess.run(command).returncode != 0:
                raise OSError(f"training {label} failed: {' '.join(command)}")
        models.append((label, str(out), limit))
    return models


def ranking_set(config, rows):
    """(rows with references to rank, their file): --ranking_set; else, with --compare, the paper's 1,000 Stanford
    Alpaca examples (data/alpaca/alpaca.jsonl, prepared on first use); else the eval set's rows."""
    path = config["ranking_set"]
    if not path and config["compare"]:
        path = ROOT / "data" / "alpaca" / "alpaca.jsonl"
        prepare_data("alpaca", path)
    if not path:
        return [r for r in rows if r["reference"] is not None], config["eval_set"]
    return [r for r in chat.read_instructions(path) if r["reference"] is not None], str(path)


def markdown(results, compare, ranked_on):
    head = f"| model | stop % | length | repeat % | breaks % | ref NLL | ranking % ({ranked_on}) |"
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
    groups = {"reference": [c[1]["content"] for c in chat.read_conversations(data_files(config["instruction_data"])[0])]}
    for task, path in paths.items():
        answers = json.loads(path.read_text(encoding="utf-8"))
        finetuning = chat.read_conversations(data_files(config["task_data"] or task)[0])
        groups |= {(task, "asked"): [a["instruction"] for a in answers], (task, "answered"): [a["output"] for a in answers],
                   (task, "task_asked"): [c[0]["content"] for c in finetuning],
                   (task, "task_answered"): [c[1]["content"] for c in finetuning]}
    model = GPT.from_pretrained(config["base"]).to(device).eval()
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


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    device = pick_device(config["device"])
    dtype = pick_dtype(device, config["dtype"])
    out_dir = Path(config["out_dir"])
    if config["similarity"]:
        return similarity(config, device, dtype)
    rows = chat.read_instructions(config["eval_set"])
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked, ranked_file = ranking_set(config, rows)  # a missing file fails now, not after training
    limit = config["max_new_tokens"]
    models = comparison(config) if config["compare"] else [(spec, spec, limit) for spec in config["models"].split()]
    for _, spec, _ in models:  # a typo fails now, not after an hour of generation
        parse_model(spec)
    results = {}
    for label, spec, max_new_tokens in models:
        metrics, alpaca = evaluate_model(spec, rows, ranked, config, device, dtype, max_new_tokens)
        results[label] = {"model": spec, "max_new_tokens": max_new_tokens, **metrics}
        chat.write_atomic(out_dir / f"{file_name(label)}.json", json.dumps(alpaca, indent=2, ensure_ascii=False))
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
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
