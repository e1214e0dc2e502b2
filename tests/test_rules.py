"""rules.py: exact rule arithmetic, the incremental state against the from-scratch reference, the sampler."""
import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_clear_margins, assert_close, assert_same_generations, assert_same_greedy, last_logits
from hypothesis import given, settings, strategies as st

import chat
from model import GPT
from rules import (respond, ASSISTANT_TAG, ForcedRules, DIVERSITY_ONLY, EOS_ONLY, EOT, NO_RULES, UNIFORM_ONLY, UNIFORM, USER_TAG, VOCAB,
                   RuleState, RuleSet, after_tag, eos_bias, parse_rules, product_of_experts, rule_bias,
                   uniform_bias)



def test_eos_rule_ramps_then_drops():
    r = RuleSet()
    assert [eos_bias(n, r) for n in (0, 1, 125, 249, 250, 600)] == [0.0, 15 / 250, 7.5, 15 * 249 / 250, 0.0, 0.0]
    hold = RuleSet(eos_hold=True)
    assert [eos_bias(n, hold) for n in (0, 249, 250, 600)] == [0.0, 15 * 249 / 250, 15.0, 15.0]
    prompt = [1, 2, 3]
    for n, expected in ((0, 0.0), (1, 0.06), (125, 7.5), (249, 14.94), (250, 0.0)):
        bias = rule_bias(prompt + [7] * n, len(prompt), EOS_ONLY)
        assert_close(bias[EOT], torch.tensor(expected))
        assert bias.count_nonzero() == (expected != 0)  # nothing but <|endoftext|>


def test_diversity_rule_penalizes_distinct_ids_after_the_user_tag_once():
    before, instruction, response = [11, 12, 13], [20, 21, 20, 22], [21, 30, 30, 30, 31]
    prompt = before + USER_TAG + instruction
    bias = rule_bias(prompt + response, len(prompt), DIVERSITY_ONLY)
    penalized = {20, 21, 22, 30, 31}
    assert set(bias.nonzero().flatten().tolist()) == penalized  # not 11-13, not the tag itself
    assert all(bias[t].item() == -1.5 for t in penalized)  # 30 three times: still -1.5 once
    only_response = rule_bias(prompt + response, len(prompt), RuleSet(False, True, False, response_only=True))
    assert set(only_response.nonzero().flatten().tolist()) == {21, 30, 31}
    # the last user tag counts (a multi-turn history), and the assistant tag after it is penalized too
    ids = chat.encode_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                              {"role": "user", "content": "Bye"}])
    bias = rule_bias(ids, len(ids), DIVERSITY_ONLY)
    start = after_tag(ids, USER_TAG)
    assert chat.tokenizer().decode(ids[start:]) == "Bye\n<|assistant|>\n"
    assert set(bias.nonzero().flatten().tolist()) == set(ids[start:])


def test_uniform_rule_tokens_and_biases():
    assert len(UNIFORM) == 15 and len({token for *_, token, _ in UNIFORM}) == 15
    # the official ids of combined_model.py lines 147-176, with the biases the code gives them
    assert {llama: bias for llama, _, _, _, bias in UNIFORM} == {
        29966: -4, 529: -4, 29989: -4, 306: -5, 29902: -5, 1334: -3, 5618: -5, 881: -6,
        334: 1, 448: 1, 1678: 1, 396: 1, 444: 1, 13: 1, 29991: 1}
    for _, piece, gpt2, token, _ in UNIFORM:
        assert chat.tokenizer().decode([token]) == gpt2  # every id is the string written next to it
        assert chat.encode(gpt2) == [token]
        # and that string is the Llama piece, its "▁" read as a space; <0x0A> is the byte 0x0A. GPT-2 has no
        # token of three spaces, so its single space stands in for "▁▁▁": the one inexact entry.
        want = {"<0x0A>": "\n", "▁▁▁": " "}.get(piece, piece.replace("▁", " "))
        assert gpt2 == want, piece
    assert [p for _, p, g, _, _ in UNIFORM if g != p.replace("▁", " ") and p != "<0x0A>"] == ["▁▁▁"]
    bias = rule_bias([1, 2], 2, UNIFORM_ONLY)
    assert {t: bias[t].item() for t in bias.nonzero().flatten().tolist()} == {
        27: -4, 1279: -4, 91: -4, 314: -5, 40: -5, 775: -3, 2061: -5, 815: -6,
        1635: 1, 532: 1, 220: 1, 1303: 1, 22492: 1, 198: 1, 0: 1}
    assert rule_bias([1, 2], 2, RuleSet(False, False, True, what_bias=-3.0))[2061].item() == -3  # Table 8's value


