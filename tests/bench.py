"""
Speed against HF transformers, measured in one run on the same machine and reported as ratios.

    python tests/bench.py generate      # greedy decode, gpt2 shape, random weights, CPU fp32
    python tests/bench.py train         # one optimizer step (forward + backward + AdamW), gpt2 shape, CPU fp32
    python tests/bench.py rules         # greedy decode of 1,000 tokens with all rules vs none; the rules' step cost
    python tests/bench.py gpu [OUT.json] # on a CUDA GPU: train steps gpt2..gpt2-xl, decoding, the evaluation's cost

Not a test: numbers depend on the machine, so nothing here asserts a time. Needs the test requirements.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import GPT, GPTConfig  # noqa: E402


def gpt2_pair(seed=0):
    """Our GPT and HF's GPT2LMHeadModel with the same random weights in the gpt2 (124M) shape."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(initializer_range=0.1)).eval()
    ours = GPT(GPTConfig()).eval()
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
    times = [[timed(fn) for fn in fns] for _ in range(rounds)]
    return [min(column) for column in zip(*times)]


@torch.no_grad()
def bench_generate(new_tokens=64):
    ours, hf = gpt2_pair()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (1, 32), generator=g)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in (5, 12, 20, 32, 40, 48, 60, 64)]
    ours_1, hf_1, ours_8 = interleaved([
        lambda: ours.generate([prompt[0].tolist()], new_tokens, greedy=True, eos=None),
        lambda: hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=50256),
        lambda: ours.generate(prompts, new_tokens, greedy=True, eos=None),
    ])
    print(f"greedy decode, gpt2 shape, CPU fp32, {torch.get_num_threads()} threads, 32-token prompt, "
          f"{new_tokens} new tokens, best of 5 interleaved")
    print(f"  batch 1:  ours {new_tokens / ours_1:6.1f} tok/s   HF generate {new_tokens / hf_1:6.1f} tok/s   "
          f"ratio ours/HF {hf_1 / ours_1:.2f}x")
    print(f"  batch 8 (prompts of 5..64 tokens): ours {8 * new_tokens / ours_8:6.1f} tok/s = "
          f"{ours_1 * 8 / ours_8:.1f}x batch 1")


def bench_train(batch=4, T=256):
    ours, hf = gpt2_pair()
    ours.train(), hf.train()
    hf.config.attn_pdrop = hf.config.resid_pdrop = hf.config.embd_pdrop = 0.0  # ours trains with dropout 0 too
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randint(0, 50257, (batch, T), generator=torch.Generator().manual_seed(0))
    targets = torch.cat([x[:, 1:], torch.full((batch, 1), -1)], dim=1)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, weight_decay=0.0)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)

    def step_ours():
        ours(x, targets)[1].backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(x, labels=x).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
    t_ours, t_hf = interleaved([step_ours, step_hf], rounds=3)
    print(f"train step (forward + backward + AdamW), gpt2 shape, CPU fp32, batch {batch} x {T} tokens, "
          f"{torch.get_num_threads()} threads, best of 3 interleaved")
    print(f"  ours {t_ours:.2f} s   HF {t_hf:.2f} s   time ratio ours/HF {t_ours / t_hf:.2f}")


@torch.no_grad()
def bench_rules(new_tokens=1000):
    from rules import RuleState, RuleSet
    ours, _ = gpt2_pair()
    prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    none, ruled = interleaved([
        lambda: ours.generate([prompt], new_tokens, greedy=True, eos=None),
        lambda: ours.generate([prompt], new_tokens, greedy=True, eos=None, hook=RuleState([prompt], RuleSet())),
    ], rounds=2)
    print(f"greedy decode of {new_tokens} tokens, gpt2 shape, CPU fp32, best of 2 interleaved")
    print(f"  no rules {1000 * none / new_tokens:.1f} ms/token   all rules {1000 * ruled / new_tokens:.1f} ms/token   "
          f"ratio {ruled / none:.3f}x")
    # the rules' own cost per step, after 100 and after 1,000 tokens: a seen-mask and a counter, never a rescan
    for n in (100, 1000):
        state, generated = RuleState([prompt], RuleSet()), torch.randint(0, 50257, (1, n))
        for t in range(1, n + 1):
            state.update(generated[0, t - 1:t])
        state.steps = n
        logprobs = torch.zeros(1, 50257)
        t = timed(lambda: [state(logprobs, generated) for _ in range(200)]) / 200
        print(f"  rules' step after {n:>4} tokens: {1e6 * t:.0f} us")


