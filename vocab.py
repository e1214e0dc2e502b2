"""
A restricted vocabulary: GPT-2's architecture with one embedding and output row per GPT-2 id a
model knows.

TinyWorld's 0.4M-parameter models (data/tinyworld/README.md) use about 1,000 of GPT-2's 50,257 ids;
a full output layer would cost them about ten times the rest of the network. GPT holds a
Vocabulary and translates at its two edges: GPT-2 ids to rows on the way in (rows),
log-probabilities over rows back to all 50,257 ids on the way out (full, -inf for the ids it
lacks). Everything outside the model (chat.py, rules.py, generate's hook, evaluate.py) keeps
speaking GPT-2 ids. With token_ids None (GPT-2 itself) every method is the identity.
"""
import torch
from torch import nn

VOCAB = 50257  # GPT-2's BPE vocabulary, <|endoftext|> included: every id the rest of the code uses
EOT = 50256  # <|endoftext|>: GPT-2's only special token; the paper's end of a response


class Vocabulary(nn.Module):

    def __init__(self, token_ids, vocab_size):
        super().__init__()
        self.token_ids = None
        self.row_of = None
        if token_ids is None:
            return
        if len(token_ids) != vocab_size or len(set(token_ids)) != vocab_size:
            raise ValueError(f"token_ids: {len(token_ids)} ids for vocab_size {vocab_size}, "
                             "or repeated")
        ids = torch.tensor(token_ids, dtype=torch.long)  # (V,)
        # buffers instead of attributes: they move with model.to(device); not in the state_dict
        del self.token_ids
        del self.row_of
        row_of = torch.full((VOCAB,), -1).index_copy_(0, ids, torch.arange(len(ids)))
        self.register_buffer("token_ids", ids, persistent=False)  # row -> GPT-2 id
        self.register_buffer("row_of", row_of, persistent=False)  # GPT-2 id -> row, -1 if unknown

    def rows(self, ids):
        """GPT-2 ids -> the rows of wte and lm_head that stand for them: the ids themselves for
        GPT-2; with a restricted vocabulary its row, or -1 for an id it does not know (and for -1,
        "no target")."""
        if self.row_of is None:
            return ids
        return torch.where(ids >= 0, self.row_of[ids.clamp(min=0)], -1)

    def own(self, scores):
        """(..., 50257) scores over GPT-2's ids -> (..., vocab_size) over the model's rows."""
        if self.token_ids is None:
            return scores
        return scores[..., self.token_ids]

    def full(self, logprobs):
        """(..., vocab_size) over the model's rows -> (..., 50257) over GPT-2's ids, -inf
        (probability 0) for the ids a restricted vocabulary lacks."""
        if self.token_ids is None:
            return logprobs
        full = logprobs.new_full((*logprobs.shape[:-1], VOCAB), float("-inf"))
        return full.index_copy_(-1, self.token_ids, logprobs)

    def unknown(self, ids):
        """The GPT-2 ids among `ids` (any iterable) that the model has no row for, sorted; for
        GPT-2 none, at no cost (the iterable is never read)."""
        if self.row_of is None:
            return []
        ids = list(set(ids))
        if not ids:
            return []
        ids = torch.tensor(ids, dtype=torch.long, device=self.row_of.device)
        return sorted(set(ids[self.rows(ids) < 0].tolist()))