def test_each_rule_alone_touches_only_its_tokens():
    prompt = USER_TAG + [100, 101]
    ids = prompt + [27, 500, 500]
    total = rule_bias(ids, len(prompt), RuleSet())
    parts = [rule_bias(ids, len(prompt), r) for r in (EOS_ONLY, DIVERSITY_ONLY, UNIFORM_ONLY)]
    assert torch.equal(total, parts[0] + parts[1] + parts[2])
    assert set(parts[0].nonzero().flatten().tolist()) == {EOT}
    assert set(parts[1].nonzero().flatten().tolist()) == {100, 101, 27, 500}
    assert set(parts[2].nonzero().flatten().tolist()) == {t for *_, t, _ in UNIFORM}
    assert total[27].item() == -4 - 1.5  # uniform and diversity add up on "<"


def test_parse_rules():
    assert parse_rules("none") == NO_RULES == parse_rules("") and not NO_RULES.on and RuleSet(eos=False).on
    assert parse_rules("True") == RuleSet() == parse_rules("all") == parse_rules("eos,diversity,uniform")
    assert parse_rules("uniform,eos") == RuleSet(eos=True, diversity=False, uniform=True)
    with pytest.raises(ValueError, match="unknown rule 'speed'"):
        parse_rules("eos,speed")


def test_the_tags_are_the_last_five_tokens_the_official_code_takes():
    # combined_model.py 180 and 183: tokenizer(f'\n{TAG}\n')['input_ids'][-5:]; Llama-2's are "|user|>\n" and
    # "assistant|>\n" ([29989, 1792, 29989, 29958, 13] and [465, 22137, 29989, 29958, 13]): GPT-2's, the same strings
    assert chat.encode("\n<|user|>\n")[-5:] == USER_TAG and chat.tokenizer().decode(USER_TAG) == "|user|>\n"
    assert chat.encode("\n<|assistant|>\n")[-5:] == ASSISTANT_TAG
    assert chat.tokenizer().decode(ASSISTANT_TAG) == "assistant|>\n"


def official_rules(ids, rule_set):
    """combined_model.py 140-235 (InsTunerModel.forward, batch 1, the "start" rule off), transcribed line for line
    with GPT-2's ids: the rule scores for the token after ids. Written apart from rules.py, loops and all."""
    output = torch.zeros(VOCAB)
    if rule_set.uniform:
        for _, _, _, gpt2, bias in UNIFORM:
            output[gpt2] = bias
    first_token_index = None
    for i in range(len(ids)):  # every match: the last one wins
        if ids[i:i + 5] == USER_TAG:
            first_token_index = i + 5
    if rule_set.diversity:
        uniq_words = set()
        for i in range(len(ids)):
            if i < first_token_index:  # the official code raises here without a user tag: so do we
                continue
            uniq_words.add(ids[i])
        for w in uniq_words:
            output[w] -= 1.5
    prefix_len = len(ids)
    for i in range(len(ids)):
        if ids[i:i + 5] == ASSISTANT_TAG:
            prompt_len = i + 5
    prefix_len = prefix_len - prompt_len
    if rule_set.eos and 0 < prefix_len < 250:
        score = max(0, 5 * (prefix_len - 0) / (250 - 0))
        output[EOT] += score * 3
    return output


