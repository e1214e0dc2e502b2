"""
Continuous batching: the bookkeeping of GPT.generate's rows. A batch decodes B rows together; when
one row's answer ends (<|endoftext|>, or out of room) it takes the next waiting prompt, so a batch
does not idle behind its longest answer while prompts wait (sample.py --instructions, evaluate.py,
TinyWorld). Rows keeps, on the host, which prompt each row answers, where its newest token sits and
when its answer began; model.py does the tensors.
"""
import torch


class Rows:
    """The rows of a decoding batch: the prompt each row answers (None: idle), the position (its
    cache slot) of its newest token and the step its answer began at, kept on the host; the tokens
    of every step, kept on the device. Prompts past the first B wait their turn (continuous
    batching)."""

    def __init__(self, prompts, room, B, answered=None, device="cpu"):
        self.prompts, self.room, self.answered = prompts, room, answered
        self.owner, self.pos, self.begin = [None] * B, [0] * B, [0] * B
        self.waiting = iter(range(B, len(prompts)))
        self.answers = [None] * len(prompts)
        self.tokens = torch.empty((B, 64), dtype=torch.long, device=device)  # (B, capacity)
        self.steps = 0  # columns of self.tokens filled, one a step
        self.device = device

    def finish(self, i, tokens):
        self.answers[i] = tokens
        if self.answered is not None:
            self.answered(i, tokens)

    def take(self, b, i):
        """Row b answers prompt i (None: the next waiting one); a prompt that fills the context is
        answered with no tokens and skipped. Returns the prompt, or None if the row idles."""
        if i is None:
            i = next(self.waiting, None)
        while i is not None and self.room[i] == 0:
            self.finish(i, [])
            i = next(self.waiting, None)
        self.owner[b] = i
        if i is None:
            return None
        self.pos[b], self.begin[b] = len(self.prompts[i]) - 1, self.steps
        return self.prompts[i]

    def record(self, nxt):
        """One step's tokens (B,), on the device: no host synchronization."""
        if self.steps == self.tokens.size(1):  # double the capacity
            self.tokens = torch.cat([self.tokens, torch.empty_like(self.tokens)], dim=1)
        self.tokens[:, self.steps] = nxt
        self.steps += 1

    def check(self, n, eos):
        """After the last n steps: the rows whose answer ended in them (at eos, or out of room),
        each answer handed over and its row freed; every other busy row moves n tokens on. One
        host synchronization."""
        window = self.tokens[:, self.steps - n:self.steps].tolist()
        ended = []
        for b, i in enumerate(self.owner):
            if i is None:
                continue
            for j, token in enumerate(window[b]):
                end = self.steps - n + j + 1  # the answer so far: steps begin[b] to end
                if token == eos or end - self.begin[b] == self.room[i]:
                    ended.append(b)
                    self.owner[b] = None
                    self.finish(i, self.tokens[b, self.begin[b]:end].tolist())
                    break
            else:
                self.pos[b] += n
        return ended

    def step(self, nxt, eos):
        """record and check one step: the rows that ended at it."""
        self.record(nxt)
        return self.check(1, eos)

    def generated(self):
        return self.tokens[:, :self.steps]  # (B, steps)

    def left(self, b):
        """How many more tokens row b's answer may have."""
        return self.room[self.owner[b]] - (self.steps - self.begin[b])

    def busy_rows(self):
        return [b for b, i in enumerate(self.owner) if i is not None]

    def busy(self):
        return any(i is not None for i in self.owner)

    def idle(self):
        return torch.tensor([i is None for i in self.owner], device=self.device)  # (B,)

    def positions(self):
        return torch.tensor(self.pos, device=self.device)  # (B,)


def with_rows(h, read, B):
    """h (B, C) with the rows in `read` ({row: (C,) or None}) replaced; a new tensor, since a
    compiled step's h lives in the CUDA graph's memory. An idle row keeps what it had (zeros at
    first)."""
    read = {b: x for b, x in read.items() if x is not None}
    if not read:
        return h
    if h is None:
        x = next(iter(read.values()))
        h = x.new_zeros(B, x.size(0))
    else:
        h = h.clone()
    for b, x in read.items():
        h[b] = x
    return h
