"""The chat format and its loss mask (chat.py)."""
import itertools

import pytest
import torch
from conftest import assert_close
from hypothesis import given, settings, strategies as st

from chat import EOT, decode, encode, encode_chat, encode_prompt, targets_from_mask, tokenizer
from model import GPT

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": " It is 12.\n"},  # surrounding whitespace is stripped, as the paper's code does
]
TEXT = ("<|user|>\nWhat is 2+2?\n<|assistant|>\n4.<|endoftext|>\n"
        "<|user|>\nAnd times 3?\n<|assistant|>\nIt is 12.<|endoftext|>")


def test_tokenizer_is_tiktoken_gpt2():
    assert encode("Hello world") == [15496, 995]
    assert tokenizer().n_vocab == 50257 and tokenizer().eot_token == EOT == 50256


def test_multi_turn_text_and_mask():
    ids, mask = encode_chat(CONVERSATION)
    assert len(ids) == len(mask)
    assert tokenizer().decode(ids) == TEXT
    trained = [t for t, m in zip(ids, mask) if m]
    # the "\n" after the first <|endoftext|> is the first response's (finetune.py 361-381 masks only the spans of
    # the user turns, each from its own tag on)
    assert trained == encode("4.") + [EOT] + encode("\n") + encode("It is 12.") + [EOT]
    assert ids[ids.index(EOT) + 1] == 198 and mask[ids.index(EOT) + 1] == 1
    # every masked token is outside the responses: user turns and the assistant tags right after them
    assert tokenizer().decode([t for t, m in zip(ids, mask) if not m]) == \
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n<|user|>\nAnd times 3?\n<|assistant|>\n"


def test_system_message_is_masked():
    ids, mask = encode_chat([{"role": "system", "content": "Be brief."}] + CONVERSATION[:2])
    assert tokenizer().decode(ids) == "<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4.<|endoftext|>"
    assert sum(mask) == len(encode("4.")) + 1


def test_response_only_format_of_the_paper():
    ids, mask = encode_chat([{"role": "user", "content": ""}, {"role": "assistant", "content": "Sure."}])
    assert tokenizer().decode(ids) == "<|user|>\n\n<|assistant|>\nSure.<|endoftext|>"


def test_endoftext_typed_by_a_user_is_ordinary_text():
    ids, mask = encode_chat([{"role": "user", "content": "say <|endoftext|> now"},
                             {"role": "assistant", "content": "ok <|endoftext|>"}])
    assert ids.count(EOT) == 1 and ids[-1] == EOT  # only the real end of the response
    assert EOT not in encode_prompt("say <|endoftext|> now")
    assert decode(encode("<|endoftext|>")) == "<|endoftext|>"


def test_prompt_ends_with_assistant_tag_and_is_the_training_prefix():
    prompt = encode_prompt("What is 2+2?")
    assert tokenizer().decode(prompt).endswith("<|assistant|>\n")
    ids, mask = encode_chat(CONVERSATION[:2])
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1 and sum(mask[:len(prompt)]) == 0
    # multi-turn history: the prompt for the second answer is the first exchange plus the new question
    prompt2 = encode_prompt(CONVERSATION[:3])
    full, mask = encode_chat(CONVERSATION)
    assert full[:len(prompt2)] == prompt2 and mask[len(prompt2)] == 1


def test_unknown_role():
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        encode_chat([{"role": "bot", "content": "hi"}])


def test_mask_gives_hf_masked_loss(small_hf):
    hf, directory = small_hf
    model = GPT.from_pretrained(directory).eval()
    ids, mask = encode_chat(CONVERSATION)
    idx = torch.tensor([ids])
    _, loss = model(idx, torch.tensor([targets_from_mask(ids, mask)]))
    labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])  # HF shifts labels itself
    with torch.no_grad():
        ref = hf(idx, labels=labels).loss
    assert_close(loss, ref)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(text, text), min_size=1, max_size=3))
def test_any_conversation_round_trips(turns):
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ids, mask = encode_chat(messages)
    expected = "\n".join(f"<|user|>\n{q.strip()}\n<|assistant|>\n{a.strip()}<|endoftext|>" for q, a in turns)
    assert tokenizer().decode(ids) == expected
    assert ids.count(EOT) == len(turns)
    joins = len(turns) - 1  # the "\n" after each <|endoftext|> but the last is trained too
    assert sum(mask) == sum(len(encode(a.strip())) + 1 for _, a in turns) + joins
    # a prompt keeps the instructions as given; of the stripped ones, it is the training prefix up to the last
    # response, which is all that is trained after it
    prompt = encode_prompt([{**m, "content": m["content"].strip()} for m in messages[:-1]])
    assert ids[:len(prompt)] == prompt and sum(mask[len(prompt):]) == len(mask) - len(prompt) == len(encode(turns[-1][1].strip())) + 1
    targets = targets_from_mask(ids, mask)
    # the trained targets are the trained tokens, in order (the first token, <|user|>, never is)
    assert mask[0] == 0 and [t for t in targets if t != -1] == [t for t, m in zip(ids, mask) if m]


