"""The checks of EXERCISES.md. Each check_<name>() reads the function under exercise from its module (rules,
chat, evaluate or sampling) and asserts, over many inputs, the property a right answer must have, each compared with
an independent statement of it; inputs are tried smallest first and from fixed seeds, so a failure names the
smallest input it found and reproduces. (Why not hypothesis, which the other tests use: enumerating every small
input, smallest first, makes the first failure the smallest one without a shrinker, in the same order on every
run, and a student's slow or crashing function meets each input once, not the hundreds of re-runs of shrinking.)
test_<exercise> run them on the repository's code (each check takes the function, by default the module's);
test_exercise_checks_catch_wrong_answers replaces each function with plausible wrong answers and a hard-coded one
(the kind that passes a check of one fixed input) and asserts that its check fails.

These oracles are the teacher's: a student copy (python exercises.py new DIR) does not hold this file, and its
checks (python exercises.py check) compare with the reference's outputs stored as data; tests/test_grading.py
holds those checks and the grader to the same wrong answers.
"""
import copy
import dataclasses
import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import chat
import evaluate
import rules
import sampling
from model import GPT


def call(fn, *args, what, **kwargs):
    """fn(*args): an exception inside the student's code becomes the check's failure, naming the input."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e


# 1. the EOS rule ------------------------------------------------------------------------------------------
# the rules' scores are float32 (RuleState): a bias is right to within a few of its ulps at the ramp's top, 15
# (8 there; 4 at the top of the other values' ramps, 30 at most)
EOS_TOLERANCE = 8 * torch.finfo(torch.float32).eps * 15


def eos_rule_sets():
    """The official RuleSets (eos_hold off and on), then others of another peak and length, as a synthetic world
    sets them: a right answer reads rule_set.eos_max and rule_set.eos_length, never 15 and 250."""
    rng = random.Random(1)
    others = [rules.RuleSet(eos_hold=bool(k % 2), eos_max=round(rng.uniform(-5, 30), 3), eos_length=length)
              for k, length in enumerate((1, 2, 37, 300))]
    return [rules.RuleSet(eos_hold=hold) for hold in (False, True)] + others


def check_eos_rule(eos_bias=None):
    eos_bias = eos_bias or rules.eos_bias
    for r in eos_rule_sets():
        top, length, hold = r.eos_max, r.eos_length, r.eos_hold
        shown = f"RuleSet(eos_hold={hold}, eos_max={top:g}, eos_length={length})"
        late = top if hold else 0.0  # from n = eos_length on
        for n in range(2001):  # every count, smallest first
            # the property on its own terms: 0 at n = 0, a line of slope top/length while n < length, then flat
            want = 0.0 if n == 0 else n * (top / length) if n < length else late
            got = call(eos_bias, n, r, what=f"eos_bias({n}, {shown})")
            assert abs(float(got) - want) <= EOS_TOLERANCE, (
                f"eos_bias({n}, {shown}) is {got!r}, expected {want:g} ({n} is the smallest count where it is "
                f"wrong). The bias is 0 at n = 0, eos_max·n/eos_length (here {top:g}·n/{length}) while 0 < n < "
                f"{length}, and {late:g} from n = {length} on"
                f"{' (eos_hold keeps it at eos_max)' if hold else ' (the official code drops it back to 0)'}; the "
                f"official values are 15 and 250, read them from rule_set.")
        counts = torch.arange(2001)
        got = call(eos_bias, counts, r, what=f"eos_bias(torch.arange(2001), {shown}) (a tensor of counts)")
        assert torch.is_tensor(got) and got.shape == counts.shape, (
            f"eos_bias(torch.arange(2001), {shown}) returned {type(got).__name__} "
            f"{tuple(got.shape) if torch.is_tensor(got) else ''}, expected a tensor of 2001 biases, one per count: "
            f"RuleState (what `sample.py --rules` runs) calls eos_bias with one count per sequence of its batch. "
            f"Write it with comparisons and arithmetic that work on ints and tensors alike (no `if` on n).")
        want = torch.tensor([float(eos_bias(n, r)) for n in range(2001)])
        bad = (got.double() - want.double()).abs() > EOS_TOLERANCE
        assert not bad.any(), (
            f"eos_bias(torch.arange(2001), {shown})[{int(bad.nonzero()[0])}] is "
            f"{float(got[bad][0])}, but eos_bias({int(bad.nonzero()[0])}) is {float(want[bad][0])}: on a tensor of "
            f"counts it must give, count by count, what it gives for each int.")


def test_eos_rule_ramps_linearly_then_stops():
    check_eos_rule()


# 2. the 15 uniform tokens in GPT-2's vocabulary ------------------------------------------------------------
# official open_instruct/combined_model.py lines 147-176: Llama-2 id -> (its true piece, bias)
OFFICIAL = {29966: ("<", -4), 529: ("▁<", -4), 29989: ("|", -4), 306: ("▁I", -5), 29902: ("I", -5),
            1334: ("▁We", -3), 5618: ("What", -5), 881: ("▁should", -6), 334: ("▁*", 1), 448: ("▁-", 1),
            1678: ("▁▁▁", 1), 396: ("▁#", 1), 444: ("▁##", 1), 13: ("<0x0A>", 1), 29991: ("!", 1)}


def check_uniform_tokens(table=None):
    table = table or rules.UNIFORM
    assert {llama: (piece, bias) for llama, piece, _, _, bias in table} == OFFICIAL, "the official ids, pieces, biases"
    for llama, piece, _, token, _ in table:
        # Llama's ▁ is a space; <0x0A> is a newline; GPT-2 spells a run of spaces with single spaces
        want = {"▁▁▁": " ", "<0x0A>": "\n"}.get(piece, piece.replace("▁", " "))
        assert chat.tokenizer().decode([token]) == want, f"{piece!r}: id {token} is {chat.tokenizer().decode([token])!r}"


def test_uniform_tokens_are_the_official_ones_in_gpt2():
    check_uniform_tokens()


# 3. mask the instruction out of the loss -------------------------------------------------------------------
def masks_smallest_first():
    """(ids, mask) pairs: every mask of up to 7 tokens, then random multi-turn masks (runs of 0s and 1s)."""
    for length in range(1, 8):
        for mask in itertools.product((0, 1), repeat=length):
            yield list(range(100, 100 + length)), list(mask)  # distinct ids: a shift by one shows
    rng = random.Random(3)
    for _ in range(300):
        mask = []
        for _ in range(rng.randint(1, 6)):  # turns: an instruction run (0s), then a response run (1s)
            mask += [0] * rng.randint(0, 8) + [1] * rng.randint(1, 8)
        mask += [0] * rng.randint(0, 3)
        yield [rng.randrange(50257) for _ in mask], mask


def check_loss_targets(targets_from_mask=None):
    targets_from_mask = targets_from_mask or chat.targets_from_mask
    for ids, mask in masks_smallest_first():
        # position t predicts token t + 1, and is trained exactly when token t + 1 is (the last has no next token)
        want = [ids[t + 1] if t + 1 < len(ids) and mask[t + 1] == 1 else -1 for t in range(len(ids))]
        got = call(targets_from_mask, list(ids), list(mask), what=f"targets_from_mask({ids}, {mask})")
        assert list(got) == want, (
            f"targets_from_mask(ids={ids}, mask={mask}) is {list(got)}, expected {want}. Position t predicts "
            f"token t + 1: targets[t] = ids[t + 1] where mask[t + 1] is 1, and -1 everywhere else, the last position "
            f"included; one target per position.")
    rng = random.Random(4)  # and on real conversations: the trained targets are the responses and what ends them
    for turns in range(1, 5):
        messages = [m for k in range(turns) for m in ({"role": "user", "content": f"Question {k}?"},
                                                      {"role": "assistant", "content": rng.choice(["Yes.", "No way!", "42"])})]
        ids, mask = chat.encode_chat(messages)
        trained = [t for t in targets_from_mask(ids, mask) if t != -1]
        want = []
        for k, response in enumerate(messages[1::2]):
            want += chat.encode(response["content"]) + [chat.EOT]
            if k < turns - 1:  # the "\n" after <|endoftext|> trains too (open-instruct's mask: chat.py)
                want += chat.encode("\n")
        assert trained == want, (f"on a {turns}-turn chat the trained targets are {trained}, expected each response, "
                                 f"its <|endoftext|> and the \\n after it if another turn follows: {want}")


def test_loss_targets_are_the_next_trained_token():
    check_loss_targets()


# 4. turn LIMA into response-only data ------------------------------------------------------------------------
def conversations_smallest_first():
    rng = random.Random(5)
    words = ["", "Hi?", "Tell me a joke.", "Sure: a list\n- one", "  spaced  ", "Bye."]
    for size in range(1, 7):
        for _ in range(20):
            messages = [{"role": "system", "content": rng.choice(words)}] if rng.random() < 0.3 else []
            for k in range(size):
                messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": rng.choice(words)})
            yield messages


def check_response_only(empty_instructions=None):
    empty_instructions = empty_instructions or chat.empty_instructions
    for conversation in conversations_smallest_first():
        before = copy.deepcopy(conversation)
        got = call(empty_instructions, conversation, what=f"empty_instructions({before})")
        assert conversation == before, (
            f"empty_instructions({before}) changed its input into {conversation}: build new messages "
            f"({{**m, 'content': ''}}) instead of editing the given ones.")
        want = [{**m, "content": ""} if m["role"] == "user" else m for m in before]
        ok = len(got) == len(want) and all(
            g.get("role") == w["role"] and (g.get("content", "").strip() == "" if w["role"] == "user" else g == w)
            for g, w in zip(got, want))
        assert ok, (
            f"empty_instructions({before}) is {got}, expected {want}: every message is kept, in order, every user "
            f"turn with an empty content and every other turn unchanged.")


def test_response_only_empties_every_user_turn():
    check_response_only()


# 5. the diversity rule ---------------------------------------------------------------------------------------
def last_tag_end(ids, tag=rules.USER_TAG):
    """Stated independently: just past the last `tag` in ids, None if there is none."""
    ends = [i + len(tag) for i in range(len(ids)) if ids[i:i + len(tag)] == tag]
    return ends[-1] if ends else None


def prompts_smallest_first():
    """(prompt, response) with 0 to 3 user tags in the prompt and 0 to 2 in the response (a turn the model opens
    itself), shortest first; ids < 40 form no stray tag."""
    rng, cases = random.Random(6), []

    def text(size, tags):
        pieces = [[rng.randrange(40) for _ in range(rng.randint(0, size))] for _ in range(rng.randint(1, tags + 1))]
        return [t for k, piece in enumerate(pieces) for t in (rules.USER_TAG if k else []) + piece]
    for size in range(0, 12):
        for _ in range(25):
            cases.append((text(size, 3) or [1], text(size, rng.choice([0, 0, 1, 2]))))
    return sorted(cases, key=lambda c: len(c[0]) + len(c[1]))


def check_diversity_rule(rule_bias=None):
    rule_bias = rule_bias or rules.rule_bias
    # the official penalty, and others a synthetic world may set (exact in float32: the check compares exactly)
    official, *others = [rules.RuleSet(eos=False, uniform=False, diversity_penalty=p) for p in (1.5, 0.375, 2.75)]
    for k, (prompt, response) in enumerate(prompts_smallest_first()):
        ids = prompt + response
        start = last_tag_end(ids)
        got = call(rules.after_tag, list(ids), rules.USER_TAG, what=f"after_tag({ids}, USER_TAG)")
        assert (got or 0) == (start or 0), (
            f"after_tag({ids}, USER_TAG) is {got}, expected {start}: the index just past the LAST tag "
            f"{rules.USER_TAG} (a chat history has several, and the model may write one), None if there is none.")
        tagged = ids + rules.ASSISTANT_TAG + ids[:3]
        got = call(rules.after_tag, tagged, rules.ASSISTANT_TAG, what=f"after_tag({tagged}, ASSISTANT_TAG)")
        assert got == len(ids) + len(rules.ASSISTANT_TAG), (
            f"after_tag({tagged}, ASSISTANT_TAG) is {got}, expected {len(ids) + len(rules.ASSISTANT_TAG)}: the "
            f"function finds whichever tag it is given (the EOS rule counts from the last ASSISTANT_TAG).")
        for r in (official, others[k % len(others)]):
            shown = f"RuleSet(eos=False, uniform=False, diversity_penalty={r.diversity_penalty})"
            bias = call(rule_bias, list(ids), len(prompt), r, what=f"rule_bias({ids}, {len(prompt)}, {shown})")
            got = {t: bias[t].item() for t in sorted(bias.nonzero().flatten().tolist())}
            want = {t: -r.diversity_penalty for t in sorted(set(ids[start or 0:]))}
            assert got == want, (
                f"rule_bias(ids={ids}, prompt_len={len(prompt)}, {shown}) penalized {got}, expected {want}: "
                f"-rule_set.diversity_penalty (officially 1.5) on each distinct id after the last user tag of the "
                f"whole sequence (index {start}; the response's own tags count too), once per id however often it "
                f"occurs, and nothing else.")


def test_diversity_rule_penalizes_each_id_after_the_last_user_tag_once():
    check_diversity_rule()


# 6. the paper's response ranking -----------------------------------------------------------------------------
def score_tables():
    """(name, n, negatives, seed, score, expected %, tolerance): score(i, j) = base[i] + outcome, where the own
    response (j = i) gets 0 and each other one -1 (own wins), 0 (tie) or +1 (own loses). Where rows mix outcomes
    the expected share is the table's share of wins among all i != j pairs, up to the draws' noise."""
    rng = random.Random(7)
    for name, outcome, share in (("own always likeliest", -1, 100.0), ("all tied", 0, 0.0), ("own always least likely", 1, 0.0)):
        for n, negatives, seed in ((2, 40, 0), (3, 30, 1), (5, 4, 2), (5, 50, 3)):
            base = [rng.uniform(-5, 0) for _ in range(n)]
            yield name, n, negatives, seed, (lambda i, j, b=base, o=outcome: b[i] + (0.0 if i == j else o)), share, 0.0
    for seed, (p_win, p_tie) in enumerate(((0.7, 0.1), (0.3, 0.3), (0.55, 0.0))):
        n = 8
        base = [rng.uniform(-5, 0) for _ in range(n)]
        table = [[0.0 if i == j else rng.choices((-1.0, 0.0, 1.0), (p_win, p_tie, 1 - p_win - p_tie))[0] for j in range(n)]
                 for i in range(n)]
        wins = sum(table[i][j] < 0 for i in range(n) for j in range(n) if i != j)
        yield (f"a table whose own responses beat {wins} of the {n * (n - 1)} others (ties: no win)", n, 1000, seed,
               lambda i, j, b=base, t=table: b[i] + t[i][j], 100 * wins / (n * (n - 1)), 3.0)


def official_draws(n, negatives, seed):
    """Stated independently: ratio_eval.py's draws, with replacement from all n, a draw of i itself skipped."""
    rng = random.Random(seed)
    pairs = [(i, rng.randint(0, n - 1)) for i in range(n) for _ in range(negatives)]
    return [(i, j) for i, j in pairs if j != i]