# ------------------------------------------------------------------------------------------------ on a GPU

SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


def cuda_time(fn, device):
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_train_step(name, device, T=1024, per_step=64, compile=False, steps=3):
    """One optimizer step of 64 sequences of T tokens as train.py takes it (bf16 autocast, fused AdamW, the
    example-weighted loss), with the largest micro-batch that fits: tokens/s, MFU (6N flops a token, as
    train.py reports it), peak memory."""
    import cli
    import train
    n_layer, n_head, n_embd = SHAPES[name]

    def attempt(micro):
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).to(device)
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

    for micro in (16, 8, 4, 2, 1):
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
            t_ours, t_hf = [min(cuda_time(f, device) for _ in range(3)) for f in (ours_fn, hf_fn)]
        rows.append({"batch": batch, "new_tokens": new_tokens, "ours_tok_s": batch * new_tokens / t_ours,
                     "hf_tok_s": batch * new_tokens / t_hf, "ratio": t_hf / t_ours})
    return rows


@torch.no_grad()
def bench_evaluation(device, n_prompts=50):
    """What evaluate.py costs with gpt2: generating to the end of the context (a model that never stops, the
    worst case) at batch 8, against the 512-token limit; and scoring the ranking's responses, batched."""
    import cli
    import evaluate
    from rules import NO_RULES, RuleSet
    ours, _ = gpt2_pair()
    ours = ours.to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (int(n),), generator=g).tolist() for n in torch.randint(15, 60, (8,), generator=g)]
    out = {}
    with cli.autocast(device, "bfloat16"):
        for limit in (512, 1024):
            t = cuda_time(lambda: ours.generate(prompts, limit, greedy=True, eos=None), device)
            out[f"generate_batch8_to_{limit}_s"] = t
            out[f"generate_{n_prompts}_prompts_to_{limit}_s"] = t * n_prompts / 8
        # ranking: (prompt, response) pairs with Alpaca-like lengths, 400 measured, 6,000 extrapolated
        encoded = []
        for _ in range(400):
            p, r = int(torch.randint(20, 80, (1,), generator=g)), int(torch.randint(10, 400, (1,), generator=g))
            ids = torch.randint(0, 50256, (p + r,), generator=g).tolist() + [50256]
            encoded.append((ids, p))
        encoded.sort(key=lambda e: len(e[0]))
        for rule_set in (NO_RULES, RuleSet()):
            t = cuda_time(lambda: [evaluate.score_batch(ours, rule_set, encoded[i:i + 8], device, "bfloat16")
                                   for i in range(0, 400, 8)], device)
            out[f"score_6000_pairs{'_rules' if rule_set.on else ''}_s"] = t * 6000 / 400
    return out


def bench_gpu(path=None):
    import json
    import subprocess
    device = "cuda"
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()}
    print(report, flush=True)
    report["train"] = []
    for name, compile in (("gpt2", False), ("gpt2", True), ("gpt2-medium", False), ("gpt2-large", False), ("gpt2-xl", False)):
        row = bench_train_step(name, device, compile=compile)
        print(row, flush=True)
        report["train"].append(row)
    report["decode"] = bench_decode(device)
    print(report["decode"], flush=True)
    report["evaluation"] = bench_evaluation(device)
    print(report["evaluation"], flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "generate"
    {"generate": bench_generate, "train": bench_train, "rules": bench_rules, "gpu": bench_gpu}[which](*sys.argv[2:])
