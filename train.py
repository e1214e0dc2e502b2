"""
Finetune GPT-2 in the paper's chat format, with the loss on assistant tokens only.

    python train.py                                 # the default run: response-tune gpt2 on Dolly
    python train.py config/instruction_tuning.toml  # the baseline: LIMA, instructions, responses
    python train.py config/response_tuning.toml     # LIMA, instructions emptied (section 3)
    python train.py config/poetry.toml              # single-task finetuning on poems (section 4)
    python train.py config/gsm8k.toml               # ... and the other four: mbpp, recipes, chess
    python train.py config/smoke.toml               # a tiny model on data/sample: CPU, no download
    python train.py config/poetry.toml --init_from=gpt2-medium --batch_size=4 \\
        --gradient_accumulation_steps=16
    torchrun --standalone --nproc_per_node=4 train.py config/instruction_tuning.toml
    # continue a stopped run (Ctrl-C stops one):
    python train.py --init_from=resume --out_dir=out/dolly_responses

A TOML file sets any of the flags below; flags after it override it. The out_dir ends up holding
ckpt.pt (to resume), config.json + model.safetensors (HF format: sample.py, transformers and
GPT.from_pretrained load it), progress.json (how far the run got), log.jsonl and loss.png. A run
is never lost to a mistake: every flag, the data and the model are checked before anything is
written, --overwrite replaces the old run only at the new run's first checkpoint, and a checkpoint
whose weights or validation loss are not finite is never written.
"""
import fcntl
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
from checkpoint import (holds_run, load_checkpoint, marks_agree, non_finite, progress, put_back,
                        save_run, set_aside, settle)
