"""
The paper's section 5.2, after `python evaluate.py --compare`: does a single-task model answer in
its task's style even far from its task?

    python similarity.py                  # the five single-task models' answers in out/eval
    python similarity.py --out_dir=out/eval-medium --base=gpt2-medium

For each single-task model and each evaluation instruction (the official
open_instruct/plot_embeds.py): x is the instruction's mean cosine similarity to the task's
finetuning instructions, and y the mean similarity of the model's response to the task's finetuning
responses minus its mean similarity to the reference (LIMA) responses. The paper's finding: y falls
as x falls. Writes similarity-<task>.png and similarity.json (per model the correlation of x and y,
and the mean of y) into --out_dir, beside the answers --compare wrote there.
"""
import json
import sys
from pathlib import Path

import torch

import chat
from cli import (DEVICE_FLAGS, DEVICE_RANGES, check_ranges, for_inference,
                 machine, parse_flags, pyplot, run_main)
from comparison import file_name
from embedding import embed, unit_vectors
from model import GPT

# ---------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "out_dir": ("out/eval", "where evaluate.py --compare wrote the single-task models' answers; "
                            "the plots and similarity.json go there too"),
    "base": ("gpt2", "the model that embeds every text (the one --compare started from)"),
    "instruction_data": ("lima", "the reference responses: the instruction-tuned baseline's data"),
    "tasks": ("gsm8k mbpp recipes chess poetry",
              "the single-task models, as --compare named them"),
    "task_data": ("", "each task's finetuning data, if --compare was given --task_data"),
    "batch_size": (8, "texts embedded together"),
    **DEVICE_FLAGS,  # --device, --dtype, --threads: as in train.py
}
RANGES = {"batch_size": "[1, inf)", **DEVICE_RANGES}
# -------------------------------------------------------------------------------------------------


def similarity_axes(asked, answered, task_asked, task_answered, reference_answered):
    """The two numbers the official plot_embeds.py computes for each evaluation instruction, from
    unit vectors (rows): x = its mean cosine similarity to the task's finetuning instructions; y =
    the mean cosine similarity of the model's response to the task's finetuning responses minus
    that to the reference (LIMA) responses. The paper's finding (section 5.2): y falls as x falls,
    so far from its domain a single-task model does not answer in its domain's style."""
    x = (asked @ task_asked.T).mean(1)
    y = (answered @ task_answered.T).mean(1) - (answered @ reference_answered.T).mean(1)
    return x, y


def texts_to_embed(config):
    """{group: [texts]}: the reference responses, and per task the instructions and the model's
    answers (from --compare's files) and the task's finetuning instructions and responses."""
    out_dir = Path(config["out_dir"])
    tasks = config["tasks"].split()
    paths = {task: out_dir / f"{file_name(f'{task}-tuned')}.json" for task in tasks}
    for task, path in paths.items():  # before anything is downloaded
        if not path.is_file():
            raise OSError(f"{path}: no answers of the {task}-tuned model; run python evaluate.py "
                          f"--compare first")
    reference = chat.read_conversations(chat.data_files(config["instruction_data"])[0])
    groups = {"reference": [c[1]["content"] for c in reference]}
    for task, path in paths.items():
        answers = json.loads(path.read_text(encoding="utf-8"))
        finetuning = chat.read_conversations(chat.data_files(config["task_data"] or task)[0])
        groups[(task, "asked")] = [a["instruction"] for a in answers]
        groups[(task, "answered")] = [a["output"] for a in answers]
        groups[(task, "task_asked")] = [c[0]["content"] for c in finetuning]
        groups[(task, "task_answered")] = [c[1]["content"] for c in finetuning]
    return groups


def plot(x, y, r, task, config, plt):
    """One model's instructions as dots: response similarity against instruction similarity, in
    --out_dir/similarity-<task>.png."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(x, y, s=12)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(title=f"{task}-tuned: response vs instruction similarity (r = {r:.2f})",
           xlabel=f"instruction similarity to the {task} instructions",
           ylabel=f"response similarity to {task} over {config['instruction_data']}")
    fig.tight_layout()
    fig.savefig(Path(config["out_dir"]) / f"similarity-{task}.png", dpi=120)
    plt.close(fig)


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_ranges(config, RANGES)
    device, dtype = machine(config)
    out_dir = Path(config["out_dir"])
    # 1) every text, embedded by the base model in one pass
    groups = texts_to_embed(config)
    model = for_inference(GPT.from_pretrained(config["base"]), device, dtype)
    texts = [text for group in groups.values() for text in group]
    vectors = unit_vectors(embed(model, texts, device, dtype, config["batch_size"]))
    vectors = dict(zip(groups, vectors.split([len(group) for group in groups.values()])))
    # 2) each task's axes, their correlation and its plot
    results = {}
    plt = pyplot("the similarity plots")
    for task in config["tasks"].split():
        kinds = ("asked", "answered", "task_asked", "task_answered")
        x, y = similarity_axes(*(vectors[(task, kind)] for kind in kinds), vectors["reference"])
        r = float("nan")
        if len(x) > 1:
            r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        results[task] = {"r": r, "mean_y": y.mean().item(), "x": x.tolist(), "y": y.tolist()}
        if plt is not None:
            plot(x, y, r, task, config, plt)
    # 3) the table and the file
    print("| single-task model | instructions | r(instruction sim, response sim) "
          "| mean response sim over reference |")
    print("| --- | ---: | ---: | ---: |")
    for task, m in results.items():
        print(f"| {task}-tuned | {len(m['x'])} | {m['r']:.3f} | {m['mean_y']:+.4f} |")
    summary = {"embedding": f"{config['base']}, mean-pooled, centered",
               "reference": config["instruction_data"], "tasks": results}
    chat.write_atomic(out_dir / "similarity.json", json.dumps(summary, indent=2))
    print(f"wrote {out_dir}/similarity.json and similarity-<task>.png", file=sys.stderr)


if __name__ == "__main__":
    run_main(main, "nothing was written")
