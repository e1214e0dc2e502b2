"""
GPT-2 in one file: the pretrained language model every method in the paper starts from.

    python -c "from model import GPT; m = GPT.from_pretrained('gpt2'); print(m.config)"

Module names and weight shapes equal those of Hugging Face's GPT-2 state dict (transformer.h.0.attn.c_attn,
...), so a checkpoint from the hub loads with no renaming and no transposes. Loading reads
safetensors with a small strict reader written below (no pickle anywhere). `generate` decodes a batch of
prompts of different lengths with a key/value cache and takes a per-step hook that adds to the next-token
log-probabilities: that hook is how rules.py multiplies the rule-based LM into GPT-2 (paper section 5).
"""
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

EOT = 50256  # <|endoftext|>: GPT-2's only special token; the paper's end of a response
VOCAB = 50257  # GPT-2's BPE vocabulary, <|endoftext|> included: every id the rest of the code speaks
HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


def varying_lengths():
    """The attention kernels for sequence lengths that change from call to call (decoding adds a key each step;
    scoring batches differ in length): every backend but cuDNN's, which PyTorch prefers on Hopper GPUs but which
    builds a new plan for every new length, about 2.5 ms of CPU time per call (measured on an H200, torch 2.11:
    that made decoding 10x slower). Training keeps it: its shapes repeat."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (HF: n_positions)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary, <|endoftext|> included
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for finetuning, as in nanoGPT; HF's three pdrops collapse into this one
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    token_ids: tuple = None  # a restricted vocabulary (TinyWorld): the GPT-2 id of each row of wte; None = all


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation: (n_layer, B, nh, T_max, hs)."""

    def __init__(self, k, v):
        self.k, self.v = k, v
        self.length = 0  # positions filled so far; GPT.hidden advances it after all layers have written

    @classmethod
    def empty(cls, config, batch_size, max_len, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        # zeros, not empty: masked-out padding slots are never written, and 0 * NaN garbage would be NaN
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def row(self, b, start):
        """A cache for sequence b alone whose position 0 is slot `start`: a view, so writes land in self."""
        return KVCache(self.k[:, b:b + 1, :, start:], self.v[:, b:b + 1, :, start:])

    def update(self, layer, k, v):
        # k, v: (B, nh, T, hs) for the new positions; returns all keys and values so far, (B, nh, length+T, hs)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Linear(nn.Module):
    """y = x W + b with W stored (in, out): the layout of GPT-2's own checkpoints (HF calls it Conv1D), so they
    load without transposes. It is also the faster layout for one-token decoding on CPU: MKL's matrix-vector
    product runs about 12% faster than with nn.Linear's (out, in) (tests/bench.py); training is the same."""

    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        # x (..., n_in) -> (..., n_out)
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout, self.layer = config.n_head, config.n_embd, config.dropout, layer

    def forward(self, x, cache=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, Tk, hs): the past and the new positions
        # Training and unpadded prefill are plain causal attention (the fast kernels); with left padding
        # or a cache, `mask` (B, 1, T, Tk) says which keys each query may see. A single new query with no
        # padding may see every key, so it needs neither.
        causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 uses the tanh approximation of GELU (HF's "gelu_new"); exact GELU drifts by ~1e-3 in logits
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
        # A restricted vocabulary: wte and lm_head have one row per GPT-2 id the model knows, so a tiny model
        # (TinyWorld's 0.4M parameters) does not spend 90% of its compute on 50,257 logits. Everything outside
        # the model still speaks GPT-2 ids: rows() translates them on the way in, full_vocab() on the way out.
        if config.token_ids is None:
            self.token_ids = self.row_of = None
        else:
            if len(config.token_ids) != config.vocab_size or len(set(config.token_ids)) != config.vocab_size:
                raise ValueError(f"token_ids: {len(config.token_ids)} ids for vocab_size {config.vocab_size}, or repeated")
            ids = torch.tensor(config.token_ids, dtype=torch.long)  # (V,)
            row_of = torch.full((VOCAB,), -1, dtype=torch.long).index_copy_(0, ids, torch.arange(len(ids)))
            self.register_buffer("token_ids", ids, persistent=False)  # row -> GPT-2 id
            self.register_buffer("row_of", row_of, persistent=False)  # GPT-2 id -> row, -1 if unknown
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

    def rows(self, ids):
        """GPT-2 ids -> the rows of wte and lm_head that stand for them: the ids themselves for GPT-2; with a
        restricted vocabulary its row, or -1 for an id it does not know (and for -1, "no target")."""
        if self.row_of is None:
            return ids
        return torch.where(ids >= 0, self.row_of[ids.clamp(min=0)], -1)

    def own_vocab(self, scores):
        """(..., 50257) scores over GPT-2's ids -> (..., vocab_size) over this model's rows."""
        return scores if self.token_ids is None else scores[..., self.token_ids]

    def full_vocab(self, logprobs):
        """(..., vocab_size) over this model's rows -> (..., 50257) over GPT-2's ids, -inf (probability 0) for
        the ids a restricted vocabulary lacks."""
        if self.token_ids is None:
            return logprobs
        full = logprobs.new_full((*logprobs.shape[:-1], VOCAB), float("-inf"))
        return full.index_copy_(-1, self.token_ids, logprobs)

    def unknown(self, ids):
        """The GPT-2 ids in the list `ids` that this model has no row for (none for GPT-2), sorted."""
        if self.row_of is None or not ids:
            return []
        ids = torch.tensor(ids, dtype=torch.long, device=self.row_of.device)
        return sorted(set(ids[self.rows(ids) < 0].tolist()))

    def hidden(self, idx, pos=None, cache=None, mask=None):
        # idx (B, T) GPT-2 token ids; pos (B, T) their positions (default 0..T-1 after the cache); -> (B, T, C)
        T = idx.size(1)
        if pos is None:
            start = cache.length if cache is not None else 0
            assert start + T <= self.config.block_size, f"{start + T} tokens exceed block_size {self.config.block_size}"
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(self.rows(idx)) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, cache, mask)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        # idx, targets (B, T) GPT-2 ids; targets == -1 are ignored (masked prompt tokens and padding)
        logits = self.lm_head(self.hidden(idx))  # (B, T, vocab_size): over the model's rows
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), self.rows(targets).view(-1), ignore_index=-1)
        return logits, loss

    # ---------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    @varying_lengths()  # the key length grows every step
    def generate(self, prompts, max_new_tokens, greedy=False, temperature=1.0, top_k=None, top_p=None,
                 hook=None, callback=None, eos=EOT, use_cache=True, generator=None):
        """Continue each prompt (a list of token-id lists, lengths may differ) by up to max_new_tokens.

        hook(logprobs, generated) -> bias: called at every step with the next-token log-probabilities
        (B, vocab_size) and the tokens generated so far (B, n); the bias is added and the sum renormalized,
        a product of experts (paper section 5). callback(logprobs, tokens), if given, sees the final
        log-probabilities and the tokens chosen at each step (streaming uses it). Returns one list of new
        tokens per prompt, ending at `eos` (included) if it was produced; eos=None always runs max_new_tokens.

        Prompts are left-padded to a common length P, so that new tokens are appended in one column.
        Padding is masked out of attention and positions count from each prompt's first real token, so a
        batch gives what each prompt gives alone. With the cache, each prompt is first read alone into its
        right-aligned slots (no compute spent on padding); then all rows decode together, one token a step.
        """
        device, B = self.lm_head.weight.device, len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        P = int(lengths.max())
        if int(lengths.min()) == 0:
            raise ValueError("every prompt needs at least one token")
        if P > self.config.block_size:
            raise ValueError(f"prompt of {P} tokens is longer than the context ({self.config.block_size})")
        unknown = self.unknown([t for p in prompts for t in p])
        if unknown:
            raise ValueError(f"the prompt has tokens this model's vocabulary lacks: {unknown[:10]}")
        max_new_tokens = min(max_new_tokens, self.config.block_size - P)  # learned positions end there
        idx = torch.full((B, P), EOT, dtype=torch.long, device=device)  # padding: any id, masked out
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        valid = torch.arange(P, device=device)[None, :] >= (P - lengths)[:, None]  # (B, P), False on padding
        padded = not bool(valid.all())
        generated = torch.empty((B, 0), dtype=torch.long, device=device)

        if use_cache:
            kind = device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.lm_head.weight.dtype
            cache = KVCache.empty(self.config, B, P + max_new_tokens, device, dtype)
            h = torch.cat([self.hidden(idx[b:b + 1, P - len(p):], cache=cache.row(b, P - len(p)))[:, -1]
                           for b, p in enumerate(prompts)])  # (B, C) at each prompt's last token
            cache.length = P

        def next_hidden(generated):
            # (B, C) hidden state at the last token of each row, once `generated` has been appended
            keys = torch.cat([valid, torch.ones_like(generated, dtype=torch.bool)], dim=1)  # (B, P + n)
            if use_cache:  # read just the newest token; the cache holds the rest
                mask = keys[:, None, None, :] if padded else None  # (B, 1, 1, P + n)
                return self.hidden(generated[:, -1:], (lengths + generated.size(1) - 1)[:, None], cache, mask)[:, -1]
            # no cache: read the whole padded sequence again, masking the padding
            pos, mask = (keys.cumsum(1) - 1).clamp(min=0), None  # each prompt's first real token is position 0
            if padded:
                i = torch.arange(keys.size(1), device=device)
                # see real keys up to yourself; a padding query sees itself so that no row is empty (NaN)
                mask = (keys[:, None, None, :] & (i[None, :] <= i[:, None])) | torch.eye(len(i), dtype=torch.bool, device=device)
            return self.hidden(torch.cat([idx, generated], dim=1), pos, None, mask)[:, -1]

        if not use_cache:
            h = next_hidden(generated)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logprobs = self.full_vocab(F.log_softmax(self.lm_head(h).float(), dim=-1))  # (B, 50257)
            if hook is not None:
                logprobs = F.log_softmax(logprobs + hook(logprobs, generated), dim=-1)
            nxt = sample(logprobs, greedy, temperature, top_k, top_p, generator)  # (B,)
            nxt = torch.where(done, EOT, nxt)  # finished rows run on until all are done; cut off below
            if callback is not None:
                callback(logprobs, nxt)
            generated = torch.cat([generated, nxt[:, None]], dim=1)
            if eos is not None:
                done |= nxt == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            h = next_hidden(generated)
        out = []
        for row in generated.tolist():
            out.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
        return out

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """`gpt2` ... `gpt2-xl` from the hub (cached), an HF directory (config.json + model.safetensors), or a
        .safetensors file whose config is read off its tensor shapes."""
        path = Path(name_or_path)
        if str(name_or_path) in HUB_MODELS:
            import hub  # only needed for downloads
            repo = HUB_MODELS[str(name_or_path)]
            path = hub.cached_download(repo, "config.json").parent
            hub.cached_download(repo, "model.safetensors")
        if path.is_dir():
            config = config_from_hf_json(path / "config.json")
            tensors, _ = load_safetensors(path / "model.safetensors")
        elif path.is_file() and path.suffix == ".safetensors":
            tensors, metadata = load_safetensors(path)
            config = config_from_shapes(path, tensors, metadata)
        elif path.exists():
            raise ValueError(f"{path}: expected a directory with config.json + model.safetensors, or a .safetensors file")
        else:
            raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not one of the hub models "
                                    f"{', '.join(HUB_MODELS)}")
        config.dropout = dropout
        model = cls(config)
        load_hf_state_dict(model, tensors, path)
        return model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors as transformers' save_pretrained does, so that this class,
        transformers and sample.py all load the directory. Each file is written to a temp name and renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        c = self.config
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
              "n_ctx": c.block_size, "vocab_size": c.vocab_size, "layer_norm_epsilon": 1e-5, "n_inner": None,
              "bos_token_id": EOT, "eos_token_id": EOT, "tie_word_embeddings": True,
              "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout}
        metadata = {"format": "pt", "n_head": str(c.n_head)}
        if c.token_ids is not None:  # transformers keeps the extra field; its logits are over these rows
            hf["token_ids"] = list(c.token_ids)
            metadata["token_ids"] = json.dumps(list(c.token_ids))
        tmp = directory / "config.json.tmp"
        tmp.write_text(json.dumps(hf, indent=2))
        os.replace(tmp, directory / "config.json")
        tensors = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        save_safetensors(tensors, directory / "model.safetensors", metadata)