def test_generated_tags_restart_the_rules_as_in_the_official_code():
    prompt = chat.encode_prompt("Name a fruit.")
    said = chat.encode("Apple. Apple.")
    turn = chat.encode("\n<|user|>\nName a color.\n")
    answer = chat.encode("<|assistant|>\nRed red")
    user_end = len(prompt) + len(said) + chat.encode("\n<|user|>\n").__len__()
    ids = prompt + said + turn + answer
    assert after_tag(ids, USER_TAG) == user_end and after_tag(ids, ASSISTANT_TAG) == len(ids) - len(chat.encode("Red red"))
    for t in range(len(prompt), len(ids) + 1):  # every step, through both new tags
        assert_close(rule_bias(ids[:t], len(prompt), RuleSet()), official_rules(ids[:t], RuleSet()))
    bias = rule_bias(ids, len(prompt), RuleSet(uniform=False))
    # the diversity rule counts from the model's own user tag: "Apple" and the first instruction are forgotten
    assert set(bias.nonzero().flatten().tolist()) - {EOT} == set(ids[user_end:])
    assert bias[chat.encode("Apple")[0]] == 0
    # and the EOS ramp restarted at the model's own assistant tag: n = 2 ("Red", " red"), +15 * 2 / 250
    assert_close(bias[EOT], torch.tensor(15 * 2 / 250 - 1.5 * (EOT in ids[user_end:])))
    # the earlier reading, which kept the prompt's tags, gives n = 17 and the whole instruction
    fixed = rule_bias(ids, len(prompt), RuleSet(uniform=False, fixed_tags=True))
    assert_close(fixed[EOT], torch.tensor(15 * (len(ids) - len(prompt)) / 250))
    assert fixed[chat.encode("Apple")[0]] == -1.5


token = st.integers(0, VOCAB - 1)
# the model's text: small ids (many repeats), whole tags, and tags cut short (a partial match that fails)
piece = st.one_of(st.lists(st.integers(0, 60), min_size=1, max_size=8),
                  st.sampled_from([USER_TAG, ASSISTANT_TAG, USER_TAG[:3], ASSISTANT_TAG[:4], USER_TAG[:1] + USER_TAG]))


@settings(max_examples=40, deadline=None)
@given(before=st.lists(token, max_size=5), instruction=st.lists(token, max_size=20), with_tag=st.booleans(),
       pieces=st.lists(piece, min_size=1, max_size=40), cut=st.integers(0, 3),
       options=st.fixed_dictionaries({"eos": st.booleans(), "diversity": st.booleans(), "uniform": st.booleans(),
                                      "eos_hold": st.booleans(), "response_only": st.booleans(),
                                      "fixed_tags": st.booleans()}))
def test_incremental_state_equals_the_reference_at_every_step(before, instruction, with_tag, pieces, cut, options):
    rules = RuleSet(**options)
    # the prompt may end inside a tag (cut tokens of the assistant tag go to the response) or hold none
    prompt = before + (USER_TAG if with_tag else []) + instruction + ASSISTANT_TAG[:len(ASSISTANT_TAG) - cut]
    response = ASSISTANT_TAG[len(ASSISTANT_TAG) - cut:] + [t for p in pieces for t in p]
    official = not (rules.fixed_tags or rules.response_only or rules.eos_hold)
    state = RuleState([prompt], rules)
    generated = torch.empty((1, 0), dtype=torch.long)
    for t in range(len(response) + 1):
        ours = state(torch.zeros(1, VOCAB), generated)[0]
        reference = rule_bias(prompt + response[:t], len(prompt), rules)
        assert_close(ours, reference)
        ids = prompt + response[:t]
        if official and after_tag(ids, USER_TAG) and after_tag(ids, ASSISTANT_TAG):  # where the official code runs
            assert_close(reference, official_rules(ids, rules))
        if t < len(response):
            generated = torch.cat([generated, torch.tensor([[response[t]]])], dim=1)


def test_batched_state_keeps_one_state_per_sequence():
    prompts = [USER_TAG + [10, 11], [3, 4, 5] + USER_TAG + [12], [7]]
    state = RuleState(prompts, RuleSet())
    # row 0 opens a new response, row 1 a new user turn, row 2 neither: each resets its own row alone
    steps = torch.tensor([[13, *ASSISTANT_TAG, 14, 15], [16, *USER_TAG, 16, 10], [17, 7, 7, 7, 7, 7, 7, 7]])
    for t in range(steps.size(1) + 1):
        batch = state(torch.zeros(3, VOCAB), steps[:, :t])
        for b, p in enumerate(prompts):
            reference = rule_bias(p + steps[b, :t].tolist(), len(p), RuleSet())
            assert_close(batch[b], reference)


