"""
One decode step as one graph: GPT.generate(compiled=True). On a GPU a step of gpt2 at batch 1 is
about 1.3 ms of kernels, but eager PyTorch launches them one by one from Python and waits on the
host twice a step (issue 23, bf16 autocast: 155 tokens/s eager, 480 with only the layers compiled).
Here the whole step, from the hidden state at each row's newest token to the next one, is compiled
as one graph (torch.compile, fullgraph; on a GPU one CUDA graph a step): 696 tokens/s, 625 with the
rules (H200, docs/results.md; what is left is the layers' own kernels):

    lm_head -> log_softmax -> + the rules' scores -> log_softmax -> the choice (greedy, or sampled
    with noise drawn outside) -> the rules' state updated in place -> the new token's keys and
    values at its row's position -> the next hidden state

Everything the graph reads or writes lives in fixed buffers (a CUDA graph holds their addresses):
the block_size-slot cache, the hidden states, each row's position, and the rules' own tensors. The
host never waits inside a step: GPT.generate looks at the tokens every CHECK_EVERY steps, and never
past the step at which the first row runs out of room; a row whose answer ended inside the window
goes on decoding unread until then, at a position that cannot pass its last slot.
"""
import torch
from torch.nn import functional as F

from sampling import next_tokens, sampled
from vocab import EOT, VOCAB

CHECK_EVERY = 8  # steps between looks at the tokens: rows that end idle at most 7 steps
RECOMPILES = 64  # graphs of the step that one process may compile


class GraphStep:
    """The buffers and the compiled step of compiled decoding, for one model, batch size and
    dtype (GPT.graph_step keeps one on the model)."""

    def __init__(self, model, cache):
        B = cache.k[0].size(0)
        device = cache.k[0].device
        self.model = model
        self.cache = cache  # (B, nh, block_size, hs) a layer: every slot read, under a mask
        dtype = model.transformer.ln_f.weight.dtype  # what the last LayerNorm gives
        self.h = torch.zeros(B, model.config.n_embd, device=device, dtype=dtype)  # (B, C)
        self.pos = torch.zeros(B, dtype=torch.long, device=device)  # (B,) each row's newest token
        self.last = torch.zeros_like(self.pos)  # (B,) the last position a row may reach
        self.idle = torch.ones(B, dtype=torch.bool, device=device)  # (B,) rows with no prompt
        self.noise = torch.zeros(B, VOCAB, device=device)  # (B, 50257) sampling's uniform draws
        self.slots = torch.arange(model.config.block_size, device=device)  # (T,)
        cache.slot = self.pos  # the new token's keys and values go to its row's position
        cache.length = model.config.block_size
        self.cuda = device.type == "cuda"
        # a graph per batch size, dtype, rule set and decoding choice: in one process more than
        # dynamo's default 8 (evaluate.py --compare's six rule models, the tests), and with
        # fullgraph the ninth would be an error
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILES)
        mode = None
        if self.cuda:
            self.hold(cache.k + cache.v + [self.h, self.pos, self.last, self.idle, self.noise])
            mode = "reduce-overhead"  # CUDA graphs: one launch a step
        self.run = torch.compile(self.step, mode=mode, dynamic=False, fullgraph=True)

    def hold(self, tensors):
        """Tell torch.compile the tensors keep their addresses (and may be written in place)."""
        if self.cuda:
            for t in tensors:
                torch._dynamo.mark_static_address(t)

    def reset(self):
        torch._foreach_zero_(self.cache.k + self.cache.v)  # finite in masked slots: 0 * NaN = NaN
        self.idle.fill_(True)

    def step(self, hook, greedy, temperature, top_k, top_p):
        """The graph: one token for each row from self.h, and self.h at it. Returns the tokens (B,)
        and the log-probabilities they were chosen from (B, 50257)."""
        logprobs = self.model.logprobs(self.h)  # (B, 50257)
        if hook is not None:  # the product of experts, as in eager decoding
            logprobs = F.log_softmax(logprobs + hook.scores(), dim=-1)
        nxt = next_tokens(logprobs, greedy, temperature, top_k, top_p, noise=self.noise)  # (B,)
        nxt = nxt.masked_fill(self.idle, EOT)
        if hook is not None:
            hook.advance(nxt)  # the rules' state, in place
        self.pos.copy_(torch.minimum(self.pos + 1, self.last))  # an ended row stays in its room
        seen = self.slots <= self.pos[:, None]  # (B, T): each row's slots up to its position
        h = self.model.hidden(nxt[:, None], self.pos[:, None], self.cache, seen[:, None, None, :])
        self.h.copy_(h[:, -1])
        return nxt, logprobs

    def place(self, read, rows):
        """Rows that took a prompt: read {b: hidden state (C,) at its end, or None if the row
        idles}; their position and last position from rows (batching.Rows)."""
        for b, x in read.items():
            if x is None:
                self.idle[b] = True
                self.last[b] = self.pos[b]  # an idle row stays where it is
                continue
            self.h[b] = x
            self.pos[b] = rows.pos[b]
            self.last[b] = rows.pos[b] + rows.left(b)
            self.idle[b] = False

    def steps(self, rows, hook, callback, eos, generator, choice):
        """Up to CHECK_EVERY steps, never past the first row's last slot (one step a look with a
        callback, which streams every token), then one look at the tokens: the rows that ended."""
        n = min(CHECK_EVERY, min(rows.left(b) for b in rows.busy_rows()))
        if callback is not None:
            n = 1
        draws = sampled(choice["greedy"], choice["temperature"])
        for _ in range(n):
            if draws:  # drawn as eager decoding draws them (sampling.next_tokens)
                self.noise.uniform_(generator=generator)
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are spent
            nxt, logprobs = self.run(hook, **choice)
            if callback is not None:
                callback(logprobs, nxt)
            rows.record(nxt)
            if hook is not None:
                hook.steps += 1  # the graph took the token in (advance)
        return rows.check(n, eos)
