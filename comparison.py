"""
The models a comparison measures and where they come from: a model spec (NAME, NAME+rules,
NAME+rules=eos,uniform), the rule models and their ablations, the paper's numbers for each, and the
finetuned runs behind the others, trained by train.py in a process of its own (a script never
imports another), found again by their settings, finished when stopped. evaluate.py --compare,
epochs.py and data/tinyworld/experiment.py share them.
"""
import hashlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from checkpoint import progress, unfinished
from cli import Stopped, read_toml
from rules import NO_RULES, parse_rules

ROOT = Path(__file__).resolve().parent
# official README: the models without the EOS rule generate at most 512 new tokens
NO_EOS_LIMIT = 512
# The paper's numbers (Llama-2-7B, Tables 1-2): AlpacaEval win rate against the instruction-tuned
# model, and response ranking (on Stanford Alpaca). Ours are other measurements of the same models,
# shown beside them.
PAPER = {"base": (2.4, 80.4), "base + rules": (24.4, None), "no EOS rule": (10.4, None),
         "no diversity rule": (14.3, None), "no uniform rule": (16.3, None),
         "instruction-tuned": (50.0, 77.4), "response-tuned": (43.3, None),
         "gsm8k-tuned": (23.7, None), "mbpp-tuned": (16.9, None), "recipes-tuned": (14.6, None),
         "chess-tuned": (2.1, None), "poetry-tuned": (22.9, None)}


def parse_model(spec):
    """'NAME', 'NAME+rules' or 'NAME+rules=eos,uniform' -> (NAME, RuleSet; NO_RULES without
    +rules)."""
    init_from, with_rules, rule_text = spec.partition("+rules")
    if not with_rules:
        return init_from, NO_RULES
    try:
        return init_from, parse_rules(rule_text.removeprefix("=") or "all")
    except ValueError as e:
        raise ValueError(f"--models: {spec}: {str(e).split(': ', 1)[1]}") from None


def rule_models(base, limit):
    """The base model, with all rules, and without each rule: [(label, spec, max_new_tokens)]. As
    the official README says, the models without the EOS rule (which rarely stop) generate at most
    512 new tokens."""
    return [("base", base, limit),
            ("base + rules", f"{base}+rules", limit),
            ("no EOS rule", f"{base}+rules=diversity,uniform", min(limit, NO_EOS_LIMIT)),
            ("no diversity rule", f"{base}+rules=eos,uniform", limit),
            ("no uniform rule", f"{base}+rules=eos,diversity", limit)]


def file_name(label):
    """A model's label as a file name: 'base + rules' -> 'base-+-rules'."""
    return re.sub(r"[^\w.+=,-]+", "_", label.replace(" ", "-"))


def check_finished(spec):
    """A model that is a train.py run must be a finished one: a half-trained model is not a
    result."""
    init_from, _ = parse_model(spec)
    why = None
    if Path(init_from).is_dir():
        why = unfinished(init_from)
    if why:
        raise ValueError(why)


# ----------------------------------------------------------------------------------- training runs

def run_train(args, config):
    """python train.py ARGS on --device with --threads, in a process of its own (run_script)."""
    device = [f"--device={config['device']}", f"--threads={config['threads']}"]
    run_script("train.py", [*args, *device], "training")


def run_script(script, args, what):
    """python SCRIPT ARGS in a process of its own (a script never imports another); fails loudly.
    Ctrl-C or SIGTERM here is passed on: train.py finishes its step, checkpoints and exits, and we
    wait for it (a second Ctrl-C stops it at once), so a stopped comparison can be resumed where
    its training stopped."""
    command = [sys.executable, str(ROOT / script), *args]
    child = subprocess.Popen(command)
    try:
        code = child.wait()
    except (KeyboardInterrupt, Stopped) as e:
        if isinstance(e, Stopped):
            child.send_signal(signal.SIGTERM)
        else:
            child.send_signal(signal.SIGINT)
        try:
            child.wait()
        except (KeyboardInterrupt, Stopped):
            child.kill()
            child.wait()
        raise
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        # the child was stopped at a step's end and checkpointed, by a signal that did not reach us
        # (sent to it alone, or to a thread of ours that never woke our wait): stop as if it had
        raise Stopped(code, "interrupted" if code == 128 + signal.SIGINT else "terminated")
    if code != 0:
        raise OSError(f"{what} failed: {' '.join(command)}")


def train_settings(args):
    """The settings (what defines a run) that train.py ARGS would train with, as train.py itself
    resolves them."""
    command = [sys.executable, str(ROOT / "train.py"), *args, "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        why = result.stderr.strip().splitlines()[-1].removeprefix("error: ")
        raise ValueError(f"--train_args: {why}")
    return json.loads(result.stdout)


def find_run(config, run, args):
    """Where a comparison takes the model that `train.py ARGS` trains: the directory the README's
    command puts it in (the config's own out_dir, e.g. out/response_tuning) if the run there has
    exactly the settings ARGS give (base, data, steps, learning rate, seed, loss, --train_args:
    train_settings); else --out_dir/runs/<base>_<run>_<a hash of ARGS>, trained there if missing,
    so that runs with other settings never stand in for each other. A run found is checked against
    the settings, so that one trained by another version of train.py (other defaults) is never
    taken either."""
    own = Path(read_toml(ROOT / "config" / f"{run}.toml").get("out_dir", ""))
    state = None
    if str(own) not in ("", "."):
        state = progress(own)
    wanted = None
    if state is not None:
        wanted = train_settings(args)
        if state["settings"] == wanted:
            return own
        keys = wanted.keys() | state["settings"].keys()
        differ = sorted(k for k in keys if state["settings"].get(k) != wanted.get(k))
        print(f"{own} holds a run with other settings ({', '.join(differ[:4])}): not used",
              file=sys.stderr)
    digest = hashlib.sha256(json.dumps([run, *args[1:]]).encode()).hexdigest()[:8]  # TOML by name
    out = Path(config["out_dir"]) / "runs" / f"{Path(config['base']).name}_{run}_{digest}"
    state = progress(out)
    if state is not None and state["settings"] != (wanted or train_settings(args)):
        command = " ".join(args[1:])
        raise ValueError(f"{out} holds a run with other settings than train.py {command} gives "
                         f"now (an older version's defaults?); move it away to train it anew")
    return out


def train_if_missing(label, args, out, config):
    """Train `train.py ARGS` into `out` if nothing is there, finish it if it was stopped (a run is
    never measured half-trained), keep it if it is done: the runs of evaluate.py --compare and of
    epochs.py."""
    if progress(out) is None and not (out / "ckpt.pt").exists():
        print(f"training {label} into {out}", file=sys.stderr)
        run_train([*args, f"--out_dir={out}"], config)
    elif why := unfinished(out):  # a stopped run is finished first, never measured half-trained
        print(f"resuming {out}: {why}", file=sys.stderr)
        run_train(["--init_from=resume", f"--out_dir={out}"], config)
    else:
        print(f"reusing {out} ({label}, finished)", file=sys.stderr)
