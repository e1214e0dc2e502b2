"""
TinyWorld's comparison: every method of the paper in a synthetic world where each answer can be
checked exactly (README.md beside this file), on a CPU in a few minutes.

    python data/tinyworld/experiment.py            # the reported table: 5 seeds, the test set
    python data/tinyworld/experiment.py --split=dev --lr_sweep="3e-5 1e-4 3e-4 1e-3"  # on dev
    python data/tinyworld/experiment.py --split=dev --derive_rules   # the world rules, from dev (done once)

For each of --seeds: the shipped pretrained base (or one pretrained now, --from_scratch), its rule
models (the official rules and the world rules of world_rules.json, each with its three
leave-one-rule-out ablations), and the instruction-, response-, poem- and letter-tuned models
(finetuned now by train.py), each judged on the world's test (or dev) set: win % against the same
seed's instruction-tuned model (the paper's metric, graded exactly), correct % on the held-out and
the finetuned families, stop %, ranking %; and the style claim (section 4) for the two single-task
models. Mean ± sd over seeds in out/tinyworld/results.{md,json,png}, every model's judged answers
in out/tinyworld/seed<N>/.
"""
import json
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: chat.py, comparison.py, ...
sys.path.insert(0, str(HERE))  # world.py, report.py
import report  # noqa: E402  TinyWorld's tables and charts
import world  # noqa: E402  TinyWorld's task families and their exact judge

import chat  # noqa: E402
from cli import (DEVICE_FLAGS, DEVICE_RANGES, check_ranges, for_inference, machine,  # noqa: E402
                 numbers, parse_flags, pyplot, run_main)
from comparison import PAPER, ROOT, file_name, parse_model, rule_models, run_train  # noqa: E402
from embedding import embed, unit_vectors  # noqa: E402
from model import EOT, GPT  # noqa: E402
from rules import GREEDY, NO_RULES, RuleSet, respond  # noqa: E402
from scoring import score_pairs  # noqa: E402

# ---------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "seeds": ("1 2 3 4 5", "the pretraining seeds (bases shipped in data/tinyworld/bases/seedN)"),
    "split": ("test", "test (the reported table) or dev (the set settings are chosen on)"),
    "from_scratch": (False, "pretrain every seed's base (config/tinyworld_pretrain.toml) "
                            "instead of starting from the shipped ones"),
    "lr_sweep": ("", "response-tuning learning rates to try instead of the table, e.g. "
                     "'3e-5 1e-4 3e-4 1e-3' (lr_sweep.png)"),
    "derive_rules": (False, "derive the world rules from the dev set and the bases' greedy "
                            "answers (the declared procedure) into --rules_file, then stop"),
    "rules_file": (str(HERE / "world_rules.json"), "the frozen world rules (JSON)"),
    "jobs": (2, "seeds run at once, each in a process of its own with --threads/jobs threads"),
    "out_dir": ("out/tinyworld", "where the results, the judged answers and the runs go"),
    **DEVICE_FLAGS,  # --device, --dtype, --threads: as in train.py
}
RANGES = {"jobs": "[1, inf)", **DEVICE_RANGES}
LIMIT = 64  # new tokens per answer: the longest reference answer is 30
BATCH = 64  # rows generating together (continuous batching), or pairs scored: the model is tiny
# (label, config/<name>.toml): the two single tasks are the poem and the letter
RUNS = [("instruction-tuned", "tinyworld_instruction"), ("response-tuned", "tinyworld_responses"),
        ("poetry-tuned", "tinyworld_poem"), ("letter-tuned", "tinyworld_letter")]
SINGLE_TASKS = {"poetry-tuned": "poem", "letter-tuned": "letter"}
REFERENCE = "instruction-tuned"  # the model every win % is against, as in the paper
# the sweep's own instruction-tuned run: a label (and so a run directory and answers file) of its
# own, so that a sweep into the table's --out_dir never overwrites the table's model or answers
SWEEP_REFERENCE = "instruction-tuned for the sweep"
# the world rules' declared procedure (README.md): the values it does not derive are the official
UNIFORM_SIZE = 15  # tokens the uniform rule changes, as the official table's 15
OVER_BIAS, UNDER_BIAS = -4.0, +1.0  # the official table's most common penalty and its one boost
# -------------------------------------------------------------------------------------------------


def answer_tokens(model, rule_set, rows, device, dtype):
    """Greedy new tokens for every row's instruction in the chat format, at most LIMIT."""
    settings = {**GREEDY, "max_new_tokens": LIMIT, "seed": 0, "compile": False}
    prompts = [chat.encode_prompt(r["instruction"]) for r in rows]
    return respond(model, prompts, settings, rule_set, device, dtype, batch_size=BATCH)


