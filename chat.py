"""
The paper's chat format and its loss mask: the one place that turns conversations into GPT-2 tokens.

    python chat.py "Write a poem called Spring"     # prints the tokens of a generation prompt

One turn (paper section 3, Figure 1):

    <|user|>\\n{instruction}\\n<|assistant|>\\n{response}<|endoftext|>

Turns are joined with "\\n"; a system message, if any, is `<|system|>\\n{content}\\n` (as in open-instruct,
whose Tulu format the paper's code uses). The tags are plain text to GPT-2, not special tokens; the only
special token is <|endoftext|> (id 50256), which ends every response. Each assistant response and the
<|endoftext|> after it are trained (mask 1); tags, instructions and joins are masked (0). Response tuning
(section 3) is this same format with every user content empty: `<|user|>\\n\\n<|assistant|>\\n{response}`.

Tokenization is done piece by piece, cut where the mask changes, so a mask boundary is always a token
boundary and a generation prompt encodes to exactly the tokens the model was trained to continue.
Text written by a user is always ordinary text: "<|endoftext|>" typed into an instruction is 7 tokens of
text, never the special token.
"""
import sys

import tiktoken

EOT = 50256  # <|endoftext|>
ROLES = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
_encoding = None


def tokenizer():
    global _encoding
    if _encoding is None:  # loaded on first use: tiktoken reads (or downloads) the GPT-2 BPE files
        _encoding = tiktoken.get_encoding("gpt2")
    return _encoding


def encode(text):
    """Token ids of `text`, special-token strings included as plain text."""
    return tokenizer().encode_ordinary(text)


def decode(ids):
    """Text of `ids`, <|endoftext|> dropped (it ends a response; it is not part of it)."""
    return tokenizer().decode([i for i in ids if i != EOT])


def _pieces(messages):
    # (text or EOT, trained) in order, adjacent untrained texts merged so that they are encoded together
    pieces = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        join = "\n" if i > 0 and messages[i - 1]["role"] == "assistant" else ""  # after <|endoftext|>
        if role == "assistant":
            pieces += [(join + ROLES[role], False), (content, True), (EOT, True)]
        else:
            pieces += [(join + ROLES[role] + content + "\n", False)]
    merged = []
    for text, trained in pieces:
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trained))
    return merged


def encode_chat(messages):
    """Token ids and loss mask of a conversation [{"role": ..., "content": ...}, ...].

    mask[t] is 1 where token t is part of an assistant response or the <|endoftext|> closing it."""
    ids, mask = [], []
    for text, trained in _pieces(messages):
        tokens = [EOT] if text == EOT else encode(text)
        ids += tokens
        mask += [int(trained)] * len(tokens)
    return ids, mask


def encode_prompt(instruction_or_messages):
    """Tokens that ask for the next assistant turn: the conversation so far (or one instruction) followed by
    `<|assistant|>\\n`, exactly as training formats the text before a response."""
    messages = instruction_or_messages
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    ids, _ = encode_chat(list(messages) + [{"role": "assistant", "content": ""}])
    return ids[:-1]  # drop the empty response's <|endoftext|>: the prompt ends with "<|assistant|>\n"


def targets_from_mask(ids, mask):
    """Next-token targets for `ids` with untrained positions set to -1 (ignored by GPT.forward's loss):
    position t predicts token t+1, and counts only if token t+1 is trained."""
    return [nxt if m else -1 for nxt, m in zip(ids[1:], mask[1:])] + [-1]


if __name__ == "__main__":
    prompt = encode_prompt(" ".join(sys.argv[1:]) or "Write a poem called Spring")
    print(prompt)
    print(repr(decode(prompt)))