def draws_keeping_own(n, negatives, seed):
    """A wrong ranking_draws: the official draws, a draw of i itself kept as a comparison."""
    rng = random.Random(seed)
    return [(i, rng.randint(0, n - 1)) for i in range(n) for _ in range(negatives)]


def check_ranking(ranking_win_rate=None):
    ranking_win_rate = ranking_win_rate or evaluate.ranking_win_rate
    for n, negatives, seed in ((1, 3, 0), (2, 1, 0), (2, 40, 5), (5, 4, 2), (17, 5, 0), (50, 5, 123)):
        what = f"ranking_draws(n={n}, negatives={negatives}, seed={seed})"
        got = call(evaluate.ranking_draws, n, negatives, seed, what=what)
        want = official_draws(n, negatives, seed)
        assert list(got) == want, (
            f"{what} is {list(got)[:8]}..., expected {want[:8]}... ({len(want)} pairs): for each i in order, "
            f"`negatives` draws random.Random(seed).randint(0, n - 1) from one generator, with replacement, "
            f"a draw of i itself skipped.")
    for name, n, negatives, seed, score, want, tolerance in score_tables():
        what = f"ranking_win_rate(score, n={n}, negatives={negatives}, seed={seed}) with {name}"
        got = call(ranking_win_rate, score, n, negatives, seed, what=what)
        assert abs(got - want) <= tolerance, (
            f"{what} is {got:.1f}, expected {want:.1f}{f' ± {tolerance:g}' if tolerance else ''} (%). Compare score(i, i) "
            f"with score(i, j) under the same instruction i; a tie is not a win; a draw of j = i is skipped, not "
            f"counted; return wins / comparisons in %.")
        assert call(ranking_win_rate, score, n, negatives, seed, what=what) == got, f"{what}: the same seed must give the same result"


