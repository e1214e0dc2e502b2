"""
Finetune GPT-2 in the paper's chat format, with the loss on assistant tokens only.

    python train.py                                   # the default run: response-tune gpt2 on Dolly
    python train.py config/instruction_tuning.toml    # the baseline: LIMA, instructions and responses
    python train.py config/response_tuning.toml       # LIMA responses with empty instructions (paper section 3)
    python train.py config/poetry.toml                # single-task finetuning on poems (paper section 4)
    python train.py config/gsm8k.toml                 # ... and the other four: mbpp, recipes, chess
    python train.py config/smoke.toml                 # a tiny model on data/sample: runs on a CPU, no download
    python train.py config/poetry.toml --init_from=gpt2-medium --batch_size=4 --gradient_accumulation_steps=16
    torchrun --standalone --nproc_per_node=4 train.py config/instruction_tuning.toml
    python train.py --init_from=resume --out_dir=out/dolly_responses   # continue a stopped run (Ctrl-C stops one)

A TOML file sets any of the flags below; flags after it override it. The out_dir ends up holding ckpt.pt (to
resume), config.json + model.safetensors (HF format: sample.py, transformers and GPT.from_pretrained load it),
progress.json (how far the run got), log.jsonl and loss.png. A run is never lost to a mistake: every flag, the
data and the model are checked before anything is written, --overwrite replaces the old run only at the new
run's first checkpoint, and a checkpoint whose weights or validation loss are not finite is never written.
"""
import fcntl
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
from checkpoint import (holds_run, load_checkpoint, marks_agree, non_finite, progress, put_back, save_run,
                        set_aside, settle)
