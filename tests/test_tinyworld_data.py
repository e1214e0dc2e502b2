"""TinyWorld (data/tinyworld): the internet's generator, the exact judge, and the sets prepare.py writes."""
import functools
import itertools
import json
import random
import re
import string
import sys

from conftest import ROOT
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chat
import rules

sys.path.insert(0, str(ROOT / "data" / "tinyworld"))
import prepare
import world

SMALL = {"n_documents": 1500, "n_val_documents": 100}  # prepare.main's sets in full, fewer documents


def pattern(phrasing):
    """A phrasing as a regular expression whose named groups are its fields ("{xs}", "{creature}", ...)."""
    parts, seen = [], set()
    for literal, field, _, _ in string.Formatter().parse(phrasing):  # as str.format reads it
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(f"(?P={field})" if field in seen else f"(?P<{field}>.+)")
            seen.add(field)
    return re.compile("".join(parts))


PATTERNS = [(family, pattern(p)) for family, phrasings in world.PHRASINGS.items() for p in phrasings]


def question(instruction):
    """(family, fields): what `instruction` asks, whatever its phrasing ("Add 12 and 7." asks what "What is 12
    plus 7?" asks), found from the phrasings alone (exactly one must match)."""
    found = [(f, tuple(sorted(m.groupdict().items())))
             for f, p in PATTERNS if (m := p.fullmatch(instruction))]
    assert len(found) == 1, (instruction, found)
    return found[0]


def family_of(instruction):
    """The family whose phrasing `instruction` is."""
    return question(instruction)[0]


def instruction_space(family, split):
    """The distinct instructions of prepare.DRAWS draws: all of a small family's (the 12 of category's train
    split), as prepare.py's own draws find them."""
    rng = random.Random(f"space-{family}")
    return {world.make_instance(family, rng, split)["instruction"] for _ in range(prepare.DRAWS)}


# ------------------------------------------------------------------------------------------------ the internet

def test_documents_are_deterministic_and_never_hold_the_chat_tags():
    docs = world.pretraining_documents(3000, seed=0)
    assert docs == world.pretraining_documents(3000, seed=0)
    assert docs != world.pretraining_documents(3000, seed=1)
    assert not [d for d in docs if "<|user|>" in d or "<|assistant|>" in d]
    assert len(set(docs)) > 2900 and all(d.strip() == d and d for d in docs)


def test_speaker_tags_that_would_be_the_chat_tags_are_redrawn(monkeypatch):
    monkeypatch.setattr(world, "LEFT", ("<|",))
    monkeypatch.setattr(world, "RIGHT", ("|>",))
    monkeypatch.setattr(world, "ASKERS", ("user", "guest"))
    monkeypatch.setattr(world, "ANSWERERS", ("assistant", "bot"))
    tags = {world._tags(random.Random(seed)) for seed in range(300)}
    assert tags and all(t not in world.FORBIDDEN for pair in tags for t in pair)
    assert ("<|User|>", "<|Assistant|>") in tags  # only the exact lowercase strings are the chat format's


def test_the_internet_mentions_every_fact_in_every_form():
    docs = world.pretraining_documents(3000, seed=0)
    text = "\n".join(docs)
    for creature, colour in world.CREATURES:  # test creatures included: pretraining is where facts come from
        assert f"A {creature} is {colour}." in text, creature
    for dish, ingredients in world.DISHES:
        assert f"To make {dish} you need {world._and_list(list(ingredients))}." in text, dish
    for title in world.TITLES:
        assert f"And I sing of the {title}." in text, title
    forms = {"Q: ": 0, "Frequently asked questions": 0, "Posted by": 0, " plus ": 0}
    for d in docs:
        for marker in forms:
            forms[marker] += marker in d
    assert all(n > 50 for n in forms.values()), forms


def test_most_dialogues_end_right_after_an_answer(monkeypatch):
    drawn, facts = [], world._facts
    monkeypatch.setattr(world, "_facts", lambda rng, lo, hi: drawn.append(facts(rng, lo, hi)) or drawn[-1])
    rng, ends = random.Random(0), []
    for _ in range(2000):
        dialogue = world._dialogue(rng)
        rows = drawn[-1]
        assert 2 <= len(rows) <= 6 and all(r["instruction"] in dialogue and r["answer"] in dialogue for r in rows)
        ends.append(dialogue.endswith(rows[-1]["answer"]))
    assert 0.55 < sum(ends) / len(ends) < 0.65  # the others trail off into a filler line