def test_ranking_counts_outright_wins_over_the_drawn_negatives():
    check_ranking()


# 7. a repetition metric ---------------------------------------------------------------------------------------
def token_lists_smallest_first():
    for length in range(0, 10):  # every list over {0, 1} up to 9 tokens, with the default n = 4
        for tokens in itertools.product((0, 1), repeat=length):
            yield list(tokens), 4
    rng = random.Random(8)
    for length in range(0, 40):
        for n in (1, 2, 3, 4, 5):
            yield [rng.randrange(rng.choice((2, 3, 5))) for _ in range(length)], n


def check_repetition(repeated_ngram_share=None):
    repeated_ngram_share = repeated_ngram_share or evaluate.repeated_ngram_share
    for tokens, n in token_lists_smallest_first():
        grams = [tokens[i:i + n] for i in range(len(tokens) - n + 1)]
        repeats = sum(gram in grams[:i] for i, gram in enumerate(grams))  # each n-gram seen earlier counts once
        want = repeats / len(grams) if grams else 0.0
        args = f"{tokens}" + (f", n={n}" if n != 4 else "")
        got = call(repeated_ngram_share, list(tokens), what=f"repeated_ngram_share({args})", **({"n": n} if n != 4 else {}))
        assert got == pytest.approx(want, abs=1e-12), (
            f"repeated_ngram_share({args}) is {got}, expected {want:g}: of its {len(grams)} {n}-grams, {repeats} "
            f"repeat an earlier {n}-gram (every repeat counts, a third occurrence too); fewer than {n} tokens have no "
            f"{n}-grams and give 0.")


