"""
Pick a run's epochs as the official scripts did, without their GPT-4 judge (docs/epochs.md).

    python epochs.py --run=response_tuning --eval_set=val.jsonl       # 5, 7, 10, 15 and 20 epochs
    python epochs.py --run=gsm8k --counts="5 7" --base=gpt2-medium

The official finetune_{5,7,10,15,20}e.sh train each count, a run of its own, and judge each model's
answers to eval/val_eval/val.jsonl. This trains config/<run>.toml from --base at each of --counts
(train.py, a run per count, reused when finished with the same settings), measures each with
evaluate.py on --eval_set, and reports each run's final validation loss beside evaluate.py's
proxies, in --out_dir (out/epochs/<run>): results.md, results.json, results.png, each count's
answers in AlpacaEval's format (<run>-<N>e.json) for the judge, if you have one, and evaluate.py's
own files in eval/.
"""
import json
import os
import sys
from pathlib import Path

import chat
from checkpoint import progress
from cli import (DEVICE_FLAGS, DEVICE_RANGES, cell, check_ranges, numbers, parse_flags,
                 pick_device, pick_dtype, pyplot, refuse_overwriting, run_main)
from comparison import ROOT, file_name, find_run, run_script, train_if_missing, train_settings

# ---------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "run": ("response_tuning", "the run to sweep: config/<run>.toml"),
    "counts": ("5 7 10 15 20", "the epochs to try, each a run of its own (the official "
                               "finetune_{5,7,10,15,20}e.sh)"),
    "base": ("gpt2", "the pretrained model every count starts from"),
    "train_args": ("", "extra train.py flags, e.g. '--batch_size=64'"),
    "eval_set": ("data/eval/eval.jsonl", "the instructions to answer: JSONL or JSON (the official "
                                         "pick used its 56 of eval/val_eval/val.jsonl)"),
    "out_dir": ("", "where results go, and the runs (in runs/): by default out/epochs/<run>"),
    "max_new_tokens": (1024, "evaluate.py's generation limit"),
    "batch_size": (8, "evaluate.py's prompts generated, or responses scored, together"),
    "compile": (False, "evaluate.py generates through torch.compile"),
    **DEVICE_FLAGS,  # --device, --dtype, --threads: as in train.py
}
RANGES = {"max_new_tokens": "[1, inf)", "batch_size": "[1, inf)", **DEVICE_RANGES}
# Offline we have no judge: the sweep reports what can be measured without one. The official pick
# (official README, "Response Tuning") went into finetune_seed*.sh.
JUDGE_NOTE = ("Not the official judge: the official pick "
              "(scripts/iclr2025/*/finetune_{{5,7,10,15,20}}e.sh) judged each count's answers to "
              "eval/val_eval/val.jsonl with AlpacaEval's GPT-4 annotator against GPT-3.5's "
              "answers. These are offline proxies; with an OpenAI key, judge the counts as it "
              "did: alpaca_eval --model_outputs {out}/{name}-<N>e.json "
              "--reference_outputs <official repo>/eval/val_eval/val-gpt3.5-2.json")
PANELS = [("val_loss", "final val loss"), ("stop", "stop %"), ("length", "length (tokens)"),
          ("repeat", "repeated 4-grams %"), ("breaks", "format breaks %"), ("nll", "ref NLL")]
# -------------------------------------------------------------------------------------------------


def sweep_plan(config):
    """(name, [epochs]) of --run and --counts, checked: a run of config/, positive counts, each
    once; --train_args may not set the epochs (the counts do)."""
    name = config["run"]
    known = sorted(path.stem for path in (ROOT / "config").glob("*.toml"))
    if name not in known:
        raise ValueError(f"--run={name}: no such run; expected one of config/*.toml: "
                         f"{', '.join(known)}")
    counts = numbers(config, "counts", float)
    if not counts:
        raise ValueError("--counts is empty: name at least one count, e.g. "
                         "--counts='5 7 10 15 20'")
    if not all(0 < epochs < float("inf") for epochs in counts):
        raise ValueError(f"--counts={config['counts']!r}: expected counts above 0")
    if len(set(counts)) < len(counts):
        raise ValueError(f"--counts={config['counts']!r}: a count twice (each count is one run)")
    if any(arg.startswith("--epochs") for arg in config["train_args"].split()):
        raise ValueError(f"--train_args={config['train_args']!r}: sets --epochs, which --counts "
                         f"sets here")
    return name, counts


def sweep_args(config, name, epochs):
    """train.py's arguments for config/<name>.toml at `epochs` from --base. Each count is a run of
    its own: the learning rate decays linearly to 0 at a run's last step (train.get_lr,
    open-instruct's linear schedule), so the first 5 epochs of a 20-epoch run are not a 5-epoch
    run. The official scripts train each count separately too
    (scripts/iclr2025/expt1_llama/res/finetune_5e.sh ... finetune_20e.sh, each with its own
    --num_train_epochs)."""
    toml = str(ROOT / "config" / f"{name}.toml")
    extra = config["train_args"].split()
    return [toml, f"--init_from={config['base']}", *extra, f"--epochs={epochs!r}"]


