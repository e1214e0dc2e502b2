"""
Speed against HF transformers, measured in one run on the same machine and reported as ratios.

    python tests/bench.py generate      # greedy decode, gpt2 shape, random weights, CPU: fp32 and bf16 weights
    python tests/bench.py train         # a train step (forward + backward + AdamW), gpt2 shape, CPU fp32; fused
                                        # AdamW; micro-batches grouped by length on LIMA's lengths
    python tests/bench.py rules         # decoding with all rules vs none, quiet and with the other core busy
    python tests/bench.py gpu [OUT.json] # on a CUDA GPU: scoring with the rules, decoding precision, continuous
                                        # batching, decoding, the evaluation's cost, train steps gpt2..gpt2-xl;
                                        # --only=refill,decode: those sections (tests/gpu_check.py: with the tests)
    python tests/bench.py all --tiny     # every CPU bench on a tiny shape in seconds (what the tests run);
                                        # `gpu --tiny` likewise on a GPU (tests/test_cuda.py)

Not a test: numbers depend on the machine, so nothing here asserts a time. Needs the test requirements. Every
figure is printed with the machine's state (threads, cores, load average when it started): a busy machine makes
small ops several times slower, so a bench warns when the load says another process is using the CPU.
"""
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

import conftest  # noqa: E402,F401  the tests' set-up: the repository on sys.path, TIKTOKEN_CACHE_DIR from ../shared
from model import GPT, GPTConfig  # noqa: E402


TINY = False  # `--tiny`: a 2-layer, 64-wide model and a few tokens, so the whole bench runs in seconds (tests)


def shape():
    """The model shape a CPU bench measures: gpt2 (124M), or with --tiny a 2-layer one."""
    return dict(n_layer=2, n_head=2, n_embd=64) if TINY else dict(n_layer=12, n_head=12, n_embd=768)


def machine():
    """The machine's state, recorded with every figure: threads, cores, the 1-minute load average, and the share
    of the CPU other processes used during the second before the bench (Linux: /proc/stat), which, unlike the
    load average, does not lag. Warns when another process is busy."""
    load, others = os.getloadavg()[0], None
    if os.path.exists("/proc/stat"):
        def ticks():
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            return sum(fields), fields[3] + fields[4]  # all, idle + iowait
        (total0, idle0), _, (total1, idle1) = ticks(), time.sleep(1.0), ticks()
        others = round(1 - (idle1 - idle0) / max(1, total1 - total0), 2)
    state = {"threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_1min": round(load, 2),
             "cpu_busy_before": others, "busy": (others if others is not None else load / os.cpu_count()) > 0.2}
    print(f"machine: {state['cores']} cores, {state['threads']} torch threads, load average {load:.2f}"
          + (f", CPU {100 * others:.0f}% busy the second before" if others is not None else "")
          + ("  WARNING: another process is using the CPU; these figures are not quiet ones" if state["busy"] else " (quiet)"))
    return state


@contextlib.contextmanager
def busy_core(on=True):
    """Another process spinning on one core while the block runs: the 'under load' figures."""
    if not on:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def gpt2_pair(seed=0):
    """Our GPT and HF's GPT2LMHeadModel with the same random weights in the bench's shape (gpt2 unless --tiny)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(initializer_range=0.1, **shape())).eval()
    ours = GPT(GPTConfig(**shape())).eval()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    from checkpoint import load_hf_state_dict
    load_hf_state_dict(ours, sd, "hf")
    return ours, hf


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns, rounds=5):
    """Best time of each function over `rounds`, run in turns (ours, theirs, ours, ...) after a warm-up, so
    that drift in the machine's speed hits both sides alike."""
    for fn in fns:
        fn()
    times = [[timed(fn) for fn in fns] for _ in range(1 if TINY else rounds)]  # --tiny: a smoke run of the code
    return [min(column) for column in zip(*times)]


