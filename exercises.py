"""
The exercises of EXERCISES.md for a class: a student copy without the answers, its public checks,
and a teacher's grader on fresh inputs.

    python exercises.py new ../student        # the teacher: a student copy (a new git repository)
    python exercises.py check                   # the student, in the copy: every exercise's check
    python exercises.py check 1 3               # ... or some of them
    python exercises.py grade ../student      # the teacher, here: fresh inputs, the reference
    python exercises.py grade ../student 8 --seed=1234      # replay a grade

`new` copies this repository's tracked files into DIR with every exercise function's body replaced
by `raise NotImplementedError`, exercise 2's GPT-2 columns blank and the comments that give its
answers reworded; the tests that hold reference answers stay behind, and exercises.json holds the
public checks' inputs with the reference's outputs (data, not formulas). `check` runs them on the
copy's own functions: a row per exercise, passed, not started, or failed with the smallest input it
failed on. `grade` runs the student's functions in a process of their own, in DIR (they import the
student's modules, never this repository's), on inputs drawn anew from a printed seed over the
whole range the program meets (large counts, ties, boundaries, batches, RuleSets of other values
than the official ones), and inside the program (RuleState, train.py's tokenize and collate,
chat.write_sets, the sampler, evaluate.py's proxies), against this repository's reference. A row
per exercise; the exit status is 0 only if every one named passes.
"""
import ast
import contextlib
import hashlib
import io
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
# number: (check name, file, the names a student writes, what EXERCISES.md calls it)
EXERCISES = {
    1: ("eos_rule", "rules.py", ["eos_bias"], "the EOS rule"),
    2: ("uniform_tokens", "rules.py", ["UNIFORM"], "the 15 uniform tokens in GPT-2"),
    3: ("loss_targets", "chat.py", ["targets_from_mask"], "the loss targets"),
    4: ("response_only", "chat.py", ["empty_instructions"], "response-only data"),
    5: ("diversity_rule", "rules.py", ["rule_bias", "after_tag"], "the diversity rule"),
    6: ("ranking", "evaluate.py", ["ranking_draws", "ranking_win_rate"], "the response ranking"),
    7: ("repetition", "evaluate.py", ["repeated_ngram_share"], "the repetition metric"),
    8: ("top_p", "sampling.py", ["top_p_filter"], "top-p sampling"),
}
# files that hold reference answers (the checks' oracles, a transcription of the official rules) or
# the teacher's notes: never in a student copy
TEACHER_ONLY = {"tests/test_exercises.py", "tests/test_rules.py", "tests/test_grading.py",
                "SOLUTIONS.md"}
CASES_FILE = "exercises.json"
STUDENT_TIMEOUT = 600  # seconds for all of one exercise's cases in the student's process
# the rules' scores are float32: a bias is right to within a few of its ulps at the ramp's top, 15
# (8 ulps there; 3 at the largest score other_values' rules reach, 30 + 4 + 8)
TOLERANCE = 8 * torch.finfo(torch.float32).eps * 16
# message contents the conversations are made of: empty, spaced, multi-line, non-ASCII
WORDS = ["", "Hi?", "Tell me a joke.", "Sure: a list\n- one", "  spaced  ", "Bye.", "Ünïcode ✓"]


# -------------------------------------------------------------------------------- the repositories

def load(root, file):
    """A module of the repository at `root` (rules.py, chat.py, ...), loaded from its file. The
    grader loads the student's files from the student's copy; a script's file (evaluate.py) is
    loaded like any other: what is graded is the file."""
    root = str(root)
    if root not in sys.path:
        sys.path.insert(0, root)  # its own helpers (cli.py, model.py, ...) come from there too
    name = Path(file).stem
    if name in sys.modules and Path(sys.modules[name].__file__).parent == Path(root):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(root) / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def modules(root):
    """{file stem: module} of every file an exercise or a program case needs, from `root`."""
    names = ["rules", "chat", "evaluate", "sampling", "train"]
    return {name: load(root, f"{name}.py") for name in names}


# ------------------------------------------------------------------------ cases and their encoding

def encode(value):
    """A JSON-able form of an argument or a result: tensors, RuleSets and tuples keep their
    kind."""
    if torch.is_tensor(value):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if hasattr(value, "__dataclass_fields__"):  # a RuleSet: its uniform_table is a tuple of tuples
        # only the fields off their defaults (decode's RuleSet fills in the rest): a failure shows
        # the values that matter, not eleven fields cut off at its length limit
        fields = value.__dataclass_fields__.items()
        return {"ruleset": {k: encode(getattr(value, k)) for k, f in fields
                            if getattr(value, k) != f.default}}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": str(value)}
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy's values
        return encode(value.tolist())
    return value


def decode(value, mods):
    """encode's inverse; a RuleSet is built by the repository's own rules.py (mods["rules"])."""
    if isinstance(value, list):
        return [decode(v, mods) for v in value]
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if "ruleset" in value:
        fields = {k: decode(v, mods) for k, v in value["ruleset"].items()}
        return mods["rules"].RuleSet(**fields)
    if "tuple" in value:
        return tuple(decode(v, mods) for v in value["tuple"])
    if "dict" in value:
        return {decode(k, mods): decode(v, mods) for k, v in value["dict"]}
    if "float" in value:
        return float(value["float"])
    if "table" in value:  # a score(i, j) for ranking_win_rate, from its table
        table = value["table"]
        return lambda i, j: table[i][j]
    raise ValueError(f"unknown encoded value {value}")


def case(call, *args, **kwargs):
    """One input: what to call (a function of an exercise, or a program piece of PROGRAM) and on
    what."""
    return {"call": call, "args": [encode(a) for a in args],
            "kwargs": {k: encode(v) for k, v in kwargs.items()}}


