"""
The sampler: one next token per sequence from the log-probabilities `GPT.generate` hands it (after
the rules' bias, if any). Greedy by default, as the paper's evaluation decodes; temperature, top-k
and top-p (nucleus) sampling for chatting (`python sample.py --greedy=False --top_p=0.9 ...`).
EXERCISES.md, exercise 8, asks you to write top_p_filter.
"""
import torch


def next_tokens(logprobs, greedy=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from (B, V) log-probabilities: argmax if greedy, else temperature, top-k,
    top-p."""
    if greedy or temperature == 0:
        return logprobs.argmax(dim=-1)
    scores = logprobs / temperature
    if top_k is not None and top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


def top_p_filter(scores, p):
    """Top-p (nucleus) filtering of (B, V) scores (log-probabilities up to a constant per row):
    per row, keep the smallest set of likeliest tokens whose probabilities (softmax of the row) add
    up to at least p, and set every other score to -inf. Returns the new scores; the kept ones are
    unchanged."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p  # drop tokens once the mass before them reaches p
    dropped = torch.zeros_like(drop).scatter(-1, order, drop)  # (B, V), in the rows' own order
    return scores.masked_fill(dropped, float("-inf"))