@torch.no_grad()
def bench_generate():
    """Greedy decoding, ours vs HF generate on the same weights (batch 1), our batch of 8 mixed prompts against
    8 times batch 1, and ours in bfloat16 weights (--dtype=bfloat16 on a CPU), with the share of the memory
    bandwidth floor reached (a batch-1 token reads every weight once)."""
    import cli
    new_tokens = 8 if TINY else 64
    ours, hf = gpt2_pair()
    bf16 = cli.for_inference(gpt2_pair()[0], "cpu", "bfloat16")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (1, 32), generator=g)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (5, 12, 20, 32, 40, 48, 60, 64)]
    state = machine()

    def ours_bf16(batch):
        with cli.autocast("cpu", "bfloat16"):
            return bf16.generate(batch, new_tokens, greedy=True, eos=None)
    ours.generate([prompt[0].tolist()], new_tokens, greedy=True, eos=None, compiled=True)  # compiles (once a shape)
    ours_1, hf_1, ours_8, bf16_1, bf16_8, compiled_1 = interleaved([
        lambda: ours.generate([prompt[0].tolist()], new_tokens, greedy=True, eos=None),
        lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=50256),
        lambda: ours.generate(prompts, new_tokens, greedy=True, eos=None),
        lambda: ours_bf16([prompt[0].tolist()]),
        lambda: ours_bf16(prompts),
        lambda: ours.generate([prompt[0].tolist()], new_tokens, greedy=True, eos=None, compiled=True),
    ])
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    read_s = bandwidth()
    floor_ms = 1000 * weight_bytes / read_s  # fp32: every weight read once per batch-1 token
    out = {"machine": state, "new_tokens": new_tokens, "ms_per_token_batch1": 1000 * ours_1 / new_tokens,
           "hf_ms_per_token_batch1": 1000 * hf_1 / new_tokens, "ratio_ours_vs_hf": hf_1 / ours_1,
           "batch8_vs_batch1": ours_1 * 8 / ours_8, "bf16_weights_speedup_batch1": ours_1 / bf16_1,
           "bf16_weights_speedup_batch8": ours_8 / bf16_8, "compiled_vs_eager_batch1": ours_1 / compiled_1,
           "memory_read_gb_s": read_s / 1e9,
           "floor_ms_per_token_fp32": floor_ms, "share_of_floor_fp32": floor_ms / (1000 * ours_1 / new_tokens),
           "share_of_floor_bf16": floor_ms / 2 / (1000 * bf16_1 / new_tokens)}
    print(f"greedy decode, {'tiny' if TINY else 'gpt2'} shape, CPU, 32-token prompt, {new_tokens} new tokens, best "
          f"of 5 interleaved")
    print(f"  batch 1, fp32: ours {out['ms_per_token_batch1']:.1f} ms/token, HF generate "
          f"{out['hf_ms_per_token_batch1']:.1f}: ours/HF speed {out['ratio_ours_vs_hf']:.2f}x")
    print(f"  batch 8 (prompts of 5..64 tokens): {out['batch8_vs_batch1']:.1f}x the tokens/s of batch 1")
    print(f"  bfloat16 weights: {out['bf16_weights_speedup_batch1']:.2f}x fp32 at batch 1, "
          f"{out['bf16_weights_speedup_batch8']:.2f}x at batch 8")
    print(f"  compiled static decoding (--compile): {out['compiled_vs_eager_batch1']:.2f}x eager at batch 1")
    print(f"  bandwidth floor (weights / {out['memory_read_gb_s']:.0f} GB/s measured): fp32 {floor_ms:.1f} ms/token, "
          f"reached {100 * out['share_of_floor_fp32']:.0f}%; bf16 reached {100 * out['share_of_floor_bf16']:.0f}%")
    return out