def shown(c, limit=300):
    """A case as the student reads it in a failure: the call and its arguments, shortened."""
    args = [json.dumps(a) for a in c["args"]]
    args += [f"{k}={json.dumps(v)}" for k, v in c["kwargs"].items()]
    text = f"{c['call']}({', '.join(args)})"
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return text


# ------------------------------------------------------------------- program pieces a case can run

def sparse(scores):
    """A (V,) or (B, V) score tensor as its nonzero entries: {id: score} per row."""
    rows = scores.reshape(-1, scores.size(-1))
    out = []
    for row in rows:
        ids = row.nonzero().flatten().tolist()
        out.append({i: float(row[i]) for i in ids})
    return out


def run_rule_state(mods, prompts, rule_set, steps):
    """RuleState as generate drives it: the scores after the prompts, then after each step's
    tokens."""
    state = mods["rules"].RuleState(prompts, rule_set)
    out = [sparse(state.scores())]
    for tokens in steps:
        state.update(torch.tensor(tokens))
        out.append(sparse(state.scores()))
    return out


def run_tokenize(mods, conversations, block_size):
    """train.py's tokenize and collate: the micro-batch's targets (exercise 3 in the program)."""
    examples, truncated = mods["train"].tokenize(conversations, block_size)
    x, y = mods["train"].collate(examples, "cpu", block_size)
    return {"truncated": truncated, "x": x.tolist(), "y": y.tolist()}


def run_write_sets(mods, conversations):
    """chat.write_sets(..., responses_only=True) and reading the response-only file back (exercise
    4 in the program: what prepare.py writes and train.py reads)."""
    chat = mods["chat"]
    with tempfile.TemporaryDirectory() as directory, contextlib.redirect_stdout(io.StringIO()):
        chat.write_sets(directory, "x", conversations, responses_only=True)
        return chat.read_conversations(Path(directory) / "x_responses_train.jsonl")


def run_next_tokens(mods, logprobs, top_p, seed):
    """The sampler at top_p (exercise 8 in the program): 64 draws per row from a seeded
    generator."""
    generator = torch.Generator().manual_seed(seed)
    draws = [mods["sampling"].next_tokens(logprobs, top_p=top_p, generator=generator)
             for _ in range(64)]
    return torch.stack(draws, 1).tolist()  # (B, 64)


def run_proxies(mods, outputs, instructions):
    """evaluate.py's proxies of a model's answers (exercise 7 in the program)."""
    return mods["evaluate"].proxies(outputs, instructions)


PROGRAM = {"RuleState": run_rule_state, "tokenize+collate": run_tokenize,
           "write_sets": run_write_sets, "next_tokens": run_next_tokens, "proxies": run_proxies}
FUNCTIONS = {"eos_bias": "rules", "UNIFORM": "rules", "uniform_bias": "rules",
             "targets_from_mask": "chat", "empty_instructions": "chat", "rule_bias": "rules",
             "after_tag": "rules", "ranking_draws": "evaluate", "ranking_win_rate": "evaluate",
             "repeated_ngram_share": "evaluate", "top_p_filter": "sampling"}


def run(mods, c):
    """What case c gives with the repository `mods`: ("ok", result), ("todo", message) when the
    exercise is not started, or ("error", message)."""
    args = [decode(a, mods) for a in c["args"]]
    kwargs = {k: decode(v, mods) for k, v in c["kwargs"].items()}
    try:
        if c["call"] in PROGRAM:
            result = PROGRAM[c["call"]](mods, *args, **kwargs)
        elif c["call"] == "UNIFORM":
            result = [list(row) for row in mods["rules"].UNIFORM]
        else:
            result = getattr(mods[FUNCTIONS[c["call"]]], c["call"])(*args, **kwargs)
        if c["call"] == "empty_instructions":  # its input must come back unchanged
            result = {"result": result, "input": args[0]}
        if c["call"] == "targets_from_mask":  # the program indexes and measures it
            result = {"type": type(result).__name__, "result": list(result)}
        if c["call"] in ("rule_bias", "uniform_bias"):  # (V,) scores: compared by their nonzeros
            result = sparse(result)
        return "ok", encode(result)
    except NotImplementedError as e:
        return "todo", str(e) or "NotImplementedError"
    except Exception as e:  # the student's code failed on this input: that is the finding
        return "error", f"{type(e).__name__}: {e}"[:500]


# ------------------------------------------------------------------------------- comparing results

def close(a, b):
    """Two rule scores (float32 arithmetic) agree: to within a few ulps of the largest, 15."""
    return abs(a - b) <= TOLERANCE


def same_sparse(want, got):
    """Two lists of {id: score} rows (or nested lists of them) agree: the same ids, close
    scores."""
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            same_sparse(w, g) for w, g in zip(want, got))
    if not (isinstance(got, dict) and "dict" in got and set(got) == {"dict"}):
        return False
    want = {k: v for k, v in want["dict"]}
    got = {k: v for k, v in got["dict"]}
    return want.keys() == got.keys() and all(close(want[k], got[k]) for k in want)


def nucleus(row, p):
    """(the smallest prefix's size k, the k-th largest probability) of a row of scores at p,
    computed in float64 from the scores' softmax: a valid top-p set keeps every token likelier than
    that probability and, among those exactly as likely, as many as make k."""
    probs = torch.softmax(row.double(), -1)
    ordered = probs.sort(descending=True).values
    k = int((ordered.cumsum(0) < p).sum()) + 1  # the token that reaches p is kept
    k = min(k, int((ordered > 0).sum()))
    return k, float(ordered[k - 1]), probs


