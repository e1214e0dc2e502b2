"""
GPT-2 in one file: the pretrained language model every method in the paper starts from.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.config)"

Module names and weight shapes equal those of Hugging Face's GPT-2 state dict
(transformer.h.0.attn.c_attn, ...), so hub checkpoints load with no renaming or transposes
(checkpoint.py reads the files: safetensors, no pickle). `generate` decodes a batch of prompts of
different lengths with a key/value cache and takes a per-step hook that adds to the next-token
log-probabilities: how rules.py multiplies the rule LM into GPT-2 (section 5).
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import checkpoint
from batching import Rows, with_rows
from graphstep import GraphStep
from sampling import next_tokens, sampled
from vocab import EOT, Vocabulary


def varying_lengths():
    """Attention kernels for lengths that change from call to call (decoding, scoring): all but
    cuDNN's, which Hopper GPUs prefer but which plans anew for each length (~2.5 ms of CPU a call:
    10x slower decoding, H200)."""
    kernels = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(kernels)


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (HF: n_positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary, <|endoftext|> included
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for finetuning, as in nanoGPT; HF's three pdrops collapse into it
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    token_ids: tuple = None  # a restricted vocabulary (TinyWorld): the GPT-2 id of each row of wte


class KVCache:
    """Keys and values for a whole generation: one (B, nh, T_max, hs) tensor per layer. A token's
    keys and values sit in the slot of its position, so each row fills its own slots 0, 1, ... and
    no slot holds padding."""

    def __init__(self, k, v):
        self.k, self.v = k, v
        self.length = 0  # slots read by attention (reading a prompt: filled so far)
        self.slot = None  # decoding: (B,) the slot, i.e. the position, of each row's one new token

    @classmethod
    def empty(cls, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)  # one layer's
        # zeros, not empty: slots a row has not reached are read under a mask, and 0 * NaN garbage
        # would be NaN
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(k, v)

    def row(self, b):
        """A cache for sequence b alone: a view, so writes land in self."""
        return KVCache([k[b:b + 1] for k in self.k], [v[b:b + 1] for v in self.v])

    def update(self, layer, k, v):
        # k, v: (B, nh, T, hs) for the new positions; returns the keys and values of slots
        # 0..length-1 (and the new ones), (B, nh, Tk, hs)
        if self.slot is not None:
            # decoding: one token a row, each written at its row's own slot (a tensor index)
            rows = torch.arange(k.size(0), device=k.device)
            self.k[layer][rows, :, self.slot] = k[:, :, 0]
            self.v[layer][rows, :, self.slot] = v[:, :, 0]
            return self.k[layer][:, :, :self.length], self.v[layer][:, :, :self.length]
        end = self.length + k.size(2)  # reading a prompt: its tokens fill the next slots
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Linear(nn.Module):
    """y = x W + b with W stored (in, out): the layout of GPT-2's own checkpoints (HF calls it
    Conv1D), so they load without transposes. It is also the faster layout for one-token decoding
    on CPU: MKL's matrix-vector product runs about 12% faster than with nn.Linear's (out, in)
    (tests/bench.py); training is the same."""

    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        if bias:
            self.bias = nn.Parameter(torch.zeros(n_out))
        else:
            self.bias = None

    def forward(self, x):
        # x (..., n_in) -> (..., n_out)
        if self.bias is None:
            return x @ self.weight
        y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)  # (N, n_out)
        return y.view(*x.shape[:-1], -1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer = layer  # this block's index: its keys and values in the cache

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, Tk, hs): the past and the new positions
        # Training and unpadded prefill are plain causal attention (the fast kernels); with left
        # padding or a cache, `mask` (B, 1, T, Tk) says which keys each query may see. A single new
        # query with no padding may see every key, so it needs neither.
        causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU (HF's "gelu_new"); exact GELU drifts by ~1e-3
        # in logits
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.vocab = Vocabulary(config.token_ids, config.vocab_size)  # GPT-2 ids <-> wte rows
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, Linear)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied wte/lm_head matrix counts once

    def hidden(self, idx, pos=None, cache=None, mask=None):
        # idx (B, T) GPT-2 token ids; pos (B, T) their positions (default: 0..T-1 after the cache)
        T = idx.size(1)
        if pos is None:
            start = cache.length if cache is not None else 0
            end = start + T
            limit = self.config.block_size
            assert end <= limit, f"{end} tokens exceed block_size {limit}"
            pos = torch.arange(start, end, device=idx.device)
        tok_emb = self.transformer.wte(self.vocab.rows(idx))  # (B, T, C)
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache, mask)
        if cache is not None and cache.slot is None:
            cache.length += T  # a prompt read: T more slots filled (decoding: decode_step sets it)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None):
        # idx, targets (B, T) GPT-2 ids; targets == -1 are ignored (masked prompt tokens, padding)
        logits = self.lm_head(self.hidden(idx))  # (B, T, vocab_size): over the model's rows
        loss = None
        if targets is not None:
            flat_logits = logits.view(-1, logits.size(-1)).float()  # (B * T, vocab_size)
            flat_targets = self.vocab.rows(targets).view(-1)  # (B * T,)
            loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1)
        return logits, loss

    # ---------------------------------------------------------------------------------- generation

    @torch.no_grad()
    @varying_lengths()  # the key length grows every step
    def generate(self, prompts, max_new_tokens, greedy=False, temperature=1.0, top_k=None,
                 top_p=None, hook=None, callback=None, eos=EOT, use_cache=True, generator=None,
                 compiled=False, batch_size=None, answered=None):
        """Continue each prompt (a list of token-id lists, lengths may differ) by up to
        max_new_tokens. Returns one list of new tokens per prompt, ending at `eos` (included) if
        produced; eos=None runs out the room.
        hook(logprobs, generated) -> bias: called every step with the next-token log-probabilities
        (B, 50257) and the tokens chosen so far (B, steps); the bias is added and the sum
        renormalized, a product of experts (section 5). callback(logprobs, tokens) sees each step's
        final log-probabilities and tokens (streaming); answered(i, tokens) each answer as it ends.
        A batch gives what each prompt gives alone: each row holds its prompt from slot 0 (read
        alone: prefill) and decodes at its own position (decode_step). batch_size: rows decoded
        together (default: all); a row whose answer ends takes the next prompt (continuous
        batching) and the hook gets hook.restart(b, prompt, generated). compiled: each step is one
        graph (graphstep.py), the hook a rules.RuleState, whose state the graph updates."""
        self.check_prompts(prompts)
        device = self.lm_head.weight.device
        B = min(batch_size or len(prompts), len(prompts))
        if B < len(prompts) and hook is not None and not hasattr(hook, "restart"):
            raise TypeError("refilling rows (batch_size < the prompts) needs a hook with restart()")
        compiled = compiled and self.graphable(greedy, temperature, top_p, device)
        if compiled and hook is not None and not hasattr(hook, "advance"):
            raise TypeError("compiled decoding runs the rules in its graph: it needs a RuleState")
        # 1) each prompt's room: up to max_new_tokens, and no further than the learned positions
        room = [min(max_new_tokens, self.config.block_size - len(p)) for p in prompts]
        slots = max(len(p) + r for p, r in zip(prompts, room))  # the longest sequence
        # (B, slots) each row's prompt from slot 0 and, without the cache, its answer so far
        seq = torch.full((B, slots), EOT, dtype=torch.long, device=device)
        cache = None  # without it, every step reads each row's whole sequence again
        if compiled:
            graph = self.graph_step(B, device, self.cache_dtype(device), hook)
            cache = graph.cache
        elif use_cache:
            cache = KVCache.empty(self.config, B, slots, device, self.cache_dtype(device))
        rows = Rows(prompts, room, B, answered, device)

        def take(b, i):
            """Row b answers prompt i, or the next one with room (None: it idles). Returns, with
            the cache, the hidden state (C,) at the prompt's end, read alone into the row's slots
            0, 1, ... (slots past it may hold an earlier prompt's keys: finite, and masked)."""
            p = rows.take(b, i)
            if p is None:
                return None
            seq[b, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
            if rows.owner[b] >= B and hook is not None:
                hook.restart(b, p, rows.generated())
            if cache is not None:
                return self.hidden(seq[b:b + 1, :len(p)], cache=cache.row(b))[0, -1]

        # 2) read the first B prompts
        read = {b: take(b, b) for b in range(B)}
        choice = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        # 3) decode, 4) each row whose answer ends takes the next waiting prompt, or idles
        if compiled:
            graph.place(read, rows)
            while rows.busy():
                ended = graph.steps(rows, hook, callback, eos, generator, choice)
                graph.place({b: take(b, None) for b in ended}, rows)
            return rows.answers
        h = with_rows(None, read, B)  # (B, C) at the newest tokens
        arange = torch.arange(B, device=device)
        while rows.busy():
            if cache is None:
                h = self.hidden(seq[:, :max(rows.pos) + 1])[arange, rows.positions()]
            logprobs = self.logprobs(h)  # (B, 50257)
            if hook is not None:
                bias = hook(logprobs, rows.generated())
                logprobs = F.log_softmax(logprobs + bias, dim=-1)
            nxt = next_tokens(logprobs, **choice, generator=generator)  # (B,)
            nxt = nxt.masked_fill(rows.idle(), EOT)  # idle rows: unread
            if callback is not None:
                callback(logprobs, nxt)
            ended = rows.step(nxt, eos)  # a host synchronization a step
            new = rows.positions()  # (B,)
            if cache is None:  # the rows are read again whole: the new tokens join them
                seq[arange, new] = nxt  # (an ended or idle row's last slot: rewritten, unread)
            elif rows.busy():  # some row goes on
                h = self.decode_step(nxt, rows.pos, new, cache)
            h = with_rows(h, {b: take(b, None) for b in ended}, B)
        return rows.answers

    def logprobs(self, h):
        """(B, 50257) next-token log-probabilities from the hidden states h (B, C), in float32."""
        logits = self.lm_head(h).float()  # (B, vocab_size): over the model's rows
        return self.vocab.full(F.log_softmax(logits, dim=-1))

    def check_prompts(self, prompts):
        """Refuse an empty prompt, one longer than the context, or ids the vocabulary lacks."""
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest > self.config.block_size:
            context = self.config.block_size
            raise ValueError(f"prompt of {longest} tokens is longer than the context ({context})")
        unknown = self.vocab.unknown(t for p in prompts for t in p)
        if unknown:
            raise ValueError(f"the prompt has tokens this model's vocabulary lacks: {unknown[:10]}")

    def cache_dtype(self, device):
        """The dtype the layers compute in: the cache's."""
        kind = torch.device(device).type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.lm_head.weight.dtype

    def graphable(self, greedy, temperature, top_p, device):
        """Whether compiled decoding takes these choices: not top-p sampling on a GPU, whose sort,
        cumsum and scatter inductor fails to write in Triton (torch 2.11, H200: "list indices must
        be integers", 2026-12-04). generate then decodes eagerly, and warns."""
        top_p_on_gpu = top_p is not None and top_p < 1.0 and torch.device(device).type == "cuda"
        if sampled(greedy, temperature) and top_p_on_gpu:
            warnings.warn("compiled decoding cannot take top_p on a GPU: decoding eagerly")
            return False
        return True

    def decode_step(self, newest, pos, new, cache):
        """(B, C): the hidden state at each row's newest token (B,), whose position is `pos` (on the
        host) and `new` (on the device): its keys and values go to that slot of the cache, which
        holds the rows' earlier tokens, each from slot 0. Every row attends to its slots up to its
        own position."""
        cache.slot = new
        cache.length = max(pos) + 1  # the slots filled so far
        mask = None  # every row at the same position sees every key: no mask, the fast kernels
        if len(set(pos)) > 1:
            seen = torch.arange(cache.length, device=new.device) <= new[:, None]  # (B, Tk)
            mask = seen[:, None, None, :]  # (B, 1, 1, Tk)
        return self.hidden(newest[:, None], new[:, None], cache, mask)[:, -1]

    def graph_step(self, B, device, dtype, hook):
        """The GraphStep of B rows, kept on the model for later calls of the same shape and
        weights (a CUDA graph holds the addresses of its buffers and the weights); its cache
        zeroed, and the hook's (a RuleState's) tensors held, which the graph updates in place."""
        weights = [(p.data_ptr(), p.dtype) for p in self.parameters()]
        key = (B, dtype, torch.device(device), weights)
        if getattr(self, "_graph_key", None) != key:  # another shape, or the weights moved: anew
            self._graph_key = key
            cache = KVCache.empty(self.config, B, self.config.block_size, device, dtype)
            self._graph = GraphStep(self, cache)
        self._graph.reset()
        if hook is not None:
            self._graph.hold(hook.tensors())
        return self._graph

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """`gpt2` ... `gpt2-xl` from the hub (cached), an HF directory (config.json +
        model.safetensors), or a .safetensors file whose config is read off its tensor shapes
        (checkpoint.py reads them all)."""
        fields, tensors, path = checkpoint.read_pretrained(name_or_path)
        model = cls(GPTConfig(**fields, dropout=dropout))
        checkpoint.load_hf_state_dict(model, tensors, path)
        return model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors as transformers' save_pretrained does (both load
        the directory)."""
        tensors = self.state_dict()
        del tensors["lm_head.weight"]  # tied to wte
        checkpoint.write_pretrained(directory, self.config, tensors)