# a RuleSet of other values (a synthetic world's) runs the very same code ----------------------------------------
def test_the_defaults_are_the_official_values():
    r = RuleSet()
    assert (r.eos_max, r.eos_length, r.diversity_penalty, r.uniform_table) == (15.0, 250, 1.5, ())
    # the official table spelled out as pairs gives the default's scores ("What" at its -5)
    official = tuple((token, bias) for *_, token, bias in UNIFORM)
    assert torch.equal(uniform_bias(RuleSet(uniform_table=official)), uniform_bias(r))
    assert len({r, RuleSet(uniform_table=official), RuleSet(uniform_table=official)}) == 2  # hashable
    # another table replaces the official one whole: what_bias is the official table's "What"
    other = RuleSet(eos=False, diversity=False, uniform_table=((2061, 0.5), (7, -2.0)), what_bias=-3.0)
    bias = rule_bias([1, 2], 2, other)
    assert {t: bias[t].item() for t in bias.nonzero().flatten().tolist()} == {2061: 0.5, 7: -2.0}
    assert rule_bias([1, 2, 7, 7], 2, RuleSet(eos=False, uniform=False, diversity_penalty=0.25))[7] == -0.25


@settings(max_examples=60, deadline=None)
@given(top=st.floats(-5, 30, allow_subnormal=False), length=st.integers(1, 300), hold=st.booleans())
def test_eos_bias_with_other_values_is_the_formula(top, length, hold):
    r = RuleSet(eos_max=top, eos_length=length, eos_hold=hold)
    counts = list(range(length + 3)) + [length + 100, 10 ** 6]
    want = [0.0 if n == 0 else top * n / length if n < length else top * hold for n in counts]
    assert [eos_bias(n, r) for n in counts] == want  # the same float arithmetic, to the last bit
    got = eos_bias(torch.tensor(counts), r)  # RuleState's: float32, one count per sequence
    assert got.dtype == torch.float32 and got.shape == (len(counts),)
    # the formula in float32, to its resolution at top (one that float32 holds only as a subnormal keeps a few bits)
    assert_close(got, torch.tensor(want, dtype=torch.float32), scale=max(abs(top), 1e-30))


# ids a table biases: the sequences' own small ids, <|endoftext|>, the tags' ids, anything
table_token = st.one_of(st.integers(0, 60), st.sampled_from([EOT, *USER_TAG, *ASSISTANT_TAG]), token)
table = st.lists(st.tuples(table_token, st.floats(-8, 8, allow_subnormal=False)), min_size=1,
                 max_size=20, unique_by=lambda entry: entry[0]).map(tuple)
other_values = st.fixed_dictionaries({
    "eos_length": st.one_of(st.integers(1, 12), st.integers(1, 300)),  # small ones: ramps that end
    "eos_max": st.floats(-5, 30, allow_subnormal=False),
    "diversity_penalty": st.floats(0, 4, allow_subnormal=False),
    "uniform_table": st.one_of(st.just(()), table)})
# a prompt (maybe with a user tag, maybe ending inside the assistant tag) and the model's text, which may hold
# <|endoftext|> (its diversity penalty is kept apart from the EOS ramp)
row = st.tuples(st.lists(token, max_size=5), st.booleans(), st.lists(token, max_size=12), st.integers(0, 3),
                st.lists(st.one_of(piece, st.just([EOT])), min_size=1, max_size=30))


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=3), values=other_values,
       options=st.fixed_dictionaries({"eos": st.booleans(), "diversity": st.booleans(), "uniform": st.booleans(),
                                      "eos_hold": st.booleans(), "response_only": st.booleans(),
                                      "fixed_tags": st.booleans(), "what_bias": st.sampled_from([-5.0, -3.0])}))