def judge(model, rule_set, rows, device, dtype):
    """Every row's answer, judged exactly: `correct` when it ends with <|endoftext|> (the model
    stopped) and its family's checker (world.py) accepts it; `grade` the pairwise judge's 2/1/0
    (world.grade: 1 = right, then more text)."""
    judged = []
    for row, tokens in zip(rows, answer_tokens(model, rule_set, rows, device, dtype)):
        text = chat.decode(tokens).strip()
        stopped = tokens[-1:] == [EOT]
        judged.append({"family": row["family"], "instruction": row["instruction"],
                       "response": text, "stopped": stopped,
                       "correct": stopped and world.check(row, text),
                       "grade": world.grade(row, text, stopped)})
    return judged


def world_ranking(model, rule_sets, rows, device, dtype):
    """The paper's response ranking (Table 2) in the world: under each instruction, its own
    reference answer against one answer of every other family (that family's row at the same index,
    cycled); for each of `rule_sets`, the % of comparisons the own answer wins on mean
    log-probability per token. The rule sets share the model's forward passes (a base and its
    rule models are scored in one pass, as evaluate.py --compare does)."""
    by_family = {f: [k for k, r in enumerate(rows) if r["family"] == f] for f in world.FAMILIES}
    others = []  # (i, j): row j's answer under row i's instruction
    for i, row in enumerate(rows):
        for family, ks in by_family.items():
            if family != row["family"] and ks:
                others.append((i, ks[i % len(ks)]))
    ranked = [{"instruction": r["instruction"], "reference": r["answer"]} for r in rows]
    pairs = others + [(i, i) for i in range(len(rows))]
    tables = score_pairs(model, rule_sets, ranked, pairs, device=device, dtype=dtype,
                         batch_size=BATCH)
    out = []
    for table in tables:
        mean = {pair: logprobs.mean().item() for pair, logprobs in table.items()}
        wins = sum(mean[(i, i)] > mean[(i, j)] for i, j in others)
        out.append(100 * wins / len(others))
    return out


def share(rows, key):
    """% of rows whose `key` is true (0 for no rows)."""
    return 100 * sum(bool(r[key]) for r in rows) / max(1, len(rows))


def win_rate(judged, reference):
    """% of instructions where `judged` has the higher grade than `reference` (the same seed's
    instruction-tuned model), a tie counting one half: the paper's win rate, graded exactly."""
    points = [1.0 if a["grade"] > b["grade"] else 0.5 if a["grade"] == b["grade"] else 0.0
              for a, b in zip(judged, reference)]
    return 100 * statistics.mean(points)


def world_metrics(judged, ranking, reference):
    """Win % against `reference` (over every instruction and over the held-out ones), correct % on
    the held-out, the headline finetuned, the control and the long families and on each family,
    answered % (held-out, grade >= 1), stop %, ranking %."""
    def rows(families):
        return [r for r in judged if r["family"] in families]

    def held(rs):
        return [r for r in rs if r["family"] in world.HELD_OUT]

    metrics = {"win": win_rate(judged, reference),
               "win held-out": win_rate(held(judged), held(reference)),
               "held-out": share(rows(world.HELD_OUT), "correct"),
               "finetuned": share(rows(world.HEADLINE), "correct"),
               "control": share(rows(world.CONTROL), "correct"),
               "long": share(rows(world.LONG), "correct"),
               "answered": 100 * statistics.mean(r["grade"] >= 1 for r in held(judged)),
               "stop": share(judged, "stopped"), "ranking": ranking}
    for family in world.FAMILIES:
        metrics[family] = share(rows((family,)), "correct")
    return metrics


# ------------------------------------------------------------------------------ the world rules

def world_rule_set(path):
    """The frozen world rules (--rules_file, written by --derive_rules) as a RuleSet: the official
    rules' code with the world's values."""
    try:
        frozen = json.loads(Path(path).read_text(encoding="utf-8"))
        table = tuple((int(token), float(bias)) for token, _, bias in frozen["uniform"])
        return RuleSet(eos_max=float(frozen["eos_max"]), eos_length=int(frozen["eos_length"]),
                       diversity_penalty=float(frozen["diversity_penalty"]), uniform_table=table)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--rules_file={path}: {e} (python data/tinyworld/experiment.py "
                         f"--derive_rules writes it)") from None


