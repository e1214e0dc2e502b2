"""
The rule-based language model of section 5: three hand-written rules which, multiplied with a
pretrained LM (a product of experts), make it follow instructions.

    python sample.py --rules --prompt="Give me a recipe for tiramisu."   # GPT-2 x all three rules
    python sample.py --rules=eos,uniform --prompt="..."          # any subset; --rules=none: off
    python rules.py              # prints the rules' biases step by step and draws out/rules.png

Next-token log-probabilities are log_softmax(GPT-2 logits) + log_softmax(rule scores),
renormalized, and decoding is greedy, as in the paper's evaluation. The rules score the next token
from the tokens so far:

  EOS        <|endoftext|> gets +eos_max * n / eos_length after n response tokens
             (0 < n < eos_length): responses end sooner.
  diversity  every distinct token already present after the user tag gets -diversity_penalty,
             once per id: less repetition.
  uniform    fixed tokens always get a fixed bias: fewer "I", "What", "should", more lists and
             newlines.

The values are a RuleSet's fields, officially (combined_model.py's) 15, 250, 1.5 and the 15-row
UNIFORM table; a RuleSet of other values (a synthetic world's) runs the very same code.

"After the user tag" and "response tokens" count from the LAST user and assistant tags anywhere
in the sequence, the model's own text included, as the official code re-finds them at every step:
a model that opens a new turn restarts the diversity rule (a new user tag) or the EOS ramp (a new
assistant tag).

`rule_bias` computes the scores from scratch, to be read next to the paper. `RuleState` is what
the sampler uses: per sequence, a mask of tokens seen, a response-length counter and how much of
each tag the sequence ends with, updated with each new token, so a step costs the same at token
1,000 as at token 1 and each sequence of a batch keeps its own state. `ForcedRules` is the same
state in closed form for responses already known (scoring.py): every position at once.
"""
import functools
import math
import numbers
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import autocast

EOT = 50256  # <|endoftext|>, GPT-2's end of sequence
VOCAB = 50257
# The tags the rules look for: the last 5 tokens of "\n<|user|>\n" and "\n<|assistant|>\n", as the
# official combined_model.py (lines 180 and 183) takes them from its tokenizer. Llama-2's last 5
# are "|", "user", "|", ">", "\n" and "ass", "istant", "|", ">", "\n"; GPT-2's, the same strings.
USER_TAG = [91, 7220, 91, 29, 198]  # "|user|>\n"
ASSISTANT_TAG = [562, 10167, 91, 29, 198]  # "assistant|>\n"

# The uniform rule (paper section 5, Listing 1), as the official open_instruct/combined_model.py
# lines 147-176 sets it: 15 Llama-2 token ids and their biases. Eight of the code's comments
# misname their ids (their text, "_" read as "▁", is not the id's piece: 5618 is "What",
# commented "_What"; 334 is "▁*", commented "-"; 1334 is "▁We", commented "We"; and five more
# marked below), so the table maps each id by its true Llama piece (decoded with the Llama-2
# vocabulary, llama-tokenizer-js 1.2.2) to the GPT-2 token with the same string: Llama's "▁" is a
# space, so "▁X" is GPT-2's " X" and "X" is GPT-2's "X". GPT-2 has no token of several spaces (it
# spells a run of spaces with single-space tokens, id 220), so 220 stands in for Llama's "▁▁▁".
#          official id  Llama piece  GPT-2 string  GPT-2 id  bias
UNIFORM = [(29966,      "<",         "<",            27,    -4.0),
           (529,        "▁<",        " <",         1279,    -4.0),
           (29989,      "|",         "|",            91,    -4.0),
           (306,        "▁I",        " I",          314,    -5.0),
           (29902,      "I",         "I",            40,    -5.0),
           (1334,       "▁We",       " We",         775,    -3.0),  # commented "We"
           (5618,       "What",      "What",       2061,    -5.0),  # commented "_What" (1724)
           (881,        "▁should",   " should",     815,    -6.0),  # commented "should"
           (334,        "▁*",        " *",         1635,    +1.0),  # commented "-"
           (448,        "▁-",        " -",          532,    +1.0),  # commented "*"
           (1678,       "▁▁▁",       " ",           220,    +1.0),  # commented "  " (2 spaces)
           (396,        "▁#",        " #",         1303,    +1.0),  # commented "#"
           (444,        "▁##",       " ##",       22492,    +1.0),  # commented "##"
           (13,         "<0x0A>",    "\n",          198,    +1.0),
           (29991,      "!",         "!",             0,    +1.0)]
