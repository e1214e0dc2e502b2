"""
Answer instructions with GPT-2, a finetuned checkpoint, or GPT-2 times the rule-based LM (paper section 5).

    python sample.py --prompt="Give me a recipe for tiramisu."             # plain GPT-2
    python sample.py --rules --prompt="Give me a recipe for tiramisu."     # GPT-2 x the three rules
    python sample.py --init_from=out/response_tuning --prompt="..."        # a train.py run
    python sample.py --rules --instructions=val.jsonl --out=rules.json     # a file -> AlpacaEval JSON
    python sample.py --raw --prompt="The capital of France is"             # plain continuation, no chat format
    python sample.py --rules                                               # chat in a terminal

Only the response is printed to stdout (streamed when stdout is a terminal); everything else goes to stderr.
Decoding is greedy by default, as in the paper's evaluation; --greedy=False samples with --temperature,
--top_k and --top_p.
"""
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import chat
from model import GPT
from rules import RuleState, parse_rules
from train import DEVICE_FLAGS, autocast, parse_flags, pick_device, pick_dtype, use_threads

# ----------------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "init_from": ("gpt2", "gpt2 ... gpt2-xl, an HF directory, a .safetensors file, or a train.py out_dir"),
    "prompt": ("", "the instruction to answer (or, with --raw, the text to continue)"),
    "raw": (False, "continue --prompt as plain text, without the chat format"),
    "instructions": ("", "JSONL with an 'instruction' per line, or AlpacaEval's JSON list: answer them all"),
    "out": ("outputs.json", "with --instructions: where the AlpacaEval-format answers go"),
    "batch_size": (8, "with --instructions: prompts generated together"),
    "rules": ("none", "rules multiplied in: eos,diversity,uniform (a bare --rules = all), or none"),
    "eos_hold": (False, "keep the EOS bias at +15 after 250 tokens (the official code drops it to 0)"),
    "response_only": (False, "diversity rule on response tokens only (the official code includes the instruction)"),
    "what_bias": (-5.0, "uniform-rule bias on 'What' (GPT-2 id 2061; Listing 1 and the code: -5; Table 8: -3)"),
    "max_new_tokens": (1024, "stop after this many new tokens if <|endoftext|> has not come; the context (1,024 for "
                              "GPT-2) ends it too, so 1024 = until <|endoftext|>, as the official evaluation (limit 8,192)"),
    "greedy": (True, "argmax decoding, as in the paper's evaluation; False samples"),
    "temperature": (1.0, "sampling temperature (with --greedy=False)"),
    "top_k": (0, "sample only from the k most likely tokens; 0 = all"),
    "top_p": (1.0, "sample only from the smallest set of tokens with this much probability"),
    "seed": (1337, "random seed for sampling"),
    **DEVICE_FLAGS,  # --device, --dtype: as in train.py
}
# ---------------------------------------------------------------------------------------------------------


def respond(model, prompts, config, rules, device, dtype, stream=None):
    """New tokens for each prompt (lists of token ids), with the rules as a per-step hook when on."""
    hook = RuleState(prompts, rules, device) if rules else None
    generator = torch.Generator(device).manual_seed(config["seed"])
    callback = (lambda logprobs, tokens: stream(int(tokens[0]))) if stream else None
    with autocast(device, dtype):
        return model.generate(prompts, config["max_new_tokens"], greedy=config["greedy"],
                              temperature=config["temperature"], top_k=config["top_k"] or None, top_p=config["top_p"],
                              hook=hook, callback=callback, generator=generator)


class Printer:
    """Streams tokens as text: decodes everything so far and prints what is new, holding back a partial UTF-8
    character (a token can end in the middle of one)."""

    def __init__(self):
        self.tokens, self.shown = [], ""

    def __call__(self, token):
        self.tokens.append(token)
        text = chat.decode(self.tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def answer_file(model, config, rules, device, dtype):
    rows = chat.read_instructions(config["instructions"])
    generator = f"{Path(config['init_from']).name or config['init_from']}" + (f"+rules:{config['rules']}" if rules else "")
    outputs = []
    for i in tqdm(range(0, len(rows), config["batch_size"]), desc="generating", unit="batch", file=sys.stderr):
        batch = rows[i:i + config["batch_size"]]
        for row, out in zip(batch, respond(model, [chat.encode_prompt(r["instruction"]) for r in batch],
                                           config, rules, device, dtype)):
            outputs.append({"instruction": row["instruction"], "output": chat.decode(out).strip(),
                            "generator": generator, "dataset": row["dataset"]})
    out = Path(config["out"])
    chat.write_atomic(out, json.dumps(outputs, indent=2, ensure_ascii=False))
    print(f"wrote {len(outputs)} answers to {out} (AlpacaEval format, generator {generator!r})", file=sys.stderr)


def interactive(model, config, rules, device, dtype):
    """A chat in the terminal: the conversation so far is the prompt; /reset forgets it, Ctrl-D leaves."""
    print("chat with the model; /reset starts over, Ctrl-D quits", file=sys.stderr)
    messages = []
    while True:
        try:
            text = input("\nuser> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text.strip() == "/reset":
            messages = []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = chat.encode_prompt(messages)
        while len(prompt) > model.config.block_size // 2 and len(messages) > 1:  # forget the oldest turns
            messages = messages[2:]
            prompt = chat.encode_prompt(messages)
        sys.stdout.write("assistant> ")
        out = respond(model, [prompt], config, rules, device, dtype, stream=Printer())[0]
        messages.append({"role": "assistant", "content": chat.decode(out)})


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    rules = parse_rules(config["rules"], eos_hold=config["eos_hold"], response_only=config["response_only"],
                        what_bias=config["what_bias"])
    use_threads(config["threads"])
    device = pick_device(config["device"])
    dtype = pick_dtype(device, config["dtype"])
    if not (config["prompt"] or config["instructions"] or (sys.stdin.isatty() and sys.stdout.isatty())):
        raise ValueError('nothing to answer: give --prompt="..." or --instructions=FILE (or run in a terminal to chat)')
    if config["instructions"]:
        chat.read_instructions(config["instructions"])  # a bad file fails now, before a model download
    t0 = time.time()
    model = GPT.from_pretrained(config["init_from"]).to(device).eval()
    print(f"loaded {config['init_from']} ({model.num_params() / 1e6:.0f}M parameters) on {device} in {dtype} "
          f"in {time.time() - t0:.1f}s; rules: {config['rules']}", file=sys.stderr)
    if config["instructions"]:
        return answer_file(model, config, rules, device, dtype)
    if not config["prompt"]:
        return interactive(model, config, rules, device, dtype)
    prompt = chat.encode(config["prompt"]) if config["raw"] else chat.encode_prompt(config["prompt"])
    if sys.stdout.isatty():
        respond(model, [prompt], config, rules, device, dtype, stream=Printer())
        print()
    else:
        print(chat.decode(respond(model, [prompt], config, rules, device, dtype)[0]))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # bad flags, files or downloads: one line, no traceback
        sys.exit(f"error: {e}")