def first_divergence(tokens, reference):
    """(the token written, the token the reference has) where `tokens` first leaves `reference`,
    None if it never does (None for the written token if it ended first)."""
    for k, want in enumerate(reference):
        got = tokens[k] if k < len(tokens) else None
        if got != want:
            return got, want
    return None


def derive_world_rules(seeds, rows, config, *, device, dtype):
    """The declared procedure (README.md), run on dev and the bases' own answers only. EOS: the
    ramp ends at the longest instruction-tuning response (tokens with its <|endoftext|>) at the
    official +15. Diversity: the official -1.5. Uniform: where each base's greedy answer first
    leaves the reference (answer + <|endoftext|>), count the token written (over-used) and the one
    the reference has (under-used); the UNIFORM_SIZE tokens with the largest |under - over| get
    UNDER_BIAS if under-used, OVER_BIAS if over-used (<|endoftext|> is the EOS rule's)."""
    over, under = Counter(), Counter()
    for seed in seeds:
        base = world_base(seed, config, Path(config["out_dir"]) / f"seed{seed}")
        model = for_inference(GPT.from_pretrained(base), device, dtype)
        for row, tokens in zip(rows, answer_tokens(model, NO_RULES, rows, device, dtype)):
            where = first_divergence(tokens, chat.encode(row["answer"]) + [EOT])
            if where:
                over[where[0]] += 1
                under[where[1]] += 1
    score = {t: under[t] - over[t] for t in (over | under) if t not in (EOT, None)}
    chosen = sorted((t for t in score if score[t]),
                    key=lambda t: (-abs(score[t]), -(over[t] + under[t]), t))[:UNIFORM_SIZE]
    tuning = chat.read_conversations(HERE / "tinyworld_train.jsonl")
    lengths = [len(chat.encode(c[1]["content"])) + 1 for c in tuning]
    return {"procedure": derive_world_rules.__doc__.split(". ", 1)[1].replace("\n    ", " "),
            "seeds": seeds, "dev instructions": len(rows),
            "eos_length": max(lengths), "eos_max": 15.0, "diversity_penalty": 1.5,
            "uniform": [[t, chat.decode([t]), UNDER_BIAS if score[t] > 0 else OVER_BIAS]
                        for t in chosen],
            "counts": {chat.decode([t]): {"over-used": over[t], "under-used": under[t]}
                       for t in chosen}}


# ----------------------------------------------------------------------------------- one seed

def world_base(seed, config, out):
    """The pretrained base of a seed: shipped in data/tinyworld/bases/seed<N>, or pretrained now
    (--from_scratch)."""
    if config["from_scratch"]:
        toml = str(ROOT / "config" / "tinyworld_pretrain.toml")
        if not (out / "base" / "model.safetensors").is_file():
            run_train([toml, f"--seed={seed}", f"--out_dir={out / 'base'}", "--overwrite"],
                      config)
        return out / "base"
    base = HERE / "bases" / f"seed{seed}"
    if not (base / "model.safetensors").is_file():
        raise FileNotFoundError(f"{base}: no shipped base for seed {seed}; add --from_scratch to "
                                f"pretrain it")
    return base


def rule_model_sets(base, world_rules):
    """(label, base, RuleSet) of the rule models: the official rules and their ablations
    (evaluate.py's), then the world rules and theirs."""
    models = []
    for label, spec, _ in rule_models(str(base), LIMIT):
        models.append((label, *parse_model(spec)))
    if world_rules is not None:
        models.append(("base + world rules", str(base), world_rules))
        for rule in ("eos", "diversity", "uniform"):
            name = "EOS" if rule == "eos" else rule
            models.append((f"world rules, no {name}", str(base), replace(world_rules, **{rule: False})))
    return models


def style(judged, rows, base, device, dtype):
    """The style claim for one seed: {single-task model: {family: {similarity, form}}} for every
    family but its own. similarity: the mean cosine similarity of the family's instructions to the
    task's finetuning instructions (the seed's base embeds, embedding.py, as similarity.py does for
    GPT-2); form: the % of the model's responses to the family in the task's form (world.in_form)."""
    tasks = {family: [c[0]["content"] for c in
                      chat.read_conversations(HERE / f"tinyworld_{family}_train.jsonl")]
             for family in SINGLE_TASKS.values()}
    model = for_inference(GPT.from_pretrained(base), device, dtype)
    texts = [r["instruction"] for r in rows] + [t for ts in tasks.values() for t in ts]
    vectors = unit_vectors(embed(model, texts, device, dtype, batch_size=BATCH))  # (N, C)
    asked = vectors[:len(rows)]
    out, start = {}, len(rows)
    for label, family in SINGLE_TASKS.items():
        task = vectors[start:start + len(tasks[family])]
        start += len(tasks[family])
        x = (asked @ task.T).mean(1)  # (len(rows),) each instruction's mean similarity to the task
        out[label] = {}
        for f in world.FAMILIES:
            ks = [k for k, r in enumerate(rows) if r["family"] == f]
            if f != family and ks:
                form = [world.in_form(family, judged[label][k]["response"]) for k in ks]
                out[label][f] = {"similarity": x[ks].mean().item(),
                                 "form": 100 * statistics.mean(form)}
    return out