RULE_NAMES = ("eos", "diversity", "uniform")


@dataclass(frozen=True)
class RuleSet:
    """Which rules are on, their values, and the choices where the official code and the paper's
    text differ (docs/faithfulness.md). The module is the rule LM, RULE_NAMES the rules' names, a
    RuleSet one choice of them (NO_RULES: plain GPT-2). Frozen and hashable: a key of caches."""
    eos: bool = True
    diversity: bool = True
    uniform: bool = True
    # from eos_length tokens on keep the EOS bias at eos_max; the official code drops it to 0
    eos_hold: bool = False
    # penalize repeats of response tokens only; the code also covers the instruction
    response_only: bool = False
    # find the tags in the prompt only; the code re-finds them in the whole sequence
    fixed_tags: bool = False
    what_bias: float = -5.0  # "What": -5 in Listing 1 and the code, -3 in Table 8
    # the rules' values; the defaults are the official combined_model.py's
    eos_max: float = 15.0  # the EOS bias the ramp reaches
    eos_length: int = 250  # the response length over which it ramps
    diversity_penalty: float = 1.5  # subtracted once per distinct id
    # (): the official UNIFORM table, its "What" at what_bias; else (gpt2_id, bias) pairs that
    # replace it whole (what_bias is the official table's, so it does not apply)
    uniform_table: tuple = ()

    def __post_init__(self):
        # refused here, not as NaN scores or an unhashable set deep inside generation
        length = self.eos_length
        if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
            raise ValueError(f"RuleSet eos_length={brief(length)}: expected an integer >= 1")
        if not finite(self.eos_max):
            raise ValueError(f"RuleSet eos_max={brief(self.eos_max)}: expected a finite number")
        penalty = self.diversity_penalty
        if not finite(penalty) or penalty < 0:
            raise ValueError(f"RuleSet diversity_penalty={brief(penalty)}: expected a finite "
                             f"number >= 0")
        check_uniform_table(self.uniform_table)

    @property
    def on(self):
        """Whether any rule is on: with none, generation and scoring are the pretrained LM's."""
        return self.eos or self.diversity or self.uniform


def brief(value):
    """A value as one short line of an error message (a repr may span lines)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def finite(value):
    """Whether value is a finite real number (a bool is not: True would pass for 1)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def check_uniform_table(table):
    """RuleSet.uniform_table is a tuple (hashable) of (gpt2_id, bias) tuples, no id twice (the
    second would silently overwrite the first)."""
    if not isinstance(table, tuple):
        raise ValueError(f"RuleSet uniform_table={brief(table)}: expected a tuple of "
                         f"(gpt2_id, bias) tuples")
    seen = set()
    for entry in table:
        ok = isinstance(entry, tuple) and len(entry) == 2
        token = entry[0] if ok else None
        ok = ok and isinstance(token, numbers.Integral) and not isinstance(token, bool)
        if not (ok and 0 <= token < VOCAB and finite(entry[1])):
            raise ValueError(f"RuleSet uniform_table entry {brief(entry)}: expected a tuple "
                             f"(gpt2_id, bias), an int id in [0, {VOCAB}) and a finite bias")
        if token in seen:
            raise ValueError(f"RuleSet uniform_table: id {token} twice")
        seen.add(token)


NO_RULES = RuleSet(eos=False, diversity=False, uniform=False)


