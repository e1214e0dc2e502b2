"""
Answer instructions with GPT-2, a finetuned checkpoint, or GPT-2 times the rule-based LM (paper
section 5).

    python sample.py --prompt="Give me a recipe for tiramisu."            # plain GPT-2
    python sample.py --rules --prompt="Give me a recipe for tiramisu."    # GPT-2 x the 3 rules
    python sample.py --init_from=out/response_tuning --prompt="..."       # a train.py run
    python sample.py --rules --instructions=val.jsonl --out=rules.json    # -> AlpacaEval JSON
    python sample.py --raw --prompt="The capital of France is"  # plain text, no chat format
    python sample.py --rules                                              # chat in a terminal

Only the response is printed to stdout (streamed when stdout is a terminal); everything else goes
to stderr. Decoding is greedy by default, as in the paper's evaluation; --greedy=False samples with
--temperature, --top_k and --top_p.

With --instructions, --batch_size answers are generated together, and a row whose answer ends
takes the next instruction at once (continuous batching). Each answer is appended to
OUT.partial.jsonl as soon as it and every earlier one are done, so Ctrl-C (exit 130), SIGTERM (143)
or a crash loses at most the answers under way (and those that ended after them); the same command
again resumes from there. The AlpacaEval JSON list goes to OUT at the end and the partial
file is removed. A prompt that would leave the answer less than a quarter of the context (or
--max_new_tokens, if fewer) is cut from the left, keeping the question and the tags that ask for
the answer; the cuts are counted.
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

import chat
from cli import (DEVICE_FLAGS, DEVICE_RANGES, Stopped, check_ranges, for_inference, machine,
                 on_sigterm, parse_flags, refuse_overwriting)
from model import GPT
from rules import parse_rules, respond

# -------------------------------------------------------------------------------------- defaults
DEFAULTS = {
    "init_from": ("gpt2", "gpt2 ... gpt2-xl, an HF directory, a .safetensors file, or a train.py "
                          "out_dir"),
    "prompt": ("", "the instruction to answer (or, with --raw, the text to continue)"),
    "raw": (False, "continue --prompt as plain text, without the chat format"),
    "instructions": ("", "JSONL with an 'instruction' per line, or AlpacaEval's JSON list: answer "
                         "them all"),
    "out": ("outputs.json", "with --instructions: where the AlpacaEval-format answers go"),
    "batch_size": (8, "with --instructions: answers generated together (a row whose answer ends "
                      "takes the next instruction)"),
    "rules": ("none", "rules multiplied in: eos,diversity,uniform (a bare --rules = all), or "
                      "none"),
    "eos_hold": (False, "keep the EOS bias at +15 after 250 tokens (the official code drops it to "
                        "0)"),
    "response_only": (False, "diversity rule on response tokens only (the official code includes "
                             "the instruction)"),
    "fixed_tags": (False, "the rules keep the prompt's user and assistant tags (the official code "
                          "re-finds the last ones in the whole sequence: a turn the model opens "
                          "restarts them)"),
    "what_bias": (-5.0, "uniform-rule bias on 'What' (GPT-2 id 2061; Listing 1 and the code: -5; "
                        "Table 8: -3)"),
    "max_new_tokens": (1024, "stop after this many new tokens if <|endoftext|> has not come; the "
                             "context (1,024 for GPT-2) ends it too, so 1024 = until "
                             "<|endoftext|>, as the official evaluation (the context)"),
    "greedy": (True, "argmax decoding, as in the paper's evaluation; False samples"),
    "temperature": (1.0, "sampling temperature (with --greedy=False)"),
    "top_k": (0, "sample only from the k most likely tokens; 0 = all"),
    "top_p": (1.0, "sample only from the smallest set of tokens with this much probability"),
    "seed": (1337, "random seed for sampling"),
    "compile": (False, "decode with each step one compiled graph (a CUDA graph on a GPU; slow "
                       "to start, then faster; the same tokens; top-p on a GPU decodes eagerly)"),
    **DEVICE_FLAGS,  # --device, --dtype: as in train.py
}
# and temperature, when sampling (check_flags)
RANGES = {"top_k": "[0, inf)", "top_p": "(0, 1]", "max_new_tokens": "[1, inf)",
          "batch_size": "[1, inf)", "what_bias": "(-inf, inf)", "seed": "[0, 1e18]",
          **DEVICE_RANGES}
# -------------------------------------------------------------------------------------------------


# flags that change the answers: a resumed file must have been started with the same ones
ANSWER_FLAGS = ("init_from", "rules", "eos_hold", "response_only", "fixed_tags", "what_bias",
                "max_new_tokens", "greedy", "temperature", "top_k", "top_p", "seed")


def check_flags(config, argv):
    """Reject values that would fail deep inside generation, or silently do something else; each
    error names its flag. Returns the config with a bare --rules spelled 'all'."""
    # parse_flags reads a bare --flag as "True", which for a text flag is a wrong value
    for arg in argv:
        key = arg.removeprefix("--")
        if not arg.startswith("--") or key not in DEFAULTS or key == "rules":
            continue
        if isinstance(DEFAULTS[key][0], str):
            raise ValueError(f"{arg} needs a value: {arg}=...")
    check_ranges(config, RANGES)
    # NaN fails every comparison
    if not (config["greedy"] or 0 < config["temperature"] < math.inf):
        raise ValueError(f"--temperature={config['temperature']}: expected a number above 0 when "
                         f"sampling (--greedy=False)")
    # a bare --rules: say which rules, in the header and the generator name
    if config["rules"].lower() == "true":
        config = {**config, "rules": "all"}
    return config


def answer_room(block_size, max_new_tokens):
    """Tokens of the context kept free for an answer: a quarter of it, or max_new_tokens if
    fewer."""
    return min(max_new_tokens, block_size // 4)


def fit_prompt(prompt, block_size, max_new_tokens):
    """(prompt, cut): a prompt that leaves the answer less than answer_room tokens loses its start,
    so that what is kept is the end of the instruction, where the question and "<|assistant|>\\n"
    are. The user tag is put back in front: the model has only seen turns that open with it."""
    keep = block_size - answer_room(block_size, max_new_tokens)
    if len(prompt) <= keep:
        return prompt, False
    tag = chat.encode(chat.ROLES["user"])
    return tag + prompt[len(prompt) - (keep - len(tag)):], True


class Printer:
    """Streams tokens as text: decodes everything so far and prints what is new, holding back a
    partial UTF-8 character (a token can end in the middle of one)."""

    def __init__(self):
        self.tokens = []  # the answer so far
        self.shown = ""  # the text printed so far

    def __call__(self, token):
        self.tokens.append(token)
        text = chat.decode(self.tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


# ------------------------------------------------------------------------ --instructions: a file

def check_out(name, inputs):
    """--out must be a file we can write, or we would find out only after generating every answer;
    neither it nor its partial file may be an input (flag -> path): a rerun would then read our
    answers as its input."""
    out = Path(name)
    refuse_overwriting({"--out": out, "--out's partial file": partial_path(out)}, inputs)
    if out.is_dir():
        raise IsADirectoryError(f"--out={name}: a directory, not a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"--out={name}: {out.parent} is not a directory") from None
    except OSError as e:
        raise OSError(f"--out={name}: cannot create {out.parent} ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"--out={name}: not writable")
    return out


def partial_path(out):
    return out.with_name(out.name + ".partial.jsonl")


def read_partial(path, rows, settings):
    """The answers an earlier run with the same settings kept in `path`, checked against the
    instructions in order; [] if there is no such file. A line torn by a killed run is dropped (its
    answer is generated again)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = chat.json_lines(path, data[:data.rfind(b"\n") + 1])
    if not lines:
        return []
    where, header = lines[0]
    if not isinstance(header, dict) or not isinstance(header.get("settings"), dict):
        raise ValueError(f"{where}: not a partial answer file of sample.py "
                         f"(delete it to start over)")
    changed = [key for key in ANSWER_FLAGS if header["settings"].get(key) != settings[key]]
    if changed:
        key = changed[0]
        before = header["settings"].get(key)
        raise ValueError(f"{path}: started with --{key}={before}, now --{key}={settings[key]}; "
                         f"rerun with the same flags, or delete it to start over")
    answers = []
    for i, (where, answer) in enumerate(lines[1:]):
        if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
            raise ValueError(f"{where}: not an answer (delete the file to start over)")
        if i >= len(rows) or answer.get("instruction") != rows[i]["instruction"]:
            raise ValueError(f"{where}: answers another instruction than --instructions' item "
                             f"{i + 1} (delete the file to start over)")
        answers.append(answer)
    return answers