from cli import (DEVICE_FLAGS, DEVICE_RANGES, autocast, check_ranges, given_keys, parse_flags,
                 pick_device, pick_dtype, pyplot, use_threads)
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------- defaults
# The default run is response tuning of gpt2 on Dolly (open, ungated). Hyperparameters follow the
# paper (AdamW, no weight decay, linear warmup then linear decay as in open-instruct, 64 sequences
# per step) adapted to GPT-2: lr 5e-5 instead of the 7B model's 1e-5, since small models need
# larger steps.
DEFAULTS = {
    "init_from": ("gpt2", "gpt2 ... gpt2-xl, an HF directory or .safetensors file, 'scratch', or "
                          "'resume'"),
    "data": ("dolly_responses", "a JSONL file of conversations ({'messages'}) or of documents "
                                "to pretrain on ({'text'}), or a prepared name: lima, "
                                "lima_responses, dolly, dolly_responses, gsm8k, mbpp, poetry, "
                                "recipes, chess, sample, tinyworld_pretrain, tinyworld, ..."),
    "val_data": ("", "messages JSONL for the eval loss (default: the prepared data's val split)"),
    "out_dir": ("", "where checkpoints and logs go (default: out/<data name>)"),
    "overwrite": (False, "start over in an out_dir that already holds a run (default: refuse; see "
                         "--init_from=resume)"),
    "epochs": (1.0, "passes over the data (1 epoch of Dolly = the step count of 15 LIMA epochs)"),
    "max_iters": (0, "optimizer steps; 0 = as many as `epochs` takes"),
    "batch_size": (8, "sequences per micro-batch per process"),
    "gradient_accumulation_steps": (8, "micro-batches per step: 8 x 8 = the paper's 64 sequences "
                                       "per step"),
    "loss": ("example", "example: every sequence's mean token loss weighs the same in a step (the "
                        "official open-instruct reduce_loss=mean, one sequence per micro-batch); "
                        "token: every trained token does"),
    "learning_rate": (5e-5, "peak learning rate"),
    "warmup_ratio": (0.03, "share of steps spent warming up linearly (open-instruct's default)"),
    "weight_decay": (0.0, "the paper uses none"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 = off"),
    "block_size": (1024, "tokens per example; longer ones are truncated (and counted)"),
    "dropout": (0.0, "dropout in the model while training"),
    "eval_interval": (50, "evaluate, checkpoint and export every this many steps (and at the "
                          "end)"),
    "preview": (3, "print the answers to this many of PREVIEW_INSTRUCTIONS before and after "
                   "training"),
    **DEVICE_FLAGS,
    "compile": (False, "torch.compile the model (faster on GPUs, slow to start)"),
    "seed": (1337, "seeds the data order, initialization and dropout"),
    "n_layer": (12, "with init_from=scratch: layers"),
    "n_head": (12, "with init_from=scratch: heads"),
    "n_embd": (768, "with init_from=scratch: width"),
    "vocab": ("", "with init_from=scratch: a JSON list of the GPT-2 ids the model knows "
                  "(TinyWorld's data/tinyworld/vocab.json); empty = all 50,257"),
    "print_config": (False, "print the run's settings (the flags that define what it learns) as "
                            "JSON and exit; nothing is read or written"),
}
RANGES = {"epochs": "[0, inf)", "max_iters": "[0, inf)", "batch_size": "[1, inf)",
          "gradient_accumulation_steps": "[1, inf)", "learning_rate": "[0, inf)",
          "warmup_ratio": "[0, 1]", "weight_decay": "[0, inf)", "grad_clip": "[0, inf)",
          "block_size": "[1, inf)", "dropout": "[0, 1)", "eval_interval": "[1, inf)",
          "preview": "[0, inf)", "seed": "[0, 1e18]", "n_layer": "[1, inf)", "n_head": "[1, inf)",
          "n_embd": "[1, inf)", **DEVICE_RANGES}
DEFAULTS_VALUES = {key: value for key, (value, _) in DEFAULTS.items()}
# what --init_from=resume may change; any other flag must match the run's own
RESUMABLE = {"init_from", "out_dir", "max_iters", "epochs", "eval_interval", "preview", "compile",
             "overwrite", *DEVICE_FLAGS}
# where and how a run goes, not what it learns: not among its settings
HOW_RUN = {"out_dir", "overwrite", "eval_interval", "preview", "compile", "print_config",
           *DEVICE_FLAGS}
# held-out instructions for the before/after printout
PREVIEW_INSTRUCTIONS = ["Give me a recipe for tiramisu.",
                        "Write a short poem about the ocean.",
                        "What are three tips for staying focused while studying?"]
# -------------------------------------------------------------------------------------------------


@dataclass
class Where:
    """Where a run goes: its device and precision, its processes, its out_dir."""
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # float32, bfloat16 or float16: the precision of autocast
    ddp: bool  # launched by torchrun: one process per device, each with its share of a step
    rank: int  # this process; rank 0, the master, alone prints and writes the out_dir
    world: int  # how many processes
    out_dir: Path

    @property
    def master(self):
        return self.rank == 0


@dataclass
class Run:
    """What the training loop works on (set_up): at step 0, or where a resumed run left off."""
    train_examples: list  # (ids, targets) pairs
    val_examples: list  # the same, for the eval loss; [] if the data has no val split
    max_iters: int  # optimizer steps in all
    model: GPT  # the model itself, not compiled or wrapped in DDP: what is saved and evaluated
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16's loss scaling; a no-op in the other precisions
    step: int  # optimizer steps taken
    log: list  # a record per step: loss, lr, tokens_per_s (and val_loss where evaluated)
    origin: str  # the model the run started from (init_from, kept through resumes)


# ------------------------------------------------------------------------------------------- data

def read_examples(path, block_size):
    """(examples, truncated) from a JSONL file: conversations (loss on the responses) or documents
    (pretraining: loss on every token)."""
    if chat.jsonl_kind(path) == "text":
        return pack(chat.read_documents(path), block_size), 0
    return tokenize(chat.read_conversations(path), block_size)


def pack(documents, block_size):
    """Pretraining examples: the documents' tokens, each document followed by <|endoftext|>, as one
    stream cut into windows of block_size tokens (nanoGPT's packing; a window may span documents,
    so the model learns that a new text starts after <|endoftext|>). Every position is trained; the
    last partial window is dropped."""
    stream = []
    for text in tqdm(documents, desc="tokenizing", unit="doc", leave=False, file=sys.stderr):
        stream += chat.encode(text) + [chat.EOT]
    n = (len(stream) - 1) // block_size
    if n == 0:
        raise ValueError(f"{len(stream)} tokens of documents: fewer than one window of "
                         f"block_size={block_size}")
    windows = []
    for k in range(n):
        start = k * block_size
        ids = stream[start:start + block_size]
        targets = stream[start + 1:start + block_size + 1]  # the next token at each position
        windows.append((ids, targets))
    return windows


def tokenize(conversations, block_size):
    """(ids, targets) per conversation, cut to block_size tokens; targets are -1 where no loss is
    taken."""
    examples = []
    truncated = 0
    for messages in conversations:
        ids, mask = chat.encode_chat(messages)
        truncated += len(ids) > block_size
        ids, mask = ids[:block_size], mask[:block_size]
        targets = chat.targets_from_mask(ids, mask)
        # a response that starts beyond block_size leaves nothing to learn
        if any(t != -1 for t in targets):
            examples.append((ids, targets))
    return examples, truncated


def collate(examples, device, block_size):
    """Right-pad a micro-batch to its longest example, rounded up to a multiple of 64 (fewer
    distinct shapes for torch.compile, tensor-core friendly). Right padding needs no attention
    mask: real tokens never look ahead, and padded targets are -1, outside the loss."""
    longest = max(len(ids) for ids, _ in examples)
    T = min(math.ceil(longest / 64) * 64, block_size)
    x = torch.zeros((len(examples), T), dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (ids, targets) in enumerate(examples):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(targets)] = torch.tensor(targets)
    return x.to(device), y.to(device)


def sequences_per_step(config, world):
    """The examples of one optimizer step, all processes together."""
    return config["batch_size"] * config["gradient_accumulation_steps"] * world


def step_indices(n, step, config, world):
    """The indices (into n examples) of optimizer step `step`, in the data order. All processes
    walk one global order (a fresh seeded permutation each epoch); step s takes the next
    batch_size * accumulation * world examples, so the data position is the step itself."""
    per_step = sequences_per_step(config, world)
    orders = {}  # epoch -> its permutation, drawn once (a step spans at most a few epochs)
    indices = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(config["seed"] + epoch)
            orders[epoch] = torch.randperm(n, generator=generator).tolist()
        indices.append(orders[epoch][i])
    return indices


def micro_batches(examples, step, config, rank, world):
    """The micro-batches of optimizer step `step` for this process: the step's examples
    (step_indices) sorted by length and cut into micro-batches of similar lengths. Each is padded
    only to its longest example, and with LIMA's long-tailed lengths padding falls from 39% to 7%
    of the tokens (micro-batches of 4; tests/bench.py train). The step's loss is the same however
    its examples are grouped (loss_weights); the grouping only saves compute. Process r takes
    micro-batches r, r + world, ... (similar lengths on every process), so 2 processes see the
    micro-batches 1 process sees with twice the accumulation."""
    B = config["batch_size"]
    indices = step_indices(len(examples), step, config, world)
    # by token count; stable, so ties keep the data order
    indices.sort(key=lambda i: len(examples[i][0]))
    batches = []
    for m in range(config["gradient_accumulation_steps"] * world):
        batches.append([examples[i] for i in indices[m * B:(m + 1) * B]])
    return batches[rank::world]


def loss_weights(y, mode, n_examples, n_tokens):
    """The weight of each target of a micro-batch y (B, T) in its step's loss, which is
    sum(weight * token loss) over all the step's micro-batches and processes, so that the weights
    of a step sum to 1 however it is split. example (the official default: open-instruct's
    finetune.py with reduce_loss=mean and one sequence per micro-batch averages each sequence's
    mean loss over the 64 of a step): 1 / (n_examples * tokens of its sequence). token:
    1 / n_tokens, every trained token of the step alike (long responses weigh more)."""
    trained = (y != -1).float()  # (B, T)
    if mode == "token":
        return trained / n_tokens
    if mode == "example":  # every sequence has a trained token: tokenize() drops those without
        return trained / (trained.sum(1, keepdim=True) * n_examples)
    raise ValueError(f"loss mode {mode!r}: expected example or token")


def weighted_loss(logits, y, weights):
    # logits (B, T, V), y and weights (B, T) -> the micro-batch's share of its step's loss
    token_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                                 reduction="none")
    return (token_loss * weights.flatten()).sum()


