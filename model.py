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
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import checkpoint
from sampling import next_tokens
from vocab import Vocabulary

EOT = 50256  # <|endoftext|>: GPT-2's only special token; the paper's end of a response


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
            cache.length += T  # a prompt read: T more slots filled (decoding: next_hidden sets it)
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
                 compiled=False):
        """Continue each prompt (a list of token-id lists, lengths may differ) by up to
        max_new_tokens. Returns one list of new tokens per prompt, ending at `eos` (included) if
        produced; eos=None runs out the room.
        hook(logprobs, generated) -> bias: called every step with the next-token log-probabilities
        (B, 50257) and the tokens so far (B, n); the bias is added and the sum renormalized, a
        product of experts (section 5).
        callback(logprobs, tokens) sees each step's final log-probabilities and chosen tokens
        (streaming).

        A batch gives what each prompt gives alone: positions count from each prompt's first
        token, and each row may run to the end of the context from its own length. With the cache,
        each prompt is first read alone (prefill); then all rows decode together, one token a step,
        each at its own position (next_hidden); compiled: through torch.compile, in fixed shapes
        (static_cache)."""
        # 1) the prompts as one left-padded batch, and each row's room: how many tokens it may add
        idx, valid = self.left_pad(prompts)  # (B, P): the ids, and True where they are real
        B, P = idx.shape
        lengths = valid.sum(1)  # (B,): each prompt's length
        # room (B,): up to max_new_tokens, and no further than the learned positions (block_size)
        room = (self.config.block_size - lengths).clamp(max=max_new_tokens)
        slots = int((lengths + room).max())  # the cache's length: the longest prompt and its room
        generated = idx.new_empty((B, 0))  # (B, n): the new tokens, one column per step
        # 2) read the prompts: with the cache, each one alone into its own row (prefill)
        if use_cache:
            cache, h = self.prefill(prompts, idx, slots, compiled)  # h (B, C): at each last token
        else:
            cache = None  # every step reads the whole sequence again
            h = self.next_hidden(idx, valid, generated)
        # 3) decode: one token per row per step, until every row has stopped or run out of room
        done = room == 0  # (B,)
        for step in range(int(room.max())):
            logits = self.lm_head(h).float()  # (B, vocab_size): over the model's rows
            logprobs = self.vocab.full(F.log_softmax(logits, dim=-1))  # (B, 50257)
            if hook is not None:
                logprobs = F.log_softmax(logprobs + hook(logprobs, generated), dim=-1)
            nxt = next_tokens(logprobs, greedy, temperature, top_k, top_p, generator)  # (B,)
            nxt = torch.where(done, EOT, nxt)  # finished rows run on until all are done; cut below
            if callback is not None:
                callback(logprobs, nxt)
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            n = step + 1  # the tokens each row has now
            done |= room == n  # out of room: the context's end, or max_new_tokens
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()):
                break
            h = self.next_hidden(idx, valid, generated, cache, compiled)  # (B, C) at the newest
        # 4) cut each row at its room, and after its first `eos`
        rows = []
        for row, r in zip(generated.tolist(), room.tolist()):
            row = row[:r]
            if eos is not None and eos in row:
                row = row[:row.index(eos) + 1]
            rows.append(row)
        return rows

    def left_pad(self, prompts):
        """The prompts as one batch, right-aligned: idx (B, P), and valid (B, P), False on the
        padding in front of the shorter prompts. Refuses an empty prompt, one longer than the
        context, or unknown ids."""
        device = self.lm_head.weight.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        P = int(lengths.max())
        if int(lengths.min()) == 0:
            raise ValueError("every prompt needs at least one token")
        if P > self.config.block_size:
            context = self.config.block_size
            raise ValueError(f"prompt of {P} tokens is longer than the context ({context})")
        tokens = []
        for p in prompts:
            tokens.extend(p)
        unknown = self.vocab.unknown(tokens)
        if unknown:
            raise ValueError(f"the prompt has tokens this model's vocabulary lacks: {unknown[:10]}")
        idx = torch.full((len(prompts), P), EOT, dtype=torch.long, device=device)  # padding: masked
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        starts = P - lengths  # (B,): where each prompt begins in its row
        valid = torch.arange(P, device=device)[None, :] >= starts[:, None]  # (B, P)
        return idx, valid

    def prefill(self, prompts, idx, slots, static=False):
        """(cache, h): a KVCache of `slots` a row (static: static_cache) holding the prompts, each
        read alone into its row's first slots; h (B, C) is the hidden state at each prompt's last
        token."""
        B, P = idx.shape
        kind = idx.device.type  # the cache holds keys and values in the dtype the layers compute in
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        else:
            dtype = self.lm_head.weight.dtype
        if static:
            cache = self.static_cache(B, idx.device, dtype)
        else:
            cache = KVCache.empty(self.config, B, slots, idx.device, dtype)
        last = []  # (1, C) a prompt: the hidden state at its last token
        for b, p in enumerate(prompts):
            prompt = idx[b:b + 1, P - len(p):]  # (1, len(p)): the row without its padding
            last.append(self.hidden(prompt, cache=cache.row(b))[:, -1])
        return cache, torch.cat(last)

    def next_hidden(self, idx, valid, generated, cache=None, compiled=False):
        """(B, C): the hidden state at each row's newest token, once `generated` (B, n) follows the
        left-padded prompts idx. With the cache (which holds all but the newest token) only that
        token is read; without, the whole sequence is read again. Positions count from each
        prompt's first real token; a row that ran out of room is done, and its position stays at
        the last one (its tokens are cut off)."""
        last = self.config.block_size - 1  # the last learned position
        padded = not bool(valid.all())  # some prompt is shorter than the longest
        P = idx.size(1)
        n = generated.size(1)
        if cache is not None:
            # one step's cache state, all set here: where each row's new token goes, what is read
            pos = (valid.sum(1) + n - 1).clamp(max=last)  # (B,): the newest token's, its slot
            slots = cache.k[0].size(2)
            cache.slot = pos
            if compiled:
                cache.length = slots  # fixed shapes: every slot is read; unreached ones are masked
            else:
                cache.length = min(P + n, slots)  # the slots filled so far
            seen = torch.arange(cache.length, device=pos.device) <= pos[:, None]  # (B, Tk)
            mask = seen[:, None, None, :]  # (B, 1, 1, Tk)
            if not compiled:
                if not padded:  # one query that may see every key needs no mask: the fast kernels
                    mask = None
                return self.hidden(generated[:, -1:], pos[:, None], cache, mask)[:, -1]
            # fixed strides: one graph
            newest = generated[:, -1:].clone(memory_format=torch.contiguous_format)  # (B, 1)
            # a new step: the last step's graph outputs are spent
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled_hidden(newest, pos[:, None], cache, mask)[:, -1]
        real = torch.ones_like(generated, dtype=torch.bool)  # (B, n): generated tokens are real
        keys = torch.cat([valid, real], dim=1)  # (B, P + n): True on the real keys
        pos = (keys.cumsum(1) - 1).clamp(0, last)  # (B, P + n)
        mask = None
        if padded:  # (B, 1, T, T): real keys up to yourself; a padding query sees itself (no NaN)
            i = torch.arange(keys.size(1), device=keys.device)
            causal = i[None, :] <= i[:, None]  # (T, T)
            itself = torch.eye(len(i), dtype=torch.bool, device=keys.device)  # (T, T)
            mask = (keys[:, None, None, :] & causal) | itself
        return self.hidden(torch.cat([idx, generated], dim=1), pos, None, mask)[:, -1]

    def static_cache(self, B, device, dtype):
        """The block_size-slot cache of compiled decoding, zeroed; kept on the model with the
        compiled self.hidden that reads it, for later calls of the same shape and weights (a CUDA
        graph holds the addresses of both)."""
        weights = [(p.data_ptr(), p.dtype) for p in self.parameters()]
        key = (B, dtype, torch.device(device), weights)
        if getattr(self, "_static_key", None) != key:  # another shape, or the weights moved: anew
            cache = KVCache.empty(self.config, B, self.config.block_size, device, dtype)
            self._static_key = key
            self._static_cache = cache
            mode = None
            if torch.device(device).type == "cuda":
                for buffer in cache.k + cache.v:  # a CUDA graph writes them in place
                    torch._dynamo.mark_static_address(buffer)
                mode = "reduce-overhead"  # CUDA graphs: one launch a step
            self.compiled_hidden = torch.compile(self.hidden, mode=mode, dynamic=False)
        torch._foreach_zero_(self._static_cache.k + self._static_cache.v)
        return self._static_cache

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