def generate_answers(model, rows, answers, file, *, config, rule_set, device, dtype, generator):
    """Answer rows[len(answers):], --batch_size rows decoding together, a row taking the next
    instruction as soon as its answer ends; each answer is appended to `answers` and to `file`
    (flushed) in the instructions' order, as soon as every earlier one is written too; `generator`
    names the model in each answer. Returns how many prompts were cut to fit the context."""
    first = len(answers)
    prompts = []
    cut = 0
    for row in rows[first:]:
        prompt, was_cut = fit_prompt(chat.encode_prompt(row["instruction"]),
                                     model.config.block_size, config["max_new_tokens"])
        prompts.append(prompt)
        cut += was_cut
    ended = {}  # answers that ended before an earlier one: written once it is
    bar = tqdm(total=len(rows), initial=first, desc="generating", unit="answer", file=sys.stderr)

    def answered(i, tokens):
        ended[first + i] = tokens
        while len(answers) in ended:
            row = rows[len(answers)]
            answers.append({"instruction": row["instruction"],
                            "output": chat.decode(ended.pop(len(answers))).strip(),
                            "generator": generator,
                            "dataset": row["dataset"]})
            file.write(json.dumps(answers[-1], ensure_ascii=False) + "\n")
        file.flush()
        bar.update(1)
    with bar:
        if prompts:
            respond(model, prompts, config, rule_set, device, dtype,
                    batch_size=config["batch_size"], answered=answered)
    return cut