def vocabulary(path):
    """GPTConfig fields for --vocab: {} for GPT-2's whole vocabulary, else a restricted one read
    from a JSON list."""
    if not path:
        return {}
    # a config's repository-relative path, run from elsewhere
    if not Path(path).exists() and (ROOT / path).exists():
        path = ROOT / path
    path, data = chat.read_bytes(path)
    try:
        ids = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--vocab={path}: not valid JSON ({e})") from None
    if not (isinstance(ids, list) and ids
            and all(type(i) is int and 0 <= i <= chat.EOT for i in ids)):
        raise ValueError(f"--vocab={path}: expected a JSON list of GPT-2 token ids "
                         f"(0 to {chat.EOT})")
    ids = sorted(set(ids))
    return {"token_ids": tuple(ids), "vocab_size": len(ids)}


def get_lr(step, max_iters, config):
    """Linear warmup to learning_rate, then linear decay to 0 at max_iters (open-instruct's
    schedule)."""
    warmup = math.ceil(config["warmup_ratio"] * max_iters)
    if step < warmup:
        return config["learning_rate"] * (step + 1) / warmup
    return config["learning_rate"] * max(0.0, (max_iters - step) / max(1, max_iters - warmup))


# --------------------------------------------------------------------------- evaluation and output

@torch.no_grad()
def val_loss(model, examples, config, device, dtype):
    """The validation loss, weighted as training weighs it (--loss): the mean over sequences of
    each one's mean token loss, or the mean over all tokens."""
    model.eval()
    n_tokens = sum(t != -1 for _, targets in examples for t in targets)
    total = 0.0
    for i in range(0, len(examples), config["batch_size"]):
        x, y = collate(examples[i:i + config["batch_size"]], device, config["block_size"])
        y = model.vocab.rows(y)
        with autocast(device, dtype):
            logits, _ = model(x)
        weights = loss_weights(y, config["loss"], len(examples), n_tokens)
        total += weighted_loss(logits, y, weights).item()
    model.train()
    return total