def parse_rules(text, **options):
    """'eos,diversity,uniform' (or 'all' / 'True', from a bare --rules) -> RuleSet;
    'none' or '' -> NO_RULES."""
    names = {"all": RULE_NAMES, "true": RULE_NAMES, "none": (), "": ()}.get(text.lower())
    if names is None:
        names = tuple(name.strip() for name in text.split(","))
        for name in names:
            if name not in RULE_NAMES:
                known = ", ".join(RULE_NAMES) + ", all or none"
                raise ValueError(f"--rules={text}: unknown rule '{name}' (use {known})")
    return RuleSet(**{name: name in names for name in RULE_NAMES}, **options)


def uniform_bias(rule_set):
    """The uniform rule's scores (vocab_size,): rule_set.uniform_table's, or with () the official
    UNIFORM table's, its "What" at rule_set.what_bias."""
    bias = torch.zeros(VOCAB)
    if rule_set.uniform_table:
        for token, value in rule_set.uniform_table:
            bias[token] = value
        return bias
    for _, piece, _, token, value in UNIFORM:
        if token is None:  # a student copy's blank row: bias[None] would set every id
            raise NotImplementedError("exercise 2: see EXERCISES.md")
        bias[token] = rule_set.what_bias if piece == "What" else value
    return bias


# ------------------------------------------------------------------------ the rules, from scratch

def eos_bias(n, rule_set):
    """EOS rule (section 5): +eos_max * n / eos_length for 0 < n < eos_length response tokens
    (rule_set's values; officially +15 * n / 250, about +0.06 per token); from eos_length on 0
    (the official code), or eos_max with rule_set.eos_hold. n is a count, or a tensor of counts
    (RuleState passes one per sequence of its batch): the same arithmetic serves both."""
    top, length = rule_set.eos_max, rule_set.eos_length
    ramping = (0 < n) & (n < length)  # a bool, or a bool tensor
    held = (n >= length) & rule_set.eos_hold
    return ramping * (top * n / length) + held * top


def after_tag(ids, tag):
    """Index just past the last occurrence of `tag` in ids, None if there is none. The official
    code's loops over the whole sequence keep the last match (combined_model.py 190-192,
    210-212)."""
    for i in range(len(ids) - len(tag), -1, -1):
        if ids[i:i + len(tag)] == tag:
            return i + len(tag)
    return None


def after_tags(ids, tag, ends, default):
    """after_tag at many prefixes at once: for each row of ids (B, L) (-1 after its tokens) and each
    length in ends (B, T), the index just past the last `tag` in ids[b, :ends[b, t]], or
    default[b, t] where it has none. A tag ends at j when the len(tag) tokens up to j are the
    tag."""
    k = len(tag)
    ids = F.pad(ids, (0, max(0, k - ids.size(1))), value=-1)  # at least one window
    hit = (ids.unfold(1, k, 1) == torch.tensor(tag)).all(-1)  # (B, L - k + 1): window i is a tag
    after = torch.arange(k, ids.size(1) + 1) * hit  # just past each tag, 0 elsewhere
    last = after.cummax(dim=1).values  # (B, L - k + 1): the last tag in the first i + k tokens
    i = ends - k  # the last window inside the first ends[b, t] tokens
    found = torch.where(i >= 0, last.gather(1, i.clamp(min=0)), 0)
    return torch.where(found > 0, found, default)


def rule_starts(ids, prompt_len, rule_set):
    """(where the diversity rule starts counting, where the response starts) in ids, whose first
    prompt_len tokens are the prompt. Officially both come from the last tags in the whole
    sequence; without a user tag all of ids counts (raw text is all "instruction"), without an
    assistant tag the response starts after the prompt."""
    if rule_set.fixed_tags:  # our earlier reading: the prompt's tags, found once
        user_end = after_tag(ids[:prompt_len], USER_TAG) or 0
        response_start = prompt_len
    else:
        user_end = after_tag(ids, USER_TAG) or 0
        response_start = after_tag(ids, ASSISTANT_TAG) or prompt_len
    if rule_set.response_only:
        return response_start, response_start
    return user_end, response_start