def bandwidth(mb=512):
    """Bytes per second this machine reads from memory: the best of 5 sums over a buffer larger than its caches."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    return x.numel() * 4 / min(timed(x.sum) for _ in range(5))


def bench_train():
    """A train step, ours vs HF (the same AdamW); the AdamW step alone, fused (train.adamw) vs the default; and
    a 64-sequence step on LIMA's real lengths, micro-batches grouped by length (train.micro_batches) vs in data
    order: padding share and time."""
    import train
    batch, T = (2, 32) if TINY else (4, 256)
    ours, hf = gpt2_pair()
    ours.train(), hf.train()
    hf.config.attn_pdrop = hf.config.resid_pdrop = hf.config.embd_pdrop = 0.0  # ours trains with dropout 0 too
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randint(0, 50257, (batch, T), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([x[:, 1:], torch.full((batch, 1), -1)], dim=1)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, weight_decay=0.0, foreach=False, fused=False)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0, foreach=False, fused=False)

    def step(model, loss, opt):
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = machine()
    t_ours, t_hf = interleaved([lambda: step(ours, lambda: ours(x, targets)[1], opt_ours),
                                lambda: step(hf, lambda: hf(x, labels=x).loss, opt_hf)], rounds=3)
    for p in ours.parameters():
        p.grad = torch.randn_like(p)
    fused = train.adamw(ours, {"learning_rate": 1e-5, "weight_decay": 0.0})
    t_default, t_fused = interleaved([opt_ours.step, fused.step], rounds=5)
    out = {"machine": state, "step_ours_s": t_ours, "step_hf_s": t_hf, "time_ratio_ours_vs_hf": t_ours / t_hf,
           "adamw_default_s": t_default, "adamw_fused_s": t_fused, "fused": fused.defaults["fused"],
           **bench_grouping(train)}
    print(f"train step (forward + backward + AdamW), {'tiny' if TINY else 'gpt2'} shape, CPU fp32, batch {batch} x "
          f"{T} tokens, best of 3 interleaved: ours {t_ours:.2f} s, HF {t_hf:.2f} s, time ratio {t_ours / t_hf:.2f}")
    print(f"  AdamW step alone: default (for-loop) {t_default * 1000:.1f} ms, train.adamw "
          f"(fused={out['fused']}) {t_fused * 1000:.1f} ms: {t_default / t_fused:.1f}x")
    print(f"  a 64-sequence step on {out['lengths_from']} lengths, {out['grouping_shape']}: padding "
          f"{100 * out['padding_ungrouped']:.0f}% -> {100 * out['padding_grouped']:.0f}% of tokens, tokens/s "
          f"{out['tokens_per_s_ungrouped']:.0f} -> {out['tokens_per_s_grouped']:.0f} "
          f"({out['tokens_per_s_grouped'] / out['tokens_per_s_ungrouped']:.2f}x)")
    return out


def lima_lengths():
    """(source, token counts of LIMA's training conversations): data/lima's prepared file or ../shared's copy,
    else (and with --tiny) the shipped sample's."""
    import chat
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sample = "data/sample/sample_train.jsonl"
    for path in (sample,) if TINY else ("data/lima/lima_train.jsonl", "../shared/data/lima_data.jsonl", sample):
        if os.path.exists(os.path.join(root, path)):
            conversations = chat.read_conversations(os.path.join(root, path))
            return path, [min(1024, len(chat.encode_chat(c)[0])) for c in conversations]
    raise FileNotFoundError("no LIMA or sample data")


def bench_grouping(train, steps=1):
    """One 64-sequence step (micro-batches of 4) of LIMA-length sequences, forward + backward, grouped by length
    as train.micro_batches does vs in the data order: the same examples, padded to each micro-batch's longest."""
    source, lengths = lima_lengths()
    # a small model with a small vocabulary: the padding's share of the time is what is measured, and GPT-2's
    # 50,257-row output layer would make a CPU step of LIMA's 64 sequences take minutes
    config = dict(n_layer=2, n_head=4, n_embd=128) if TINY else dict(n_layer=4, n_head=4, n_embd=256)
    model = GPT(GPTConfig(**config, vocab_size=1024)).train()
    examples = [(list(range(n)), list(range(1, n)) + [-1]) for n in lengths]  # ids < 1024: block_size
    settings = {"batch_size": 4, "gradient_accumulation_steps": 16, "seed": 0, "block_size": 1024}
    grouped = [train.micro_batches(examples, s, settings, 0, 1) for s in range(steps)]
    in_order = []  # the same examples of each step in the data order, as before the grouping
    for step in range(len(grouped)):
        flat = [examples[k] for k in train.step_indices(len(examples), step, settings, 1)]
        in_order.append([flat[m * 4:(m + 1) * 4] for m in range(16)])

    def run(all_batches):
        for batches in all_batches:
            for b in batches:
                x, y = train.collate(b, "cpu", 1024)
                model(x, y)[1].backward()
    real = sum(len(ids) for batches in grouped for b in batches for ids, _ in b)
    padded = lambda all_batches: sum(train.collate(b, "cpu", 1024)[0].numel()  # noqa: E731
                                     for batches in all_batches for b in batches)
    t_in_order, t_grouped = interleaved([lambda: run(in_order), lambda: run(grouped)], rounds=2)
    return {"lengths_from": source, "grouping_shape": f"{config['n_layer']} layers x {config['n_embd']}, 1,024-token vocabulary",
            "padding_ungrouped": 1 - real / padded(in_order), "padding_grouped": 1 - real / padded(grouped),
            "tokens_per_s_ungrouped": real / t_in_order, "tokens_per_s_grouped": real / t_grouped}


@torch.no_grad()
def bench_rules():
    """Greedy decoding with all rules against none, quiet and with another process busy on one core, for the
    gpt2 shape and a TinyWorld-sized model; and the rules' own cost per step after 100 and 1,000 tokens."""
    from rules import RuleSet, RuleState
    state = machine()
    out = {"machine": state, "decode": []}
    sizes = [("tiny", dict(n_layer=2, n_head=2, n_embd=64), 20)] if TINY else [
        ("gpt2", shape(), 300), ("tinyworld-sized (4 layers x 128)", dict(n_layer=4, n_head=4, n_embd=128), 1000)]
    for name, config, new_tokens in sizes:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**config)).eval()
        prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        for loaded in (False, True):
            with busy_core(loaded):
                none, ruled = interleaved([
                    lambda: model.generate([prompt], new_tokens, greedy=True, eos=None),
                    lambda: model.generate([prompt], new_tokens, greedy=True, eos=None, hook=RuleState([prompt], RuleSet())),
                ], rounds=2)
            out["decode"].append({"model": name, "other_core_busy": loaded, "new_tokens": new_tokens,
                                  "ms_per_token_no_rules": 1000 * none / new_tokens,
                                  "ms_per_token_all_rules": 1000 * ruled / new_tokens, "ratio": ruled / none})
            print(f"  {name}, {new_tokens} tokens, {'other core busy' if loaded else 'quiet'}: no rules "
                  f"{1000 * none / new_tokens:.2f} ms/token, all rules {1000 * ruled / new_tokens:.2f}: {ruled / none:.2f}x")
    out["scoring"] = bench_scoring()
    prompt = list(range(16))
    for n in (100, 1000):  # the rules' own step: two in-place writes a row, never a rescan
        rule_state, generated = RuleState([prompt], RuleSet()), torch.randint(0, 50257, (1, n))
        for t in range(1, n + 1):
            rule_state.update(generated[0, t - 1:t])
        t = timed(lambda: [rule_state.update(generated[0, -1:]) for _ in range(200)]) / 200
        out[f"rules_step_after_{n}_us"] = 1e6 * t
        print(f"  the rules' own step after {n:>4} tokens: {1e6 * t:.0f} us")
    return out


