"""
The sampler: one next token per sequence from the log-probabilities `GPT.generate` hands it (after
the rules' bias, if any). Greedy by default, as the paper's evaluation decodes; temperature, top-k
and top-p (nucleus) sampling for chatting (`python sample.py --greedy=False --top_p=0.9 ...`).
EXERCISES.md, exercise 8, asks you to write top_p_filter.
"""
import torch


def next_tokens(logprobs, greedy=False, temperature=1.0, top_k=None, top_p=None, generator=None,
                noise=None):
    """One token per row from (B, V) log-probabilities: argmax if greedy, else temperature, top-k,
    top-p. noise: (B, V) uniform draws in [0, 1) for sampling (default: drawn from `generator`)."""
    if not sampled(greedy, temperature):
        return largest(logprobs)
    scores = logprobs / temperature
    if top_k is not None and top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if noise is None:
        noise = torch.rand(scores.shape, generator=generator, device=scores.device)
    # the Gumbel-max trick: argmax(scores + Gumbel noise) is token i with probability
    # softmax(scores)_i. With the noise drawn outside, a compiled step (graphstep.py) needs no
    # random-number generator of its own and draws the tokens eager decoding draws.
    gumbel = -torch.log(-torch.log(noise))  # (B, V); u = 0 gives -inf: never chosen
    return largest(scores + gumbel)


def sampled(greedy, temperature):
    """Whether next_tokens draws at random (else it takes the argmax)."""
    return not greedy and temperature != 0


def largest(scores):
    """(B,) the index of each row's largest score. In a compiled step on a GPU through topk, which
    inductor runs as a kernel of its own: argmax fused with the rules' update that reads its result
    fails to compile in Triton (torch 2.11, H200: "PassManager::run failed"). The two differ only
    on exact ties."""
    if torch.compiler.is_compiling() and scores.is_cuda:
        return torch.topk(scores, 1, dim=-1).indices[:, 0]
    return scores.argmax(dim=-1)


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
