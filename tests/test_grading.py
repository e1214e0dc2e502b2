"""exercises.py for a class: the student copy holds no answer and its checks say "not started"; honest
work passes `check` and `grade`; every wrong or hard-coded answer of test_exercises.py, and the cheats a
trial found (issue 21), fails `grade` on fresh inputs, and the plausible mistakes fail the public check
too. (Teacher-only: a student copy does not hold this file.)"""
import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import chat
import evaluate
import exercises
import rules
import sampling
from test_exercises import CASES

SEED = 20261203


def command(folder, *args, timeout=900):
    """python exercises.py ARGS in `folder`, with the exercises.py of that folder."""
    return subprocess.run([sys.executable, str(folder / "exercises.py"), *args], cwd=folder,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    """A student copy, as `python exercises.py new` writes it."""
    folder = tmp_path_factory.mktemp("class") / "student"
    r = command(ROOT, "new", str(folder))
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copyfile(ROOT / "exercises.py", folder / "exercises.py")  # as committed here
    return folder


def solved(copy, tmp_path, replace=None):
    """The student copy with every exercise solved as the reference solves it (honest work), then
    `replace` ({file: (old text, new text)}) applied: one cheat."""
    folder = tmp_path / "solved"
    shutil.copytree(copy, folder)
    for file in ("rules.py", "chat.py", "evaluate.py", "sampling.py"):
        shutil.copyfile(ROOT / file, folder / file)
    for file, (old, new) in (replace or {}).items():
        text = (folder / file).read_text()
        assert old in text, (file, old)
        (folder / file).write_text(text.replace(old, new))
    return folder


def test_the_student_copy_holds_no_answer(copy):
    for number, (_, file, names, _) in exercises.EXERCISES.items():
        text = (copy / file).read_text()
        assert f'raise NotImplementedError("exercise {number}: see EXERCISES.md")' in text
    for file in exercises.TEACHER_ONLY:
        assert not (copy / file).exists(), file
    # the reference's formulas, as written here, appear nowhere: not in a file, not in the history
    # (exercise 6's draw, `rng.randint(0, n - 1)` per draw, is its specification: EXERCISES.md says it)
    formulas = ["ramping * (top * n / length)", "zip(ids[1:], mask[1:])", '{**m, "content": ""} if m',
                "bias[token] -= rule_set.diversity_penalty", "wins += score(i, i) > score(i, j)",
                "len(set(grams)) / len(grams)", "probs.cumsum(dim=-1) - probs >= p",
                "range(len(ids) - len(tag), -1, -1)"]
    history = subprocess.run(["git", "log", "-p", "--all"], cwd=copy, capture_output=True,
                             text=True).stdout
    files = [p for p in copy.rglob("*") if p.is_file() and ".git" not in p.parts]
    for formula in formulas:
        assert formula not in history, formula
        for path in files:
            if path.suffix in (".py", ".md", ".json", ".toml", ".txt"):
                assert formula not in path.read_text(errors="replace"), (formula, path)
    assert subprocess.run(["git", "log", "--oneline"], cwd=copy, capture_output=True,
                          text=True).stdout.count("\n") == 1  # one commit: no past to dig up
    assert exercises.leaks(copy, exercises.modules(ROOT)) == []
    table = (copy / "rules.py").read_text().split("UNIFORM = [")[1].split("]")[0]
    assert table.count("None,") == 30 and "1635" not in table  # exercise 2's columns are blank


def test_the_copy_runs_and_its_checks_say_not_started(copy):
    r = command(copy, "check")
    assert r.returncode == 1, r.stdout
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 8 and all("not started" in row for row in rows), r.stdout
    # the program still runs where no exercise is on its path: the shipped TinyWorld base answers
    base = "data/tinyworld/bases/seed1"
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={base}", "--max_new_tokens=5",
                        "--prompt=What colour is a blorp?", "--device=cpu"], cwd=copy,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-1000:]
    # and where one is, it says which
    r = subprocess.run([sys.executable, "sample.py", f"--init_from={base}", "--rules",
                        "--max_new_tokens=5", "--prompt=Hi", "--device=cpu"], cwd=copy,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "exercise" in r.stderr and "EXERCISES.md" in r.stderr, r.stderr
    # TinyWorld's preparation needs exercise 4's function: it stops, and writes nothing that would
    # make the next run think the world is prepared
    r = subprocess.run([sys.executable, "data/tinyworld/prepare.py"], cwd=copy, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "exercise 4" in r.stderr, r.stderr[-1000:]
    for name in ("test.jsonl", "dev.jsonl", "tinyworld_train.jsonl", "vocab.json"):
        assert not (copy / "data" / "tinyworld" / name).exists(), name


def test_honest_work_passes_check_and_grade(copy, tmp_path):
    folder = solved(copy, tmp_path)
    r = command(folder, "check")
    assert r.returncode == 0 and r.stdout.count("passed") == 8, r.stdout + r.stderr[-2000:]
    r = command(ROOT, "grade", str(folder), f"--seed={SEED}")
    assert r.returncode == 0 and r.stdout.count("passed") == 8, r.stdout + r.stderr[-2000:]
    assert f"--seed={SEED}" in r.stdout.splitlines()[0]  # the seed, to replay a grade


# cheats that only a process of the student's own can catch: a library that does the exercise, and
# the reference dug out of the history
LIBRARY_TOP_P = ("def top_p_filter(scores, p):", '''def top_p_filter(scores, p):
    from transformers import TopPLogitsWarper
    return TopPLogitsWarper(top_p=p)(None, scores)


def unused(scores, p):''')
HISTORY_EOS = ("def eos_bias(n, rule_set):", '''def eos_bias(n, rule_set):
    import subprocess
    source = subprocess.run(["git", "show", "HEAD:rules.py"], capture_output=True, text=True).stdout
    namespace = {}
    exec(source, namespace)
    return namespace["eos_bias"](n, rule_set)


def unused(n, rule_set):''')


@pytest.mark.parametrize("number, file, cheat", [(8, "sampling.py", LIBRARY_TOP_P),
                                                 (1, "rules.py", HISTORY_EOS)],
                         ids=["transformers' TopPLogitsWarper", "exec of git show HEAD:rules.py"])
def test_grade_fails_cheats_that_reach_outside_the_copy(copy, tmp_path, number, file, cheat):
    folder = solved(copy, tmp_path, {file: cheat})
    r = command(ROOT, "grade", str(folder), str(number), f"--seed={SEED}")
    assert r.returncode == 1 and "passed" not in r.stdout, r.stdout + r.stderr[-2000:]


# cheats a trial found that a check of fixed inputs let through, as functions (graded in-process)
def eos_right_where_checked(n, r):
    """Right for the counts the old check tried (up to 2,000), wrong past them."""
    right = rules.eos_bias(n, r)
    return right + (n > 2000) * 1.0


def top_p_off_by_one(scores, p):
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    drop = ~(probs.cumsum(dim=-1) - probs <= p)
    return scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def ranking_over_all_pairs(score, n, negatives, seed):
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    return 100 * sum(score(i, i) > score(i, j) for i, j in pairs) / max(1, len(pairs))


def targets_as_a_generator(ids, mask):
    return (nxt if m else -1 for nxt, m in zip(ids[1:] + [None], mask[1:] + [0]))


def user_turns_without_content(messages):
    return [{"role": "user"} if m["role"] == "user" else m for m in messages]


def diversity_set_not_added(ids, prompt_len, rule_set):
    """rule_bias with `bias[token] = -1.5` where the rules add (the uniform rule's ids lose theirs)."""
    bias = torch.zeros(rules.VOCAB)
    diversity_start, response_start = rules.rule_starts(ids, prompt_len, rule_set)
    if rule_set.uniform:
        bias += rules.uniform_bias(rule_set)
    if rule_set.eos:
        bias[rules.EOT] += rules.eos_bias(len(ids) - response_start, rule_set)
    if rule_set.diversity:
        for token in set(ids[diversity_start:]):
            bias[token] = -1.5
    return bias


def diversity_ignoring_response_only(ids, prompt_len, rule_set):
    options = {k: getattr(rule_set, k) for k in rule_set.__dataclass_fields__}
    return ORIGINAL_RULE_BIAS(ids, prompt_len, rules.RuleSet(**{**options, "response_only": False}))


ORIGINAL_RULE_BIAS = rules.rule_bias
CHEATS = [(1, rules, "eos_bias", "right only where the old check looked", eos_right_where_checked),
          (8, sampling, "top_p_filter", "off by one: cumsum - probs <= p", top_p_off_by_one),
          (6, evaluate, "ranking_win_rate", "all pairs, no draws", ranking_over_all_pairs),
          (3, chat, "targets_from_mask", "a generator, not a list", targets_as_a_generator),
          (4, chat, "empty_instructions", "user turns without content", user_turns_without_content),
          (5, rules, "rule_bias", "bias[token] = -1.5, not -=", diversity_set_not_added),
          (5, rules, "rule_bias", "response_only ignored", diversity_ignoring_response_only)]
NUMBER = {check: number for number, (check, _, _, _) in exercises.EXERCISES.items()}
WRONG = [(NUMBER[exercise], module, name, mistake, wrong)
         for exercise, module, name, mistake, wrong in CASES] + CHEATS


@pytest.fixture(scope="module")
def fresh():
    """{exercise: [(case, the reference's result)]} on fresh inputs from SEED, as grade draws them."""
    mods = exercises.modules(ROOT)
    out = {}
    for number in exercises.EXERCISES:
        cases = exercises.exercise_cases(number, mods, random.Random(f"{SEED}:{number}"), True)
        out[number] = [(c, exercises.want_of(mods, c)) for c in cases]
    return out


@pytest.mark.parametrize("number, module, name, mistake, wrong", WRONG,
                         ids=[f"{w[0]}-{w[2]}-{w[3]}" for w in WRONG])
def test_grade_fails_every_wrong_answer(fresh, monkeypatch, number, module, name, mistake, wrong):
    mods = exercises.modules(ROOT)
    monkeypatch.setattr(module, name, wrong)  # as the student's file would have it
    results = ((c, want, exercises.run(mods, c)) for c, want in fresh[number])
    status, detail = exercises.verdict(number, results, mods)
    assert status == "failed", (mistake, status, detail)


def test_the_public_checks_fail_the_plausible_mistakes(monkeypatch):
    """Every wrong answer of test_exercises.py fails the public check of a student copy as well (the
    cheats above need grade's wider inputs, or its own process)."""
    mods = exercises.modules(ROOT)
    public = json.loads(json.dumps(exercises.public_cases(mods)))  # as exercises.json holds them
    for exercise, module, name, mistake, wrong in CASES:
        number = NUMBER[exercise]
        with monkeypatch.context() as m:
            m.setattr(module, name, wrong)
            results = ((c, want, exercises.run(mods, c)) for c, want in public[str(number)])
            status, detail = exercises.verdict(number, results, mods)
        assert status == "failed", (exercise, mistake, status, detail)


# right answers written otherwise than the reference: grade passes them (its comparisons allow the
# last bits floats differ by when the arithmetic is ordered otherwise)
def eos_with_where(n, r):
    n = torch.as_tensor(n, dtype=torch.float64)
    late = torch.tensor(r.eos_max if r.eos_hold else 0.0, dtype=torch.float64)
    held = torch.where(n >= r.eos_length, late, 0.0)
    bias = torch.where((n > 0) & (n < r.eos_length), n * r.eos_max / r.eos_length, held)
    return bias if bias.dim() else float(bias)


def targets_in_a_loop(ids, mask):
    targets = []
    for t in range(len(ids)):
        trained = t + 1 < len(ids) and mask[t + 1] == 1
        targets.append(ids[t + 1] if trained else -1)
    return targets


def repeats_counted(tokens, n=4):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def win_share_after(score, n, negatives, seed):
    draws = evaluate.ranking_draws(n, negatives, seed)
    if not draws:
        return 0.0
    return sum(score(i, i) > score(i, j) for i, j in draws) / len(draws) * 100


def top_p_shifted_cumsum(scores, p):
    probs = scores.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, -1) - sorted_probs
    keep_sorted = before < p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return scores.masked_fill(~keep, float("-inf"))


RIGHT = [(1, rules, "eos_bias", eos_with_where), (3, chat, "targets_from_mask", targets_in_a_loop),
         (7, evaluate, "repeated_ngram_share", repeats_counted),
         (6, evaluate, "ranking_win_rate", win_share_after),
         (8, sampling, "top_p_filter", top_p_shifted_cumsum)]


@pytest.mark.parametrize("number, module, name, right", RIGHT, ids=[r[2] for r in RIGHT])
def test_grade_passes_right_answers_written_otherwise(fresh, monkeypatch, number, module, name,
                                                       right):
    mods = exercises.modules(ROOT)
    monkeypatch.setattr(module, name, right)
    results = ((c, want, exercises.run(mods, c)) for c, want in fresh[number])
    assert exercises.verdict(number, results, mods) == ("passed", "")
