"""
Generate a response from GPT-2 (or a finetuned checkpoint) in the paper's chat format.

    python sample.py --prompt="Give me a recipe for tiramisu."
    python sample.py --init_from=gpt2-medium --prompt="Write a poem called Rain" --max_new_tokens=200
    python sample.py --raw --prompt="The capital of France is"

Only the response is printed to stdout; everything else goes to stderr. Decoding is greedy by default, as in
the paper's evaluation; --greedy=False samples with --temperature, --top_k and --top_p.
"""
import sys
import time

import torch

import chat
from model import GPT, autocast, pick_device, pick_dtype
from train import parse_flags

# ----------------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "init_from": ("gpt2", "gpt2 / gpt2-medium / gpt2-large / gpt2-xl, an HF directory or a .safetensors file"),
    "prompt": ("", "the instruction to answer (or, with --raw, the text to continue)"),
    "raw": (False, "continue --prompt as plain text, without the chat format"),
    "max_new_tokens": (256, "stop after this many tokens if <|endoftext|> has not come"),
    "greedy": (True, "argmax decoding, as in the paper's evaluation; False samples"),
    "temperature": (1.0, "sampling temperature (with --greedy=False)"),
    "top_k": (0, "sample only from the k most likely tokens; 0 = all"),
    "top_p": (1.0, "sample only from the smallest set of tokens with this much probability"),
    "seed": (1337, "random seed for sampling"),
    "device": ("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"),
    "dtype": ("auto", "auto (bfloat16 on CUDA if supported, else float16; float32 on CPU), or one of those"),
}
# ---------------------------------------------------------------------------------------------------------


def load_model(init_from, device):
    model = GPT.from_pretrained(init_from)
    return model.to(device).eval()


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    device = pick_device(config["device"])
    dtype = pick_dtype(device, config["dtype"])
    t0 = time.time()
    model = load_model(config["init_from"], device)
    print(f"loaded {config['init_from']} ({model.num_params() / 1e6:.0f}M parameters) on {device} in {dtype} "
          f"in {time.time() - t0:.1f}s", file=sys.stderr)
    if not config["prompt"]:
        raise ValueError("give an instruction with --prompt=\"...\"")
    prompt = chat.encode(config["prompt"]) if config["raw"] else chat.encode_prompt(config["prompt"])
    generator = torch.Generator(device).manual_seed(config["seed"])
    with autocast(device, dtype):
        out = model.generate([prompt], config["max_new_tokens"], greedy=config["greedy"],
                             temperature=config["temperature"], top_k=config["top_k"] or None,
                             top_p=config["top_p"], generator=generator)[0]
    print(chat.decode(out))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # bad flags, files or downloads: one line, no traceback
        sys.exit(f"error: {e}")