# open-instruct's training mask and evaluation prompt, written out as the official code computes them -----------

def official_text(messages, strip_inputs=True):
    """_concat_messages (finetune.py 339-350); with strip_inputs=False, the prompt template's text for the
    messages (eval/templates.py 5-12: user and system contents as given)."""
    text = ""
    for m in messages:
        content = m["content"]
        if strip_inputs or m["role"] == "assistant":
            content = content.strip()
        text += f"<|{m['role']}|>\n{content}"
        if m["role"] == "assistant":
            text += "<|endoftext|>"
        text += "\n"
    return text


def official_tokenize(text):
    return tokenizer().encode(text, allowed_special={"<|endoftext|>"})  # HF's tokenizer reads its eos_token so


def official_labels(messages):
    """(ids, mask) of encode_with_messages_format (finetune.py 330-391) with GPT-2's tokenizer: labels are -100
    (mask 0) over each non-assistant message, from the length of the tokens before it to the length of the tokens
    through it (and through the assistant tag when a response follows); all else trains."""
    ids = official_tokenize(official_text(messages).strip())
    mask = [1] * len(ids)
    for idx, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0
        if idx > 0:
            start = len(official_tokenize(official_text(messages[:idx])))
        so_far = official_text(messages[:idx + 1])
        if idx < len(messages) - 1 and messages[idx + 1]["role"] == "assistant":
            so_far += "<|assistant|>\n"
        end = len(official_tokenize(so_far))
        for t in range(start, min(end, len(ids))):
            mask[t] = 0
    return ids, mask


def test_two_turns_train_the_newline_after_the_first_endoftext():
    ids, mask = encode_chat(CONVERSATION)
    assert (ids, mask) == official_labels(CONVERSATION)
    first = ids.index(EOT)
    assert ids[first + 1] == 198 and mask[first + 1] == 1  # "\n": the first response's, before the user's tag
    assert mask[first + 2] == 0  # "<|"


# contents that stress the cuts: empty, whitespace around, tags and newlines inside; <|endoftext|> typed as text
# is left out, since HF's tokenizer reads it as the special token (our departure, tested above)
fragments = st.sampled_from(["", " ", "\n", "\n\n", "\t", "<|user|>", "<|assistant|>\n", "<", "|>", "'s", "x"])
content = st.lists(st.one_of(fragments, text), max_size=4).map("".join)
content = content.filter(lambda c: "<|endoftext|>" not in c)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content})


@settings(max_examples=400, deadline=None)
@given(st.lists(message, min_size=1, max_size=6))
def test_mask_is_open_instructs(messages):
    ids, mask = encode_chat(messages)
    ref_ids, ref_mask = official_labels(messages)
    # the official strips its whole text: a last user or system message loses its trailing whitespace, which we
    # keep, untrained (it is never a target, so the loss is the same)
    assert ids[:len(ref_ids)] == ref_ids and mask[:len(ref_ids)] == ref_mask
    assert not any(mask[len(ref_ids):])
    if messages[-1]["role"] == "assistant":
        assert len(ids) == len(ref_ids)


def test_mask_is_open_instructs_for_every_order_of_roles():
    roles = ["system", "user", "assistant"]
    for n in range(1, 5):
        for order in itertools.product(roles, repeat=n):
            for contents in (["Hi there."] * n, [""] * n, [" a\n"] * n):
                messages = [{"role": r, "content": c} for r, c in zip(order, contents)]
                ids, mask = encode_chat(messages)
                ref_ids, ref_mask = official_labels(messages)
                assert ids[:len(ref_ids)] == ref_ids and mask[:len(ref_ids)] == ref_mask, messages
                assert not any(mask[len(ref_ids):]), messages


def test_prompt_is_the_official_template_with_instructions_as_given():
    instruction = "\n  Write a poem called Rain. \n\n"
    text = "<|user|>\n" + instruction + "\n<|assistant|>\n"  # eval/templates.py 10 and 14: no strip
    assert encode_prompt(instruction) == encode(text)
    history = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"},
               {"role": "assistant", "content": " Hello! \n"}, {"role": "user", "content": " Bye"}]
    text = ("<|system|>\n Be brief. \n<|user|>\nHi\n\n<|assistant|>\nHello!<|endoftext|>\n"
            "<|user|>\n Bye\n<|assistant|>\n")  # the response alone is stripped (templates.py 12)
    assert encode_prompt(history) == official_tokenize(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(message, max_size=5))
def test_any_prompt_is_the_official_template(messages):
    text = official_text(messages, strip_inputs=False) + "<|assistant|>\n"  # templates.py 14
    assert encode_prompt(messages) == official_tokenize(text)