def test_repetition_share_counts_every_repeated_ngram():
    check_repetition()


# 8. top-p (nucleus) sampling ------------------------------------------------------------------------------------
def distributions_smallest_first():
    """(scores (3, V), p): unsorted random distributions, as unnormalized scores (temperature divides log-probs),
    with p at least 1e-3 away from every prefix sum of the sorted probabilities, so float rounding cannot matter."""
    g, rng = torch.Generator().manual_seed(9), random.Random(9)
    for V in range(1, 13):
        for _ in range(10):
            probs = torch.rand(3, V, generator=g, dtype=torch.float64).pow(3) + 1e-3
            scores = (probs.log() + torch.empty(3, 1, dtype=torch.float64).uniform_(-5, 5, generator=g)).float()
            sums = torch.softmax(scores.double(), -1).sort(-1, descending=True).values.cumsum(-1)
            p = rng.uniform(0.02, 0.98)
            while (sums - p).abs().min() < 1e-3:
                p = rng.uniform(0.02, 0.98)
            yield scores, p


def nucleus(row, p):
    """Stated independently: the smallest prefix of the tokens sorted by probability whose mass reaches p."""
    probs = torch.softmax(row.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    mass = 0.0
    for k, t in enumerate(order):
        mass += probs[t]
        if mass >= p:
            return set(order[:k + 1])
    return set(order)


def check_top_p(top_p_filter=None):
    top_p_filter = top_p_filter or sampling.top_p_filter
    g = torch.Generator().manual_seed(0)
    for scores, p in distributions_smallest_first():
        V = scores.size(1)
        got = call(top_p_filter, scores.clone(), p, what=f"top_p_filter(scores of shape {tuple(scores.shape)}, p={p:.3f})")
        assert torch.is_tensor(got) and got.shape == scores.shape, f"top_p_filter returns scores of the input's shape {tuple(scores.shape)}"
        for row, out in zip(scores, got):
            want = nucleus(row, p)
            kept = {t for t in range(V) if out[t] != float("-inf")}
            probs = [round(x, 3) for x in torch.softmax(row.double(), -1).tolist()]
            assert kept == want and all(out[t] == row[t] for t in kept), (
                f"top_p_filter at p={p:.3f} on a row with probabilities {probs} kept {sorted(kept)} (scores "
                f"{[round(x, 3) for x in out.tolist()]}), expected {sorted(want)}. Sort the tokens by probability "
                f"(softmax of the row: scores are log-probabilities divided by a temperature, not normalized), keep the "
                f"shortest prefix of that order whose probabilities add up to at least p (the token that crosses p "
                f"stays), set the others to -inf and leave the kept scores as they were.")
        if V in (4, 12):  # and next_tokens() never draws outside the kept set
            logprobs = torch.log_softmax(scores, -1)
            drawn = [set() for _ in scores]
            for _ in range(100):
                for b, t in enumerate(call(sampling.next_tokens, logprobs, top_p=p, generator=g, what="sampling.next_tokens").tolist()):
                    drawn[b].add(t)
            for b, row in enumerate(scores):
                assert drawn[b] <= nucleus(row, p), f"sample(top_p={p:.3f}) drew {sorted(drawn[b] - nucleus(row, p))}, outside the kept set {sorted(nucleus(row, p))}"


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    check_top_p()


def test_top_p_exercise_leaves_greedy_decoding_alone(monkeypatch):
    logprobs = torch.log_softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), -1)
    monkeypatch.setattr(sampling, "top_p_filter", lambda scores, p: 1 / 0)  # a broken exercise
    assert torch.equal(sampling.next_tokens(logprobs, greedy=True), logprobs.argmax(-1))