def top_p_wrong(scores, p, got):
    """None if got is a right top-p filtering of scores at p, else what is wrong with it."""
    if not torch.is_tensor(got) or got.shape != scores.shape:
        shape = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        return f"returned {shape}, expected scores of the input's shape {tuple(scores.shape)}"
    for b, (row, out) in enumerate(zip(scores.reshape(-1, scores.size(-1)),
                                       got.reshape(-1, got.size(-1)))):
        k, cut, probs = nucleus(row, p)
        kept = out != float("-inf")
        if not torch.equal(out[kept], row[kept]):
            return f"row {b}: a kept score changed (kept scores must stay as they were)"
        must = probs > cut  # every token likelier than the cut
        may = probs >= cut
        if int(kept.sum()) != k or bool((must & ~kept).any()) or bool((kept & ~may).any()):
            top = [round(x, 4) for x in probs.sort(descending=True).values[:8].tolist()]
            return (f"row {b}: kept {int(kept.sum())} tokens, expected the {k} likeliest (their "
                    f"probabilities, sorted, start {top}; the one that reaches p={p} is kept)")
    return None


def draws_wrong(c, want, got, mods):
    """None if every draw of next_tokens lies in a right top-p set of its row."""
    logprobs = decode(c["args"][0], mods)
    p = c["args"][1]
    if not isinstance(got, list) or len(got) != logprobs.size(0):
        return f"next_tokens gave {got!r:.200}"
    for b, row in enumerate(logprobs):
        _, cut, probs = nucleus(row, p)
        outside = [t for t in got[b] if not probs[t] >= cut]
        if outside:
            return f"row {b}: next_tokens drew {outside[:5]}, outside the top-p set at p={p}"
    return None


def wrong(c, want, got, mods):
    """None if `got` (encoded) is right for case c, whose reference result is `want`, else why."""
    call = c["call"]
    if call == "top_p_filter":
        return top_p_wrong(decode(c["args"][0], mods), c["args"][1], decode(got, mods))
    if call == "next_tokens":
        return draws_wrong(c, want, got, mods)
    if call in ("rule_bias", "uniform_bias", "RuleState"):
        return None if same_sparse(want, got) else "the rule scores differ"
    if call == "eos_bias":
        return eos_wrong(decode(want, mods), decode(got, mods))
    if call in ("ranking_win_rate", "repeated_ngram_share"):
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return f"returned {type(got).__name__}, expected a number"
        return None if same_number(want, got) else "wrong value"
    if call == "proxies":  # means of the student's shares: as exact as the shares themselves
        want = dict(want["dict"])
        got = dict(got["dict"]) if isinstance(got, dict) and "dict" in got else {}
        numbers = all(isinstance(v, (int, float)) for v in got.values())
        if want.keys() != got.keys() or not numbers or not all(same_number(want[k], got[k])
                                                              for k in want):
            return "evaluate.py's proxies differ"
        return None
    return None if got == want else "wrong result"


def same_number(want, got):
    """Two results of float arithmetic agree: a right answer that orders its operations otherwise
    differs from the reference in the last bits only."""
    return abs(got - want) <= 1e-9 * max(1.0, abs(want))


def eos_wrong(want, got):
    """None if eos_bias's result `got` matches the reference's `want` (a number, or a tensor)."""
    if torch.is_tensor(want):
        if not torch.is_tensor(got) or got.shape != want.shape:
            return "on a tensor of counts it must return a tensor of their biases, one per count"
        if not bool(((got.double() - want.double()).abs() <= TOLERANCE).all()):
            return "wrong for some counts of the tensor"
        return None
    if torch.is_tensor(got) and got.numel() == 1:
        got = float(got)
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"returned {type(got).__name__}, expected a number"
    return None if close(float(got), float(want)) else "wrong value"


# ------------------------------------------------------------------------------ the inputs, drawn

def ruleset(mods, **options):
    return mods["rules"].RuleSet(**options)


def other_values(rng, rules=("eos", "diversity", "uniform")):
    """Values of `rules` other than the official 15, 250, 1.5 and table, as a synthetic world sets
    them: the rules' code must read them from the RuleSet, not write the official ones in. A
    table's ids are small ones the sequences repeat, and <|endoftext|>."""
    values = {}
    if "eos" in rules:
        values.update(eos_max=round(rng.uniform(-5, 30), 3), eos_length=rng.randint(1, 300),
                      eos_hold=rng.random() < 0.5)
    if "diversity" in rules:
        values["diversity_penalty"] = round(rng.uniform(0, 4), 3)
    if "uniform" in rules and rng.random() < 0.7:  # else the official table
        ids = rng.sample(list(range(60)) + [50256], rng.randint(1, 20))
        values["uniform_table"] = tuple((i, round(rng.uniform(-8, 8), 3)) for i in ids)
    return values


def random_ids(rng, size, alphabet=40):
    """Token ids below `alphabet` (small ids form no stray chat tag)."""
    return [rng.randrange(alphabet) for _ in range(size)]


def with_tags(rng, mods, size, tags):
    """A sequence of random ids with up to `tags` user tags and maybe assistant tags inside."""
    rules = mods["rules"]
    out = random_ids(rng, rng.randint(0, size))
    for _ in range(rng.randint(0, tags)):
        tag = rng.choice([rules.USER_TAG, rules.ASSISTANT_TAG])
        out += tag + random_ids(rng, rng.randint(0, size))
    return out