def test_other_values_incremental_batched_state_equals_the_reference(rows, values, options):
    rules = RuleSet(**options, **values)
    prompts, responses = [], []
    for before, with_tag, instruction, cut, pieces in rows:  # the prompt may end inside a tag
        prompts.append(before + (USER_TAG if with_tag else []) + instruction + ASSISTANT_TAG[:5 - cut])
        responses.append(ASSISTANT_TAG[5 - cut:] + [t for p in pieces for t in p])
    longest = max(map(len, responses))
    steps = torch.tensor([r + [7] * (longest - len(r)) for r in responses])  # (B, T)
    # the scores are sums of these terms: an ulp of the largest is the arithmetic's resolution
    terms = [abs(rules.eos_max), rules.diversity_penalty, 5.0] + [abs(b) for _, b in rules.uniform_table]
    state = RuleState(prompts, rules)
    for t in range(longest + 1):
        batch = state(torch.zeros(len(prompts), VOCAB), steps[:, :t])
        for b, prompt in enumerate(prompts):
            reference = rule_bias(prompt + steps[b, :t].tolist(), len(prompt), rules)
            assert_close(batch[b], reference, scale=sum(terms))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=3), values=other_values, cut=st.integers(0, 30),
       columns=st.one_of(st.none(), st.lists(table_token, min_size=1, max_size=40, unique=True)),
       options=st.fixed_dictionaries({"eos": st.booleans(), "diversity": st.booleans(), "uniform": st.booleans(),
                                      "eos_hold": st.booleans(), "response_only": st.booleans(),
                                      "fixed_tags": st.booleans(), "what_bias": st.sampled_from([-5.0, -3.0])}))
def test_forced_rules_equal_stepping_the_state_token_by_token(rows, values, cut, columns, options):
    """Scoring's rules for known responses, all positions at once, in chunks cut anywhere and on a restricted
    vocabulary's columns, are RuleState's scores step by step: tags in the response (new turns), tags split by the
    prompt's end, <|endoftext|> in the text, every option and other values."""
    rules = RuleSet(**options, **values)
    prompts, responses = [], []
    for before, with_tag, instruction, tag_cut, pieces in rows:
        prompts.append(before + (USER_TAG if with_tag else []) + instruction + ASSISTANT_TAG[:5 - tag_cut])
        responses.append(ASSISTANT_TAG[5 - tag_cut:] + [t for p in pieces for t in p])
    longest = max(map(len, responses))
    targets = torch.tensor([r + [7] * (longest - len(r)) for r in responses])  # (B, T), padded as scoring pads
    forced = ForcedRules(prompts, targets, rules, columns)
    cut = min(cut, longest)
    width = VOCAB if columns is None else len(columns)
    zeros = torch.zeros(len(prompts), longest, width)  # log-probs of 0: what is added is the rules' scores
    chunks = torch.cat([forced.added_to(zeros[:, :cut], 0, cut), forced.added_to(zeros[:, cut:], cut, longest)], 1)
    state = RuleState(prompts, rules)
    terms = [abs(rules.eos_max), rules.diversity_penalty, 5.0] + [abs(b) for _, b in rules.uniform_table]
    for t in range(longest):
        stepped = state(torch.zeros(len(prompts), VOCAB), targets[:, :t])  # (B, V) before target t
        expected = stepped if columns is None else stepped[:, columns]
        assert_close(chunks[:, t], expected, scale=sum(terms))


@pytest.mark.parametrize("field, value", [
    ("eos_length", 0), ("eos_length", -3), ("eos_length", 2.5), ("eos_length", 250.0),
    ("eos_length", True), ("eos_length", "250"), ("eos_max", float("nan")), ("eos_max", float("inf")),
    ("eos_max", "15"), ("eos_max", None), ("eos_max", True), ("diversity_penalty", -0.5),
    ("diversity_penalty", float("-inf")), ("diversity_penalty", float("nan")),
    ("uniform_table", [(1, 1.0)]), ("uniform_table", (1, 1.0)), ("uniform_table", ((1,),)),
    ("uniform_table", ((1, 1.0, 2.0),)), ("uniform_table", ([1, 1.0],)), ("uniform_table", ((VOCAB, 1.0),)),
    ("uniform_table", ((-1, 1.0),)), ("uniform_table", ((1.0, 1.0),)), ("uniform_table", ((True, 1.0),)),
    ("uniform_table", ((1, float("nan")),)), ("uniform_table", ((1, "x"),)),
    ("uniform_table", ((1, 1.0), (2, 0.5), (1, 2.0))),
    ("uniform_table", tuple((k, 1.0) for k in range(100)) + (("many",),))])
def test_bad_values_are_refused_in_one_line_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^RuleSet {field}") as e:
        RuleSet(**{field: value})
    assert "\n" not in str(e.value) and len(str(e.value)) < 200, str(e.value)


@pytest.fixture(scope="module")
def model(small_hf):
    return loaded(small_hf[1])