# the checks catch wrong answers: each exercise's function replaced by plausible mistakes and by a hard-coded answer
# (one that passes a check of one fixed input) ---------------------------------------------------------------------
def eos_old_points(n, r):  # hard-coded: the points an old one-input check looked at
    return {0: 0.0, 1: 0.06, 2: 0.12, 125: 7.5, 249: 14.94, 250: 0.0, 251: 0.0, 1000: 0.0}.get(n, 0.0)


REFERENCE_RULE_BIAS = rules.rule_bias  # before a test replaces it
OLD_CHAT = chat.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])


def diversity_bias(start, per_occurrence=False):
    """A wrong rule_bias whose diversity part penalizes ids[start(ids, prompt_len):]."""
    def rule_bias(ids, prompt_len, r):
        bias = torch.zeros(rules.VOCAB)
        for token in (ids[start(ids, prompt_len):] if per_occurrence else set(ids[start(ids, prompt_len):])):
            bias[token] -= 1.5
        return bias
    return rule_bias


def first_tag(ids, tag):
    for i in range(len(ids) - len(tag) + 1):
        if ids[i:i + len(tag)] == tag:
            return i + len(tag)
    return None


def ranking(compare, skip_self=True, rows=None, percent=100):
    """A ranking_win_rate with a pluggable comparison; the right one is compare = own > other, skip_self."""
    def ranking_win_rate(score, n, negatives, seed):
        rng, wins, total = random.Random(seed), 0, 0
        for i in range(rows or n):
            for j in [rng.randint(0, n - 1) for _ in range(negatives)]:
                if j != i or not skip_self:
                    wins, total = wins + compare(score, i, j), total + 1
        return percent * wins / max(total, 1)
    return ranking_win_rate


