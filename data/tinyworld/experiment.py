"""
TinyWorld's comparison: every method of the paper in a synthetic world where each answer can be
checked exactly (README.md beside this file), on a CPU in a few minutes.

    python data/tinyworld/experiment.py            # the reported table: 3 seeds, the test set
    python data/tinyworld/experiment.py --split=dev --lr_sweep="3e-5 1e-4 3e-4 1e-3"  # on dev

For each of --seeds: the shipped pretrained base (or one pretrained now, --from_scratch), its rule
models (evaluate.py's: base + rules and the three leave-one-rule-out ablations), and the
instruction-, response- and poem-tuned models (finetuned now by train.py), each judged on the
world's test (or dev) set: correct % on the held-out and the finetuned families, stop %, ranking %.
Mean ± sd over seeds in out/tinyworld/results.{md,json,png}, every model's judged answers in
out/tinyworld/seed<N>/.
"""
import json
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: chat.py, comparison.py, ...
sys.path.insert(0, str(HERE))  # world.py
import world  # noqa: E402  TinyWorld's task families and their exact checkers

import chat  # noqa: E402
# noqa: E402
from cli import (DEVICE_FLAGS, DEVICE_RANGES, check_ranges, for_inference, machine,  # noqa: E402
                 numbers, parse_flags, pyplot, run_main)
from comparison import PAPER, ROOT, file_name, parse_model, rule_models, run_train  # noqa: E402
from model import EOT, GPT  # noqa: E402
from rules import GREEDY, respond  # noqa: E402
from scoring import score_pairs  # noqa: E402

# ---------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "seeds": ("1 2 3", "the pretraining seeds (bases shipped in data/tinyworld/bases/seedN)"),
    "split": ("test", "test (the reported table) or dev (the set settings are chosen on)"),
    "from_scratch": (False, "pretrain every seed's base (config/tinyworld_pretrain.toml) "
                            "instead of starting from the shipped ones"),
    "lr_sweep": ("", "response-tuning learning rates to try instead of the table, e.g. "
                     "'3e-5 1e-4 3e-4 1e-3' (lr_sweep.png)"),
    "out_dir": ("out/tinyworld", "where the results, the judged answers and the runs go"),
    **DEVICE_FLAGS,  # --device, --dtype, --threads: as in train.py
}
RANGES = {**DEVICE_RANGES}
LIMIT = 64  # new tokens per answer: every reference answer is far shorter
BATCH = 64  # prompts generated, or pairs scored, together: the model is tiny
# (label, config/<name>.toml): the single task is the poem
RUNS = [("instruction-tuned", "tinyworld_instruction"), ("response-tuned", "tinyworld_responses"),
        ("poetry-tuned", "tinyworld_poem")]
# -------------------------------------------------------------------------------------------------


def judge(model, rule_set, rows, device, dtype):
    """Greedy answers to every row's instruction in the chat format, judged exactly: an answer is
    correct when it ends with <|endoftext|> (the model stopped) and its family's checker (world.py)
    accepts it. `answered`: the checker accepts the text before any new <|user|> turn, stopped or
    not (what the model knew)."""
    settings = {**GREEDY, "max_new_tokens": LIMIT, "seed": 0, "compile": False}
    judged = []
    for i in range(0, len(rows), BATCH):
        batch = rows[i:i + BATCH]
        prompts = [chat.encode_prompt(r["instruction"]) for r in batch]
        answers = respond(model, prompts, settings, rule_set, device, dtype)
        for row, tokens in zip(batch, answers):
            text = chat.decode(tokens).strip()
            stopped = tokens[-1:] == [EOT]
            before_new_turn = text.split("<|user|>")[0]
            judged.append({"family": row["family"], "instruction": row["instruction"],
                           "response": text, "stopped": stopped,
                           "correct": stopped and world.check(row, text),
                           "answered": world.check(row, before_new_turn)})
    return judged