def dialogue(rng, pairs):
    """A conversation as training data holds them: user and assistant turns in pairs, every answer
    written, maybe after a system message."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(WORDS)})
    for _ in range(pairs):
        messages.append({"role": "user", "content": rng.choice(WORDS)})
        messages.append({"role": "assistant", "content": rng.choice(WORDS[1:])})
    return messages


def conversation(rng, turns, words):
    """A conversation of `turns` user/assistant messages, maybe after a system message."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(words)})
    for k in range(turns):
        role = "user" if k % 2 == 0 else "assistant"
        messages.append({"role": role, "content": rng.choice(words)})
    return messages


def eos_cases(mods, rng, largest, others):
    """With the official values: every count up to 300, the ramp's ends, large counts. Then
    `others` RuleSets of another peak and length (eos_max, eos_length; the first ramps over no
    token): its first counts, 30 along the ramp, its end, large ones. And tensors of counts
    (RuleState's)."""
    large = sorted(rng.sample(range(301, largest), 200))
    sets = [(ruleset(mods, eos_hold=hold), list(range(301)) + large) for hold in (False, True)]
    for k in range(others):
        values = other_values(rng, ["eos"])
        if k == 0:
            values["eos_length"] = 1  # the ramp never starts: held, or 0, from n = 1 on
        end = values["eos_length"]
        ramp = rng.sample(range(end), min(end, 30))
        counts = sorted({0, 1, 2, 3, end - 1, end, end + 1, *ramp}) + large[::20]
        sets.append((ruleset(mods, **values), counts))
    out = []
    for r, counts in sets:
        out += [case("eos_bias", n, r) for n in counts]
        for size in (1, 7, 64):
            batch = torch.tensor([rng.choice(counts) for _ in range(size)])
            out.append(case("eos_bias", batch, r))
    return out


def mask_cases(rng, longest):
    """(ids, mask) pairs: every mask of up to 7 tokens, then multi-turn masks up to `longest`."""
    out = []
    for length in range(1, 8):
        for bits in range(2 ** length):
            mask = [(bits >> k) & 1 for k in range(length)]
            out.append(case("targets_from_mask", list(range(100, 100 + length)), mask))
    for _ in range(120):
        mask = []
        while len(mask) < rng.randint(1, longest):
            mask += [0] * rng.randint(0, 40) + [1] * rng.randint(1, 60)
        out.append(case("targets_from_mask", random_ids(rng, len(mask), 50257), mask))
    return out


def conversation_cases(rng, words, count):
    """Conversations of 1 to 7 messages, smallest first: for empty_instructions."""
    out = []
    for turns in range(1, 8):
        for _ in range(count):
            out.append(case("empty_instructions", conversation(rng, turns, words)))
    return out


def diversity_cases(mods, rng, count):
    """after_tag, and rule_bias: the diversity rule alone first (`count` inputs, smallest first),
    then with the other rules and options on (`count` more; they call exercise 1's and 2's
    functions too), the uniform rule's own ids among the tokens, a third of them with other
    values (a penalty other than 1.5; a uniform table whose ids the sequence holds)."""
    rules = mods["rules"]
    alone = dict(eos=False, uniform=False)
    together = [dict(), dict(response_only=True), dict(fixed_tags=True), dict(eos_hold=True),
                dict(eos=False, uniform=False, response_only=True)]
    out = []
    for k in range(2 * count):
        size = k % count
        prompt = with_tags(rng, mods, size, 3) or [1]
        response = with_tags(rng, mods, size, 2)
        options = alone
        if k >= count:
            options = rng.choice(together) if k % 3 else other_values(rng)
            response += [rng.choice(rules.UNIFORM)[3] for _ in range(rng.randint(0, 3))]
        ids = prompt + response
        out.append(case("rule_bias", ids, len(prompt), ruleset(mods, **options)))
        out.append(case("after_tag", ids, rules.USER_TAG))
        out.append(case("after_tag", ids, rng.choice([rules.ASSISTANT_TAG, [7, 7], [3]])))
    return out


def ranking_cases(rng, sizes, tables):
    """ranking_draws at (n, negatives, seed), and ranking_win_rate on score tables with ties."""
    out = [case("ranking_draws", n, negatives, seed) for n, negatives, seed in sizes]
    for n, negatives, seed in tables:
        levels = [rng.choice([-1.0, 0.0, 1.0]) for _ in range(3)]  # few values: many exact ties
        table = [[rng.choice(levels) for _ in range(n)] for _ in range(n)]
        # score(i, j) = table[i][j]: the case carries the table, decode() makes the function
        out.append({"call": "ranking_win_rate", "args": [{"table": table}, n, negatives, seed],
                    "kwargs": {}})
    return out


def repetition_cases(rng, count, longest):
    """Every {0, 1} list up to 9 tokens with the default n = 4, then random ones, n from 1 to 6."""
    out = []
    for length in range(0, 10):
        for bits in range(2 ** length):
            out.append(case("repeated_ngram_share", [(bits >> k) & 1 for k in range(length)]))
    for _ in range(count):
        tokens = random_ids(rng, rng.randint(0, longest), rng.choice((2, 3, 5, 50)))
        out.append(case("repeated_ngram_share", tokens, n=rng.randint(1, 6)))
    return out


def away_from_sums(rng, scores):
    """A p at least 1e-4 (1e-3 in wide rows) from every prefix sum of the rows' sorted
    probabilities: float rounding, in whatever order a right answer adds them, cannot move it."""
    sums = torch.softmax(scores.double(), -1).sort(-1, descending=True).values.cumsum(-1)
    margin = 1e-3 if scores.size(-1) > 1000 else 1e-4
    for _ in range(10000):
        p = rng.uniform(0.01, 0.99)
        if float((sums - p).abs().min()) >= margin:
            return p
    raise RuntimeError("no p away from the prefix sums: the rows' head is too flat")