def preview_answers(model, title, n, device, dtype):
    """Print the model's greedy answers to the first n PREVIEW_INSTRUCTIONS: what finetuning
    changed, at a glance."""
    prompts = [chat.encode_prompt(q) for q in PREVIEW_INSTRUCTIONS[:n]]
    # a restricted vocabulary cannot read them
    if n <= 0 or model.vocab.unknown([t for p in prompts for t in p]):
        return
    print(f"\n=== {title} ===")
    model.eval()
    with autocast(device, dtype):
        outs = model.generate(prompts, 128, greedy=True)
    model.train()
    for q, out in zip(PREVIEW_INSTRUCTIONS[:n], outs):
        more = ""
        if out[-1:] != [chat.EOT]:
            more = " [...]"  # cut by the length limit: the model had not finished
        print(f"<|user|> {q}\n<|assistant|> {chat.decode(out).strip()}{more}\n")


# ---------------------------------------------------------------------------- the run directory

def take_lock(out_dir):
    """One train.py per out_dir: an exclusive flock on out_dir/train.lock, or a one-line refusal if
    a live process holds it. The kernel takes the lock in one step and releases it when its
    process ends, however it ends, so two processes can never both hold it and a killed run leaves
    no lock to clean up. The pid in the file only names the holder in the refusal. Returns the
    open lock file (release_lock closes it)."""
    path = Path(out_dir) / "train.lock"
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise OSError(f"{out_dir} is in use: train.py (pid {holder}) is training into it; "
                          f"wait for it, or stop it") from None
        # locked the file that is there now, not one its last holder removed as we opened it
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
    except OSError:  # a full disk: the lock holds without the pid
        pass
    return f


def release_lock(lock):
    # before the lock goes: a newcomer then opens a new file
    Path(lock.name).unlink(missing_ok=True)
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


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
              "A10G": 125e12}  # dense bf16