def ranking_pairs(n, longest, g):
    """n scored (ids, prompt_len) pairs, shortest first: random prompts of 20-79 tokens and responses of 10 to
    longest - 1 tokens closed by <|endoftext|>, Alpaca-like lengths drawn from generator g."""
    encoded = []
    for _ in range(n):
        p, r = int(torch.randint(20, 80, (1,), generator=g)), int(torch.randint(10, longest, (1,), generator=g))
        encoded.append((torch.randint(0, 50256, (p + r,), generator=g).tolist() + [50256], p))
    return sorted(encoded, key=lambda e: len(e[0]))


@torch.no_grad()
def bench_scoring():
    """Scoring known responses (the ranking of Table 2, the reference NLL), gpt2 shape, CPU fp32: with all rules
    against none, and the five rule sets of --compare in one pass. The rules' scores for every position come
    in closed form (rules.ForcedRules), so they should cost little beyond the model's own pass."""
    import scoring
    from rules import NO_RULES, RuleSet
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape())).eval()
    encoded = ranking_pairs(4 if TINY else 8, 30 if TINY else 200, torch.Generator().manual_seed(1))
    compare = [NO_RULES, RuleSet(), RuleSet(eos=False), RuleSet(diversity=False), RuleSet(uniform=False)]
    none, ruled, five = interleaved([lambda: scoring.score_batch(model, [NO_RULES], encoded, "cpu", "float32"),
                                     lambda: scoring.score_batch(model, [RuleSet()], encoded, "cpu", "float32"),
                                     lambda: scoring.score_batch(model, compare, encoded, "cpu", "float32")], rounds=3)
    n = sum(len(ids) - p for ids, p in encoded)
    print(f"  scoring {len(encoded)} responses ({n} tokens): no rules {none:.2f} s, all rules {ruled:.2f} s "
          f"({ruled / none:.2f}x), the five rule sets of --compare in one pass {five:.2f} s ({five / none:.2f}x)")
    return {"pairs": len(encoded), "tokens": n, "no_rules_s": none, "all_rules_s": ruled, "ratio": ruled / none,
            "compare_five_s": five, "compare_five_ratio": five / none}