def world_seed(seed, rows, runs, config, *, device, dtype):
    """Every model of one pretraining seed, judged: {"results": {label: metrics}, "style": ...}.
    runs: [(label, config name, lr or None)], each finetuned now from the seed's base into
    out_dir/seed<N>/; each model's judged answers go there too. Without --lr_sweep, the rule
    models are judged first."""
    out = Path(config["out_dir"]) / f"seed{seed}"
    base = world_base(seed, config, out)
    models = []
    if not config["lr_sweep"].split():
        models = rule_model_sets(base, config["world_rules"])
    for label, run, lr in runs:
        run_dir = out / file_name(label)
        args = [str(ROOT / "config" / f"{run}.toml"), f"--init_from={base}", f"--seed={seed}",
                f"--out_dir={run_dir}", "--overwrite"]  # this command's own runs
        if lr:
            args.append(f"--learning_rate={lr}")
        run_train(args, config)
        models.append((label, str(run_dir), NO_RULES))
    judged, rankings = {}, {}
    for init_from in tqdm(dict.fromkeys(m[1] for m in models), desc=f"seed {seed}: judging",
                          file=sys.stderr):  # each model once: the base with all its rule sets
        mine = [(label, rule_set) for label, path, rule_set in models if path == init_from]
        model = for_inference(GPT.from_pretrained(init_from), device, dtype)
        for label, rule_set in mine:
            judged[label] = judge(model, rule_set, rows, device, dtype)
            chat.write_jsonl(out / f"{file_name(label)}.jsonl", judged[label])
        ranked = world_ranking(model, [rule_set for _, rule_set in mine], rows, device, dtype)
        rankings.update(zip([label for label, _ in mine], ranked))
    reference = judged.get(REFERENCE, judged.get(SWEEP_REFERENCE))
    results = {label: world_metrics(judged[label], rankings[label], reference)
               for label in judged}
    found = {}
    if all(label in judged for label in SINGLE_TASKS):
        found = style(judged, rows, base, device, dtype)
    return {"results": results, "style": found}


def seed_job(seed, rows, runs, config):
    """One seed in a process of its own (--jobs): its share of the threads, then world_seed."""
    device, dtype = machine(config)
    return world_seed(seed, rows, runs, config, device=device, dtype=dtype)