def rule_bias(ids, prompt_len, rule_set):
    """The rule scores (vocab_size,) for the token after `ids`, a 1-D list whose first prompt_len
    tokens are the prompt: the reference computation, from scratch, one rule at a time."""
    bias = torch.zeros(VOCAB)
    diversity_start, response_start = rule_starts(ids, prompt_len, rule_set)
    if rule_set.eos:
        n = len(ids) - response_start  # tokens after the last assistant tag
        bias[EOT] += eos_bias(n, rule_set)
    if rule_set.diversity:
        for token in set(ids[diversity_start:]):  # once per distinct id, however often it occurs
            bias[token] -= rule_set.diversity_penalty
    if rule_set.uniform:
        bias += uniform_bias(rule_set)
    return bias


# ----------------------------------------------------------- the rules, incrementally, batched

def tag_table(tag):
    """The tag's matching automaton as a table (Knuth-Morris-Pratt): table[s, token] is how many
    of the tag's first tokens the sequence ends with after `token`, when before it it ended with s
    of them; len(tag) means the sequence has just completed a tag. One lookup a token finds every
    tag without rescanning."""
    table = torch.zeros(len(tag) + 1, VOCAB, dtype=torch.long)  # a token outside the tag: 0
    for s in range(len(tag) + 1):
        for token in set(tag):
            table[s, token] = tag_progress(tag[:s] + [token], tag)
    return table


@functools.lru_cache(maxsize=None)
def tag_tables(device):
    """The user and the assistant tag's tables on `device`, built once: a RuleState is made for
    every batch generated or scored, and only reads them."""
    return [tag_table(tag).to(device) for tag in (USER_TAG, ASSISTANT_TAG)]


def tag_progress(ids, tag):
    """How many of the tag's first tokens ids ends with: the longest such prefix (len(tag): a
    whole tag), 0 if none."""
    for k in range(len(tag), 0, -1):
        if ids[len(ids) - k:] == tag[:k]:
            return k
    return 0


def new_turns(progress, tokens, rule_set, tables):
    """One token along the tags: (progress after `tokens`, the rows that have just completed an
    assistant tag (the EOS ramp restarts), the rows whose diversity rule restarts (a new user tag,
    or with response_only the assistant tag)). progress: per tag, (B,) how much of it each
    sequence ends with; tokens (B,); tables: tag_tables' on the tokens' device."""
    progress = [table[k, tokens] for table, k in zip(tables, progress)]  # (B,) each
    user = progress[0] == len(USER_TAG)
    assistant = progress[1] == len(ASSISTANT_TAG)
    return progress, assistant, assistant if rule_set.response_only else user