# ------------------------------------------------------------------------------------------------ on a GPU

SHAPES = {"tiny": (2, 2, 64), "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


def cuda_time(fn, device):
    """Seconds fn takes, its GPU work included (on a CPU, as timed: the GPU sections' code runs there in tests)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda device: None)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_train_step(name, device, T=1024, per_step=64, compile=False, steps=3):
    """One optimizer step of 64 sequences of T tokens as train.py takes it (bf16 autocast, fused AdamW, the
    example-weighted loss), with the largest micro-batch that fits: tokens/s, MFU (6N flops a token, as
    train.py reports it), peak memory."""
    import cli
    import train
    n_layer, n_head, n_embd = SHAPES[name]

    def attempt(micro):
        with torch.device(device):  # built on the GPU: gpt2-xl's 1.5B weights initialize there in a moment
            model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
        run = torch.compile(model) if compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
        x = torch.randint(0, 50257, (micro, T), device=device)
        y = torch.cat([x[:, 1:], torch.full((micro, 1), -1, device=device)], dim=1)
        w = train.loss_weights(y, "example", per_step, None)

        def step():
            for _ in range(per_step // micro):
                with cli.autocast(device, "bfloat16"):
                    logits, _ = run(x)
                    loss = train.weighted_loss(logits, y, w)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        first = cuda_time(step, device)  # warm-up (and compilation)
        best = min(cuda_time(step, device) for _ in range(steps))
        tokens_s = per_step * T / best
        return {"model": name, "compile": compile, "micro_batch": micro, "step_s": best, "first_step_s": first,
                "tokens_per_s": tokens_s, "mfu": 6 * model.num_params() * tokens_s / train.peak_flops(device),
                "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "params": model.num_params()}

    for micro in [m for m in (16, 8, 4, 2, 1) if m <= per_step]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            return attempt(micro)
        except torch.OutOfMemoryError:
            continue  # the attempt's tensors die with its frame; empty_cache returns them
    return {"model": name, "compile": compile, "error": "out of memory at micro-batch 1"}


@torch.no_grad()
def bench_decode(device, new_tokens=256):
    """Greedy decoding in bf16 autocast, ours vs HF generate on the same random gpt2 weights."""
    import cli
    ours, hf = gpt2_pair()
    ours, hf = ours.to(device), hf.to(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 8, 64):
        prompts = [torch.randint(0, 50257, (32,), generator=g).tolist() for _ in range(batch)]
        x = torch.tensor(prompts, device=device)
        with cli.autocast(device, "bfloat16"):
            ours_fn = lambda: ours.generate(prompts, new_tokens, greedy=True, eos=None)  # noqa: E731
            hf_fn = lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,  # noqa: E731
                                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
            compiled_fn = lambda: ours.generate(prompts, new_tokens, greedy=True, eos=None, compiled=True)  # noqa: E731
            eager_tokens, _ = ours_fn(), hf_fn()  # warm-up
            t_ours, t_hf = [min(cuda_time(f, device) for _ in range(2)) for f in (ours_fn, hf_fn)]
            row = {"batch": batch, "new_tokens": new_tokens, "ours_tok_s": batch * new_tokens / t_ours,
                   "hf_tok_s": batch * new_tokens / t_hf, "ratio": t_hf / t_ours}
            try:  # compiled apart: if it fails, the eager figures above still stand
                t0 = time.perf_counter()
                compiled_tokens = compiled_fn()  # compilation and CUDA-graph capture
                row["compiled_first_call_s"] = time.perf_counter() - t0
                t_compiled = min(cuda_time(compiled_fn, device) for _ in range(2))
                # the share of rows whose bf16 tokens match eager's (random weights have near-ties; fp32 is tested)
                same = sum(a == b for a, b in zip(compiled_tokens, eager_tokens)) / batch
                row.update(compiled_tok_s=batch * new_tokens / t_compiled, compiled_ratio_vs_hf=t_hf / t_compiled,
                           compiled_rows_same_as_eager=same)
            except Exception as e:
                row["compiled_error"] = f"{type(e).__name__}: {e}"[:2000]
        print(row, flush=True)
        rows.append(row)
    return rows


@torch.no_grad()
def bench_evaluation(device, n_prompts=50):
    """What evaluate.py costs with gpt2: generating to the end of the context (a model that never stops, the
    worst case) at batch 8, against the 512-token limit; and scoring the ranking's responses, batched."""
    import cli
    import scoring
    from rules import NO_RULES, RuleSet
    ours, _ = gpt2_pair()
    ours = ours.to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (int(n),), generator=g).tolist() for n in torch.randint(15, 60, (8,), generator=g)]
    out, n_pairs = {}, 16 if TINY else 400
    with cli.autocast(device, "bfloat16"):
        for limit in (32, 64) if TINY else (512, 1024):
            t = cuda_time(lambda: ours.generate(prompts, limit, greedy=True, eos=None), device)
            out[f"generate_batch8_to_{limit}_s"] = t
            out[f"generate_{n_prompts}_prompts_to_{limit}_s"] = t * n_prompts / 8
        # ranking: (prompt, response) pairs with Alpaca-like lengths, 400 measured, 6,000 extrapolated
        encoded = ranking_pairs(n_pairs, 400, g)
        for rule_set in (NO_RULES, RuleSet()):
            t = cuda_time(lambda: [scoring.score_batch(ours, [rule_set], encoded[i:i + 8], device, "bfloat16")
                                   for i in range(0, n_pairs, 8)], device)
            out[f"score_6000_pairs{'_rules' if rule_set.on else ''}_s"] = t * 6000 / n_pairs
    return out