# --------------------------------------------------------------------------------------------------- the judge

def family_misses(row):
    """Plausible wrong answers to `row` of a shipped family: what a model that almost knows would write. A
    family these tests do not know (exercise 13's eleventh) has none here: generic_misses are its near misses."""
    p, family = row["params"], row["family"]
    if family == "sort":
        return [" ".join(map(str, p["xs"])), " ".join(map(str, sorted(p["xs"])[:-1]))]
    if family in ("category", "recipe"):
        items = p["items"] if family == "category" else p["ingredients"]
        stranger = "owl" if family == "recipe" else "sugar"  # a word of the other list family
        return [", ".join(items[:-1]), ", ".join(items + [items[0]]), ", ".join(items[:-1] + [stranger])]
    if family == "poem":
        other = next(t for t in world.TITLES if t != p["title"])
        wrong_first = row["answer"].replace(p["title"], other, 1)  # one line about another title
        return [world.poem(other, p["adjectives"]), wrong_first, "\n".join(row["answer"].split("\n")[:2]),
                row["answer"].replace(p["adjectives"][0], "purple", 1), row["answer"] + "\nAnd again."]
    if family == "reverse":
        return [" ".join(p["words"]), " ".join(reversed(p["words"][1:]))]  # unreversed; a word missing
    if family == "add":
        return [str(p["a"] + p["b"] + 1), f"{p['a']} {p['b']}", f"{p['a']} plus {p['b']} is {p['a'] + p['b']}"]
    if family == "count":
        return [str(p["n"] + 1), str(p["n"] - 1), f"{p['n']} words"]
    if family == "attribute":
        return [next(c for c in world.COLOURS if c != p["colour"]), f"a {p['creature']} is {p['colour']}"]
    return []


@functools.lru_cache(maxsize=None)
def answer_words(family):
    """Every word of the family's reference answers (both splits): the pool its checker reads answers in."""
    rng = random.Random(0)
    return frozenset(w for split in ("train", "test") for _ in range(prepare.DRAWS)
                     for w in world.words(world.make_instance(family, rng, split)["answer"]))


@functools.lru_cache(maxsize=None)
def strangers(family):
    """Words of the other families' answers that no answer of `family` uses ("apple" for sort, "7" for
    recipe)."""
    others = set().union(*(answer_words(f) for f in world.FAMILIES if f != family))
    return sorted(others - answer_words(family))


def generic_misses(row):
    """Wrong answers to a row of any family, a new one included: the reference said twice, with one word
    dropped or swapped for a stranger (another family's answer word), and the answers of other questions of
    its family (another creature's colour, another title's poem) where their words differ. They hold what
    every checker of the judge does: each word of a reference answer counts; one question's answer answers
    no other."""
    answer, family = row["answer"], row["family"]
    misses = [answer + "\n" + answer]
    spans = [m.span() for m in re.finditer(r"[a-z0-9]+", answer.lower())]
    for (a, b), stranger in zip(spans, itertools.cycle(strangers(family))):
        misses += [answer[:a] + answer[b:], answer[:a] + stranger + answer[b:]]
    rng, asked = random.Random(row["instruction"]), question(row["instruction"])
    said = sorted(world.words(answer))
    for split in ("train", "test"):
        for other in (world.make_instance(family, rng, split) for _ in range(10)):
            if question(other["instruction"]) != asked and sorted(world.words(other["answer"])) != said:
                misses.append(other["answer"])
    return misses


def near_misses(row):
    """Wrong answers the checker of `row` must reject, for any family: its own and the generic ones."""
    return family_misses(row) + generic_misses(row)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(world.FAMILIES), st.sampled_from(("train", "test")))