@functools.cache
def loaded(path):
    return GPT.from_pretrained(path).eval()


def test_no_rules_is_plain_generation(model):
    prompt = chat.encode_prompt("Write a poem called Rain")
    plain = model.generate([prompt], 30, greedy=True, eos=None)[0]
    off = model.generate([prompt], 30, greedy=True, eos=None, hook=RuleState([prompt], RuleSet(False, False, False)))[0]
    assert_same_greedy(off, plain, prompt, last_logits(model))


def test_sampler_logprobs_are_the_product_of_experts(model):
    prompt = chat.encode_prompt("Give me a recipe for tiramisu.")
    state, base_seen, final = RuleState([prompt], RuleSet()), [], []

    def hook(logprobs, generated):  # the rules' hook, recording GPT-2's log-probs as the sampler gets them
        base_seen.append(logprobs[0].clone())
        return state(logprobs, generated)
    out = model.generate([prompt], 60, greedy=True, eos=None, hook=hook,
                         callback=lambda logprobs, tokens: final.append(logprobs[0].clone()))[0]
    assert len(final) == 60 and len(set(out)) > 5
    for t in range(60):
        ids = prompt + out[:t]
        bias = rule_bias(ids, len(prompt), RuleSet())  # from scratch
        expected = F.log_softmax(base_seen[t] + bias, dim=-1)
        assert_close(final[t], expected)
        assert_close(final[t].exp(), expected.exp())
        assert out[t] == int(expected.argmax())
        with torch.no_grad():  # and those base log-probs are GPT-2's: the whole sequence again, no cache
            logits = model(torch.tensor([ids]))[0][0, -1]
        assert_close(base_seen[t], F.log_softmax(logits, dim=-1))
        assert_close(product_of_experts(logits, bias).exp(), F.log_softmax(F.log_softmax(logits, dim=-1) + bias, dim=-1).exp())


def test_rules_change_greedy_output_and_batch_equals_alone(model):
    prompts = [chat.encode_prompt(q) for q in ("Hi", "Write a poem called Rain", "List three colors please.")]
    plain = model.generate(prompts, 40, greedy=True, eos=None)
    ruled = model.generate(prompts, 40, greedy=True, eos=None, hook=RuleState(prompts, RuleSet()))
    assert ruled != plain
    alone = [model.generate([p], 40, greedy=True, eos=None, hook=RuleState([p], RuleSet()))[0] for p in prompts]
    assert_same_generations(ruled, alone, prompts, last_logits(model, RuleSet()))