def read_file_job(config):
    """(instructions, --out, answers kept by an interrupted run): everything that can be wrong with
    the files, found before a model download and hours of generation."""
    model = Path(config["init_from"])  # a file, or a directory whose files are the model
    inputs = {"--instructions": config["instructions"], "--init_from": model}
    for name in ("config.json", "model.safetensors"):
        inputs[f"--init_from's {name}"] = model / name
    rows = chat.read_instructions(config["instructions"])
    out = check_out(config["out"], inputs)
    settings = {key: config[key] for key in ANSWER_FLAGS}
    return rows, out, read_partial(partial_path(out), rows, settings)


def answer_file(model, rows, out, answers, *, config, rule_set, device, dtype):
    """Answer every instruction of `rows` into `out` (AlpacaEval's JSON list), after the `answers`
    an earlier run kept (read_file_job), resumably: see the docstring."""
    generator = Path(config["init_from"]).name or config["init_from"]
    if rule_set.on:
        generator += f"+rules:{config['rules']}"
    settings = {key: config[key] for key in ANSWER_FLAGS}
    partial = partial_path(out)
    if answers:
        print(f"resuming from {partial}: {len(answers)} of {len(rows)} instructions already "
              f"answered", file=sys.stderr)
    # rewritten whole, so that a torn last line is gone before we append
    chat.write_jsonl(partial, [{"settings": settings}] + answers)
    try:
        with open(partial, "a", encoding="utf-8") as file:
            cut = generate_answers(model, rows, answers, file, config=config, rule_set=rule_set,
                                   device=device, dtype=dtype, generator=generator)
    except (KeyboardInterrupt, Stopped) as e:
        if isinstance(e, Stopped):
            code, what = e.code, str(e)
        else:
            code, what = 128 + signal.SIGINT, "interrupted"
        raise Stopped(code, f"{what}: {len(answers)} of {len(rows)} answers kept in {partial}; "
                            f"run the same command again to resume") from None
    if cut:
        block = model.config.block_size
        keep = block - answer_room(block, config["max_new_tokens"])
        noun, verb = "instruction", "was"
        if cut > 1:
            noun, verb = "instructions", "were"
        print(f"{cut} {noun} too long for the {block}-token context {verb} cut from the left to "
              f"{keep} tokens", file=sys.stderr)
    chat.write_atomic(out, json.dumps(answers, indent=2, ensure_ascii=False))
    partial.unlink()
    print(f"wrote {len(answers)} answers to {out} (AlpacaEval format, generator {generator!r})",
          file=sys.stderr)