def test_checkers_accept_references_and_harmless_variants_only(seed, family, split):
    row = world.make_instance(family, random.Random(seed), split)
    json.dumps(row)  # params must travel in test.jsonl
    answer = row["answer"]
    for variant in (answer, answer + ".", answer.upper(), answer.lower(), f"  {answer.replace(' ', '  ')} \n",
                    answer.replace("\n", "\n\n")):
        assert world.check(row, variant), (row, variant)
    for miss in near_misses(row):
        assert not world.check(row, miss), (row, miss)
    for other in world.FAMILIES:
        if other != family:
            for other_split in ("train", "test"):
                other_row = world.make_instance(other, random.Random(seed), other_split)
                assert not world.check(row, other_row["answer"]), (row, other_row)
    assert not world.check(row, "") and not world.check(row, row["instruction"])


def test_no_two_families_share_an_answer():
    # the judge compares words, so families whose answers never share a multiset of words can never pass each
    # other's checkers, whatever the draw: this holds the ranges (sums >= 10, counts 2..7, 3..5 digits) to it
    rng, answers = random.Random(0), {}
    for family in world.FAMILIES:
        answers[family] = {tuple(sorted(world.words(world.make_instance(family, rng, split)["answer"])))
                           for split in ("train", "test") for _ in range(1500)}
    for a in world.FAMILIES:
        for b in world.FAMILIES:
            assert a == b or not answers[a] & answers[b], (a, b, sorted(answers[a] & answers[b])[:3])


def test_list_answers_in_any_order_and_with_and():
    row = world.make_instance("category", random.Random(0), "test")
    items = row["params"]["items"]
    assert world.check(row, world._and_list(items[::-1])) and world.check(row, "\n".join(f"- {i}" for i in items))
    poem = world.make_instance("poem", random.Random(0), "test")
    title = poem["params"]["title"]
    assert world.check(poem, f"the {title} is warm\nthe {title} is warm\nand i sing of the {title}")  # equal adjectives
    assert not world.check(poem, f"The {title} is blue,\nThe {title} is warm,\nAnd I sing of the {title}.")


BIG = 20 * prepare.N_TEST  # over this many test questions, a family needs no split (sort, add, ...)


# letter's 240 questions are split by string only (world.py, NAMES): the second declared run was measured so,
# and its letters' test questions are asked, in other words, in finetuning. data/tinyworld/README.md ("Found
# after the run") measures what that did (nothing we can see); strict, so that a fix makes this fail until the
# mark goes.
LEAKS = {"letter": pytest.mark.xfail(strict=True, reason="the second declared run's letters leak by question")}


@pytest.mark.parametrize("family", [pytest.param(f, marks=LEAKS.get(f, ())) for f in world.FAMILIES])
def test_no_test_question_is_asked_outside_the_test_split(family):
    """Every family, a new one included. A family of few questions (category, poem, attribute, recipe: a few
    entities each) must split its entities, as CREATURES are: or finetuning and dev would ask the test's
    questions, if only in other words (prepare.py drops a test instruction by its string, not its question).
    Only a big family, over BIG questions, may share them: a draw asks one of its N_TEST test questions by
    chance at most 1 time in 20 (add, the smallest, 2%)."""
    rng = random.Random(0)
    test = prepare.distinct(family, "test", prepare.N_TEST, prepare.TEST_SEED)  # the test set's own
    tested = {question(r["instruction"]) for r in test}
    draws = [world.make_instance(family, rng, "train")["instruction"] for _ in range(2000)]
    assert {family_of(i) for i in draws + [r["instruction"] for r in test]} == {family}
    n_questions = len({question(i) for i in instruction_space(family, "test")})
    leaked = [i for i in draws if question(i) in tested]
    assert not leaked or (n_questions > BIG and len(leaked) <= len(draws) / 20), (
        f"{family}: {len(leaked)} of {len(draws)} non-test draws ask a test question, e.g. "
        f"{leaked[0]!r} ({n_questions} test questions): split its entities between test and the rest")


def test_the_small_families_split_their_entities():
    entities = {"category": world.N_TEST_CATEGORIES, "poem": world.N_TEST_TITLES,
                "attribute": world.N_TEST_CREATURES, "recipe": world.N_TEST_DISHES}
    sizes = {f: len(instruction_space(f, "test")) for f in entities if f in world.FAMILIES}
    assert sizes == {f: n * len(world.PHRASINGS[f]) for f, n in entities.items() if f in world.FAMILIES}


# ------------------------------------------------------------------------------------------------ prepare.py