def random_scores(g, B, V):
    """(B, V) unsorted scores, log-probabilities up to a per-row shift; a wide row (a vocabulary)
    puts most of its mass on a few tokens, as a language model does, so p can be kept clear of its
    prefix sums."""
    probs = torch.rand(B, V, generator=g, dtype=torch.float64).pow(3) + 1e-3
    logits = probs.log()
    if V > 100:
        head = torch.randint(0, V, (B, 12), generator=g)
        boost = torch.rand(B, 12, generator=g, dtype=torch.float64) * 4 + 10
        logits.scatter_add_(1, head, boost)
    shift = torch.empty(B, 1, dtype=torch.float64).uniform_(-5, 5, generator=g)
    return (logits + shift).float()


def top_p_cases(rng, count, widths):
    """Unsorted random distributions as unnormalized scores; ties with p on a boundary (equal
    scores: exact probabilities); rows with -inf (after top-k); and the sampler on them."""
    g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    out = []
    for V in widths:
        for _ in range(count):
            scores = random_scores(g, rng.randint(1, 4), V)
            if V > 3 and rng.random() < 0.3:
                scores[:, rng.randrange(V)] = float("-inf")  # a token top-k removed
            out.append(case("top_p_filter", scores, away_from_sums(rng, scores)))
    for V in (1, 2, 4, 8, 16):  # equal scores: probabilities 1/V exactly, p on their sums
        for k in range(1, V + 1):
            out.append(case("top_p_filter", torch.zeros(2, V), k / V))
    for V in (6, 40):
        logprobs = torch.log_softmax(torch.randn(3, V, generator=g), -1)
        p = away_from_sums(rng, logprobs)
        out.append(case("next_tokens", logprobs, p, rng.randrange(999)))
    return out


def rule_state_cases(mods, rng, count, options):
    """RuleState, what `sample.py --rules` runs: batches of prompts with tags, then generated
    tokens that open new turns and repeat the uniform rule's ids (exercises 1, 2 and 5 in the
    program)."""
    rules = mods["rules"]
    out = []
    for _ in range(count):
        B = rng.randint(1, 4)
        prompts = [with_tags(rng, mods, 8, 3) or [1] for _ in range(B)]
        steps = []
        pool = [row[3] for row in rules.UNIFORM] + list(range(40))  # ids the rules act on
        while len(steps) < rng.randint(1, 300):
            if rng.random() < 0.03:  # a whole tag, as the model may write one
                for t in rng.choice([rules.USER_TAG, rules.ASSISTANT_TAG]):
                    steps.append([t] * B)
            steps.append([rng.choice(pool) for _ in range(B)])
        out.append(case("RuleState", prompts, ruleset(mods, **rng.choice(options)), steps))
    return out


def program_cases(number, mods, rng):
    """The exercise's function inside the program, on fresh inputs (the grader's)."""
    words = WORDS
    if number in (1, 2, 5):
        options = [{}, dict(eos_hold=True), dict(response_only=True), dict(what_bias=-3.0),
                   dict(diversity=False), dict(fixed_tags=True)]
        options += [other_values(rng) for _ in range(3)]  # a synthetic world's rules
        return rule_state_cases(mods, rng, 12, options)
    if number == 3:
        conversations = [dialogue(rng, rng.randint(1, 4)) for _ in range(16)]
        return [case("tokenize+collate", conversations[k:k + 4], rng.choice([24, 128, 1024]))
                for k in range(0, 16, 4)]
    if number == 4:
        return [case("write_sets", [dialogue(rng, rng.randint(1, 3)) for _ in range(8)])
                for _ in range(4)]
    if number == 7:
        outputs = [random_ids(rng, rng.randint(0, 80), 6) + rng.choice([[], [50256]])
                   for _ in range(12)]
        return [case("proxies", outputs, [rng.choice(words) for _ in outputs])]
    return []


def exercise_cases(number, mods, rng, fresh):
    """The inputs of exercise `number`'s check (fresh=False: the public one, smaller and fixed) or
    of its grade (fresh=True: wider ranges, and the program's own calls)."""
    if number == 1:
        cases = eos_cases(mods, rng, 10 ** 6 if fresh else 2001, 10 if fresh else 4)
    elif number == 2:
        cases = [case("UNIFORM")]
        if fresh:
            cases += [case("uniform_bias", ruleset(mods, what_bias=w)) for w in (-5.0, -3.0)]
    elif number == 3:
        cases = mask_cases(rng, 1100 if fresh else 60)
    elif number == 4:
        cases = conversation_cases(rng, WORDS, 20 if fresh else 12)
    elif number == 5:
        cases = diversity_cases(mods, rng, 40 if fresh else 24)
    elif number == 6:
        sizes = [(1, 3, 0), (2, 1, 0), (2, 40, 5), (5, 4, 2), (17, 5, 0), (50, 5, 123)]
        tables = [(2, 40, 0), (3, 30, 1), (5, 4, 2), (8, 1000, 3)]
        if fresh:
            sizes = [(rng.randint(1, 300), rng.randint(1, 10), rng.randrange(10 ** 9))
                     for _ in range(12)] + sizes[:2]
            tables = [(rng.randint(1, 40), rng.randint(1, 50), rng.randrange(10 ** 9))
                      for _ in range(12)]
        cases = ranking_cases(rng, sizes, tables)
    elif number == 7:
        cases = repetition_cases(rng, 300 if fresh else 200, 300 if fresh else 40)
    elif number == 8:
        widths = [1, 2, 3, 8, 100, 50257] if fresh else list(range(1, 13))
        cases = top_p_cases(rng, 8 if fresh else 6, widths)
    if fresh:
        cases += program_cases(number, mods, rng)
    return cases