def all_seeds(seeds, rows, runs, config, *, device, dtype):
    """{seed: world_seed(...)} for every seed, --jobs at once (each in a process of its own with
    its share of --threads; 1: one after the other, here); each seed's results are kept as it ends,
    so a stopped comparison loses only the seeds it was on."""
    out_dir = Path(config["out_dir"])
    name = "lr_sweep" if config["lr_sweep"].split() else "results"
    jobs = min(config["jobs"], len(seeds))
    by_seed = {}
    if jobs == 1:
        for seed in seeds:
            by_seed[seed] = world_seed(seed, rows, runs, config, device=device, dtype=dtype)
            chat.write_atomic(out_dir / f"seed{seed}" / f"{name}.json",
                              json.dumps(by_seed[seed], indent=2))
        return by_seed
    threads = config["threads"] or multiprocessing.cpu_count()
    child = {**config, "threads": max(1, threads // jobs)}
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
    with ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
        futures = {seed: pool.submit(seed_job, seed, rows, runs, child) for seed in seeds}
        for seed, future in futures.items():
            by_seed[seed] = future.result()
            chat.write_atomic(out_dir / f"seed{seed}" / f"{name}.json",
                              json.dumps(by_seed[seed], indent=2))
    return by_seed


def check_flags(config):
    """(seeds, learning rates) of --seeds and --lr_sweep, checked with --split and
    --derive_rules."""
    seeds = numbers(config, "seeds", int)
    lrs = numbers(config, "lr_sweep", float)
    if config["split"] not in ("test", "dev"):
        raise ValueError(f"--split={config['split']}: expected test or dev")
    if not seeds:
        raise ValueError("--seeds: expected at least one seed, e.g. --seeds='1 2 3'")
    if len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds={config['seeds']!r}: expected distinct seeds, 0 or more (a "
                         f"seed twice would count one base twice in the mean and sd)")
    if not all(0 < lr < float("inf") for lr in lrs):
        raise ValueError(f"--lr_sweep={config['lr_sweep']!r}: expected learning rates above 0")
    if config["derive_rules"] and (config["split"] != "dev" or lrs):
        raise ValueError("--derive_rules: the world rules are derived on --split=dev only, "
                         "without --lr_sweep")
    if config["derive_rules"] and Path(config["rules_file"]).exists():
        raise ValueError(f"--rules_file={config['rules_file']}: the frozen world rules exist; "
                         f"deriving them again would overwrite them (move it away first)")
    return seeds, lrs


def write_table(by_seed, rows, config, seconds, lrs):
    """The table over seeds to stdout and out_dir/<name>.md, the summary JSON and the charts."""
    out_dir = Path(config["out_dir"])
    name = "lr_sweep" if lrs else "results"
    results = {seed: found["results"] for seed, found in by_seed.items()}
    paper = {label: numbers[0] for label, numbers in PAPER.items()}
    table = report.markdown(results, paper)
    styles = [found["style"] for found in by_seed.values() if found["style"]]
    summary_style = {}
    if len(styles) == len(by_seed):
        summary_style = report.style_summary({s: f["style"] for s, f in by_seed.items()})
        table += "\n\n" + report.style_markdown(summary_style)
    print(table)
    bases = "pretrained here" if config["from_scratch"] else "shipped bases"
    print(f"seeds {config['seeds']}, {len(rows)} {config['split']} "
          f"instructions, {seconds / 60:.1f} minutes ({bases}, --jobs={config['jobs']})")
    chat.write_atomic(out_dir / f"{name}.md", table + "\n")
    summary = {"split": config["split"], "seeds": list(by_seed),
               "from_scratch": config["from_scratch"], "seconds": round(seconds, 1),
               "jobs": config["jobs"], "device": config["device"], "results": results,
               "style": summary_style, "paper": paper}
    chat.write_atomic(out_dir / f"{name}.json", json.dumps(summary, indent=2))
    plt = pyplot("the TinyWorld charts")
    if plt is None:
        return
    if lrs:
        report.sweep_chart(plt, results, lrs, out_dir / f"{name}.png")
    else:
        report.results_chart(plt, results, paper, out_dir / f"{name}.png")
    if summary_style:
        report.style_chart(plt, summary_style, out_dir / "style.png")


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_ranges(config, RANGES)
    seeds, lrs = check_flags(config)
    device, dtype = machine(config)
    # 1) the set the models answer, prepared on first use
    path = HERE / f"{config['split']}.jsonl"
    chat.prepare_data("tinyworld", path)
    rows = [row for _, row in chat.json_lines(*chat.read_bytes(path))]
    start = time.time()
    if config["derive_rules"]:
        frozen = derive_world_rules(seeds, rows, config, device=device, dtype=dtype)
        chat.write_atomic(Path(config["rules_file"]), json.dumps(frozen, indent=2) + "\n")
        print(json.dumps(frozen, indent=2))
        return print(f"wrote {config['rules_file']} ({time.time() - start:.0f} s)", file=sys.stderr)
    # 2) the models: the table's, or response tuning at each learning rate
    config["world_rules"] = None
    if lrs:
        sweep = [(f"response-tuned at lr {lr:.0e}", "tinyworld_responses", lr) for lr in lrs]
        runs = [(SWEEP_REFERENCE, dict(RUNS)[REFERENCE], None)] + sweep  # every win % is against it
    else:
        runs = [(label, run, None) for label, run in RUNS]
        if Path(config["rules_file"]).exists():
            config["world_rules"] = world_rule_set(config["rules_file"])
        else:
            print(f"(no {config['rules_file']}: the table has no world rules; --derive_rules "
                  f"writes them)", file=sys.stderr)
    # 3) every seed, then the table over seeds, the charts and the files
    by_seed = all_seeds(seeds, rows, runs, config, device=device, dtype=dtype)
    write_table(by_seed, rows, config, time.time() - start, lrs)
    name, style_png = ("lr_sweep", "") if lrs else ("results", " (and style.png)")
    print(f"wrote {config['out_dir']}/{name}.md, .json, .png{style_png}; each model's "
          f"answers in {config['out_dir']}/seed<N>/", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "the files written so far are kept (finished seeds' results, each model's "
                   "answers, finetuned runs to resume); the table was not written")