def world_ranking(model, rule_set, rows, device, dtype):
    """The paper's response ranking (Table 2) in the world: under each instruction, its own
    reference answer against one answer of every other family (that family's row at the same index,
    cycled); the % of comparisons the own answer wins on mean log-probability per token."""
    by_family = {f: [k for k, r in enumerate(rows) if r["family"] == f] for f in world.FAMILIES}
    others = []  # (i, j): row j's answer under row i's instruction
    for i, row in enumerate(rows):
        for family, ks in by_family.items():
            if family != row["family"] and ks:
                others.append((i, ks[i % len(ks)]))
    ranked = [{"instruction": r["instruction"], "reference": r["answer"]} for r in rows]
    pairs = others + [(i, i) for i in range(len(rows))]
    [table] = score_pairs(model, [rule_set], ranked, pairs,
                          device=device, dtype=dtype, batch_size=BATCH)
    mean = {pair: logprobs.mean().item() for pair, logprobs in table.items()}
    wins = sum(mean[(i, i)] > mean[(i, j)] for i, j in others)
    return 100 * wins / len(others)


def share(rows, key):
    """% of rows whose `key` is true (0 for no rows)."""
    return 100 * sum(r[key] for r in rows) / max(1, len(rows))


def world_metrics(judged, ranking):
    """Correct % on the held-out and the finetuned families and on each family, answered %
    (held-out), stop %, ranking %."""
    held_out = [r for r in judged if r["family"] in world.HELD_OUT]
    finetuned = [r for r in judged if r["family"] in world.FINETUNED]
    metrics = {"held-out": share(held_out, "correct"), "answered": share(held_out, "answered"),
               "finetuned": share(finetuned, "correct"), "stop": share(judged, "stopped"),
               "ranking": ranking}
    for family in world.FAMILIES:
        metrics[family] = share([r for r in judged if r["family"] == family], "correct")
    return metrics


def world_base(seed, config, out):
    """The pretrained base of a seed: shipped in data/tinyworld/bases/seed<N>, or pretrained now
    (--from_scratch)."""
    if config["from_scratch"]:
        toml = str(ROOT / "config" / "tinyworld_pretrain.toml")
        run_train([toml, f"--seed={seed}", f"--out_dir={out / 'base'}", "--overwrite"], config)
        return out / "base"
    base = HERE / "bases" / f"seed{seed}"
    if not (base / "model.safetensors").is_file():
        raise FileNotFoundError(f"{base}: no shipped base for seed {seed}; add --from_scratch to "
                                f"pretrain it")
    return base


def world_seed(seed, rows, runs, config, *, device, dtype):
    """Every model of one pretraining seed, judged: {label: metrics}. runs: [(label, config name,
    lr or None)], each finetuned now from the seed's base into out_dir/seed<N>/; each model's
    judged answers go there too. Without --lr_sweep, the rule models are judged first."""
    out = Path(config["out_dir"]) / f"seed{seed}"
    base = world_base(seed, config, out)
    models = []
    if not config["lr_sweep"].split():
        models = [(label, spec) for label, spec, _ in rule_models(str(base), LIMIT)]
    for label, run, lr in runs:
        run_dir = out / file_name(label)
        args = [str(ROOT / "config" / f"{run}.toml"), f"--init_from={base}", f"--seed={seed}",
                f"--out_dir={run_dir}", "--overwrite"]  # this command's own runs
        if lr:
            args.append(f"--learning_rate={lr}")
        run_train(args, config)
        models.append((label, str(run_dir)))
    results = {}
    for label, spec in tqdm(models, desc=f"seed {seed}: judging", file=sys.stderr):
        init_from, rule_set = parse_model(spec)
        model = for_inference(GPT.from_pretrained(init_from), device, dtype)
        judged = judge(model, rule_set, rows, device, dtype)
        results[label] = world_metrics(judged, world_ranking(model, rule_set, rows, device, dtype))
        chat.write_jsonl(out / f"{file_name(label)}.jsonl", judged)
    return results


# ------------------------------------------------------------------------------ tables and charts

def sd(values):
    """The sample standard deviation over seeds (0 for one seed)."""
    if len(values) <= 1:
        return 0.0
    return statistics.stdev(values)


def spread(values):
    """'mean ± sd' of one metric over seeds."""
    return f"{statistics.mean(values):.1f} ± {sd(values):.1f}"