# ----------------------------------------------------------------------- exercise 2's public check

def table_digest(rows):
    """A digest of the whole uniform table: it says whether the table is right, not its rows."""
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def uniform_wrong(table, digest, mods):
    """exercise 2's check without the answer: each row's GPT-2 id decodes to its GPT-2 string, and
    the whole table has the reference's digest."""
    decode_ids = mods["chat"].tokenizer().decode
    for llama, piece, string, token, _ in table:
        if string is None or token is None:
            return "not started", f"the row of {llama} ({piece!r}) is still blank"
        if decode_ids([token]) != string:
            return "failed", (f"the row of {llama} ({piece!r}): GPT-2 id {token} is "
                              f"{decode_ids([token])!r}, not the string {string!r} beside it")
    if table_digest([list(row) for row in table]) != digest:
        return "failed", ("every id decodes to its string, but some row is not the GPT-2 "
                          "counterpart of its Llama piece (reread what ▁ and <0x0A> stand for)")
    return "passed", ""


# ----------------------------------------------------------------------------------------- check

def public_cases(mods):
    """{number: [(case, the reference's result)]}: the public checks, from this repository's
    reference functions, in a fixed order (the smallest inputs first)."""
    out = {}
    for number in EXERCISES:
        rng = random.Random(number)
        if number == 2:
            table = [list(row) for row in mods["rules"].UNIFORM]
            out[number] = [({"call": "UNIFORM", "args": [], "kwargs": {}}, table_digest(table))]
            continue
        cases = exercise_cases(number, mods, rng, fresh=False)
        out[number] = [(c, want_of(mods, c)) for c in cases]
    return out


def want_of(mods, c):
    """The reference's result for case c; the reference never fails."""
    status, result = run(mods, c)
    if status != "ok":
        raise RuntimeError(f"the reference failed on {shown(c)}: {result}")
    return result


def verdict(number, results, mods):
    """(status, detail) of one exercise from [(case, want, (status, got))]: the first case that is
    not right decides, and the cases are smallest first."""
    for c, want, (status, got) in results:
        if c["call"] == "UNIFORM" and status == "ok":
            table = decode(got, mods)
            if isinstance(want, str):  # the public check: the table's digest
                return uniform_wrong(table, want, mods)
            if any(row[2] is None or row[3] is None for row in table):
                return "not started", "some rows of UNIFORM are still blank"
        if status == "todo":
            other = re.search(r"exercise (\d+)", got)
            # its case calls another exercise's function
            if other and int(other.group(1)) != number:
                return f"waits for exercise {other.group(1)}", f"{shown(c, 120)} calls it"
            return "not started", got
        if status == "error":
            return "failed", f"{shown(c)} raised {got}"
        why = wrong(c, want, got, mods)
        if why:
            return "failed", f"{shown(c)}: {why}; gave {json.dumps(got)[:300]}"
    return "passed", ""


def report(rows):
    """Print a row per exercise; True if every one passed."""
    for number, (status, detail) in rows.items():
        name = EXERCISES[number][0]
        line = f"{number:>2}. {name:<15} {status}"
        if detail:
            line += f": {detail}"
        print(line)
    return all(status == "passed" for status, _ in rows.values())


def check(numbers):
    """python exercises.py check [N ...]: the public checks on this repository's functions."""
    mods = modules(ROOT)
    path = ROOT / CASES_FILE
    if path.is_file():  # a student copy: the cases and the reference's results, as data
        stored = json.loads(path.read_text(encoding="utf-8"))
        public = {int(k): [(c, want) for c, want in v] for k, v in stored.items()}
    else:  # the teacher's repository: the reference is here
        public = public_cases(mods)
    rows = {}
    for number in numbers:
        results = ((c, want, run(mods, c)) for c, want in public[number])  # stops at a failure
        rows[number] = verdict(number, results, mods)
    return 0 if report(rows) else 1


# ------------------------------------------------------------------------------- the student copy

# what the student copy says above exercise 2's table, instead of the notes that answer it
UNIFORM_NOTE = """\
# The uniform rule (paper section 5, Listing 1), as the official open_instruct/combined_model.py
# lines 147-176 sets it: 15 Llama-2 token ids, their pieces in the Llama-2 vocabulary, and their
# biases. Exercise 2 (EXERCISES.md): fill in the GPT-2 string and id of each.
#          official id  Llama piece  GPT-2 string  GPT-2 id  bias
"""


# exercise 2's written answer: Llama's three-space piece and GPT-2's single space, id 220, on one
# line (spelled in pieces, so that this file does not hold it)
SPACES_ANSWER = "\u2581" * 3 + r"[^\n]*\b" + str(22) + "0" + r"\b"
UNIFORM_DOC = """\
The uniform rule's tokens are the 15 Llama-2 ids that the official
`open_instruct/combined_model.py` (lines 147–176) biases. Finding their GPT-2 counterparts, and
reading the official comments beside them, is exercise 2 of [EXERCISES.md](../EXERCISES.md); this
page's table of them is in the teacher's copy.
"""