@torch.no_grad()
def bench_scoring_gpu(device):
    """Item 1 and 3 of issue 23 on a GPU: scoring 400 ranking pairs (6,000 extrapolated) with no rules, all
    rules, and the five rule sets of --compare in one pass (rules.ForcedRules: the rules for every position in
    closed form), in bf16 autocast over float32 weights (what evaluate.py runs), in bf16 weights, and in
    float32; and how many of the ranking's comparisons (own response vs another's) bf16 turns the other way
    from float32 (random weights: every score is near the uniform one, so this is an upper bound)."""
    import scoring
    from rules import NO_RULES, RuleSet
    ours, _ = gpt2_pair()
    ours = ours.to(device)
    n_pairs = 16 if TINY else 400
    encoded = ranking_pairs(n_pairs, 400, torch.Generator().manual_seed(2))
    compare = [NO_RULES, RuleSet(), RuleSet(eos=False), RuleSet(diversity=False), RuleSet(uniform=False)]
    out = {"pairs": n_pairs}

    def score_all(sets, dtype):  # per batch of 8, per rule set, each response's (T,) log-probs
        return [scoring.score_batch(ours, sets, encoded[i:i + 8], device, dtype) for i in range(0, n_pairs, 8)]
    means = {}
    for label, weights, dtype in (("autocast_bf16", torch.float32, "bfloat16"), ("float32", torch.float32, "float32"),
                                  ("bf16_weights", torch.bfloat16, "float32")):
        ours.to(weights)
        for name, sets in (("no_rules", [NO_RULES]), ("rules", [RuleSet()]), ("compare_five", compare)):
            score_all(sets, dtype)  # warm-up
            t = cuda_time(lambda: score_all(sets, dtype), device)  # once after the warm-up: a GPU is lent for minutes
            out[f"{label}_{name}_6000_pairs_s"] = t * 6000 / n_pairs
        means[label] = [float(r.mean()) for batch in score_all([NO_RULES], dtype) for r in batch[0]]
        out[f"{label}_rules_ratio"] = out[f"{label}_rules_6000_pairs_s"] / out[f"{label}_no_rules_6000_pairs_s"]
    ours.float()
    half = n_pairs // 2  # comparisons: response i vs response i + half, as the ranking compares scores
    for label in ("autocast_bf16", "bf16_weights"):
        flips = sum((means[label][i] > means[label][i + half]) != (means["float32"][i] > means["float32"][i + half])
                    for i in range(half))
        out[f"{label}_comparisons_flipped_vs_float32"] = f"{flips}/{half}"
    return out