from cli import (DEVICE_FLAGS, DEVICE_RANGES, autocast, check_ranges, given_keys, parse_flags, pick_device,
                 pick_dtype, pyplot, use_threads)
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------- defaults
# The default run is response tuning of gpt2 on Dolly (open, ungated). Hyperparameters follow the paper
# (AdamW, no weight decay, linear warmup then linear decay as in open-instruct, 64 sequences per step)
# adapted to GPT-2: lr 5e-5 instead of the 7B model's 1e-5, since small models need larger steps.
DEFAULTS = {
    "init_from": ("gpt2", "gpt2 ... gpt2-xl, an HF directory or .safetensors file, 'scratch', or 'resume'"),
    "data": ("dolly_responses", "a JSONL file of conversations ({'messages'}) or of documents to pretrain on "
                                "({'text'}), or a prepared name: lima, lima_responses, dolly, dolly_responses, "
                                "gsm8k, mbpp, poetry, recipes, chess, sample, tinyworld_pretrain, tinyworld, ..."),
    "val_data": ("", "messages JSONL for the eval loss (default: the prepared data's val split)"),
    "out_dir": ("", "where checkpoints and logs go (default: out/<data name>)"),
    "overwrite": (False, "start over in an out_dir that already holds a run (default: refuse; see --init_from=resume)"),
    "epochs": (1.0, "passes over the data (1 epoch of Dolly = the step count of 15 LIMA epochs)"),
    "max_iters": (0, "optimizer steps; 0 = as many as `epochs` takes"),
    "batch_size": (8, "sequences per micro-batch per process"),
    "gradient_accumulation_steps": (8, "micro-batches per step: 8 x 8 = the paper's 64 sequences per step"),
    "loss": ("example", "example: every sequence's mean token loss weighs the same in a step (the official "
                        "open-instruct reduce_loss=mean, one sequence per micro-batch); token: every trained token does"),
    "learning_rate": (5e-5, "peak learning rate"),
    "warmup_ratio": (0.03, "share of steps spent warming up linearly (open-instruct's default)"),
    "weight_decay": (0.0, "the paper uses none"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 = off"),
    "block_size": (1024, "tokens per example; longer ones are truncated (and counted)"),
    "dropout": (0.0, "dropout in the model while training"),
    "eval_interval": (50, "evaluate, checkpoint and export every this many steps (and at the end)"),
    "preview": (3, "print the answers to this many of PREVIEW_INSTRUCTIONS before and after training"),
    **DEVICE_FLAGS,
    "compile": (False, "torch.compile the model (faster on GPUs, slow to start)"),
    "seed": (1337, "seeds the data order, initialization and dropout"),
    "n_layer": (12, "with init_from=scratch: layers"),
    "n_head": (12, "with init_from=scratch: heads"),
    "n_embd": (768, "with init_from=scratch: width"),
    "vocab": ("", "with init_from=scratch: a JSON list of the GPT-2 ids the model knows (TinyWorld's "
                  "data/tinyworld/vocab.json); empty = all 50,257"),
    "print_config": (False, "print the run's settings (the flags that define what it learns) as JSON and exit; "
                            "nothing is read or written"),
}
RANGES = {"epochs": "[0, inf)", "max_iters": "[0, inf)", "batch_size": "[1, inf)",
          "gradient_accumulation_steps": "[1, inf)", "learning_rate": "[0, inf)", "warmup_ratio": "[0, 1]",
          "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "block_size": "[1, inf)", "dropout": "[0, 1)",
          "eval_interval": "[1, inf)", "preview": "[0, inf)", "seed": "[0, 1e18]", "n_layer": "[1, inf)",
          "n_head": "[1, inf)", "n_embd": "[1, inf)", **DEVICE_RANGES}
DEFAULTS_VALUES = {key: value for key, (value, _) in DEFAULTS.items()}
RESUMABLE = {"init_from", "out_dir", "max_iters", "epochs", "eval_interval", "preview", "compile", "overwrite",
             *DEVICE_FLAGS}  # what --init_from=resume may change; any other flag must match the run's own
HOW_RUN = {"out_dir", "overwrite", "eval_interval", "preview", "compile", "print_config",
           *DEVICE_FLAGS}  # where and how a run goes, not what it learns: not among its settings
PREVIEW_INSTRUCTIONS = ["Give me a recipe for tiramisu.",  # held-out instructions for the before/after printout
                        "Write a short poem about the ocean.",
                        "What are three tips for staying focused while studying?"]
# ---------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------- data

def read_examples(path, block_size):
    """(examples, truncated) from a JSONL file: conversations (loss on the responses) or documents (pretraining:
    loss on every token)."""
    if chat.jsonl_kind(path) == "text":
        return pack(chat.read_documents(path), block_size), 0
    return tokenize(chat.read_conversations(path), block_size)


def pack(documents, block_size):
    """Pretraining examples: the documents' tokens, each document followed by <|endoftext|>, as one stream cut
    into windows of block_size tokens (nanoGPT's packing; a window may span documents, so the model learns
    that a new text starts after <|endoftext|>). Every position is trained; the last partial window is dropped."""
    stream = []
    for text in tqdm(documents, desc="tokenizing", unit="doc", leave=False, file=sys.stderr):
        stream += chat.encode(text) + [chat.EOT]
    n = (len(stream) - 1) // block_size
    if n == 0:
        raise ValueError(f"{len(stream)} tokens of documents: fewer than one window of block_size={block_size}")
    return [(stream[k * block_size:(k + 1) * block_size], stream[k * block_size + 1:(k + 1) * block_size + 1])
            for k in range(n)]


def tokenize(conversations, block_size):
    """(ids, targets) per conversation, cut to block_size tokens; targets are -1 where no loss is taken."""
    examples, truncated = [], 0
    for messages in conversations:
        ids, mask = chat.encode_chat(messages)
        truncated += len(ids) > block_size
        ids, mask = ids[:block_size], mask[:block_size]
        targets = chat.targets_from_mask(ids, mask)
        if any(t != -1 for t in targets):  # a response that starts beyond block_size leaves nothing to learn
            examples.append((ids, targets))
    return examples, truncated


def collate(examples, device, block_size):
    """Right-pad a micro-batch to its longest example, rounded up to a multiple of 64 (fewer distinct shapes for
    torch.compile, tensor-core friendly). Right padding needs no attention mask: real tokens never look
    ahead, and padded targets are -1, outside the loss."""
    T = min(-(-max(len(ids) for ids, _ in examples) // 64) * 64, block_size)
    x = torch.zeros((len(examples), T), dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (ids, targets) in enumerate(examples):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(targets)] = torch.tensor(targets)
    return x.to(device), y.to(device)


def step_indices(n, step, config, world):
    """The indices (into n examples) of optimizer step `step`, in the data order. All processes walk one global
    order (a fresh seeded permutation each epoch); step s takes the next batch_size * accumulation * world
    examples, so the data position is the step itself."""
    per_step = config["batch_size"] * config["gradient_accumulation_steps"] * world
    orders, indices = {}, []  # epoch -> its permutation, drawn once (a step spans at most a few epochs)
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(config["seed"] + epoch)).tolist()
        indices.append(orders[epoch][i])
    return indices


def micro_batches(examples, step, config, rank, world):
    """The micro-batches of optimizer step `step` for this process: the step's examples (step_indices) sorted by
    length and cut into micro-batches of similar lengths. Each is padded only to its longest example, and with
    LIMA's long-tailed lengths padding falls from 39% to 7% of the tokens (micro-batches of 4; tests/bench.py
    train). The step's loss is the same however its examples are grouped (loss_weights); the grouping only saves
    compute. Process r takes micro-batches r, r + world, ... (similar lengths on every process), so 2 processes
    see the micro-batches 1 process sees with twice the accumulation."""
    B, A = config["batch_size"], config["gradient_accumulation_steps"]
    indices = step_indices(len(examples), step, config, world)
    indices.sort(key=lambda i: len(examples[i][0]))  # by token count; stable, so ties keep the data order
    batches = [[examples[i] for i in indices[m * B:(m + 1) * B]] for m in range(A * world)]
    return batches[rank::world]


def loss_weights(y, mode, n_examples, n_tokens):
    """The weight of each target of a micro-batch y (B, T) in its step's loss, which is sum(weight * token loss)
    over all the step's micro-batches and processes, so that the weights of a step sum to 1 however it is split.
    example (the official default: open-instruct's finetune.py with reduce_loss=mean and one sequence per
    micro-batch averages each sequence's mean loss over the 64 of a step): 1 / (n_examples * tokens of its
    sequence). token: 1 / n_tokens, every trained token of the step alike (long responses weigh more)."""
    trained = (y != -1).float()  # (B, T)
    if mode == "token":
        return trained / n_tokens
    if mode == "example":  # every sequence has a trained token: tokenize() drops those without
        return trained / (trained.sum(1, keepdim=True) * n_examples)
    raise ValueError(f"loss mode {mode!r}: expected example or token")


def weighted_loss(logits, y, weights):
    # logits (B, T, V), y and weights (B, T) -> the micro-batch's share of its step's loss
    token_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none")
    return (token_loss * weights.flatten()).sum()


def vocabulary(path):
    """GPTConfig fields for --vocab: {} for GPT-2's whole vocabulary, else a restricted one read from a JSON list."""
    if not path:
        return {}
    if not Path(path).exists() and (ROOT / path).exists():  # a config's repository-relative path, run from elsewhere
        path = ROOT / path
    path, data = chat.read_bytes(path)
    try:
        ids = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--vocab={path}: not valid JSON ({e})") from None
    if not (isinstance(ids, list) and ids and all(type(i) is int and 0 <= i <= chat.EOT for i in ids)):
        raise ValueError(f"--vocab={path}: expected a JSON list of GPT-2 token ids (0 to {chat.EOT})")
    ids = sorted(set(ids))
    return {"token_ids": tuple(ids), "vocab_size": len(ids)}


def get_lr(step, max_iters, config):
    """Linear warmup to learning_rate, then linear decay to 0 at max_iters (open-instruct's schedule)."""
    warmup = math.ceil(config["warmup_ratio"] * max_iters)
    if step < warmup:
        return config["learning_rate"] * (step + 1) / warmup
    return config["learning_rate"] * max(0.0, (max_iters - step) / max(1, max_iters - warmup))


# ------------------------------------------------------------------------------------ evaluation and output

@torch.no_grad()
def val_loss(model, examples, config, device, dtype):
    """The validation loss, weighted as training weighs it (--loss): the mean over sequences of each one's mean
    token loss, or the mean over all tokens."""
    model.eval()
    n_tokens = sum(t != -1 for _, targets in examples for t in targets)
    total = 0.0
    for i in range(0, len(examples), config["batch_size"]):
        x, y = collate(examples[i:i + config["batch_size"]], device, config["block_size"])
        y = model.vocab.rows(y)
        with autocast(device, dtype):
            logits, _ = model(x)
        total += weighted_loss(logits, y, loss_weights(y, config["loss"], len(examples), n_tokens)).item()
    model.train()
    return total


def preview_answers(model, title, n, device, dtype):
    """Print the model's greedy answers to the first n PREVIEW_INSTRUCTIONS: what finetuning changed, at a glance."""
    prompts = [chat.encode_prompt(q) for q in PREVIEW_INSTRUCTIONS[:n]]
    if n <= 0 or model.vocab.unknown([t for p in prompts for t in p]):  # a restricted vocabulary cannot read them
        return
    print(f"\n=== {title} ===")
    model.eval()
    with autocast(device, dtype):
        outs = model.generate(prompts, 128, greedy=True)
    model.train()
    for q, out in zip(PREVIEW_INSTRUCTIONS[:n], outs):
        print(f"<|user|> {q}\n<|assistant|> {chat.decode(out).strip()}{'' if out[-1:] == [chat.EOT] else ' [...]'}\n")


# ------------------------------------------------------------------------------------ the run directory

def take_lock(out_dir):
    """One train.py per out_dir: an exclusive flock on out_dir/train.lock, or a one-line refusal if a live process
    holds it. The kernel takes the lock in one step and releases it when its process ends, however it ends, so two
    processes can never both hold it and a killed run leaves no lock to clean up. The pid in the file only names
    the holder in the refusal. Returns the open lock file (release_lock closes it)."""
    path = Path(out_dir) / "train.lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise OSError(f"{out_dir} is in use: train.py (pid {holder}) is training into it; wait for it, "
                          f"or stop it") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break  # locked the file that is there now, not one its last holder removed as we opened it
        f.close()
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
    except OSError:  # a full disk: the lock holds without the pid
        pass
    return f


def release_lock(lock):
    Path(lock.name).unlink(missing_ok=True)  # before the lock goes: a newcomer then opens a new file
    lock.close()


def plot_losses(log, path):
    plt = pyplot("loss.png; the numbers are in log.jsonl")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    ax.plot(*zip(*train), label="train (assistant tokens)", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss per token (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}  # dense bf16


def peak_flops(device):
    """The GPU's dense bf16 flops per second, for model flops utilization (MFU); None if unknown."""
    if not device.startswith("cuda"):
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)


# --------------------------------------------------------------------------------------------------- main

def check_flags(config):
    """The flags whose values make no run: one line each, before anything is loaded."""
    check_ranges(config, RANGES)
    if config["loss"] not in ("example", "token"):
        raise ValueError(f"--loss={config['loss']}: expected example or token")
    if config["max_iters"] == 0 and config["epochs"] == 0:
        raise ValueError(f"--max_iters={config['max_iters']}, --epochs={config['epochs']}: expected max_iters > 0, "
                         "or max_iters = 0 and epochs > 0")
    if config["init_from"] == "scratch" and config["n_embd"] % config["n_head"]:
        raise ValueError(f"--n_head={config['n_head']} does not divide --n_embd={config['n_embd']} (each head gets "
                         f"n_embd / n_head dimensions)")


def settings(config, origin):
    """What defines a run, what it learns: every flag but where and how it runs (HOW_RUN), with init_from the
    model it started from. progress.json keeps them; evaluate.py --compare reuses a run only if they match."""
    return {**{key: value for key, value in config.items() if key not in HOW_RUN}, "init_from": origin}


def resumed_config(config, ckpt, given, out_dir):
    """The run's own configuration from its checkpoint, with the flags a resumed run may change (RESUMABLE:
    extend it with --max_iters or --epochs, move it to another device, ...). Any other flag given on the command
    line or in a TOML file must equal the run's own: one line otherwise, never silently ignored."""
    run = {**DEFAULTS_VALUES, **ckpt["config"]}
    run.setdefault("loss", "token")  # checkpoints from before --loss existed weighed tokens
    for key in sorted(given - RESUMABLE):
        if config[key] != run[key]:
            raise ValueError(f"--{key}={config[key]}: {out_dir} was trained with {key}={run[key]!r}, and a resumed "
                             f"run keeps it; start a new run in another --out_dir to change it")
    return {**run, **{key: config[key] for key in given & RESUMABLE}, "init_from": "resume"}


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_flags(config)
    if config["print_config"]:
        print(json.dumps(settings(config, config["init_from"]), sort_keys=True))
        return 0
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_threads(config["threads"])
    device = pick_device(config["device"])
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    master = rank == 0
    dtype = pick_dtype(device, config["dtype"])
    resume = config["init_from"] == "resume"
    if not config["out_dir"]:
        if resume:
            raise ValueError("--init_from=resume needs --out_dir of the run to continue")
        config["out_dir"] = str(Path("out") / Path(config["data"]).stem)
    out_dir = Path(config["out_dir"])
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
    lock = None
    try:
        if master:  # the lock first: nothing in out_dir is read or changed by two processes at once
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = take_lock(out_dir)
            settle(out_dir)
        if ddp:
            torch.distributed.barrier()
        return begin(config, argv, out_dir, device, dtype, ddp, rank, world)
    except BaseException:
        if master:  # a run that ends before its first checkpoint leaves the run it was to replace as it was
            put_back(out_dir)
        raise
    finally:
        if lock is not None:
            release_lock(lock)
        for d in created if master else []:  # refused before it wrote anything: nothing left behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


def begin(config, argv, out_dir, device, dtype, ddp, rank, world):
    """The out_dir's run, checked: a resumed run takes its configuration from its checkpoint; a new run may not
    replace one without --overwrite."""
    ckpt = None
    if config["init_from"] == "resume":
        if not (out_dir / "ckpt.pt").is_file():
            raise FileNotFoundError(f"{out_dir / 'ckpt.pt'}: no checkpoint to resume")
        ckpt = load_checkpoint(out_dir / "ckpt.pt")
        config = resumed_config(config, ckpt, given_keys(argv), out_dir)
    elif rank == 0 and holds_run(out_dir) and not config["overwrite"]:
        state = progress(out_dir)
        what = f" (step {state['step']} of {state['max_iters']})" if state else ""
        raise ValueError(f"{out_dir} already holds a run{what}; continue it with --init_from=resume --out_dir={out_dir}, "
                         f"or replace it with --overwrite")
    return train(config, ckpt, out_dir, device, dtype, ddp, rank, world)


def set_up(config, ckpt, out_dir, device, dtype, world, say):
    """Everything the training loop works on: (train examples, val examples, max_iters, model, optimizer, scaler,
    step, log), at step 0, or where the checkpoint `ckpt` of a resumed run left off (weights, optimizer, RNG)."""
    torch.manual_seed(config["seed"])

    # data: conversations -> chat format -> tokens + loss mask
    train_path, val_path = chat.data_files(config["data"])
    val_path = Path(config["val_data"]) if config["val_data"] else val_path
    train, truncated = read_examples(train_path, config["block_size"])
    val = read_examples(val_path, config["block_size"])[0] if val_path else []
    if not train:  # tokenize() drops an example whose response starts past block_size: nothing of it is learned
        raise ValueError(f"{train_path}: no example keeps a response token within --block_size={config['block_size']}"
                         f" ({truncated} truncated): nothing to learn; raise --block_size")
    say(f"data: {len(train)} training examples from {train_path} ({truncated} truncated to "
        f"{config['block_size']} tokens), {len(val)} for validation" + ("" if val else " (no val split: no eval loss)"))
    per_step = config["batch_size"] * config["gradient_accumulation_steps"] * world
    max_iters = config["max_iters"] or math.ceil(config["epochs"] * len(train) / per_step)
    if ckpt is not None and max_iters < ckpt["step"]:
        raise ValueError(f"--max_iters={max_iters}: {out_dir} is already at step {ckpt['step']}")

    model = build_model(config, ckpt, [(train_path, train), (val_path, val)]).to(device)
    say(f"model: {config['init_from']}, {model.num_params() / 1e6:.1f}M parameters, on {device} in {dtype}, "
        f"{world} process{'es' if world > 1 else ''}; {max_iters} step{'s' if max_iters != 1 else ''} of {per_step} sequences")
    optimizer = adamw(model, config)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    step, log = 0, []
    if ckpt is not None:  # the RNG last: building the model above drew from it
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, log = ckpt["step"], ckpt["log"]
        torch.set_rng_state(ckpt["rng"])
        if device.startswith("cuda") and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        say(f"resuming {out_dir} at step {step}")
    return train, val, max_iters, model, optimizer, scaler, step, log


def build_model(config, ckpt, datasets):
    """The model to train: the checkpoint's (resume), a new one (scratch), or a pretrained one (GPT-2, an HF
    directory, ...). Refused if --block_size exceeds its context or the data has ids outside its vocabulary."""
    if ckpt is not None or config["init_from"] == "scratch":
        shape = ckpt["model_config"] if ckpt is not None else dict(
            n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
            block_size=config["block_size"], **vocabulary(config["vocab"]))
        model = GPT(GPTConfig(**{**shape, "dropout": config["dropout"]}))
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
    else:
        model = GPT.from_pretrained(config["init_from"], dropout=config["dropout"])
    if config["block_size"] > model.config.block_size:
        raise ValueError(f"--block_size={config['block_size']} exceeds the model's context ({model.config.block_size})")
    for path, examples in datasets:  # a restricted vocabulary must cover the data
        unknown = model.vocab.unknown(t for ids, _ in examples for t in ids)  # read only if restricted
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} token ids outside the model's vocabulary, e.g. "
                             f"{unknown[:5]} ({chat.decode(unknown[:5])!r})")
    return model