def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def per_family(rows):
    return {f: sum(r["family"] == f for r in rows) for f in world.FAMILIES}


def test_prepare_keeps_test_instructions_out_of_dev_and_finetuning(tmp_path):
    """The sets' sizes follow from prepare.py's rules and the world's families (374 test and 302 dev
    instances in the shipped world): the test set holds N_TEST of a family's test instructions, all where it
    has fewer; dev N_DEV of the others, and where they are few, all of a held-out family's and half of a
    finetuned one's (the other half is for finetuning)."""
    prepare.main(tmp_path, **SMALL)
    test, dev = read_jsonl(tmp_path / "test.jsonl"), read_jsonl(tmp_path / "dev.jsonl")
    test_instructions = [r["instruction"] for r in test]
    dev_instructions = {r["instruction"] for r in dev}
    assert len(set(test_instructions)) == len(test) and len(dev_instructions) == len(dev)
    assert all(world.check(r, r["answer"]) and family_of(r["instruction"]) == r["family"] for r in test + dev)
    assert not set(test_instructions) & dev_instructions
    expected_test = {f: min(prepare.N_TEST, len(instruction_space(f, "test"))) for f in world.FAMILIES}
    assert per_family(test) == expected_test, expected_test
    left = {f: min(2 * prepare.N_DEV, len(instruction_space(f, "train") - set(test_instructions)))
            for f in world.FAMILIES}
    expected_dev = {f: min(prepare.N_DEV, n if f in world.HELD_OUT else n // 2) for f, n in left.items()}
    assert per_family(dev) == expected_dev, expected_dev
    assert all(expected_dev.values()), (  # every family is scored by experiment.py --split=dev
        f"no dev instance of {[f for f, n in expected_dev.items() if not n]}: the test set took them all")
    counts = {("tinyworld_train", None): prepare.N_TUNE * len(world.FINETUNED),
              ("tinyworld_val", None): prepare.N_TUNE_VAL}
    for task in prepare.SINGLE_TASKS:
        counts[f"tinyworld_{task}_train", task] = prepare.N_SINGLE
        counts[f"tinyworld_{task}_val", task] = prepare.N_SINGLE_VAL
    for (name, task), n in counts.items():
        conversations = chat.read_conversations(tmp_path / f"{name}.jsonl")
        instructions = [c[0]["content"] for c in conversations]
        assert len(conversations) == n
        assert not set(instructions) & (set(test_instructions) | dev_instructions), name
        families = {family_of(i) for i in instructions}
        assert families <= set(world.FINETUNED) and (task is None or families == {task}), (name, families)
    train = chat.read_conversations(tmp_path / "tinyworld_train.jsonl")
    families = sorted(map(family_of, (c[0]["content"] for c in train)))
    assert families == sorted(list(world.FINETUNED) * prepare.N_TUNE)
    responses = chat.read_conversations(tmp_path / "tinyworld_responses_train.jsonl")
    assert [c[1] for c in responses] == [c[1] for c in train] and {c[0]["content"] for c in responses} == {""}
    documents = read_jsonl(tmp_path / "tinyworld_pretrain_train.jsonl")
    assert len(documents) == SMALL["n_documents"]
    assert len(read_jsonl(tmp_path / "tinyworld_pretrain_val.jsonl")) == SMALL["n_val_documents"]


def test_prepare_is_deterministic_and_its_vocab_covers_every_file(tmp_path):
    prepare.main(tmp_path / "a", **SMALL)
    prepare.main(tmp_path / "b", **SMALL)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) == 13
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text())
    assert vocab == sorted(set(vocab))
    needed = {rules.EOT, *rules.USER_TAG, *rules.ASSISTANT_TAG, *(row[3] for row in rules.UNIFORM)}
    for path in (tmp_path / "a").glob("*.jsonl"):
        for row in read_jsonl(path):
            if "text" in row:
                needed.update(chat.encode(row["text"]))
            elif "messages" in row:
                needed.update(chat.encode_chat(row["messages"])[0])
            else:
                needed.update(chat.encode_prompt(row["instruction"]) + chat.encode(row["answer"]))
                needed.update(chat.encode_prompt(""))
    assert needed <= set(vocab) and len(vocab) < 1500