def docstring_end(node):
    """The last line of a function's docstring, or the line of its `def` if it has none."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        return first.end_lineno
    return node.lineno


def cut_bodies(text, number, names):
    """text with the bodies of the functions `names` replaced by a NotImplementedError of exercise
    `number`; rule_bias keeps all but its diversity part (exercise 5 names that part)."""
    lines = text.split("\n")
    spans = []  # (first, last) 1-based lines to replace, with their indentation
    for node in ast.parse(text).body:
        if not isinstance(node, ast.FunctionDef) or node.name not in names:
            continue
        if node.name == "rule_bias":
            for inner in ast.walk(node):
                if isinstance(inner, ast.If) and ast.unparse(inner.test) == "rule_set.diversity":
                    spans.append((inner.body[0].lineno, inner.body[-1].end_lineno))
            continue
        spans.append((docstring_end(node) + 1, node.end_lineno))
    for first, last in sorted(spans, reverse=True):
        indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        lines[first - 1:last] = [todo(number, indent)]
    return "\n".join(lines)


def todo(number, indent):
    return f'{indent}raise NotImplementedError("exercise {number}: see EXERCISES.md")'


def blank_uniform(text):
    """rules.py with exercise 2's GPT-2 columns blank and the notes above the table reworded."""
    tree = ast.parse(text)
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "UNIFORM")
    lines = text.split("\n")
    start = node.lineno - 1
    while lines[start - 1].startswith("#"):  # the comment block above the table
        start -= 1
    rows = []
    for k, (llama, piece, _, _, bias) in enumerate(ast.literal_eval(node.value)):
        opening = "UNIFORM = [" if k == 0 else "           "
        quoted = json.dumps(piece, ensure_ascii=False) + ","
        rows.append(f"{opening}({str(llama) + ',':<11} {quoted:<12} {'None,':<13} {'None,':<9} "
                    f"{bias:+.1f}),")
    rows[-1] = rows[-1][:-1] + "]"
    lines[start:node.end_lineno] = UNIFORM_NOTE.rstrip("\n").split("\n") + rows
    return "\n".join(lines)


def student_files():
    """The files of a student copy: this repository's tracked files but the teacher's."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    files = [f for f in listed.stdout.decode().split("\0") if f]
    return [f for f in files if f not in TEACHER_ONLY and (ROOT / f).is_file()]


def student_text(file, text):
    """A file as the student copy holds it."""
    for number, (_, name, names, _) in EXERCISES.items():
        if name == file and names != ["UNIFORM"]:
            text = cut_bodies(text, number, names)
    if file == "rules.py":
        text = blank_uniform(text)
    if file == "docs/faithfulness.md":  # its table of the 15 tokens is exercise 2's answer
        text = re.sub(r"The uniform rule's tokens are .*?came from the ids\.\n", UNIFORM_DOC, text,
                      flags=re.S)
        # and the departures table says which Llama piece has no GPT-2 token of its own
        text = re.sub(r"the GPT-2 tokens with the same strings; `▁▁▁`[^|]*\|[^|]*\|",
                      "the GPT-2 tokens with the same strings (exercise 2) | — |", text)
    return text


def removed_lines(number, file, names):
    """The statements a student copy takes out of exercise `number`'s functions, stripped."""
    source = (ROOT / file).read_text(encoding="utf-8")
    kept = set(cut_bodies(source, number, names).split("\n"))
    return [line.strip() for line in source.split("\n") if line not in kept and line.strip()]


def leaks(directory, mods):
    """Where a student copy still holds an answer: a body's statements in its file, a whole body
    anywhere, or three rows of exercise 2's table (Llama id ... GPT-2 id) in a .py or .md file."""
    found = []
    texts = {}
    for path in Path(directory).rglob("*"):
        if path.is_file() and ".git" not in path.parts and path.suffix in (".py", ".md", ".json"):
            texts[path] = path.read_text(encoding="utf-8", errors="replace")
    for number, (_, file, names, _) in EXERCISES.items():
        if names == ["UNIFORM"]:
            continue
        lines = removed_lines(number, file, names)
        own = texts[Path(directory) / file]
        found += [f"{file}: {line}" for line in lines if line in own and len(line) > 15]
        body = "\n".join(lines)
        found += [f"{path}: exercise {number}'s body" for path, text in texts.items()
                  if body in "\n".join(x.strip() for x in text.split("\n"))]
    rows = []
    for llama, _, _, token, _ in mods["rules"].UNIFORM:
        rows.append(re.compile(rf"\b{llama}\b.*\b{token}\b"))
    for path, text in texts.items():
        if path.suffix in (".py", ".md") and re.search(SPACES_ANSWER, text):
            found.append(f"{path}: the written answer of exercise 2")
        if path.suffix in (".py", ".md"):
            hits = sum(any(row.search(line) for line in text.split("\n")) for row in rows)
            if hits >= 3:
                found.append(f"{path}: {hits} rows of exercise 2's table")
    return found


def new(directory):
    """python exercises.py new DIR: the student copy, built beside DIR and renamed into place once
    it is whole and holds no answer."""
    directory = Path(directory).resolve()
    if directory.exists():
        raise ValueError(f"{directory}: already exists; a student copy goes into a new folder")
    if ROOT in directory.parents:
        raise ValueError(f"{directory}: inside this repository; choose a folder outside it "
                         f"(e.g. ../student)")
    if not directory.parent.is_dir():
        raise ValueError(f"{directory.parent}: no such folder to write the student copy into")
    mods = modules(ROOT)
    # a new folder of its own beside DIR (never one that was there before), renamed when whole
    building = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    building.chmod(0o755)  # mkdtemp's 0700 is for secrets; a student copy is handed out
    try:
        for file in student_files():
            target = building / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if file.endswith((".py", ".md")):
                text = (ROOT / file).read_text(encoding="utf-8")
                target.write_text(student_text(file, text), encoding="utf-8")
            else:
                shutil.copyfile(ROOT / file, target)
        public = public_cases(mods)
        stored = {}
        for number, cases in public.items():
            stored[str(number)] = [[c, want] for c, want in cases]
        (building / CASES_FILE).write_text(json.dumps(stored), encoding="utf-8")
        found = leaks(building, mods)
        if found:
            raise RuntimeError("the student copy would hold answers: " + "; ".join(found[:5]))
        git = ["git", "-c", "user.name=exercises.py", "-c", "user.email=exercises@localhost"]
        subprocess.run(git + ["init", "-q"], cwd=building, check=True)
        subprocess.run(git + ["add", "-A"], cwd=building, check=True)
        subprocess.run(git + ["commit", "-q", "-m", "The exercises of EXERCISES.md, not started"],
                       cwd=building, check=True)
        building.rename(directory)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"wrote the student copy to {directory}: {len(student_files())} files, the exercises' "
          f"functions raise NotImplementedError; there: python exercises.py check")
    return 0


