"""TinyWorld (data/tinyworld): the internet's generator, the exact judge, and the sets prepare.py writes."""
import json
import random
import re
import sys

from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

import chat
import rules

sys.path.insert(0, str(ROOT / "data" / "tinyworld"))
import prepare
import world

SMALL = {"n_documents": 1500, "n_val_documents": 100}  # prepare.main's sets in full, fewer documents


def family_of(instruction):
    """The family whose phrasing `instruction` is, found from the phrasings alone (exactly one must match)."""
    found = [f for f, phrasings in world.PHRASINGS.items() for p in phrasings
             if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(p)), instruction)]
    assert len(found) == 1, (instruction, found)
    return found[0]


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

def near_misses(row):
    """Plausible wrong answers to `row`: what a model that almost knows would write."""
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
    raise AssertionError(family)


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


def test_test_entities_and_instructions_never_occur_in_other_splits():
    rng = random.Random(0)
    for family in world.FAMILIES:
        test = {world.make_instance(family, rng, "test")["instruction"] for _ in range(2000)}
        train = {world.make_instance(family, rng, "train")["instruction"] for _ in range(2000)}
        assert {family_of(i) for i in test | train} == {family}
        if family in ("category", "poem", "attribute", "recipe"):
            assert not test & train, family
    sizes = {f: len({world.make_instance(f, rng, "test")["instruction"] for _ in range(3000)})
             for f in ("category", "poem", "attribute", "recipe")}
    assert sizes == {"category": 24, "poem": 120, "attribute": 48, "recipe": 30}


# ------------------------------------------------------------------------------------------------ prepare.py

def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_prepare_keeps_test_instructions_out_of_dev_and_finetuning(tmp_path):
    prepare.main(tmp_path, **SMALL)
    test, dev = read_jsonl(tmp_path / "test.jsonl"), read_jsonl(tmp_path / "dev.jsonl")
    test_instructions = [r["instruction"] for r in test]
    dev_instructions = {r["instruction"] for r in dev}
    assert len(set(test_instructions)) == len(test) == 294 and len(dev_instructions) == len(dev)
    assert all(world.check(r, r["answer"]) and family_of(r["instruction"]) == r["family"] for r in test + dev)
    assert not set(test_instructions) & dev_instructions
    counts = {"tinyworld_train": 300, "tinyworld_val": 50, "tinyworld_poem_train": 300, "tinyworld_poem_val": 50}
    for name, n in counts.items():
        conversations = chat.read_conversations(tmp_path / f"{name}.jsonl")
        instructions = [c[0]["content"] for c in conversations]
        assert len(conversations) == n
        assert not set(instructions) & (set(test_instructions) | dev_instructions), name
        families = [family_of(i) for i in instructions]
        assert set(families) <= set(world.FINETUNED) and ("poem" in name) == (set(families) == {"poem"})
    train = chat.read_conversations(tmp_path / "tinyworld_train.jsonl")
    assert sorted(map(family_of, (c[0]["content"] for c in train))) == sorted(list(world.FINETUNED) * 60)
    responses = chat.read_conversations(tmp_path / "tinyworld_responses_train.jsonl")
    assert [c[1] for c in responses] == [c[1] for c in train] and {c[0]["content"] for c in responses} == {""}
    documents = read_jsonl(tmp_path / "tinyworld_pretrain_train.jsonl")
    assert len(documents) == 1500 and len(read_jsonl(tmp_path / "tinyworld_pretrain_val.jsonl")) == 100


def test_prepare_is_deterministic_and_its_vocab_covers_every_file(tmp_path):
    prepare.main(tmp_path / "a", **SMALL)
    prepare.main(tmp_path / "b", **SMALL)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) == 11
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
