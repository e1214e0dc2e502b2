"""The checks of EXERCISES.md. Each check_* takes the function under exercise (by default the repository's own)
and asserts what a right answer must do; test_* run them on the reference code, and test_wrong_* show that each
check rejects a plausible wrong answer, so that a check cannot pass by accident.

    python -m pytest tests/test_exercises.py -k eos      # after writing your own rules.eos_bias
"""
import random

import pytest
import torch

import chat
import evaluate
import model
import rules


# 1. the EOS rule ------------------------------------------------------------------------------------------
def check_eos_rule(eos_bias=None):
    eos_bias = eos_bias or rules.eos_bias
    r = rules.Rules()
    got = [eos_bias(n, r) for n in (0, 1, 2, 125, 249, 250, 251, 1000)]
    want = [0.0, 0.06, 0.12, 7.5, 14.94, 0.0, 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-9), f"EOS bias at n = 0, 1, 2, 125, 249, 250, 251, 1000: {got}"


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


# 3. mask the instruction out of the loss -------------------------------------------------------------------
def check_loss_targets(targets_from_mask=None):
    targets_from_mask = targets_from_mask or chat.targets_from_mask
    ids, mask = chat.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    targets = targets_from_mask(ids, mask)
    assert len(targets) == len(ids), "one target per input position"
    trained = [t for t in targets if t != -1]
    assert trained == chat.encode("Hello!") + [chat.EOT], "the response and <|endoftext|>, nothing else"
    first = mask.index(1)
    assert targets[first - 1] == ids[first], "position t predicts token t + 1"


# 4. turn LIMA into response-only data ------------------------------------------------------------------------
def check_response_only(empty_instructions=None):
    empty_instructions = empty_instructions or chat.empty_instructions
    conversation = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
                    {"role": "assistant", "content": "Bye."}]
    ids, _ = chat.encode_chat(empty_instructions(conversation))
    assert chat.tokenizer().decode(ids) == ("<|system|>\nBe kind.\n<|user|>\n\n<|assistant|>\nHello.<|endoftext|>\n"
                                            "<|user|>\n\n<|assistant|>\nBye.<|endoftext|>")
    assert conversation[1]["content"] == "Hi?", "the original conversation is left unchanged"


# 5. the diversity rule ---------------------------------------------------------------------------------------
def check_diversity_rule(rule_bias=None):
    rule_bias = rule_bias or rules.rule_bias
    prompt = [5, 6] + rules.USER_TAG + [7, 8, 7]
    bias = rule_bias(prompt + [9, 9, 9, 7], len(prompt), rules.Rules(eos=False, uniform=False))
    got = {t: bias[t].item() for t in bias.nonzero().flatten().tolist()}
    assert got == {7: -1.5, 8: -1.5, 9: -1.5}, f"-1.5 once per distinct id after the user tag, got {got}"


# 6. the paper's response ranking -----------------------------------------------------------------------------
def check_ranking(ranking_win_rate=None):
    ranking_win_rate = ranking_win_rate or evaluate.ranking_win_rate
    assert ranking_win_rate(lambda i, j: float(i == j), 5, 4, 0) == 100, "own response likeliest: 100%"
    assert ranking_win_rate(lambda i, j: 0.0, 5, 4, 0) == 0, "a tie is not a win"
    assert ranking_win_rate(lambda i, j: -float(i == j), 5, 4, 0) == 0, "own response least likely: 0%"


# 7. a repetition metric ---------------------------------------------------------------------------------------
def check_repetition(repeated_ngram_share=None):
    repeated_ngram_share = repeated_ngram_share or evaluate.repeated_ngram_share
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert repeated_ngram_share([7] * 10) == pytest.approx(6 / 7), "every repeat counts, not each repeated 4-gram once"