def final_val_loss(out):
    """The validation loss at a run's last step: train.py logs one at every eval_interval and at
    the final step (train.train, into log.jsonl). None if its data has no val split."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return None
    rows = [row for _, row in chat.json_lines(*chat.read_bytes(path))]
    losses = [row["val_loss"] for row in rows if "val_loss" in row]
    if not losses:
        return None
    return losses[-1]


def measure(runs, config, out_dir):
    """evaluate.py on every run at once, in a process of its own (a script never imports another):
    {label: its metrics}. Each run's answers are moved to <out_dir>/<name>-<label>e.json."""
    specs = [str(run) for run in runs.values()]
    if any(len(spec.split()) != 1 for spec in specs):
        raise ValueError(f"--out_dir={config['out_dir']}: a path with spaces cannot be named to "
                         f"evaluate.py --models")
    flags = ["max_new_tokens", "batch_size", "compile", "device", "dtype", "threads"]
    args = [f"--models={' '.join(specs)}", f"--eval_set={config['eval_set']}",
            f"--out_dir={out_dir / 'eval'}", *(f"--{flag}={config[flag]}" for flag in flags)]
    run_script("evaluate.py", args, "evaluating")
    evaluated = json.loads((out_dir / "eval" / "results.json").read_text(encoding="utf-8"))
    metrics = {}
    for label, spec in zip(runs, specs):
        metrics[label] = evaluated["results"][spec]
        answers = out_dir / "eval" / f"{file_name(spec)}.json"
        os.replace(answers, out_dir / f"{config['run']}-{label}e.json")
    return metrics


def markdown(results, title):
    """The table: one row per count."""
    head = "| epochs | steps | final val loss | stop % | length | repeat % | breaks % | ref NLL |"
    lines = [title, "", head, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, m in results.items():
        lines.append(f"| {label} | {m['steps']} | {cell(m['val_loss'], '.4f')} | "
                     f"{m['stop']:.0f} | {m['length']:.0f} | {m['repeat']:.1f} | "
                     f"{m['breaks']:.0f} | {cell(m.get('nll'), '.3f')} |")
    return "\n".join(lines)


def chart(results, path, title):
    """Each measurement against the epoch count, a panel each (those measured: no val loss without
    a val split, no ref NLL without references)."""
    plt = pyplot(path)
    if plt is None:
        return
    panels = []
    for key, name in PANELS:
        if any(m.get(key) is not None for m in results.values()):
            panels.append((key, name))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3))
    for ax, (key, name) in zip(axes, panels):
        points = [(m["epochs"], m[key]) for m in results.values() if m.get(key) is not None]
        epochs = [x for x, _ in points]
        ax.plot(epochs, [y for _, y in points], "o-", color="tab:blue")
        ax.set(xlabel="epochs", xticks=epochs)
        # the values themselves, not offsets from one
        ax.ticklabel_format(axis="y", useOffset=False)
        if name.endswith("%"):
            ax.set(ylim=(-2, 102))
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_ranges(config, RANGES)
    # 1) every flag, the eval set and every run's directory, checked before anything is written
    name, counts = sweep_plan(config)
    if not config["out_dir"]:
        config = {**config, "out_dir": f"out/epochs/{name}"}
    out_dir = Path(config["out_dir"])
    settings = train_settings(sweep_args(config, name, counts[0]))  # a bad --train_args: one line
    if settings["max_iters"]:
        raise ValueError(f"--run={name}: config/{name}.toml or --train_args sets max_iters="
                         f"{settings['max_iters']}, which fixes the steps whatever the epochs; "
                         f"add --max_iters=0 to --train_args")
    pick_dtype(pick_device(config["device"]), config["dtype"])  # a bad --device: one line, now
    rows = chat.read_eval_set(config["eval_set"])
    labels = [f"{epochs:g}" for epochs in counts]
    files = ["results.md", "results.json", "results.png"]
    files += [f"eval/{file}" for file in files]
    files += [f"{name}-{label}e.json" for label in labels]
    refuse_overwriting({f"--out_dir's {file}": out_dir / file for file in files},
                       {"--eval_set": config["eval_set"]})
    args = {label: sweep_args(config, name, epochs) for label, epochs in zip(labels, counts)}
    # other settings: refused
    runs = {label: find_run(config, name, args[label]) for label in labels}
    # 2) train every count missing, a run each (sweep_args says why)
    for label in labels:
        train_if_missing(f"{name} at {label} epochs", args[label], runs[label], config)
    # 3) measure every run, and read each one's steps and final val loss
    metrics = measure(runs, config, out_dir)
    results = {}
    for label, epochs in zip(labels, counts):
        steps = progress(runs[label])["max_iters"]
        val_loss = final_val_loss(runs[label])
        results[label] = {"epochs": epochs, "run": str(runs[label]), "steps": steps,
                          "val_loss": val_loss, **metrics[label]}
    # 4) the table, the note on the judge, the files
    title = (f"{name} from {config['base']} at each epoch count: greedy answers to "
             f"{config['eval_set']} ({len(rows)} instructions)")
    table = markdown(results, title)
    note = JUDGE_NOTE.format(out=out_dir, name=name)
    print(table)
    print(f"\n{note}")
    chat.write_atomic(out_dir / "results.md", f"{table}\n\n{note}\n")
    summary = {"run": name, "base": config["base"], "train_args": config["train_args"],
               "eval_set": config["eval_set"], "judge": note, "results": results}
    chat.write_atomic(out_dir / "results.json", json.dumps(summary, indent=2))
    chart(results, out_dir / "results.png", f"{name} from {config['base']}")
    print(f"wrote {out_dir}/results.md, results.json, results.png and {name}-<N>e.json per count",
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "the finished runs are kept, and a stopped one resumes when this runs again; "
                   "the table was not written")
