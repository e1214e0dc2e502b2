"""
Speed against HF transformers, measured in one run on the same machine and reported as ratios.

    python tests/bench.py generate      # greedy decode, gpt2 shape, random weights, CPU fp32
    python tests/bench.py train         # one optimizer step (forward + backward + AdamW), gpt2 shape, CPU fp32
    python tests/bench.py rules         # greedy decode of 1,000 tokens with all rules vs none; the rules' step cost

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
    from model import load_hf_state_dict
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
    from rules import RuleState, Rules
    ours, _ = gpt2_pair()
    prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    none, ruled = interleaved([
        lambda: ours.generate([prompt], new_tokens, greedy=True, eos=None),
        lambda: ours.generate([prompt], new_tokens, greedy=True, eos=None, hook=RuleState([prompt], Rules())),
    ], rounds=2)
    print(f"greedy decode of {new_tokens} tokens, gpt2 shape, CPU fp32, best of 2 interleaved")
    print(f"  no rules {1000 * none / new_tokens:.1f} ms/token   all rules {1000 * ruled / new_tokens:.1f} ms/token   "
          f"ratio {ruled / none:.3f}x")
    # the rules' own cost per step, after 100 and after 1,000 tokens: a seen-mask and a counter, never a rescan
    for n in (100, 1000):
        state, generated = RuleState([prompt], Rules()), torch.randint(0, 50257, (1, n))
        for t in range(1, n + 1):
            state.update(generated[0, t - 1:t])
        state.steps = n
        logprobs = torch.zeros(1, 50257)
        t = timed(lambda: [state(logprobs, generated) for _ in range(200)]) / 200
        print(f"  rules' step after {n:>4} tokens: {1e6 * t:.0f} us")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "generate"
    {"generate": bench_generate, "train": bench_train, "rules": bench_rules}[which]()