def share(count_repeats, denominator=lambda tokens, grams: len(grams), last=True):
    """A repeated_ngram_share built from a way of counting repeats and a denominator."""
    def repeated_ngram_share(tokens, n=4):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + (1 if last else 0))]
        return count_repeats(grams) / denominator(tokens, grams)
    return repeated_ngram_share


def nucleus_filter(keep_sorted, sort=True, probs_of=lambda s: s.softmax(-1)):
    """A top_p_filter: keep_sorted(sorted probs, p) -> bool mask over the sorted order."""
    def top_p_filter(scores, p):
        order = scores.argsort(-1, descending=True) if sort else torch.arange(scores.size(-1)).expand_as(scores)
        keep = keep_sorted(probs_of(scores).gather(-1, order), p)
        return scores.masked_fill(~torch.zeros_like(keep).scatter(-1, order, keep), float("-inf"))
    return top_p_filter


WRONG = [  # (exercise, the module and name of its function, {mistake: wrong answer})
    ("eos_rule", rules, "eos_bias", {
        "off by one at 250 (n <= 250)": lambda n, r: ((0 < n) & (n <= 250)) * (15 * n / 250) + ((n > 250) & r.eos_hold) * 15.0,
        "the paper's wording, never drops": lambda n, r: min(15.0, 15 * n / 250),
        "one token early (15·(n+1)/250)": lambda n, r: ((n < 250) * (15 * (n + 1) / 250)) + ((n >= 250) & r.eos_hold) * 15.0,
        "ignores eos_hold": lambda n, r: ((0 < n) & (n < 250)) * (15 * n / 250),
        "right on ints, fails on a batch of counts": lambda n, r: 15 * n / 250 if 0 < n < 250 else 15.0 * (r.eos_hold and n >= 250),
        "hard-codes the official 15 and 250": lambda n, r: (
            ((0 < n) & (n < 250)) * (15 * n / 250) + ((n >= 250) & r.eos_hold) * 15.0),
        "reads eos_length, hard-codes the peak 15": lambda n, r: (
            ((0 < n) & (n < r.eos_length)) * (15 * n / r.eos_length) + ((n >= r.eos_length) & r.eos_hold) * 15.0),
        "hard-coded": eos_old_points}),
    ("uniform_tokens", rules, "UNIFORM", {
        "We without its space": [(i, p, s, {1334: 1135}.get(i, t), b) for i, p, s, t, b in rules.UNIFORM],
        "lt and space-lt swapped": [(i, p, s, {29966: 1279, 529: 27}.get(i, t), b) for i, p, s, t, b in rules.UNIFORM],
        "trusting the official comments": [(i, p, s, {5618: 1867, 334: 12, 448: 9}.get(i, t), b) for i, p, s, t, b in rules.UNIFORM]}),
    ("loss_targets", chat, "targets_from_mask", {
        "not shifted": lambda ids, mask: [t if m else -1 for t, m in zip(ids, mask)],
        "mask off by one": lambda ids, mask: [n if m else -1 for n, m in zip(ids[1:], mask[:-1])] + [-1],
        "HF's -100 instead of -1": lambda ids, mask: [n if m else -100 for n, m in zip(ids[1:], mask[1:])] + [-100],
        "one target short": lambda ids, mask: [n if m else -1 for n, m in zip(ids[1:], mask[1:])],
        "hard-coded": lambda ids, mask: chat.targets_from_mask(*OLD_CHAT) if ids == OLD_CHAT[0] else [-1] * len(ids)}),
    ("response_only", chat, "empty_instructions", {
        "drops the user turns": lambda ms: [m for m in ms if m["role"] != "user"],
        "edits the input in place": lambda ms: [m.update(content="") or m if m["role"] == "user" else m for m in ms],
        "only the first user turn": lambda ms: [{**m, "content": ""} if m is next(x for x in ms if x["role"] == "user") else m for m in ms],
        "hard-coded": lambda ms: [{"role": "system", "content": "Be kind."}, {"role": "user", "content": ""},
                                  {"role": "assistant", "content": "Hello."}]}),
    ("diversity_rule", rules, "rule_bias", {
        "per occurrence, from the start": diversity_bias(lambda ids, p: 0, per_occurrence=True),
        "per occurrence after the tag": diversity_bias(lambda ids, p: last_tag_end(ids) or 0, per_occurrence=True),
        "the tag itself penalized": diversity_bias(lambda ids, p: max(0, (last_tag_end(ids) or 0) - len(rules.USER_TAG))),
        "the prompt's tag only": diversity_bias(lambda ids, p: last_tag_end(ids[:p]) or 0),
        "the response only": diversity_bias(lambda ids, p: p),
        "hard-codes the official penalty 1.5": lambda ids, p, r: REFERENCE_RULE_BIAS(
            ids, p, dataclasses.replace(r, diversity_penalty=1.5)),
        "hard-coded": lambda ids, p, r: torch.zeros(rules.VOCAB).index_fill(0, torch.tensor([7, 8, 9]), -1.5)}),
    ("diversity_rule", rules, "after_tag", {"the first tag": first_tag,
                                            "the prompt's user tag, whatever the tag": lambda ids, tag: last_tag_end(ids)}),
    ("ranking", evaluate, "ranking_draws", {
        "draws of the own response kept": draws_keeping_own,
        "a new generator per instruction": lambda n, negatives, seed: [
            p for i in range(n) for p in official_draws(n, negatives, seed + i) if p[0] == i],
        "hard-coded": lambda n, negatives, seed: [(0, 1), (1, 0)]}),
    ("ranking", evaluate, "ranking_win_rate", {
        "a tie counts as a win": ranking(lambda s, i, j: s(i, i) >= s(i, j)),
        "draws of the own response counted": ranking(lambda s, i, j: s(i, i) > s(i, j), skip_self=False),
        "each response under its own instruction": ranking(lambda s, i, j: s(i, i) > s(j, j)),
        "a fraction, not %": ranking(lambda s, i, j: s(i, i) > s(i, j), percent=1),
        "hard-coded": lambda score, n, negatives, seed: 100.0 if score(0, 0) > score(0, 1) else 0.0}),
    ("repetition", evaluate, "repeated_ngram_share", {
        "each repeated n-gram once": share(lambda g: len({x for i, x in enumerate(g) if x in g[:i]}), lambda t, g: max(1, len(g))),
        "divided by the tokens, not the n-grams": share(lambda g: len(g) - len(set(g)), lambda t, g: max(1, len(t))),
        "the last n-gram missed": share(lambda g: len(g) - len(set(g)), lambda t, g: max(1, len(g)), last=False),
        "fails on lists shorter than n": share(lambda g: len(g) - len(set(g))),
        "always 4-grams": lambda tokens, n=4: share(lambda g: len(g) - len(set(g)), lambda t, g: max(1, len(g)))(tokens),
        "hard-coded": lambda tokens, n=4: {(7,) * 10: 6 / 7, (1, 2, 3, 4, 1, 2, 3, 4): 1 / 5}.get(tuple(tokens), 0.0)}),
    ("top_p", sampling, "top_p_filter", {
        "drops the token that crosses p": nucleus_filter(lambda probs, p: probs.cumsum(-1) <= p),
        "never sorts": nucleus_filter(lambda probs, p: probs.cumsum(-1) - probs < p, sort=False),
        "exp() of unnormalized scores": nucleus_filter(lambda probs, p: probs.cumsum(-1) - probs < p, probs_of=lambda s: s.exp()),
        "hard-coded": lambda scores, p: nucleus_filter(lambda probs, p: (torch.arange(probs.size(-1)) < (2 if p >= 0.5 else 1)).expand_as(probs))(scores, p)}),
]
CHECKS = {"eos_rule": check_eos_rule, "uniform_tokens": check_uniform_tokens, "loss_targets": check_loss_targets,
          "response_only": check_response_only, "diversity_rule": check_diversity_rule, "ranking": check_ranking,
          "repetition": check_repetition, "top_p": check_top_p}