class RuleState:
    """The rules for a batch of sequences, kept up to date one token at a time. Called by
    GPT.generate at each step as a hook: returns the rule scores (B, vocab_size) for the next
    token.
    The rule scores are one (B, vocab_size) tensor changed in place: after a token only two entries
    per row can change, the token's own (the diversity rule, the first time it is seen) and
    <|endoftext|>'s (the EOS ramp), so a step costs O(B) small writes instead of rebuilding the
    whole table. A row whose sequence completes a new tag is reset (a new user tag empties its
    diversity rule, a new assistant tag restarts its EOS ramp), as rule_bias's from-scratch search
    of the last tags gives."""

    def __init__(self, prompts, rule_set, device="cpu"):
        self.rule_set = rule_set
        B = len(prompts)
        if rule_set.uniform:
            self.base = uniform_bias(rule_set).to(device)  # (V,) the scores every row starts from
        else:
            self.base = torch.zeros(VOCAB, device=device)
        # per tag (user, assistant), (B,) how much of it each sequence ends with, so that a tag the
        # prompt's end splits is still found (set by start)
        self.progress = [torch.zeros(B, dtype=torch.long, device=device) for _ in range(2)]
        self.n = torch.zeros(B, dtype=torch.long, device=device)  # (B,) response tokens
        # (B, V) the ids the diversity rule penalizes
        self.seen = torch.zeros(B, VOCAB, dtype=torch.bool, device=device)
        self.bias = self.base.repeat(B, 1)  # (B, V): the rule scores for the next token
        self.eot = self.bias[:, EOT].clone()  # (B,) <|endoftext|>'s score without the EOS ramp
        self.tables = tag_tables(torch.device(device))  # read by every step: looked up once here
        self.steps = 0  # tokens taken in (update)
        for b, prompt in enumerate(prompts):
            self.start(b, prompt)

    def start(self, b, prompt):
        """Row b's state after `prompt` alone: where the diversity rule starts counting and the
        response starts (rule_starts), and the ids it has seen since."""
        diversity_start, response_start = rule_starts(prompt, len(prompt), self.rule_set)
        for progress, tag in zip(self.progress, (USER_TAG, ASSISTANT_TAG)):
            progress[b] = tag_progress(prompt, tag)
        self.n[b] = len(prompt) - response_start
        self.seen[b] = False
        self.seen[b, prompt[diversity_start:]] = True
        self.bias[b] = self.base
        if self.rule_set.diversity:
            self.bias[b] -= self.rule_set.diversity_penalty * self.seen[b]
        self.eot[b] = self.bias[b, EOT]
        self.ramp()

    def restart(self, b, prompt, generated):
        """Row b now answers `prompt` (continuous batching, GPT.generate), after the tokens
        `generated` (B, steps): they are taken in first, so that the step's token of the row's old
        prompt does not count for its new one."""
        self.catch_up(generated)
        self.start(b, prompt)

    def ramp(self):
        """<|endoftext|>'s score: the others' plus the EOS ramp after n tokens (the exercise's
        eos_bias, batched)."""
        if self.rule_set.eos:
            self.bias[:, EOT] = self.eot + eos_bias(self.n, self.rule_set)

    def forget(self, rows):
        """Empty the diversity rule of the rows where a new count starts (rows: (B,) bool), in
        place and with no host synchronization (a compiled step's graph runs it every step)."""
        self.seen.masked_fill_(rows[:, None], False)
        self.bias.copy_(torch.where(rows[:, None], self.base, self.bias))
        self.eot.copy_(torch.where(rows, self.base[EOT], self.eot))

    def update(self, tokens):
        """Take in the token each sequence has just generated, tokens (B,)."""
        self.advance(tokens)
        self.steps += 1

    def advance(self, tokens):
        """update's tensor work, every tensor changed in place: the whole of the rules' step, which
        a compiled decode step (GPT.generate(compiled=True)) runs inside its graph."""
        rows = torch.arange(len(tokens), device=tokens.device)
        if self.rule_set.diversity:
            penalty = self.rule_set.diversity_penalty
            new = ~self.seen[rows, tokens]  # (B,) the diversity rule counts each distinct id once
            self.bias[rows, tokens] -= penalty * new
            # <|endoftext|>'s entry is rebuilt by ramp(): keep its share of the penalty
            self.eot -= penalty * (new & (tokens == EOT))
        self.seen[rows, tokens] = True
        self.n += 1
        if not self.rule_set.fixed_tags:
            progress, assistant, restart = new_turns(self.progress, tokens, self.rule_set,
                                                     self.tables)
            for mine, new in zip(self.progress, progress):
                mine.copy_(new)
            self.n.masked_fill_(assistant, 0)  # the response starts anew after the new tag
            # a new turn is rare: eager decoding skips the O(B V) reset (at the cost of a host
            # synchronization); a graph has no branches and always runs it
            if torch.compiler.is_compiling() or restart.any():
                self.forget(restart)
        self.ramp()

    def tensors(self):
        """What a step reads and writes: a compiled step's graph holds their addresses."""
        return [self.base, self.n, self.seen, self.bias, self.eot, *self.progress, *self.tables]

    def scores(self):
        return self.bias  # (B, V), kept by the state: read it, do not change it

    def catch_up(self, generated):
        # generated (B, n): all tokens so far; only the newest one can be new to us
        assert generated.size(1) in (self.steps, self.steps + 1), "one RuleState per generate call"
        if generated.size(1) == self.steps + 1:
            self.update(generated[:, -1])

    def __call__(self, logprobs, generated):
        self.catch_up(generated)
        # the rule LM's log-probabilities up to its normalizer, a per-row constant that generate's
        # renormalization of the product removes: so the hook costs one add of this tensor, no
        # full-vocabulary op of its own
        return self.scores()