# 8. top-p (nucleus) sampling ------------------------------------------------------------------------------------
def check_top_p(sample=None):
    sample = sample or model.sample
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample(logprobs, top_p=0.7, generator=g)) for _ in range(400)}
    assert seen == {0, 1}, f"top_p=0.7 keeps the smallest set reaching 0.7 ({{0, 1}}), drew {seen}"
    seen = {int(sample(logprobs, top_p=0.4, generator=g)) for _ in range(200)}
    assert seen == {0}, "the likeliest token is always kept"


CHECKS = [check_eos_rule, check_uniform_tokens, check_loss_targets, check_response_only, check_diversity_rule,
          check_ranking, check_repetition, check_top_p]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_reference_code_passes(check):
    check()


# plausible wrong answers, one or two per exercise: each must fail its check --------------------------------------
def wrong_sample_top_p(logprobs, top_p=None, generator=None, **_):
    sorted_scores, order = torch.sort(logprobs, descending=True)
    keep = sorted_scores.exp().cumsum(-1) <= top_p  # drops the token that crosses p, and can drop everything
    probs = torch.zeros_like(logprobs).scatter(-1, order, keep.float() * sorted_scores.exp())
    return torch.multinomial(probs / probs.sum(), 1, generator=generator)[:, 0]


def wrong_ranking(score, n, negatives, seed):  # counts a tie as a win
    rng, wins, total = random.Random(seed), 0, 0
    for i in range(n):
        for j in [rng.randint(0, n - 1) for _ in range(negatives)]:
            if j != i:
                wins, total = wins + (score(i, i) >= score(i, j)), total + 1
    return 100 * wins / total


def wrong_ranking_with_self(score, n, negatives, seed):  # counts draws of the own response as comparisons
    rng, wins = random.Random(seed), 0
    for i in range(n):
        for j in [rng.randint(0, n - 1) for _ in range(negatives)]:
            wins += score(i, i) > score(i, j)
    return 100 * wins / (n * negatives)


def wrong_diversity(ids, prompt_len, r):  # per occurrence, and from the very start
    bias = torch.zeros(rules.VOCAB)
    for token in ids:
        bias[token] -= 1.5
    return bias


WRONG = [
    (check_eos_rule, lambda n, r: 15 * n / 250 if n <= 250 else 0.0),  # off by one at 250
    (check_eos_rule, lambda n, r: min(15.0, 15 * n / 250)),  # the paper's wording, not the code: never drops
    (check_uniform_tokens, [(i, p, s, {1334: 1135}.get(i, t), b) for i, p, s, t, b in rules.UNIFORM]),  # "We", no space
    (check_uniform_tokens, [(i, p, s, {29966: 1279, 529: 27}.get(i, t), b) for i, p, s, t, b in rules.UNIFORM]),  # swapped
    # trusting the code's comments: 5618 as " What", 334 as "-", 448 as "*" (line-start forms)
    (check_uniform_tokens, [(i, p, s, {5618: 1867, 334: 12, 448: 9}.get(i, t), b) for i, p, s, t, b in rules.UNIFORM]),
    (check_loss_targets, lambda ids, mask: [t if m else -1 for t, m in zip(ids, mask)]),  # not shifted
    (check_loss_targets, lambda ids, mask: [n if m else -1 for n, m in zip(ids[1:], mask[:-1])] + [-1]),  # mask off by one
    (check_response_only, lambda ms: [m for m in ms if m["role"] != "user"]),  # drops the user turns entirely
    (check_response_only, lambda ms: [m.update(content="") or m if m["role"] == "user" else m for m in ms]),  # in place
    (check_diversity_rule, wrong_diversity),
    (check_ranking, wrong_ranking),
    (check_ranking, wrong_ranking_with_self),
    (check_repetition, lambda toks: len({tuple(toks[i:i + 4]) for i in range(len(toks) - 3)
                                         if toks[i:i + 4] in [toks[j:j + 4] for j in range(i)]}) / max(1, len(toks) - 3)),
    (check_top_p, wrong_sample_top_p),
]


@pytest.mark.parametrize("check, wrong", WRONG, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(WRONG)])
def test_wrong_answers_fail_their_check(check, wrong):
    with pytest.raises(AssertionError):
        check(wrong)