def peak_flops(device):
    """The GPU's dense bf16 flops per second, for model flops utilization (MFU); None if
    unknown."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for gpu, flops in PEAK_FLOPS.items():
        if gpu in name:
            return flops
    return None


# ------------------------------------------------------------------------------------------- main

def check_flags(config):
    """The flags whose values make no run: one line each, before anything is loaded."""
    check_ranges(config, RANGES)
    if config["loss"] not in ("example", "token"):
        raise ValueError(f"--loss={config['loss']}: expected example or token")
    if config["max_iters"] == 0 and config["epochs"] == 0:
        raise ValueError(f"--max_iters={config['max_iters']}, --epochs={config['epochs']}: "
                         "expected max_iters > 0, or max_iters = 0 and epochs > 0")
    if config["init_from"] == "scratch" and config["n_embd"] % config["n_head"]:
        raise ValueError(f"--n_head={config['n_head']} does not divide "
                         f"--n_embd={config['n_embd']} (each head gets n_embd / n_head "
                         f"dimensions)")


def settings(config, origin):
    """What defines a run, what it learns: every flag but where and how it runs (HOW_RUN), with
    init_from the model it started from. progress.json keeps them; evaluate.py --compare reuses a
    run only if they match."""
    defining = {key: value for key, value in config.items() if key not in HOW_RUN}
    return {**defining, "init_from": origin}


def resumed_config(config, ckpt, given, out_dir):
    """The run's own configuration from its checkpoint, with the flags a resumed run may change
    (RESUMABLE: extend it with --max_iters or --epochs, move it to another device, ...). Any other
    flag given on the command line or in a TOML file must equal the run's own: one line
    otherwise, never silently ignored."""
    run = {**DEFAULTS_VALUES, **ckpt["config"]}
    run.setdefault("loss", "token")  # checkpoints from before --loss existed weighed tokens
    for key in sorted(given - RESUMABLE):
        if config[key] != run[key]:
            raise ValueError(f"--{key}={config[key]}: {out_dir} was trained with "
                             f"{key}={run[key]!r}, and a resumed run keeps it; start a new run "
                             f"in another --out_dir to change it")
    changed = {key: config[key] for key in given & RESUMABLE}
    return {**run, **changed, "init_from": "resume"}


def main(argv):
    config = parse_flags(DEFAULTS, argv, __doc__)
    check_flags(config)
    if config["print_config"]:
        print(json.dumps(settings(config, config["init_from"]), sort_keys=True))
        return 0
    ddp = "RANK" in os.environ  # launched by torchrun
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_threads(config["threads"])
    device = pick_device(config["device"])
    if ddp:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    dtype = pick_dtype(device, config["dtype"])
    if not config["out_dir"]:
        if config["init_from"] == "resume":
            raise ValueError("--init_from=resume needs --out_dir of the run to continue")
        config["out_dir"] = str(Path("out") / Path(config["data"]).stem)
    where = Where(device=device, dtype=dtype, ddp=ddp, rank=rank, world=world,
                  out_dir=Path(config["out_dir"]))
    return run_locked(config, argv, where)


def run_locked(config, argv, where):
    """begin() with the out_dir locked by the master (one train.py per out_dir). A run that ends
    before its first checkpoint leaves the run it was to replace as it was, and one refused before
    it wrote anything leaves no directory behind."""
    out_dir = where.out_dir
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
    lock = None
    try:
        # the lock first: nothing in out_dir is read or changed by two processes at once
        if where.master:
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = take_lock(out_dir)
            settle(out_dir)
        if where.ddp:
            torch.distributed.barrier()
        return begin(config, argv, where)
    except BaseException:
        # a run that ends before its first checkpoint leaves the run it was to replace as it was
        if where.master:
            put_back(out_dir)
        raise
    finally:
        if lock is not None:
            release_lock(lock)
        if where.master:
            for d in created:  # refused before it wrote anything: nothing left behind
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()


def begin(config, argv, where):
    """The out_dir's run, checked: a resumed run takes its configuration from its checkpoint; a
    new run may not replace one without --overwrite."""
    ckpt = None
    path = where.out_dir / "ckpt.pt"
    if config["init_from"] == "resume":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume")
        ckpt = load_checkpoint(path)
        config = resumed_config(config, ckpt, given_keys(argv), where.out_dir)
    elif where.master and holds_run(where.out_dir) and not config["overwrite"]:
        state = progress(where.out_dir)
        what = ""
        if state:
            what = f" (step {state['step']} of {state['max_iters']})"
        raise ValueError(f"{where.out_dir} already holds a run{what}; continue it with "
                         f"--init_from=resume --out_dir={where.out_dir}, or replace it with "
                         f"--overwrite")
    return train(config, ckpt, where)


def set_up(config, ckpt, where):
    """Everything the training loop works on (a Run), at step 0, or where the checkpoint `ckpt` of
    a resumed run left off (weights, optimizer, RNG)."""
    say = print if where.master else quiet
    torch.manual_seed(config["seed"])

    # data: conversations -> chat format -> tokens + loss mask
    train_path, val_path = chat.data_files(config["data"])
    if config["val_data"]:
        val_path = Path(config["val_data"])
    train_examples, truncated = read_examples(train_path, config["block_size"])
    val_examples = []
    if val_path:
        val_examples, _ = read_examples(val_path, config["block_size"])
    # tokenize() drops an example whose response starts past block_size: nothing of it is learned
    if not train_examples:
        raise ValueError(f"{train_path}: no example keeps a response token within "
                         f"--block_size={config['block_size']} ({truncated} truncated): nothing "
                         f"to learn; raise --block_size")
    no_val = ""
    if not val_examples:
        no_val = " (no val split: no eval loss)"
    say(f"data: {len(train_examples)} training examples from {train_path} ({truncated} truncated "
        f"to {config['block_size']} tokens), {len(val_examples)} for validation{no_val}")
    per_step = sequences_per_step(config, where.world)
    max_iters = config["max_iters"] or math.ceil(config["epochs"] * len(train_examples) / per_step)
    if ckpt is not None and max_iters < ckpt["step"]:
        raise ValueError(f"--max_iters={max_iters}: {where.out_dir} is already at step "
                         f"{ckpt['step']}")

    datasets = [(train_path, train_examples), (val_path, val_examples)]
    model = build_model(config, ckpt, datasets).to(where.device)
    processes = f"{where.world} process{'es' if where.world > 1 else ''}"
    steps = f"{max_iters} step{'s' if max_iters != 1 else ''}"
    say(f"model: {config['init_from']}, {model.num_params() / 1e6:.1f}M parameters, on "
        f"{where.device} in {where.dtype}, {processes}; {steps} of {per_step} sequences")
    optimizer = adamw(model, config)
    scaler = torch.amp.GradScaler(where.device.split(":")[0], enabled=where.dtype == "float16")
    run = Run(train_examples=train_examples, val_examples=val_examples, max_iters=max_iters,
              model=model, optimizer=optimizer, scaler=scaler, step=0, log=[],
              origin=config["init_from"])
    if ckpt is not None:  # the RNG last: building the model above drew from it
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        run.step = ckpt["step"]
        run.log = ckpt["log"]
        run.origin = ckpt.get("origin", "")
        torch.set_rng_state(ckpt["rng"])
        if where.device.startswith("cuda") and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        say(f"resuming {where.out_dir} at step {run.step}")
    return run


def build_model(config, ckpt, datasets):
    """The model to train: the checkpoint's (resume), a new one (scratch), or a pretrained one
    (GPT-2, an HF directory, ...). Refused if --block_size exceeds its context or the data has ids
    outside its vocabulary."""
    if ckpt is not None:
        model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": config["dropout"]}))
        model.load_state_dict(ckpt["model"])
    elif config["init_from"] == "scratch":
        shape = dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                     block_size=config["block_size"], **vocabulary(config["vocab"]))
        model = GPT(GPTConfig(**{**shape, "dropout": config["dropout"]}))
    else:
        model = GPT.from_pretrained(config["init_from"], dropout=config["dropout"])
    if config["block_size"] > model.config.block_size:
        raise ValueError(f"--block_size={config['block_size']} exceeds the model's context "
                         f"({model.config.block_size})")
    for path, examples in datasets:  # a restricted vocabulary must cover the data
        # read only if restricted
        unknown = model.vocab.unknown(t for ids, _ in examples for t in ids)
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} token ids outside the model's vocabulary, "
                             f"e.g. {unknown[:5]} ({chat.decode(unknown[:5])!r})")
    return model


def train(config, ckpt, where):
    """The run itself: set_up (data, model, optimizer, where a resumed run stopped), then the
    training loop. Returns the exit status: 0, or 128 + the signal that stopped it (130 for
    Ctrl-C, 143 for SIGTERM), so that scripts can tell a stopped run."""
    # 1) the run, the model the loop calls (compiled, in DDP), the out_dir, the signals
    run = set_up(config, ckpt, where)
    if ckpt is None and where.master:
        preview_answers(run.model, "before training", config["preview"], where.device, where.dtype)
    model = for_training(run.model, config, where)  # run.model: what is saved and evaluated
    if where.master:
        open_run(run, config, ckpt, where)
    # Ctrl-C or SIGTERM: finish the current step, checkpoint and exit; resume continues exactly
    stop = catch_stop_signals()
    per_step = sequences_per_step(config, where.world)
    peak = peak_flops(where.device)
    flops_per_token = 6 * run.model.num_params()  # forward + backward (PaLM, appendix B)
    saved = run.step if ckpt is not None else None  # the step of the last checkpoint written
    first_step = run.step
    model.train()
    bar = tqdm(total=run.max_iters, initial=run.step, desc="training", disable=not where.master,
               dynamic_ncols=True)
    while run.step < run.max_iters and not stop:
        # 2) the step's learning rate, and this process's share of the step's examples
        t0 = time.time()
        lr = get_lr(run.step, run.max_iters, config)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro = micro_batches(run.train_examples, run.step, config, where.rank, where.world)
        # each sequence (--loss=example) or each trained token (--loss=token) of the step weighs
        # the same, whichever micro-batch or process it is in
        n_tokens = trained_tokens(micro, where)

        # 3) forward and backward, one micro-batch at a time: the step's gradients accumulate
        step_loss = torch.zeros((), device=where.device)
        for m, examples in enumerate(micro):
            x, y = collate(examples, where.device, config["block_size"])
            # DDP averages gradients only on the last micro-batch
            sync = not where.ddp or m == len(micro) - 1
            with autocast(where.device, where.dtype), gradient_sync(model, sync):
                logits, _ = model(x)
                # the targets' rows of lm_head (the ids themselves for GPT-2)
                y = run.model.vocab.rows(y)
                weights = loss_weights(y, config["loss"], per_step, n_tokens)
                loss = weighted_loss(logits, y, weights)
            step_loss += loss.detach()
            # * world: DDP divides the summed gradients by world
            run.scaler.scale(loss * where.world).backward()
        if where.ddp:
            torch.distributed.all_reduce(step_loss)  # the step's loss: summed over the processes
            agree_to_stop(stop, where.device)
        if not torch.isfinite(step_loss):
            raise diverged(f"loss is {step_loss.item()} at step {run.step + 1}", run.model,
                           first=run.step == first_step, out_dir=where.out_dir, saved=saved)

        # 4) clip the gradients to norm grad_clip (0: not clipped), step, zero the gradients
        if config["grad_clip"]:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1

        # 5) bookkeeping: the log and the progress bar; evaluate and checkpoint when due
        tokens = sum(len(ids) for b in micro for ids, _ in b) * where.world  # real tokens
        tokens_per_s = tokens / (time.time() - t0)
        run.log.append({"step": run.step, "loss": round(step_loss.item(), 6), "lr": lr,
                        "tokens_per_s": round(tokens_per_s)})
        show_step(bar, step_loss, lr, tokens_per_s, flops_per_token, peak)
        if where.master and checkpoint_due(run, config, stop):
            record_val_loss(run, config, where, bar, step_loss)
            # never a checkpoint of a diverged update
            check_finite(run.model, run.log[-1], where.out_dir, saved)
            write_checkpoint(run, config, where)
            saved = run.step
        if where.master:
            write_log(where.out_dir, run.log[-1:], "a")
    bar.close()
    return finish(run, config, where, stop)


# ------------------------------------------------------------------ the training loop's helpers

def quiet(*args, **kwargs):
    """print's stand-in on the processes other than the master: says nothing."""