CASES = [(exercise, module, name, mistake, wrong) for exercise, module, name, wrongs in WRONG for mistake, wrong in wrongs.items()]


@pytest.mark.parametrize("exercise, module, name, mistake, wrong", CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_exercise_checks_catch_wrong_answers(exercise, module, name, mistake, wrong, monkeypatch):
    monkeypatch.setattr(module, name, wrong)  # as a student's edit would
    with pytest.raises(AssertionError):
        CHECKS[exercise]()


def test_every_check_meets_two_wrong_answers_and_a_hard_coded_one():
    mistakes = {exercise: [m for e, _, _, m, _ in CASES if e == exercise] for exercise in CHECKS}
    for exercise, found in mistakes.items():
        assert len(found) >= 2, exercise
        assert "hard-coded" in found or exercise == "uniform_tokens", exercise  # the table is a lookup by nature


# one home per idea: sample.py --rules runs the exercises' functions ---------------------------------------------
@pytest.fixture(scope="module")
def small(small_hf):
    return GPT.from_pretrained(small_hf[1]).eval()


def test_rule_state_uses_the_exercise_eos_bias(small, monkeypatch):
    prompt = chat.encode_prompt("Write a poem called Rain")

    def ruled():
        return small.generate([prompt], 12, greedy=True, eos=None, hook=rules.RuleState([prompt], rules.RuleSet()))[0]
    reference = ruled()
    monkeypatch.setattr(rules, "eos_bias", lambda n, r: (n >= 3) * 100.0)  # a student's different ramp
    changed = ruled()
    assert changed != reference and changed[3] == chat.EOT, (reference, changed)


def test_a_student_eos_ramp_changes_what_sample_py_rules_prints(small_hf, monkeypatch, capsys):
    """The command an exercise names, run in-process: `python sample.py --rules --prompt=...` answers with the
    rules' EOS ramp from rules.eos_bias, so a student's version changes its output."""
    import sample
    args = [f"--init_from={small_hf[1]}", "--rules", "--prompt=Write a poem called Rain", "--max_new_tokens=12",
            "--device=cpu"]

    def answer():
        assert sample.main(args) in (0, None)
        return capsys.readouterr().out
    reference = answer()
    monkeypatch.setattr(rules, "eos_bias", lambda n, r: (n >= 3) * 100.0)  # a student's ramp: stop after 3 tokens
    changed = answer()
    # the same first tokens, then <|endoftext|> at the student's n = 3: a strict prefix of the reference's answer
    assert reference.strip().startswith(changed.strip()) and len(changed.strip()) < len(reference.strip()), (reference, changed)


def test_rule_state_uses_the_exercise_uniform_bias_and_user_tag(monkeypatch):
    prompt = [5, 6] + rules.USER_TAG + [7]
    reference = rules.RuleState([prompt], rules.RuleSet()).scores()
    monkeypatch.setattr(rules, "uniform_bias", lambda r: torch.zeros(rules.VOCAB).index_fill(0, torch.tensor([42]), 3.0))
    assert reference[0, 42] == 0 and rules.RuleState([prompt], rules.RuleSet()).scores()[0, 42] == 3.0
    monkeypatch.setattr(rules, "after_tag", lambda ids, tag: None)  # a student's search that finds no tag
    assert rules.RuleState([prompt], rules.RuleSet()).scores()[0, 5] == -1.5


def test_a_rule_set_of_other_values_survives_the_cases_json():
    """exercises.json and the grader's process carry RuleSets as JSON: every field comes back, the uniform table as
    a tuple of tuples (a RuleSet is hashable), so the student's functions meet the very values drawn."""
    import exercises
    mods = exercises.modules(ROOT)
    r = rules.RuleSet(eos_hold=True, eos_max=-2.5, eos_length=7, diversity_penalty=0.0,
                      uniform_table=((3, 1.5), (rules.EOT, -2.0)))
    back = exercises.decode(json.loads(json.dumps(exercises.encode(r))), mods)
    assert back == r and hash(back) == hash(r) and type(back.uniform_table[0]) is tuple
    assert exercises.decode(json.loads(json.dumps(exercises.encode(rules.RuleSet()))), mods) == rules.RuleSet()


# the Watch commands of EXERCISES.md show the numbers it quotes --------------------------------------------------
TINYWORLD = ROOT / "data" / "tinyworld"


def test_watch_of_exercise_4_prepare_writes_the_response_set_through_empty_instructions():
    """`python data/tinyworld/prepare.py` writes the response-tuning files as the instruction files with every user
    turn emptied by chat.empty_instructions (prepared here on first use, as data/tinyworld/experiment.py does)."""
    chat.prepare_data("tinyworld", TINYWORLD / "tinyworld_responses_train.jsonl")
    for split in ("train", "val"):
        instructed = [json.loads(line) for line in open(TINYWORLD / f"tinyworld_{split}.jsonl")]
        responses = [json.loads(line) for line in open(TINYWORLD / f"tinyworld_responses_{split}.jsonl")]
        assert responses == [{"messages": chat.empty_instructions(row["messages"])} for row in instructed]
        assert all(m["content"] == "" for row in responses for m in row["messages"] if m["role"] == "user")
    assert (TINYWORLD / "tinyworld_responses_train.jsonl").read_text().startswith('{"messages": [{"role": "user", "content": ""}, ')


@pytest.mark.skipif(not (TINYWORLD / "bases" / "seed1").exists(), reason="no shipped TinyWorld base")
def test_watch_of_exercises_6_and_7_gives_the_numbers_quoted(tmp_path):
    """Exercise 6's command, verbatim but for --out_dir (its dev set prepared on first use, as in a fresh clone):
    the ranking % and repeat % EXERCISES.md quotes."""
    command = ("--models=data/tinyworld/bases/seed1 --eval_set=data/tinyworld/dev.jsonl --max_new_tokens=48 "
               f"--out_dir={tmp_path} --threads=1").split()
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *command], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    row = "| data/tinyworld/bases/seed1 | 0 | 48 | 0.3 | 100 |"
    assert row in r.stdout and r.stdout.split(row)[1].split("\n")[0].endswith("| 83.0 |"), r.stdout
    assert "**83.0**" in (ROOT / "EXERCISES.md").read_text() and "**0.3**" in (ROOT / "EXERCISES.md").read_text()