def train(config, ckpt, out_dir, device, dtype, ddp, rank, world):
    """The run itself: set_up (data, model, optimizer, where a resumed run stopped), then the training loop.
    Returns the exit status: 0, or 128 + the signal that stopped it (130 for Ctrl-C, 143 for SIGTERM), so that
    scripts can tell a stopped run."""
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    train, val, max_iters, raw_model, optimizer, scaler, step, log = set_up(config, ckpt, out_dir, device, dtype,
                                                                            world, say)
    if ckpt is None and master:
        preview_answers(raw_model, "before training", config["preview"], device, dtype)
    model = torch.compile(raw_model) if config["compile"] else raw_model  # raw_model: what is saved and evaluated
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    origin = ckpt.get("origin", "") if ckpt is not None else config["init_from"]  # the model the run started from
    per_step = config["batch_size"] * config["gradient_accumulation_steps"] * world

    def marks():  # progress.json: how far the run is, and what defines it
        return {"step": step, "max_iters": max_iters, "finished": step >= max_iters, "init_from": origin,
                "data": config["data"], "settings": settings(config, origin)}

    def checkpoint():
        model_config = {k: v for k, v in vars(raw_model.config).items() if k != "dropout"}
        save_run(out_dir, raw_model, {
            "model": raw_model.state_dict(), "model_config": model_config, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "config": config, "step": step, "max_iters": max_iters, "origin": origin,
            "samples_seen": step * per_step, "log": log, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}, marks())

    if master and ckpt is None:  # flags, data and model are good: the run it replaces steps aside
        set_aside(out_dir)
    if master and ckpt is not None and not marks_agree(progress(out_dir), ckpt):
        checkpoint()  # killed while saving: progress.json or the export lag the checkpoint; rewrite them from it
    if master:
        write_log(out_dir, log, "w")  # rewritten from the checkpoint's history when resuming

    stop = []  # Ctrl-C (or SIGTERM) finishes the current step, checkpoints and exits; resume continues exactly
    signal.signal(signal.SIGINT, lambda signum, _: stop.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: stop.append(signum))
    peak = peak_flops(device)
    flops_per_token = 6 * raw_model.num_params()  # forward + backward (PaLM, appendix B)
    saved, first_step = (step if ckpt is not None else None), step  # saved: the step of the last checkpoint written
    model.train()
    bar = tqdm(total=max_iters, initial=step, desc="training", disable=not master, dynamic_ncols=True)
    while step < max_iters and not stop:
        t0 = time.time()
        lr = get_lr(step, max_iters, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = micro_batches(train, step, config, rank, world)  # this process's share of the step's examples
        step_loss = forward_backward(model, raw_model, scaler, micro, config, device, dtype, ddp, world)
        if ddp:
            agree_to_stop(stop, device)
        if not torch.isfinite(step_loss):
            raise diverged(f"loss is {step_loss.item()} at step {step + 1}", raw_model, step == first_step, out_dir,
                           saved)
        update(model, optimizer, scaler, config["grad_clip"])
        step += 1
        tokens_per_s = sum(len(ids) for b in micro for ids, _ in b) * world / (time.time() - t0)  # real tokens
        log.append({"step": step, "loss": round(step_loss.item(), 6), "lr": lr, "tokens_per_s": round(tokens_per_s)})
        bar.set_postfix(loss=f"{step_loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}",
                        **({"mfu": f"{100 * flops_per_token * tokens_per_s / peak:.1f}%"} if peak else {}))
        bar.update()
        if master and (step % config["eval_interval"] == 0 or step == max_iters or stop):
            if val:
                log[-1]["val_loss"] = round(val_loss(raw_model, val, config, device, dtype), 6)
                bar.write(f"step {step}: train loss {step_loss.item():.4f}, val loss {log[-1]['val_loss']:.4f}")
            check_finite(raw_model, log[-1], out_dir, saved)  # never a checkpoint of a diverged update
            checkpoint()
            saved = step
        if master:
            write_log(out_dir, log[-1:], "a")
    bar.close()
    return finish(raw_model, log, stop, step, out_dir, config, device, dtype, ddp, master)


def adamw(model, config):
    """The paper's AdamW (betas 0.9 / 0.999, eps 1e-8), fused into one kernel wherever the installed torch has one
    for the model's device: CUDA, and CPU from torch 2.4 (9.3x faster a step on the gpt2 shape on our CPU, the same
    parameters to 1e-7: tests/test_train.py); elsewhere the default implementation. A resumed run keeps the
    choice its checkpoint recorded (load_state_dict restores it), so resuming reproduces the run."""
    params, settings = list(model.parameters()), dict(lr=config["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                                                      weight_decay=config["weight_decay"])
    try:
        return torch.optim.AdamW(params, **settings, fused=True)
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return torch.optim.AdamW(params, **settings)


def forward_backward(model, raw_model, scaler, micro, config, device, dtype, ddp, world):
    """Accumulate the gradients of one optimizer step over its micro-batches `micro` (lists of examples); returns
    the step's loss (summed over the processes with DDP)."""
    batches = [collate(b, device, config["block_size"]) for b in micro]
    # each sequence (--loss=example) or each trained token (--loss=token) of the step weighs the same,
    # whichever micro-batch or process it is in
    per_step = config["batch_size"] * config["gradient_accumulation_steps"] * world
    n_tokens = torch.tensor(float(sum(t != -1 for b in micro for _, targets in b for t in targets)), device=device)
    if ddp:
        torch.distributed.all_reduce(n_tokens)
    step_loss = torch.zeros((), device=device)
    for m, (x, y) in enumerate(batches):
        sync = not ddp or m == len(batches) - 1  # DDP averages gradients only on the last micro-batch
        with autocast(device, dtype), (nullcontext() if sync else model.no_sync()):
            logits, _ = model(x)
            y = raw_model.vocab.rows(y)  # the targets' rows of lm_head (the ids themselves for GPT-2)
            loss = weighted_loss(logits, y, loss_weights(y, config["loss"], per_step, n_tokens))
        step_loss += loss.detach()
        scaler.scale(loss * world).backward()  # * world: DDP divides the summed gradients by world
    if ddp:
        torch.distributed.all_reduce(step_loss)
    return step_loss


def agree_to_stop(stop, device):
    """With DDP, a signal reaches the processes at different steps: all stop at the first step any has seen one."""
    stopping = torch.tensor(float(bool(stop)), device=device)
    torch.distributed.all_reduce(stopping, op=torch.distributed.ReduceOp.MAX)
    if stopping.item() and not stop:
        stop.append(signal.SIGTERM)


def check_finite(model, record, out_dir, saved):
    """Before a checkpoint: the weights after this step's update, and its val loss, must be finite numbers."""
    if any(non_finite(p.detach()) for p in model.parameters()):
        raise diverged(f"the update of step {record['step']} made the weights NaN or Inf", model, False, out_dir,
                       saved)
    if not math.isfinite(record.get("val_loss", 0.0)):
        raise diverged(f"the val loss is {record['val_loss']} at step {record['step']}", model, False, out_dir, saved)


def diverged(what, model, first, out_dir, saved):
    """The error for a run whose loss or weights stopped being finite: what happened, that nothing of it was saved,
    where the last good checkpoint is, and a likely cause (`first`: on the run's first step, so the weights may
    have come in broken)."""
    last = f"{out_dir / 'ckpt.pt'} (step {saved})" if saved is not None else "none yet"
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is None:
        cause = "Try a lower --learning_rate (or keep --grad_clip on)"
    elif first:
        cause = f"The weights were not finite ({bad}) when loaded"
    else:
        cause = f"An update made the weights NaN or Inf ({bad}): try a lower --learning_rate (or keep --grad_clip on)"
    return FloatingPointError(f"{what}; stopping, nothing of it saved. Last good checkpoint: {last}. {cause}.")


def write_log(out_dir, records, mode):
    """Write ("w") or append ("a") records to out_dir/log.jsonl; a full disk is one line naming the file."""
    path = Path(out_dir) / "log.jsonl"
    try:
        with open(path, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    except OSError as e:
        raise OSError(f"{path}: could not write the training log ({e.strerror or e})") from None


def update(model, optimizer, scaler, grad_clip):
    """The optimizer step on the accumulated gradients, clipped to norm grad_clip (0: not clipped)."""
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def finish(model, log, stop, step, out_dir, config, device, dtype, ddp, master):
    """After the loop: leave DDP; on the master, say how the run ended and, if it finished, plot the losses and
    answer PREVIEW_INSTRUCTIONS again. Returns the exit status."""
    if ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not master:
        return 128 + int(stop[0]) if stop else 0
    if stop:
        print(f"stopped at step {step}; continue with: python train.py --init_from=resume --out_dir={out_dir}")
        return 128 + int(stop[0])
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    plot_losses(log, out_dir / "loss.png")
    preview_answers(model, "after training", config["preview"], device, dtype)
    print(f"done: {out_dir}/ holds the HF-format model; try python sample.py --init_from={out_dir} --prompt=\"...\"")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, OSError, FloatingPointError) as e:  # user mistakes, data errors, downloads: one line
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C before the first step (after it, the loop stops at a step's end)
        print("interrupted before training began; the out_dir is as it was", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