def sample(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_sample_cli_end_to_end(small_hf, tmp_path):
    _, directory = small_hf
    r = sample(f"--init_from={directory}", "--rules", "--prompt=Write a poem called Rain", "--max_new_tokens=12")
    assert r.returncode == 0 and "rules: all" in r.stderr, r.stderr
    plain = sample(f"--init_from={directory}", "--prompt=Write a poem called Rain", "--max_new_tokens=12")
    ids = chat.encode_prompt("Write a poem called Rain")
    model = GPT.from_pretrained(directory).eval()
    tokens = model.generate([ids], 12, greedy=True)[0]
    assert_clear_margins(model, ids, tokens)  # another process: perhaps other threads and kernels, the same tokens
    assert plain.stdout == chat.decode(tokens) + "\n"  # only the response
    (tmp_path / "val.jsonl").write_text('{"instruction": "Say hi."}\n\n{"instruction": "Name a color.", "x": 1}\n')
    out = tmp_path / "answers.json"
    r = sample(f"--init_from={directory}", "--rules=eos,uniform", f"--instructions={tmp_path / 'val.jsonl'}",
               f"--out={out}", "--max_new_tokens=10", "--batch_size=2")
    assert r.returncode == 0, r.stderr
    answers = json.loads(out.read_text())
    assert [a["instruction"] for a in answers] == ["Say hi.", "Name a color."]
    assert all(set(a) == {"instruction", "output", "generator", "dataset"} and isinstance(a["output"], str) for a in answers)
    assert answers[0]["generator"].endswith("+rules:eos,uniform") and answers[0]["dataset"] == "val"
    # AlpacaEval's own JSON list is accepted as input too, keeping its dataset names
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Hi", "output": "x", "generator": "g", "dataset": "oasst"}]))
    r = sample(f"--init_from={directory}", f"--instructions={tmp_path / 'alpaca.json'}", f"--out={out}", "--max_new_tokens=4")
    assert r.returncode == 0 and json.loads(out.read_text())[0]["dataset"] == "oasst", r.stderr


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"instruction": "ok"}\n{"instruction": \n', "bad.jsonl:2: malformed JSON"),
    ('{"instruction": "ok"}\n{"instruction": "   "}\n', "bad.jsonl:2: empty instruction"),
    ('{"prompt": "ok"}\n', "bad.jsonl:1: missing string field 'instruction'"),
    ("", "empty file"),
])
def test_sample_cli_bad_instruction_files(small_hf, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    r = sample(f"--init_from={small_hf[1]}", f"--instructions={path}")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_sample_cli_other_mistakes(small_hf):
    for args, message in [(("--rules=eos,fast", "--prompt=x"), "unknown rule 'fast'"),
                          ((f"--init_from={small_hf[1]}",), "nothing to answer")]:
        r = sample(*args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_rules_figure(tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, str(ROOT / "rules.py"), str(tmp_path / "rules.png")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rules.png").stat().st_size > 10_000 and "EOS bias" in r.stdout
    lines = r.stdout.splitlines()
    assert lines[1].split()[-3:] == ["+0.00", "+0.00", "+0.00"] and lines[2].split()[-1] == "+0.06"  # n = 0, 1


REFILL_CONFIG = {"max_new_tokens": 0, "greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0,
                 "compile": False}


def question(rng, k):
    """A prompt with the chat tags (k % 3 == 0: raw text, no tags; k % 3 == 1: a second turn), from random words,
    often with the start of an answer after the assistant tag: the EOS ramp then starts part way up, so answers
    end at different steps."""
    def words(n):
        return " ".join(rng.choice(["rain", "poem", "list", "three", "colors", "why", "sky", "blue", "What"])
                        for _ in range(n))
    text = words(rng.randint(1, 12))
    if k % 3 == 0:
        return chat.encode(text)
    if k % 3 == 1:
        prompt = chat.encode_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text},
                                     {"role": "user", "content": text[::-1]}])
    else:
        prompt = chat.encode_prompt(text)
    return prompt + chat.encode(words(rng.randint(0, 6)))


@settings(max_examples=12, deadline=None)
@given(count=st.integers(1, 9), batch=st.integers(1, 4), max_new=st.integers(1, 50), eos_length=st.integers(2, 30),
       options=st.sampled_from([{}, dict(response_only=True), dict(fixed_tags=True), dict(uniform=False),
                                dict(eos=False), dict(eos=False, diversity=False, uniform=False)]),
       seed=st.integers(0, 10 ** 6))
def test_refilled_rows_give_each_prompt_its_answer_alone(small_hf, count, batch, max_new, eos_length, options,
                                                         seed):
    """Continuous batching (respond's batch_size): a row whose answer ends takes the next prompt, its cache slots
    and its rule state started over; every prompt's answer is its answer alone, whatever the batch size, and each
    answer is reported once, as it ends. The EOS ramp over a few tokens ends answers at different steps, so rows
    are refilled mid-run (and a prompt that fills the context is answered with nothing)."""
    import random
    model = loaded(small_hf[1])
    rng = random.Random(seed)
    prompts = [question(rng, k) for k in range(count)]
    if rng.random() < 0.3:
        prompts[rng.randrange(count)] = [rng.randrange(VOCAB - 1) for _ in range(model.config.block_size)]
    rule_set = RuleSet(eos_max=30.0, eos_length=eos_length, **options)
    config = {**REFILL_CONFIG, "max_new_tokens": max_new}
    alone = [respond(model, [p], config, rule_set, "cpu", "float32")[0] for p in prompts]
    order = []
    got = respond(model, prompts, config, rule_set, "cpu", "float32", batch_size=batch,
                  answered=lambda i, tokens: order.append((i, tokens)))
    assert_same_generations(got, alone, prompts, last_logits(model, rule_set))
    assert sorted(i for i, _ in order) == list(range(count))  # each answer once
    assert all(got[i] == tokens for i, tokens in order)


