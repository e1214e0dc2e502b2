"""
Continuous batching: the bookkeeping of GPT.generate's rows. A batch decodes B rows together; when
one row's answer ends (<|endoftext|>, or out of room) it takes the next waiting prompt, so a batch
does not idle behind its longest answer while prompts wait (sample.py --instructions, evaluate.py,
TinyWorld). Rows keeps, on the host, which prompt each row answers, where its newest token sits and
when its answer began; model.py does the tensors.
"""
import torch


class Rows:
    """The rows of a decoding batch, kept on the host: the prompt each row answers (None: idle),
    the position (its cache slot) of its newest token, and the step its answer began at. Prompts
    past the first B wait their turn (continuous batching)."""

    def __init__(self, prompts, room, B, answered=None):
        self.prompts, self.room, self.answered = prompts, room, answered
        self.owner, self.pos, self.begin = [None] * B, [0] * B, [0] * B
        self.waiting = iter(range(B, len(prompts)))
        self.answers = [None] * len(prompts)

    def finish(self, i, tokens):
        self.answers[i] = tokens
        if self.answered is not None:
            self.answered(i, tokens)

    def take(self, b, i, step):
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
        self.pos[b], self.begin[b] = len(self.prompts[i]) - 1, step
        return self.prompts[i]

    def step(self, stopped, step, generated):
        """After `step` steps: the rows whose answer has ended (stopped[b], or out of room), their
        answers taken from generated (B, steps); every other busy row moves to its new token."""
        ended = []
        for b, i in enumerate(self.owner):
            if i is not None and (stopped[b] or step - self.begin[b] == self.room[i]):
                ended.append(b)
                self.finish(i, generated[b, self.begin[b]:step].tolist())
            elif i is not None:
                self.pos[b] += 1
        return ended

    def busy(self):
        return any(i is not None for i in self.owner)

    def idle(self, device):
        return torch.tensor([i is None for i in self.owner], device=device)  # (B,)

    def positions(self, device):
        return torch.tensor(self.pos, device=device)  # (B,)


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