def test_the_test_set_is_drawn_last_and_nothing_else_depends_on_it(tmp_path, monkeypatch):
    """draw_test=False writes every other file byte for byte as a full preparation does (the second
    declared run developed on them before its test set existed), so no other file depends on the test
    draw; another TEST_SEED draws other test instructions; and a test prompt whose ids are not in
    vocab.json is refused, not given to a model that has no rows for them."""
    prepare.main(tmp_path / "full", **SMALL)
    prepare.main(tmp_path / "before", **SMALL, draw_test=False)
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert sorted(p.name for p in (tmp_path / "before").iterdir()) == [f for f in full if f != "test.jsonl"]
    for name in full:
        if name != "test.jsonl":
            assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "before" / name).read_bytes(), name
    vocab = json.loads((tmp_path / "full" / "vocab.json").read_text())
    exclude = {r["instruction"] for r in read_jsonl(tmp_path / "full" / "dev.jsonl")}
    exclude |= prepare.tuning_instructions(tmp_path / "full")  # as main() excludes them
    drawn = [r["instruction"] for r in read_jsonl(tmp_path / "full" / "test.jsonl")]
    assert [r["instruction"] for rows in prepare.test_set(exclude, vocab).values() for r in rows] == drawn
    first = prepare.test_set(exclude, vocab)["sort"][0]
    dropped = [i for i in vocab if i != chat.encode(first["answer"])[0]]
    try:
        prepare.test_set(exclude, dropped)
    except ValueError as e:
        assert "not in vocab.json" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a test prompt with an id outside vocab.json was accepted")
    monkeypatch.setattr(prepare, "TEST_SEED", 99)
    every_id = range(50257)  # the small internet's vocab.json need not hold another draw's numbers
    other = [r["instruction"] for rows in prepare.test_set(exclude, every_id).values() for r in rows]
    assert len(set(other) - set(drawn)) > len(drawn) / 2


# ---------------------------------------------------------------------------------- the pairwise judge's grade

@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(world.FAMILIES), st.sampled_from(("train", "test")))
def test_grade_is_2_stopped_and_right_1_right_then_more_0_otherwise(seed, family, split):
    row = world.make_instance(family, random.Random(seed), split)
    answer = row["answer"]
    filler = world._filler(random.Random(seed))
    assert world.grade(row, answer, stopped=True) == 2
    assert world.grade(row, answer, stopped=False) == 1  # ran to the token limit
    assert world.grade(row, f"{answer}\n{filler}", stopped=True) == 1  # answered, then a filler line
    assert world.grade(row, f"{answer}\n<|user|>\n{row['instruction']}", stopped=False) == 1  # a new turn
    assert world.grade(row, f"{answer}<|assistant|>", stopped=True) == 1
    for miss in near_misses(row)[:6]:
        # a wrong answer stays 0 with more text after it, unless a line of it is the answer
        # (the reference said twice, the first line of a poem said once)
        cut_right = any(world.check(row, miss[:m.start()]) for m in re.finditer(r"\n|<\|", miss))
        assert world.grade(row, miss, stopped=True) == int(cut_right), (row, miss)
        assert world.grade(row, f"{miss}\n{filler}", stopped=True) == int(cut_right), (row, miss)
    assert world.grade(row, f"{filler}\n{answer}", stopped=True) == 0  # the answer must come first
    assert world.grade(row, "", stopped=True) == world.grade(row, "", stopped=False) == 0


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from(prepare.SINGLE_TASKS))
def test_in_form_needs_two_of_the_tasks_lines(seed, task):
    rng = random.Random(seed)
    row = world.make_instance(task, rng, "test")
    assert world.in_form(task, row["answer"]) and world.in_form(task, row["answer"].upper() + "\n")
    lines = row["answer"].split("\n")
    assert not world.in_form(task, lines[0]) and not world.in_form(task, lines[-1])
    assert world.in_form(task, f"{lines[0]}\n{world._filler(rng)}\n{lines[-1]}")
    assert not world.in_form(task, f"{lines[0]} {lines[-1]}")  # lines, not words anywhere
    for other in world.FAMILIES:
        if other != task:  # no other family's answer takes the form
            assert not world.in_form(task, world.make_instance(other, rng, "test")["answer"])