# ------------------------------------------------------------------------ a chat in the terminal

def interactive(model, config, rule_set, device, dtype):
    """A chat in the terminal: the conversation so far is the prompt; /reset forgets it, Ctrl-D
    leaves."""
    print("chat with the model; /reset starts over, Ctrl-C stops a reply, Ctrl-D quits",
          file=sys.stderr)
    messages = []
    while True:
        try:
            text = input("\nuser> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text.strip() == "/reset":
            messages = []
        elif text.strip():
            messages = chat_turn(model, messages, text, config=config, rule_set=rule_set,
                                 device=device, dtype=dtype)


def chat_turn(model, messages, text, *, config, rule_set, device, dtype):
    """The conversation with the user's `text` and the model's reply added. A message too long to
    leave room for a reply is refused (the conversation is returned unchanged). Ctrl-C during the
    reply stops it, and the part already shown stays in the conversation, so that the model
    remembers what the screen shows."""
    block = model.config.block_size
    limit = block - answer_room(block, config["max_new_tokens"])
    alone = len(chat.encode_prompt(text))
    if alone > limit:
        print(f"(message not sent: {alone} tokens with the chat tags, and this model's "
              f"{block}-token context holds {limit} before the reply; shorten it)",
              file=sys.stderr)
        return messages
    messages = messages + [{"role": "user", "content": text}]
    prompt = chat.encode_prompt(messages)
    while len(prompt) > block // 2 and len(messages) > 1:  # forget the oldest turns
        messages = messages[2:]
        prompt = chat.encode_prompt(messages)
    sys.stdout.write("assistant> ")
    printer = Printer()
    try:
        out = respond(model, [prompt], config, rule_set, device, dtype, stream=printer)[0]
    except KeyboardInterrupt:
        out = printer.tokens
        print("\n(reply stopped; the part shown stays in the conversation)", file=sys.stderr)
    return messages + [{"role": "assistant", "content": chat.decode(out)}]


# ------------------------------------------------------------------------------------------ main

def main(argv):
    config = check_flags(parse_flags(DEFAULTS, argv, __doc__), argv)
    rule_set = parse_rules(config["rules"], eos_hold=config["eos_hold"],
                           response_only=config["response_only"], fixed_tags=config["fixed_tags"],
                           what_bias=config["what_bias"])
    device, dtype = machine(config)
    in_terminal = sys.stdin.isatty() and sys.stdout.isatty()
    if not (config["prompt"] or config["instructions"] or in_terminal):
        raise ValueError('nothing to answer: give --prompt="..." or --instructions=FILE '
                         '(or run in a terminal to chat)')
    if config["instructions"]:  # the files are checked before the model loads
        rows, out, answers = read_file_job(config)
    t0 = time.time()
    model = for_inference(GPT.from_pretrained(config["init_from"]), device, dtype)
    print(f"loaded {config['init_from']} ({model.num_params() / 1e6:.0f}M parameters) on {device} "
          f"in {dtype} in {time.time() - t0:.1f}s; rules: {config['rules']}", file=sys.stderr)
    if config["instructions"]:
        return answer_file(model, rows, out, answers, config=config, rule_set=rule_set,
                           device=device, dtype=dtype)
    if not config["prompt"]:
        return interactive(model, config, rule_set, device, dtype)
    if config["raw"]:
        prompt = chat.encode(config["prompt"])
    else:
        prompt = chat.encode_prompt(config["prompt"])
    if sys.stdout.isatty():
        respond(model, [prompt], config, rule_set, device, dtype, stream=Printer())
        print()
    else:
        print(chat.decode(respond(model, [prompt], config, rule_set, device, dtype)[0]))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_sigterm)  # here, not on import: tests import this file
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # bad flags, files or downloads: one line, no traceback
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C outside answer_file and chat replies: nothing to keep
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(e.code)