@functools.lru_cache(maxsize=32)
def column_tables(rule_set, columns=None):
    """ForcedRules' tables for a rule set over `columns` (a tuple of GPT-2 ids, one per score
    column; None: all 50,257): the base scores (V',), <|endoftext|>'s column (0 or 1 of them), and
    each GPT-2 id's column (VOCAB + 1,), -1 for none and for -1. Built once, not once a batch:
    full-vocabulary tensors are most of a batch's setup on a GPU."""
    columns = torch.arange(VOCAB) if columns is None else torch.tensor(columns, dtype=torch.long)
    base = uniform_bias(rule_set) if rule_set.uniform else torch.zeros(VOCAB)
    col_of = torch.full((VOCAB + 1,), -1, dtype=torch.long)  # the last entry: id -1
    col_of[columns] = torch.arange(len(columns))
    return base[columns], (columns == EOT).nonzero().flatten(), col_of


class ForcedRules:
    """The rules along known responses (teacher forcing: scoring, the paper's Table 2), for every
    position at once. Before response token t the rule scores are closed-form in t: the EOS ramp's
    count is the context's length less where the response starts, and the diversity rule counts
    from the user tag (rule_starts' after_tag at every prefix at once: after_tags); a token of the
    context is penalized once if no earlier copy lies at or after that start. So a chunk of n
    positions costs a few batched tensor operations over the model's (B, n, V) log-probs, not n
    RuleState steps or a step a row; and added_to(zeros) equals RuleState.scores() step by step
    (tests/test_rules.py)."""

    def __init__(self, prompts, targets, rule_set, columns=None):
        # prompts: B lists of GPT-2 ids; targets (B, T) on the CPU, each row's response tokens
        # (right padding is harmless: it only comes after them). columns: the GPT-2 id of each
        # column of the scores (a restricted vocabulary's rows), all 50,257 by default.
        self.rule_set = rule_set
        B, T = targets.shape
        key = None if columns is None else tuple(torch.as_tensor(columns).tolist())
        # (V',) the scores every position starts from; <|endoftext|>'s column, if it has one;
        # (VOCAB + 1,) each GPT-2 id's column, -1 for none (and for -1)
        self.base, self.eot, col_of = column_tables(rule_set, key)
        lens = torch.tensor([len(p) for p in prompts])  # (B,) target t is at index lens + t
        ids = torch.full((B, int(lens.max()) + T), -1, dtype=torch.long)  # (B, L) prompt, targets
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            ids[b, len(prompt):len(prompt) + T] = targets[b]
        self.ends = lens[:, None] + torch.arange(T)[None, :]  # (B, T) the context's length at t
        if rule_set.fixed_tags:  # the prompt's tags, found once
            response = lens[:, None].expand(B, T)
            user = torch.tensor([after_tag(p, USER_TAG) or 0 for p in prompts])
            user = user[:, None].expand(B, T)
        else:  # the last tags of the context, as the official code re-finds them
            response = after_tags(ids, ASSISTANT_TAG, self.ends, lens[:, None].expand(B, T))
            user = after_tags(ids, USER_TAG, self.ends, torch.zeros(B, T, dtype=torch.long))
        self.counts = self.ends - response  # (B, T) the EOS ramp's n
        self.begins = response if rule_set.response_only else user  # (B, T) diversity counts from
        # each context token's column (-1: none, its score is not changed) and the index of the
        # previous copy of the same token (-1: none)
        self.cols = col_of[ids]  # (B, L)
        order = torch.sort(ids, dim=1, stable=True).indices  # copies side by side, in index order
        same = ids.gather(1, order[:, 1:]) == ids.gather(1, order[:, :-1])  # (B, L - 1)
        previous = torch.where(same, order[:, :-1], -1)
        self.prev = torch.full_like(ids, -1).scatter(1, order[:, 1:], previous)  # (B, L)
        self.device = torch.device("cpu")

    def to(self, device):
        """The state on `device`, moved once (not once a chunk: scoring calls added_to per
        chunk)."""
        device = torch.device(device)
        if device != self.device:
            for name in ("base", "ends", "counts", "begins", "cols", "prev"):
                setattr(self, name, getattr(self, name).to(device))
            self.device = device
        return self

    def added_to(self, logprobs, t0, t1):
        """logprobs (B, t1 - t0, V') plus the rule scores before targets t0..t1-1: the product of
        experts, up to each position's normalizer (the rule LM's own is a constant there, which the
        product's renormalization removes)."""
        self.to(logprobs.device)
        product = logprobs + self.base  # (B, n, V') a new tensor: logprobs is shared
        if self.rule_set.diversity:
            # token j counts before target t if it lies in [begin, end) and no earlier copy does:
            # each distinct id once (B, n, L)
            begin, end = self.begins[:, t0:t1, None], self.ends[:, t0:t1, None]  # (B, n, 1)
            j = torch.arange(self.cols.size(1), device=product.device)  # (L,)
            counted = (j >= begin) & (j < end) & (self.prev[:, None, :] < begin)
            counted &= self.cols[:, None, :] >= 0
            penalty = -self.rule_set.diversity_penalty * counted.to(product.dtype)
            index = self.cols.clamp(min=0)[:, None, :].expand_as(counted)  # (B, n, L)
            product.scatter_add_(2, index, penalty)
        if self.rule_set.eos and len(self.eot):
            ramp = eos_bias(self.counts[:, t0:t1], self.rule_set)  # (B, n)
            product[:, :, self.eot[0]] += ramp.to(product.dtype)
        return product