@torch.no_grad()
def bench_decode_precision(device, new_tokens=256):
    """Items 2 and 3: greedy decoding at batch 1 and 8 in float32, bf16 autocast over float32 weights, and bf16
    weights, eager, and at batch 1 compiled (each step one CUDA graph, graphstep.py), with no rules and with all
    three (their state updated inside the graph): tokens/s, and whether the tokens are float32 eager's."""
    import cli
    from rules import RuleSet, RuleState
    ours, _ = gpt2_pair()
    g = torch.Generator().manual_seed(3)
    rows = []
    for batch in (1, 8):
        prompts = [torch.randint(0, 50257, (32,), generator=g).tolist() for _ in range(batch)]
        reference = {}
        for label, weights, dtype in (("float32", torch.float32, "float32"), ("autocast_bf16", torch.float32,
                                      "bfloat16"), ("bf16_weights", torch.bfloat16, "float32")):
            model = ours.to(device=device, dtype=weights)
            for rules in (False, True):
                for compiled in (False, True) if batch == 1 else (False,):  # compiling costs ~10 s a graph
                    def run():
                        hook = RuleState(prompts, RuleSet(), device) if rules else None
                        with cli.autocast(device, dtype):
                            return model.generate(prompts, new_tokens, greedy=True, eos=None, hook=hook,
                                                  compiled=compiled)
                    tokens = run()  # warm-up, and compilation
                    t = min(cuda_time(run, device) for _ in range(2))
                    same = reference.setdefault(rules, tokens)  # float32 eager comes first
                    rows.append({"batch": batch, "precision": label, "rules": rules, "compiled": compiled,
                                 "tok_s": batch * new_tokens / t,
                                 "rows_same_as_float32_eager": sum(a == b for a, b in zip(tokens, same)) / batch})
                    print(rows[-1], flush=True)
    ours.float()
    return rows