def test_refilling_is_real_and_needs_a_restartable_hook(model):
    """Answers of different lengths end at different steps, and a later prompt's answer is reported before an
    earlier one's (it was started in a row freed mid-run); a hook without restart() is refused before any work.
    The compiled step (fixed shapes) refills the same way."""
    prompts = [chat.encode_prompt(q) + chat.encode(" sky" * k)  # answers begun: the EOS ramp starts at k
               for q, k in (("Hi", 0), ("Write a poem called Rain", 6), ("List three colors please.", 1),
                            ("Why is the sky blue?", 4), ("What", 2))]
    order = []
    rule_set = RuleSet(eos_max=30.0, eos_length=8)
    config = {**REFILL_CONFIG, "max_new_tokens": 40}
    alone = [respond(model, [p], config, rule_set, "cpu", "float32")[0] for p in prompts]
    assert len({len(a) for a in alone}) >= 3, alone  # the ramp ends them at different steps
    got = respond(model, prompts, config, rule_set, "cpu", "float32", batch_size=2,
                  answered=lambda i, tokens: order.append(i))
    assert_same_generations(got, alone, prompts, last_logits(model, rule_set))
    assert order != sorted(order), order
    compiled = respond(model, prompts, {**config, "compile": True}, rule_set, "cpu", "float32", batch_size=2)
    assert_same_generations(compiled, alone, prompts, last_logits(model, rule_set))
    with pytest.raises(TypeError, match="restart"):
        model.generate(prompts, 5, hook=lambda logprobs, generated: 0 * logprobs, batch_size=2)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), options=st.sampled_from([{}, dict(response_only=True), dict(fixed_tags=True),
                                                              dict(eos_hold=True), dict(eos_length=3)]))
def test_a_restarted_row_is_a_fresh_state_for_its_new_prompt(seed, options):
    """RuleState.restart(b, prompt, generated), as generate calls it after the step that ended row b's answer and
    before the state has taken in that step's tokens: row b's scores are then exactly those of a state built for
    the new prompt alone, fed the row's later tokens; the other rows go on as if nothing happened."""
    import random
    rng = random.Random(seed)
    rule_set = RuleSet(**options)
    pool = [EOT, 2061, 11, 12, 13, 14] + USER_TAG + ASSISTANT_TAG  # ids the rules act on, and the tags' pieces

    def draw(n):
        return [rng.choice(pool) for _ in range(n)]
    B = rng.randint(1, 4)
    prompts = [draw(rng.randint(1, 10)) for _ in range(B)]
    steps = [torch.tensor(draw(B)) for _ in range(rng.randint(2, 30))]
    b, at, new = rng.randrange(B), rng.randint(1, len(steps) - 1), draw(rng.randint(1, 10))
    state, kept = RuleState(prompts, rule_set), RuleState(prompts, rule_set)
    fresh = RuleState([new], rule_set)
    for s in range(len(steps) + 1):
        generated = torch.stack(steps[:s], 1) if s else torch.zeros(B, 0, dtype=torch.long)
        if s == at:  # row b's answer ended at step `at`: the column just written is its old prompt's
            state.restart(b, new, generated)
        scores = state(None, generated)
        others = [r for r in range(B) if r != b]
        assert torch.equal(scores[others], kept(None, generated)[others])
        if s >= at:
            assert torch.equal(scores[b], fresh(None, generated[b:b + 1, at:])[0])


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.sampled_from([1, 2, 3] + USER_TAG + ASSISTANT_TAG), max_size=40), min_size=1,
                     max_size=4), tag=st.sampled_from([USER_TAG, ASSISTANT_TAG, [1, 1], [2]]))
def test_after_tags_is_after_tag_at_every_prefix(rows, tag):
    """ForcedRules' closed form of the tags: after_tags(ids, tag, ends, default) at every prefix length of every
    row equals the reference after_tag (the exercise's function) on that prefix, default where it finds none;
    tags that overlap, repeat, or run into the padding are drawn from the tags' own pieces."""
    from rules import after_tags
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    ends = torch.tensor([[min(n, len(r)) for n in range(L + 1)] for r in rows])  # (B, L + 1)
    default = torch.full_like(ends, -7)
    got = after_tags(ids, tag, ends, default).tolist()
    for b, r in enumerate(rows):
        assert got[b] == [after_tag(r[:n], tag) or -7 for n in ends[b].tolist()]