def world_markdown(by_seed):
    """The table over seeds: each model's correct % on held-out and finetuned families, stop %,
    ranking %, the paper's number beside it; then correct % per family (means)."""
    labels = list(next(iter(by_seed.values())))

    def column(label, key):  # one metric of one model, a value per seed
        return [by_seed[s][label][key] for s in by_seed]

    lines = [f"| model ({len(by_seed)} seeds, mean ± sd) | correct %, held-out families "
             "| correct %, finetuned families | answered %, held-out, stopped or not | stop % "
             "| ranking % | paper: win % vs instruction-tuned |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        paper = PAPER.get(label, (None, None))[0]
        cells = [spread(column(label, key))
                 for key in ("held-out", "finetuned", "answered", "stop", "ranking")]
        cells.append("–" if paper is None else str(paper))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| model | " + " | ".join(world.FAMILIES) + " |",
              "| --- |" + " ---: |" * len(world.FAMILIES)]
    for label in labels:
        means = [f"{statistics.mean(column(label, f)):.0f}" for f in world.FAMILIES]
        lines.append(f"| {label} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def world_chart(by_seed, path):
    """Correct % on held-out and finetuned families per model: bars are means, error bars sd, dots
    the seeds."""
    plt = pyplot(path)
    if plt is None:
        return
    labels = list(next(iter(by_seed.values())))
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(labels) + 1.5))
    for k, (key, color) in enumerate((("held-out", "tab:orange"), ("finetuned", "tab:blue"))):
        values = [[by_seed[s][label][key] for s in by_seed] for label in labels]
        y = [i + (k - 0.5) * 0.4 for i in range(len(labels))]
        ax.barh(y, [statistics.mean(v) for v in values], height=0.4, color=color,
                label=f"{key} families", xerr=[sd(v) for v in values], capsize=3)
        for yi, v in zip(y, values):
            ax.plot(v, [yi] * len(v), "k.", markersize=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()  # first model on top
    ax.set(xlim=(0, 100),
           xlabel=f"correct % (exact judge): mean ± sd over {len(by_seed)} seeds, dots = seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_chart(by_seed, lrs, path):
    """Response tuning's correct % against its learning rate: where it works and where it
    collapses."""
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


def check_flags(config):
    """(seeds, learning rates) of --seeds and --lr_sweep, checked with --split."""
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
    return seeds, lrs


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_ranges(config, RANGES)
    device, dtype = machine(config)
    seeds, lrs = check_flags(config)
    # 1) the set the models answer, prepared on first use
    path = HERE / f"{config['split']}.jsonl"
    chat.prepare_data("tinyworld", path)
    rows = [row for _, row in chat.json_lines(*chat.read_bytes(path))]
    out_dir = Path(config["out_dir"])
    start = time.time()
    # 2) the models: the table's, or response tuning at each learning rate
    if lrs:
        name = "lr_sweep"
        runs = [(f"response-tuned at lr {lr:.0e}", "tinyworld_responses", lr) for lr in lrs]
    else:
        name = "results"
        runs = [(label, run, None) for label, run in RUNS]
    # 3) every seed; each seed's results are kept as it ends: a stopped comparison loses only the
    #    seed it was on
    by_seed = {}
    for seed in seeds:
        by_seed[seed] = world_seed(seed, rows, runs, config, device=device, dtype=dtype)
        results = json.dumps(by_seed[seed], indent=2)
        chat.write_atomic(out_dir / f"seed{seed}" / f"{name}.json", results)
    # 4) the table over seeds, the chart and the files
    minutes = (time.time() - start) / 60
    table = world_markdown(by_seed)
    print(table)
    bases = "pretrained here" if config["from_scratch"] else "shipped bases"
    print(f"{len(seeds)} seeds ({config['seeds']}), {len(rows)} {config['split']} instructions, "
          f"{minutes:.1f} minutes ({bases})")
    chat.write_atomic(out_dir / f"{name}.md", table + "\n")
    summary = {"split": config["split"], "seeds": seeds, "from_scratch": config["from_scratch"],
               "minutes": round(minutes, 2), "device": device, "results": by_seed, "paper": PAPER}
    chat.write_atomic(out_dir / f"{name}.json", json.dumps(summary, indent=2))
    if lrs:
        sweep_chart(by_seed, lrs, out_dir / f"{name}.png")
    else:
        world_chart(by_seed, out_dir / f"{name}.png")
    print(f"wrote {out_dir}/{name}.md, {name}.json, {name}.png; each model's answers in "
          f"{out_dir}/seed<N>/", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "the files written so far are kept (finished seeds' results, each model's "
                   "answers, finetuned runs to resume); the table was not written")