def adamw(model, config):
    """The paper's AdamW (betas 0.9 / 0.999, eps 1e-8), fused into one kernel wherever the
    installed torch has one for the model's device: CUDA, and CPU from torch 2.4 (9.3x faster a
    step on the gpt2 shape on our CPU, the same parameters to 1e-7: tests/test_train.py);
    elsewhere the default implementation. A resumed run keeps the choice its checkpoint recorded
    (load_state_dict restores it), so resuming reproduces the run."""
    params = list(model.parameters())
    options = dict(lr=config["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                   weight_decay=config["weight_decay"])
    try:
        return torch.optim.AdamW(params, **options, fused=True)
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return torch.optim.AdamW(params, **options)


def for_training(model, config, where):
    """The model the loop calls: compiled with --compile and, with DDP, wrapped to average the
    gradients over the processes. Either way it shares its parameters with `model`."""
    if config["compile"]:
        model = torch.compile(model)
    if where.ddp:
        device_ids = None  # on CPUs (gloo)
        if where.device.startswith("cuda"):
            device_ids = [where.device]
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def open_run(run, config, ckpt, where):
    """The master's first writes, once flags, data and model are good: a new run sets the run it
    replaces aside; a resumed run repairs a checkpoint it was killed while saving; log.jsonl is
    (re)written from the checkpoint's history."""
    if ckpt is None:  # flags, data and model are good: the run it replaces steps aside
        set_aside(where.out_dir)
    elif not marks_agree(progress(where.out_dir), ckpt):
        # killed while saving: progress.json or the export lag the checkpoint; rewrite them from it
        write_checkpoint(run, config, where)
    write_log(where.out_dir, run.log, "w")  # rewritten from the checkpoint's history when resuming


def catch_stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM no longer stop the process at once: each is noted in the list
    returned, and the loop ends after the current step."""
    stop = []

    def note(signum, frame):
        stop.append(signum)

    signal.signal(signal.SIGINT, note)
    signal.signal(signal.SIGTERM, note)
    return stop


def trained_tokens(micro, where):
    """The step's trained tokens (targets not -1), counted over every process's micro-batches."""
    count = sum(t != -1 for b in micro for _, targets in b for t in targets)
    n_tokens = torch.tensor(float(count), device=where.device)
    if where.ddp:
        torch.distributed.all_reduce(n_tokens)
    return n_tokens


def gradient_sync(model, sync):
    """The context of a micro-batch's forward and backward: with DDP, model.no_sync() holds the
    gradients back from averaging until the step's last micro-batch (sync)."""
    if sync:
        return nullcontext()
    return model.no_sync()


def agree_to_stop(stop, device):
    """With DDP, a signal reaches the processes at different steps: all stop at the first step any
    has seen one."""
    stopping = torch.tensor(float(bool(stop)), device=device)
    torch.distributed.all_reduce(stopping, op=torch.distributed.ReduceOp.MAX)
    if stopping.item() and not stop:
        stop.append(signal.SIGTERM)


def show_step(bar, step_loss, lr, tokens_per_s, flops_per_token, peak):
    """Advance the progress bar by a step: its loss, learning rate, tokens per second and, on a GPU
    whose peak we know, the model flops utilization (MFU)."""
    postfix = {"loss": f"{step_loss.item():.3f}", "lr": f"{lr:.2e}",
               "tok_s": f"{tokens_per_s:.0f}"}
    if peak:
        postfix["mfu"] = f"{100 * flops_per_token * tokens_per_s / peak:.1f}%"
    bar.set_postfix(**postfix)
    bar.update()


def checkpoint_due(run, config, stop):
    """Whether the step just taken is evaluated and checkpointed: every eval_interval steps, the
    last step, and the step a signal stopped."""
    return run.step % config["eval_interval"] == 0 or run.step == run.max_iters or bool(stop)


def record_val_loss(run, config, where, bar, step_loss):
    """The val loss of the model after this step, into its log record and on the screen; nothing
    without a val split."""
    if not run.val_examples:
        return
    record = run.log[-1]
    loss = val_loss(run.model, run.val_examples, config, where.device, where.dtype)
    record["val_loss"] = round(loss, 6)
    bar.write(f"step {run.step}: train loss {step_loss.item():.4f}, "
              f"val loss {record['val_loss']:.4f}")


def marks(run, config):
    """progress.json: how far the run is, and what defines it."""
    return {"step": run.step, "max_iters": run.max_iters, "finished": run.step >= run.max_iters,
            "init_from": run.origin, "data": config["data"],
            "settings": settings(config, run.origin)}


def write_checkpoint(run, config, where):
    """Save the run as it is now: ckpt.pt (everything an exact resume needs), the HF export and
    progress.json (save_run)."""
    model_config = {k: v for k, v in vars(run.model.config).items() if k != "dropout"}
    cuda_rng = None
    if where.device.startswith("cuda"):
        cuda_rng = torch.cuda.get_rng_state(where.device)
    state = {"model": run.model.state_dict(), "model_config": model_config,
             "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
             "config": config, "step": run.step, "max_iters": run.max_iters, "origin": run.origin,
             "samples_seen": run.step * sequences_per_step(config, where.world), "log": run.log,
             "rng": torch.get_rng_state(), "cuda_rng": cuda_rng}
    save_run(where.out_dir, run.model, state, marks(run, config))


def check_finite(model, record, out_dir, saved):
    """Before a checkpoint: the weights after this step's update, and its val loss, must be finite
    numbers."""
    if any(non_finite(p.detach()) for p in model.parameters()):
        raise diverged(f"the update of step {record['step']} made the weights NaN or Inf", model,
                       first=False, out_dir=out_dir, saved=saved)
    if not math.isfinite(record.get("val_loss", 0.0)):
        raise diverged(f"the val loss is {record['val_loss']} at step {record['step']}", model,
                       first=False, out_dir=out_dir, saved=saved)


def diverged(what, model, first, out_dir, saved):
    """The error for a run whose loss or weights stopped being finite: what happened, that nothing
    of it was saved, where the last good checkpoint is, and a likely cause (`first`: on the run's
    first step, so the weights may have come in broken)."""
    last = "none yet"
    if saved is not None:
        last = f"{out_dir / 'ckpt.pt'} (step {saved})"
    bad = None  # the first parameter that is not finite
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = name
            break
    if bad is None:
        cause = "Try a lower --learning_rate (or keep --grad_clip on)"
    elif first:
        cause = f"The weights were not finite ({bad}) when loaded"
    else:
        cause = (f"An update made the weights NaN or Inf ({bad}): try a lower --learning_rate "
                 f"(or keep --grad_clip on)")
    return FloatingPointError(f"{what}; stopping, nothing of it saved. Last good checkpoint: "
                              f"{last}. {cause}.")


def write_log(out_dir, records, mode):
    """Write ("w") or append ("a") records to out_dir/log.jsonl; a full disk is one line naming
    the file."""
    path = Path(out_dir) / "log.jsonl"
    try:
        with open(path, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    except OSError as e:
        raise OSError(f"{path}: could not write the training log ({e.strerror or e})") from None


def finish(run, config, where, stop):
    """After the loop: leave DDP; on the master, say how the run ended and, if it finished, plot
    the losses and answer PREVIEW_INSTRUCTIONS again. Returns the exit status."""
    if where.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    code = 0
    if stop:
        code = 128 + int(stop[0])
    if not where.master:
        return code
    if stop:
        print(f"stopped at step {run.step}; continue with: python train.py --init_from=resume "
              f"--out_dir={where.out_dir}")
        return code
    if where.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(where.device) / 2**30:.1f} GiB")
    plot_losses(run.log, where.out_dir / "loss.png")
    preview_answers(run.model, "after training", config["preview"], where.device, where.dtype)
    print(f"done: {where.out_dir}/ holds the HF-format model; try python sample.py "
          f"--init_from={where.out_dir} --prompt=\"...\"")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    # user mistakes, data errors, downloads: one line
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    # Ctrl-C before the first step (after it, the loop stops at a step's end)
    except KeyboardInterrupt:
        print("interrupted before training began; the out_dir is as it was", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
