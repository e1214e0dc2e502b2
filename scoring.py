"""
How likely a response is, given its instruction, under a model alone or with the rules: the
log-probability of each of its tokens in the chat format. evaluate.py's reference NLL and response
ranking (the paper's Table 2) read it, and so does TinyWorld's ranking
(data/tinyworld/experiment.py).
"""
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
from cli import autocast
from model import EOT, varying_lengths
from rules import ForcedRules


def encode_pair(instruction, response, block_size):
    """(ids, prompt_len) of a one-turn conversation in the chat format, cut to block_size + 1
    tokens: the response's end is cut (as the official max_seq_length does), and a prompt too long
    alone loses its start."""
    # the training format, instruction stripped: the official ratio_eval.py scores with
    # finetune.py's encoder (a generation prompt, chat.encode_prompt, keeps the instruction as
    # given, as eval/templates.py does)
    messages = [{"role": "user", "content": instruction},
                {"role": "assistant", "content": response}]
    ids, mask = chat.encode_chat(messages)
    start = mask.index(1)  # the first trained token: the response's
    prompt = ids[:start]
    target = ids[start:]  # the response and its <|endoftext|>
    target = target[:max(1, block_size + 1 - len(prompt))]
    ids = (prompt + target)[-block_size - 1:]
    return ids, len(ids) - len(target)


@torch.no_grad()
def score_responses(model, rule_sets, pairs, device, dtype, batch_size=8):
    """[(instruction, response)] -> for each of `rule_sets`, the log-probability of each token of
    each response and of the <|endoftext|> closing it, given its instruction in the chat format,
    under the model (times the rules when on: the same product of experts the sampler uses). Pairs
    of similar length are scored together, right-padded; the rule sets share the model's forward
    passes (base, base + rules and the ablations of evaluate.py --compare read the references
    once)."""
    encoded = [encode_pair(q, r, model.config.block_size) for q, r in pairs]
    order = sorted(range(len(pairs)), key=lambda k: len(encoded[k][0]))  # shortest first
    out = [[None] * len(pairs) for _ in rule_sets]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", file=sys.stderr, leave=False):
        chunk = order[start:start + batch_size]
        batch = [encoded[k] for k in chunk]
        for scored, per_rule_set in zip(out, score_batch(model, rule_sets, batch, device, dtype)):
            for k, logprobs in zip(chunk, per_rule_set):
                scored[k] = logprobs
    return out


def score_batch(model, rule_sets, batch, device, dtype, chunk=64):
    """score_responses on one batch [(ids, prompt_len)]: for each rule set, each row's (T,)
    log-probs."""
    B = len(batch)
    L = max(len(ids) for ids, _ in batch) - 1  # the longest input
    T = max(len(ids) - p for ids, p in batch)  # the longest target
    x = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, T), EOT, dtype=torch.long)  # right-padded
    for b, (ids, p) in enumerate(batch):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[b, :len(ids) - p] = torch.tensor(ids[p:])
    prompts = [ids[:p] for ids, p in batch]
    columns = model.vocab.token_ids  # the GPT-2 id of each row of lm_head (None: all of GPT-2's)
    columns = None if columns is None else columns.cpu()
    # the rules along the known responses, every position at once (RuleState's steps in closed form)
    forced = [ForcedRules(prompts, targets, rule_set, columns) if rule_set.on else None
              for rule_set in rule_sets]
    x = x.to(device)
    rows = model.vocab.rows(targets.to(device))  # (B, T) the targets' rows of lm_head
    first = torch.tensor([p - 1 for _, p in batch], device=device)  # predicts each first target
    picked = [[] for _ in rule_sets]  # per rule set, (B, n) log-probs of the targets, n at a time
    with autocast(device, dtype), varying_lengths():  # every batch has a length of its own
        h = model.hidden(x)  # (B, L, C): right padding is never seen by the real tokens before it
        for t0 in range(0, T, chunk):
            t1 = min(t0 + chunk, T)
            span = torch.arange(t0, t1, device=device)
            # (B, n); past a row's end: clamped, and ignored below
            positions = (first[:, None] + span[None, :]).clamp(max=L - 1)
            row_index = torch.arange(B, device=device)[:, None]
            logits = model.lm_head(h[row_index, positions]).float()  # (B, n, V)
            lm = F.log_softmax(logits, dim=-1)  # (B, n, V) the model's log-probs, shared
            wanted = rows[:, span, None]  # (B, n, 1)
            for rules_here, scored in zip(forced, picked):
                if rules_here is None:
                    scored.append(lm.gather(2, wanted)[..., 0])
                    continue
                # the product of experts, log_softmax(lm + log_softmax(rules)): the rule LM's
                # normalizer is a constant per position, which the renormalization removes
                product = rules_here.added_to(lm, t0, t1)  # (B, n, V) unnormalized
                scored.append(product.gather(2, wanted)[..., 0] - product.logsumexp(-1))
    picked = [torch.cat(scored, dim=1).cpu() for scored in picked]  # each (B, T)
    out = []
    for scored in picked:
        out.append([scored[b, :len(ids) - p] for b, (ids, p) in enumerate(batch)])
    return out


def score_pairs(model, rule_sets, rows, pairs, *, device, dtype, batch_size):
    """For each of `rule_sets`, {(i, j): log-probs of row j's reference response under row i's
    instruction} for the pairs asked."""
    unique = sorted(set(pairs))
    texts = [(rows[i]["instruction"], rows[j]["reference"]) for i, j in unique]
    scored = score_responses(model, rule_sets, texts, device, dtype, batch_size)
    return [dict(zip(unique, logprobs)) for logprobs in scored]