# ----------------------------------------------------------------------------------------- grade

# the student's process: this file, loaded by path, runs the cases on the modules of its working
# folder, the student's copy (python -c puts the working folder first on sys.path)
HARNESS = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("grader", sys.argv[1])
grader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grader)
grader.serve(sys.argv[2], sys.argv[3])
"""


def serve(cases_path, out_path):
    """In the student's process: every case on the student's modules, the results as JSON (never a
    pickle: nothing the student's code makes is loaded as code by the grader). transformers is
    not importable here: an answer must not hand the exercise to a library."""
    for library in ("transformers", "safetensors"):
        sys.modules[library] = None
    mods = modules(Path.cwd())
    cases = json.loads(Path(cases_path).read_text(encoding="utf-8"))
    results = [list(run(mods, c)) for c in cases]
    Path(out_path).write_text(json.dumps(results), encoding="utf-8")


def student_results(directory, cases):
    """[(status, result)] of every case with the student's functions, in a process of their own in
    the student's folder; a crash or a timeout fails every case."""
    with tempfile.TemporaryDirectory() as scratch:
        cases_path = Path(scratch) / "cases.json"
        out_path = Path(scratch) / "results.json"
        cases_path.write_text(json.dumps(cases), encoding="utf-8")
        # the harness runs from a copy, and the environment does not name this folder: the
        # student's code is not pointed at the reference (it runs with your permissions, though:
        # grade copies you do not trust in a container)
        grader = Path(scratch) / "grader.py"
        shutil.copyfile(Path(__file__).resolve(), grader)
        env = {k: v for k, v in os.environ.items() if k not in ("OLDPWD", "PYTHONPATH")}
        env["PWD"] = str(directory)
        command = [sys.executable, "-c", HARNESS, str(grader), str(cases_path), str(out_path)]
        try:
            child = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                                   timeout=STUDENT_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            return [("error", f"took over {STUDENT_TIMEOUT} s")] * len(cases)
        if child.returncode != 0 or not out_path.is_file():
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            return [("error", f"the student's process failed: {last}"[:500])] * len(cases)
        return [tuple(result) for result in json.loads(out_path.read_text(encoding="utf-8"))]


def grade(directory, numbers, seed):
    """python exercises.py grade DIR [N ...] [--seed=S]: the student's functions against this
    repository's, on inputs drawn from `seed` (printed, so that a grade can be replayed)."""
    directory = Path(directory).resolve()
    for _, file, _, _ in EXERCISES.values():
        if not (directory / file).is_file():
            raise ValueError(f"{directory}: no {file}; expected a student copy (python "
                             f"exercises.py new DIR)")
    if seed is None:
        seed = random.SystemRandom().randrange(10 ** 9)
    named = " ".join(map(str, numbers))
    print(f"grading {directory} on inputs from seed {seed} (replay: python exercises.py grade "
          f"{directory} {named} --seed={seed})")
    mods = modules(ROOT)
    rows = {}
    for number in numbers:
        started = time.time()
        cases = exercise_cases(number, mods, random.Random(f"{seed}:{number}"), fresh=True)
        wants = [want_of(mods, c) for c in cases]
        got = student_results(directory, cases)
        status, detail = verdict(number, zip(cases, wants, got), mods)
        rows[number] = (status, f"{detail} [{len(cases)} inputs, {time.time() - started:.0f} s]")
    return 0 if report(rows) else 1


def parse(argv):
    """(command, folder or None, exercise numbers, seed or None) from the command line."""
    if argv[:1] in (["-h"], ["--help"]):
        try:
            print(__doc__.strip())
        except BrokenPipeError:  # --help | head
            pass
        sys.exit(0)
    if not argv or argv[0] not in ("new", "check", "grade"):
        raise ValueError(f"usage: python exercises.py new DIR | check [N ...] | grade DIR [N ...] "
                         f"[--seed=S] (got {' '.join(argv) or 'nothing'}; see the docstring)")
    command, rest = argv[0], argv[1:]
    seed = None
    for arg in [a for a in rest if a.startswith("--")]:
        if not arg.startswith("--seed=") or not arg[7:].isdigit():
            raise ValueError(f"unknown argument {arg!r} (grade takes --seed=S, S a number)")
        seed = int(arg[7:])
    rest = [a for a in rest if not a.startswith("--")]
    folder = None
    if command in ("new", "grade"):
        if not rest:
            raise ValueError(f"python exercises.py {command} DIR: name the student copy's folder")
        folder, rest = rest[0], rest[1:]
    numbers = []
    for arg in rest:
        if not arg.isdigit() or int(arg) not in EXERCISES:
            raise ValueError(f"exercise {arg!r}: the exercises with a function to check are "
                             f"{', '.join(map(str, EXERCISES))} (EXERCISES.md gives the others' "
                             f"expected results)")
        numbers.append(int(arg))
    return command, folder, numbers or list(EXERCISES), seed


def main(argv):
    command, folder, numbers, seed = parse(argv)
    if command == "new":
        return new(folder)
    if command == "check":
        return check(numbers)
    return grade(folder, numbers, seed)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