def product_of_experts(logits, rule_scores):
    """log p(x) = log_softmax(LM logits) + log_softmax(rule scores), renormalized (section 5)."""
    lm = F.log_softmax(logits.float(), dim=-1)
    rule_lm = F.log_softmax(rule_scores, dim=-1)
    return F.log_softmax(lm + rule_lm, dim=-1)


# respond's decoding flags for greedy answers: evaluate.py and TinyWorld answer greedily, as the
# official evaluation does
GREEDY = {"greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def respond(model, prompts, config, rule_set, device, dtype, stream=None, batch_size=None,
            answered=None):
    """New tokens for each prompt (lists of token ids) from model.generate, with the rules (a
    RuleSet; NO_RULES for plain GPT-2) as its per-step hook; `config` holds sample.py's decoding
    flags. batch_size rows decode together (default: all), each taking the next prompt when its
    answer ends; answered(i, tokens) sees each answer as it ends. stream(token), if given, sees each
    token of the first prompt's answer as it comes."""
    hook = None
    if rule_set.on:  # built for the first rows; generate restarts a row that takes a new prompt
        hook = RuleState(prompts[:batch_size or len(prompts)], rule_set, device)
    callback = None
    if stream:
        def callback(logprobs, tokens):
            stream(int(tokens[0]))
    generator = torch.Generator(device).manual_seed(config["seed"])
    with autocast(device, dtype):
        return model.generate(prompts, config["max_new_tokens"], greedy=config["greedy"],
                              temperature=config["temperature"], top_k=config["top_k"] or None,
                              top_p=config["top_p"], hook=hook, callback=callback,
                              generator=generator, compiled=config["compile"],
                              batch_size=batch_size, answered=answered)


# ----------------------------------------------------------------------------- the README's figure

