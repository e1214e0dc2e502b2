"""
TinyWorld's tables and charts, from experiment.py's results {seed: {model: metrics}}: the one home of
how a result is shown (mean ± sd over seeds, the paper's number beside ours).
"""
import statistics

import world

# the columns of the main table: (metrics key, heading)
COLUMNS = (("win", "win % vs instruction-tuned (paper's metric)"),
           ("held-out", f"correct %, held-out ({', '.join(world.HELD_OUT)})"),
           ("finetuned", f"correct %, finetuned ({', '.join(world.HEADLINE)})"),
           ("answered", "answered %, held-out (grade ≥ 1)"),
           ("stop", "stop %"), ("ranking", "ranking %"))


def sd(values):
    """The sample standard deviation over seeds (0 for one seed)."""
    if len(values) <= 1:
        return 0.0
    return statistics.stdev(values)


def spread(values):
    """'mean ± sd' of one metric over seeds; one seed has no spread, so just its value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {sd(values):.1f}"


def seeds_heading(n):
    """What the first column's heading says the cells are."""
    return "1 seed" if n == 1 else f"{n} seeds, mean ± sd"


def column(by_seed, label, key):
    """One metric of one model: a value per seed."""
    return [by_seed[s][label][key] for s in by_seed]


def markdown(by_seed, paper):
    """The main table (mean ± sd over seeds, the paper's win rate against its instruction-tuned
    model in the last column), then correct % per family (means), the control families apart."""
    labels = list(next(iter(by_seed.values())))
    heads = [heading for _, heading in COLUMNS]
    lines = [f"| model ({seeds_heading(len(by_seed))}) | " + " | ".join(heads)
             + " | paper: win % vs instruction-tuned |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for label in labels:
        cells = [spread(column(by_seed, label, key)) for key, _ in COLUMNS]
        number = paper.get(label)
        cells.append("–" if number is None else str(number))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    families = [f for f in world.FAMILIES if f not in world.CONTROL] + list(world.CONTROL)
    heads = [f"{f} (control)" if f in world.CONTROL else f for f in families]
    lines += ["", "| model | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(families)]
    for label in labels:
        means = [f"{statistics.mean(column(by_seed, label, f)):.0f}" for f in families]
        lines.append(f"| {label} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def style_markdown(style):
    """The style claim: per single-task model, each family's instruction similarity and the share
    of its responses in the task's form (means over seeds), and the correlation over families and
    seeds."""
    lines = ["| single-task model | family | instruction similarity | in the task's form % |",
             "| --- | --- | ---: | ---: |"]
    for label, model in style.items():
        for family, point in model["families"].items():
            lines.append(f"| {label} | {family} | {point['similarity']:+.3f} "
                         f"| {point['form']:.1f} |")
    lines += ["", "| single-task model | points (families × seeds) | Pearson r | Spearman ρ |",
              "| --- | ---: | ---: | ---: |"]
    for label, model in style.items():
        lines.append(f"| {label} | {len(model['points'])} | {shown(model['pearson'])} "
                     f"| {shown(model['spearman'])} |")
    return "\n".join(lines)


def shown(r):
    """A correlation as the table and the chart print it."""
    return "undefined (one side constant)" if r is None else f"{r:+.2f}"


def pearson(x, y):
    """Pearson's r of two lists (None when either is constant: r is undefined there, and JSON has
    no nan)."""
    mx, my = statistics.mean(x), statistics.mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def ranks(values):
    """Each value's rank (1-based), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def style_summary(by_seed_style):
    """{seed: {model: {family: {similarity, form}}}} -> {model: {families (means over seeds),
    points, pearson, spearman}}: one point per family and seed."""
    summary = {}
    models = next(iter(by_seed_style.values()))
    for label in models:
        points = [(s, f, p["similarity"], p["form"])
                  for s, seed_style in by_seed_style.items()
                  for f, p in seed_style[label].items()]
        families = {}
        for f in models[label]:
            mine = [(x, y) for _, g, x, y in points if g == f]
            families[f] = {"similarity": statistics.mean(x for x, _ in mine),
                           "form": statistics.mean(y for _, y in mine)}
        x = [p[2] for p in points]
        y = [p[3] for p in points]
        summary[label] = {"families": families, "points": points, "pearson": pearson(x, y),
                          "spearman": pearson(ranks(x), ranks(y))}
    return summary


# ---------------------------------------------------------------------------------------- charts

def save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_chart(plt, by_seed, paper, path):
    """Left: win % against the same seed's instruction-tuned model beside the paper's win rate
    (AlpacaEval, Llama-2-7B) for each model the paper has. Right: correct % on held-out and
    finetuned families. Bars are means, error bars sd, dots the seeds."""
    labels = list(next(iter(by_seed.values())))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(labels) + 1.8), sharey=True)
    y = range(len(labels))
    wins = [column(by_seed, label, "win") for label in labels]
    axes[0].barh([i - 0.2 for i in y], [statistics.mean(v) for v in wins], height=0.4,
                 xerr=[sd(v) for v in wins], capsize=3, color="tab:green",
                 label="TinyWorld (exact judge)")
    for i, v in enumerate(wins):
        axes[0].plot(v, [i - 0.2] * len(v), "k.", markersize=3)
    papers = [(i, paper[label]) for i, label in enumerate(labels) if paper.get(label) is not None]
    axes[0].barh([i + 0.2 for i, _ in papers], [p for _, p in papers], height=0.4,
                 color="tab:gray", label="paper (AlpacaEval, Llama-2-7B)")
    axes[0].axvline(50, color="k", lw=0.5)
    axes[0].set(xlim=(0, 100), xlabel="win % vs instruction-tuned (ties count half)")
    axes[0].legend(loc="lower right", fontsize=8)
    for k, (key, color) in enumerate((("held-out", "tab:orange"), ("finetuned", "tab:blue"))):
        values = [column(by_seed, label, key) for label in labels]
        ys = [i + (k - 0.5) * 0.4 for i in y]
        axes[1].barh(ys, [statistics.mean(v) for v in values], height=0.4, color=color,
                     label=f"{key} families", xerr=[sd(v) for v in values], capsize=3)
        for yi, v in zip(ys, values):
            axes[1].plot(v, [yi] * len(v), "k.", markersize=3)
    axes[1].set(xlim=(0, 100), xlabel="correct % (exact judge)")
    axes[1].legend(loc="lower right", fontsize=8)
    axes[0].set_yticks(list(y), labels)
    axes[0].invert_yaxis()  # first model on top
    fig.suptitle(f"TinyWorld: mean ± sd over {len(by_seed)} seeds, dots = seeds", fontsize=10)
    save(plt, fig, path)


def style_chart(plt, style, path):
    """The style claim as the paper draws it: x how similar a family's instructions are to the
    single task's, y the share of responses in the task's form; one dot per family and seed."""
    fig, axes = plt.subplots(1, len(style), figsize=(5.5 * len(style), 4.2), squeeze=False)
    for ax, (label, model) in zip(axes[0], style.items()):
        for family in model["families"]:
            pts = [(x, y) for _, f, x, y in model["points"] if f == family]
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, label=family)
        ax.set(title=f"{label}: r = {shown(model['pearson'])}, ρ = {shown(model['spearman'])}",
               xlabel="instruction similarity to the task's finetuning instructions",
               ylabel="responses in the task's form %", ylim=(-3, 103))
        ax.legend(fontsize=7, ncol=2)
    save(plt, fig, path)


def sweep_chart(plt, by_seed, lrs, path):
    """Response tuning's correct % against its learning rate: where it works and where it
    collapses; the instruction-tuned model's (the first row) as a dashed line."""
    reference, *labels = list(next(iter(by_seed.values())))  # (instruction-tuned, one per lr)
    assert len(labels) == len(lrs), (labels, lrs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, color in (("held-out", "tab:orange"), ("finetuned", "tab:blue")):
        values = [column(by_seed, label, key) for label in labels]
        ax.errorbar(lrs, [statistics.mean(v) for v in values], yerr=[sd(v) for v in values],
                    marker="o", capsize=3, color=color, label=f"{key} families")
        ax.axhline(statistics.mean(column(by_seed, reference, key)), color=color, ls="--", lw=1,
                   label=f"{reference}, {key}")
    ax.set(xscale="log", ylim=(0, 100), xlabel="response-tuning learning rate (60 steps of 16)",
           ylabel=f"correct % ({seeds_heading(len(by_seed))})")
    ax.legend(fontsize=8)
    save(plt, fig, path)