@torch.no_grad()
def bench_refill(device):
    """Item 4: continuous batching against the old fixed chunks (each chunk of batch_size prompts runs until its
    longest answer ends), bf16 autocast as evaluate.py. Random weights never stop, so answers end at the
    context's end, as the official evaluation generates: prompts of mixed lengths give each its own room. The 50
    eval prompts with 24 to 1,000 prompt tokens (rooms 1,000 to 24), and 805 (AlpacaEval's count) with rooms of
    8 to 64 new tokens at the end of 960 to 1,016 prompt tokens' context."""
    import cli
    ours, _ = gpt2_pair()
    ours = ours.to(device)
    block = ours.config.block_size
    g = torch.Generator().manual_seed(4)
    out = []
    for n, lo, hi, batches in ((50, 24, 1000, (8,)), (805, block - 64, block - 8, (8, 32))):
        if TINY:
            n, lo, hi = min(n, 12), block - 24, block - 4
        lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        prompts = [torch.randint(0, 50256, (k,), generator=g).tolist() for k in lengths]
        for batch in batches:
            with cli.autocast(device, "bfloat16"):
                def chunks():
                    return [a for i in range(0, n, batch) for a in ours.generate(prompts[i:i + batch], block,
                                                                                 greedy=True, eos=None)]

                def refilled():
                    return ours.generate(prompts, block, greedy=True, eos=None, batch_size=batch)
                t_chunks = cuda_time(chunks, device)
                answers = []
                t_refill = cuda_time(lambda: answers.append(refilled()), device)
            tokens = sum(len(a) for a in answers[0])
            out.append({"prompts": n, "batch": batch, "new_tokens": tokens, "chunks_s": t_chunks,
                        "refilled_s": t_refill, "speedup": t_chunks / t_refill})
            print(out[-1], flush=True)
    return out


GPU_SECTIONS = ("scoring", "decode_precision", "refill", "decode", "evaluation", "train")  # bench_gpu's order


def bench_gpu(path=None, only=None):
    """Every GPU figure in one command. Each section is written to `path` as soon as it is measured, and a
    section that fails records its error and lets the rest run: a GPU is lent for minutes, and a run cut short
    must still bring back what it measured."""
    import traceback
    device, errors = "cuda", []
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()}
    print(report, flush=True)

    def section(key, measure, row=False):
        if only and key not in only:  # --only=a,b: those sections alone
            return
        t0 = time.perf_counter()
        try:
            result = measure()
        except Exception as e:  # recorded, not raised: the other sections still run
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"[:2000]}
            errors.append(key)
        if row:  # one row of a table
            report.setdefault(key, []).append(result)
        else:
            report[key] = result
        print(f"{key} ({time.perf_counter() - t0:.0f} s):", json.dumps(result, indent=1), flush=True)
        if path:
            with open(f"{path}.tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(f"{path}.tmp", path)

    # the figures issue 23 left unmeasured first, so that a run cut short still brings them back
    section("scoring", lambda: bench_scoring_gpu(device))
    section("decode_precision", lambda: bench_decode_precision(device, new_tokens=8 if TINY else 256))
    section("refill", lambda: bench_refill(device))
    section("decode", lambda: bench_decode(device, new_tokens=16 if TINY else 256))
    section("evaluation", lambda: bench_evaluation(device))
    runs = [("tiny", False), ("tiny", True)] if TINY else \
        [("gpt2", False), ("gpt2", True), ("gpt2-medium", False), ("gpt2-large", False), ("gpt2-xl", False)]
    for name, compile in runs:
        section("train", lambda: bench_train_step(name, device, compile=compile,
                                                  **({"T": 64, "per_step": 8} if TINY else {})), row=True)
    errors += [f"decode batch {row['batch']} compiled" for row in report.get("decode", []) if "compiled_error" in row] \
        if isinstance(report.get("decode"), list) else []
    if errors:  # measured what it could, but must not pass as a complete run
        sys.exit(f"error: the GPU bench failed in: {', '.join(errors)} (the report says why)")


CPU_BENCHES = {"generate": bench_generate, "train": bench_train, "rules": bench_rules}


def main(argv):
    global TINY
    TINY = "--tiny" in argv
    json_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--json=")), None)
    args = [a for a in argv if not a.startswith("--")]
    which = args[0] if args else "generate"
    if which == "gpu":
        only = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--only=")), None)
        unknown = [key for key in only or [] if key not in GPU_SECTIONS]
        if unknown:  # else the bench would measure nothing and pass
            sys.exit(f"error: --only={','.join(only)}: no section {unknown[0]!r}; the sections: "
                     f"{','.join(GPU_SECTIONS)}")
        return bench_gpu(*args[1:], only=only)
    if which not in (*CPU_BENCHES, "all"):
        sys.exit(f"error: unknown bench {which!r}: expected {', '.join(CPU_BENCHES)}, all or gpu")
    report = {name: bench() for name, bench in CPU_BENCHES.items() if which in (name, "all")}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