def explain(instruction, response, rule_set=RuleSet(), path="rules.png"):
    """Print, for each token of a response, the bias the diversity and uniform rules gave it and
    the EOS rule's bias on <|endoftext|> at that step; plot them to `path`, the EOS ramp drawn on
    to 10 tokens past its end (260 officially)."""
    import chat
    prompt = chat.encode_prompt(instruction)
    ids = prompt + chat.encode(response)
    rows = []  # (step, token text, diversity bias on it, uniform bias on it, EOS bias)
    diversity_only = replace(rule_set, eos=False, uniform=False)  # rule_set's values, one rule
    uniform_only = replace(rule_set, eos=False, diversity=False)
    for t in range(len(prompt), len(ids)):
        step = t - len(prompt)
        diversity = 0.0
        uniform = 0.0
        eos = 0.0
        if rule_set.diversity:
            diversity = float(rule_bias(ids[:t], len(prompt), diversity_only)[ids[t]])
        if rule_set.uniform:
            uniform = float(rule_bias(ids[:t], len(prompt), uniform_only)[ids[t]])
        if rule_set.eos:
            eos = eos_bias(step, rule_set)
        rows.append((step, chat.tokenizer().decode([ids[t]]), diversity, uniform, eos))
    header = f"{'step':>4}  {'token':<14} {'diversity':>9} {'uniform':>9}"
    print(header + "   EOS bias (on <|endoftext|>)")
    for step, text, diversity, uniform, eos in rows:
        print(f"{step:>4}  {text!r:<14} {diversity:>+9.2f} {uniform:>+9.2f}   {eos:+.2f}")
    from cli import pyplot
    plt = pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 3.6))
    steps = [r[0] for r in rows]
    if rule_set.eos:
        end = rule_set.eos_length + 10
        ramp = [eos_bias(n, rule_set) for n in range(end + 1)]
        ax.plot(range(end + 1), ramp, color="tab:red", ls=":", lw=1)
        ax.plot(steps, [r[4] for r in rows], color="tab:red",
                label=f"EOS rule: bias on <|endoftext|> (dotted: on to {end})")
    ax.step(steps, [r[2] for r in rows], where="mid", color="tab:blue",
            label="diversity rule: bias on the token written")
    ax.step(steps, [r[3] for r in rows], where="mid", color="tab:green",
            label="uniform rule: bias on the token written")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="response token n", ylabel="rule score (nats)",
           title=f"The rules while answering {instruction!r}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


EOS_ONLY = RuleSet(eos=True, diversity=False, uniform=False)
DIVERSITY_ONLY = RuleSet(eos=False, diversity=True, uniform=False)
UNIFORM_ONLY = RuleSet(eos=False, diversity=False, uniform=True)

RESPONSE = """Here is a simple tiramisu:

- Whisk 3 egg yolks with 75 g sugar until pale, then fold in 250 g mascarpone.
- Dip ladyfingers briefly in strong coffee and lay them in a dish.
- Spread half the cream on top, add another layer of ladyfingers, then the rest of the cream.
- Chill for at least 4 hours and dust with cocoa before serving.

Enjoy!"""

USAGE = "    python rules.py [PATH.png]     # default: out/rules.png (out*/ is git-ignored)"


def main(argv):
    """The command line: at most one path for the figure, or --help."""
    if argv[:1] in (["-h"], ["--help"]):
        try:
            return print(__doc__.strip() + "\n\n" + USAGE)
        except BrokenPipeError:  # --help | head
            return None
    for arg in argv:
        if arg.startswith("-"):
            raise ValueError(f"unknown argument {arg!r} "
                             "(the one argument is a PATH.png; see --help)")
    if len(argv) > 1:
        raise ValueError(f"one PATH.png at most, got {len(argv)} arguments (see --help)")
    if argv:
        path = Path(argv[0])
    else:
        path = Path("out/rules.png")  # where .gitignore covers, not an untracked file in the repository
        path.parent.mkdir(exist_ok=True)
    if not path.parent.is_dir():  # now, not after the table is printed
        raise FileNotFoundError(f"{path}: no such directory {path.parent}")
    explain("Give me a recipe for tiramisu.", RESPONSE, path=path)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # a bad argument, or a figure path that cannot be written
        sys.exit(f"error: {e}")