def sample(logprobs, greedy=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from (B, V) log-probabilities: argmax if greedy, else temperature, top-k, top-p."""
    if greedy or temperature == 0:
        return logprobs.argmax(dim=-1)
    scores = logprobs / temperature
    if top_k is not None and top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_scores.softmax(dim=-1) >= top_p  # drop tokens once the mass before them reaches p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]


# ------------------------------------------------------------------- checkpoints: safetensors and HF keys

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER = 100 * 1024 * 1024  # a header is JSON describing tensors; anything bigger is not a checkpoint


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor}, checking every byte range first.

    Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets}, and an
    optional "__metadata__"}, then the data section; offsets are relative to the data section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise ValueError(f"{path}: safetensors header length {n} is larger than the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings")
        data_size, spans = size - 8 - n, []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"{path}: tensor '{name}' needs exactly dtype, shape and data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {dtype} (F32, F16, BF16 only)")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise ValueError(f"{path}: tensor '{name}' has invalid shape {shape}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data_size):
                raise ValueError(f"{path}: tensor '{name}' data_offsets {offsets} lie outside the data section "
                                 f"({data_size} bytes; file truncated?)")
            nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(f"{path}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes but "
                                 f"{dtype}{shape} needs {nbytes}")
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:  # the data section must be covered exactly once, with no overlap and no hole
                raise ValueError(f"{path}: tensor '{name}' starts at byte {begin}, expected {end} "
                                 f"({'overlap' if begin < end else 'hole'} in the data section)")
            end = stop
        if end != data_size:
            raise ValueError(f"{path}: data section has {data_size} bytes, tensors cover {end}")
        tensors = {}
        for begin, _, name in spans:
            f.seek(8 + n + begin)
            info = header[name]
            t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            f.readinto(t.view(-1).view(torch.uint8).numpy())  # little-endian on disk, as on every host we run on
            tensors[name] = t
    for name, t in tensors.items():  # a diverged run saves NaNs that would only show up as garbage text later
        if non_finite(t):
            raise ValueError(f"{path}: tensor '{name}' has {non_finite(t)} NaN or Inf values "
                             f"(a diverged or corrupted checkpoint)")
    return tensors, metadata


def non_finite(t):
    """How many NaN or Inf values `t` holds. A sum is finite only if every value is, and summing is 20x faster
    than isfinite(t) on a CPU (1 s for GPT-2's 124M weights); only a non-finite sum (or one that overflowed
    float16) pays for the exact count."""
    if torch.isfinite(t.sum()):
        return 0
    return t.numel() - int(torch.isfinite(t).sum())


def save_safetensors(tensors, path, metadata):
    """Write {name: tensor} as a .safetensors file (the format load_safetensors reads), atomically."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch.float32 -> "F32", ...
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # pad the header so tensor data starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")  # HF's names; n_positions is block_size


def config_from_hf_json(path):
    """GPTConfig from an HF GPT-2 config.json, refusing variants this GPT does not implement."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an HF model directory needs config.json + model.safetensors)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(hf, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(hf), "a number")
        raise ValueError(f"{path}: expected a JSON object, not {kind}")
    for key in SIZES:
        if type(hf.get(key)) is not int:  # not isinstance: true and false are ints to Python
            raise ValueError(f"{path}: missing or non-integer field '{key}'")
    unsupported = {"activation_function": "gelu_new", "n_inner": None, "layer_norm_epsilon": 1e-5,
                   "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                   "scale_attn_weights": True, "add_cross_attention": False, "tie_word_embeddings": True}
    for key, expected in unsupported.items():
        value = hf.get(key, expected)
        if value != expected and not (key == "n_inner" and value == 4 * hf["n_embd"]):
            raise ValueError(f"{path}: field '{key}' is {value!r}; this GPT-2 implements only {expected!r}")
    config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                       n_head=hf["n_head"], n_embd=hf["n_embd"], token_ids=check_token_ids(path, hf.get("token_ids")))
    return check_sizes(path, config, {key: f"field '{key}'" for key in SIZES})


def check_sizes(path, config, names):
    """`config` if a GPT can be built from it, else a one-line ValueError: every size must be positive and the
    heads must split n_embd evenly. `names` says what each size in SIZES is called in the file."""
    sizes = {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
             "n_positions": config.block_size, "vocab_size": config.vocab_size}
    for key, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{path}: {names[key]} is {value}; it must be positive")
    if config.n_embd % config.n_head:
        raise ValueError(f"{path}: {names['n_head']} is {config.n_head}, which does not divide n_embd "
                         f"{config.n_embd} (each head gets n_embd / n_head dimensions)")
    if config.token_ids is not None and len(config.token_ids) != config.vocab_size:
        raise ValueError(f"{path}: token_ids has {len(config.token_ids)} ids for vocab_size "
                         f"{config.vocab_size} (one per row of wte)")
    return config


def check_token_ids(where, ids):
    """A restricted vocabulary's GPT-2 ids (a JSON list) as a tuple; None stays None (all of GPT-2's)."""
    if ids is None:
        return None
    if not (isinstance(ids, list) and ids and all(type(i) is int and 0 <= i < VOCAB for i in ids)
            and len(set(ids)) == len(ids)):
        raise ValueError(f"{where}: token_ids must be a list of distinct GPT-2 ids (0 to {VOCAB - 1})")
    return tuple(ids)


def config_from_shapes(path, tensors, metadata):
    """GPTConfig of a bare .safetensors file. Shapes fix all sizes but the head count: taken from the file's
    metadata when it says (our exports do), else GPT-2's 64-dimensional heads (true of all four sizes)."""
    key = {k.removeprefix("transformer."): k for k in tensors}
    for name in ("wte.weight", "wpe.weight"):
        if name not in key:
            raise ValueError(f"{path}: missing tensor '{name}'")
        if tensors[key[name]].dim() != 2:  # (rows, n_embd); anything else would fail to unpack below
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(tensors[key[name]].shape)}; "
                             f"expected 2 dimensions")
    vocab_size, n_embd = tensors[key["wte.weight"]].shape
    n_layer = len({k.split(".")[1] for k in key if k.startswith("h.")})
    n_head = metadata.get("n_head", str(max(1, n_embd // 64)))
    if not (n_head.isascii() and n_head.isdigit()):  # int() would also take " 4", "+4", "4_0" and "٤"
        raise ValueError(f"{path}: metadata 'n_head' is {n_head[:40]!r}; expected a positive integer")
    try:
        token_ids = json.loads(metadata["token_ids"]) if "token_ids" in metadata else None
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: metadata token_ids is not JSON") from None
    config = GPTConfig(block_size=tensors[key["wpe.weight"]].shape[0], vocab_size=vocab_size, n_layer=n_layer,
                       n_head=int(n_head), n_embd=n_embd, token_ids=check_token_ids(path, token_ids))
    names = {"n_layer": "the number of blocks (tensors h.N.*)", "n_embd": "n_embd (columns of wte.weight)",
             "n_positions": "n_positions (rows of wpe.weight)", "vocab_size": "vocab_size (rows of wte.weight)",
             "n_head": "metadata 'n_head'" if "n_head" in metadata else "n_head (n_embd // 64: no metadata 'n_head')"}
    return check_sizes(path, config, names)


def load_hf_state_dict(model, tensors, path):
    """Copy HF GPT-2 tensors into `model`, accepting both the hub's layout and save_pretrained's."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, tensors.get("wte.weight", lm_head)):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    # the causal-mask buffers of older HF versions are constants, not weights
    tensors = {k: v for k, v in tensors.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    expected = {k.removeprefix("transformer."): p for k, p in model.state_dict().items() if k != "lm_head.weight"}
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{path}: unexpected tensor '{key}' (not a GPT-2 checkpoint?)")
    for key, param in expected.items():
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor '{key}'")
        if tensors[key].shape != param.shape:
            raise ValueError(f"{path}: tensor '{key}' has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensors[key])
