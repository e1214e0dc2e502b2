"""
The checkpoint formats, read and written in one place:

- an HF GPT-2 directory (config.json + model.safetensors), as the hub serves it and train.py
  exports it, or a bare .safetensors file: GPT.from_pretrained and GPT.save_pretrained (model.py)
  call read_pretrained and write_pretrained. Safetensors is read by a small strict reader (no
  pickle anywhere), which checks every byte range and refuses NaN weights;
- a train.py run directory: ckpt.pt (everything needed to resume), progress.json (how far the run
  got: what evaluate.py asks before it trusts a run) and that same HF export, replaced together at
  every checkpoint.

It knows nothing of the network: the HF config becomes a dict of GPTConfig's fields, and model.py
builds the GPTConfig from it.
"""
import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

import chat

EOT = 50256  # <|endoftext|>: GPT-2's bos and eos token, as config.json says
VOCAB = 50257  # GPT-2's ids; a restricted vocabulary (token_ids) is a subset of them
HUB_MODELS = {name: f"openai-community/{name}"
              for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


# ----------------------------------------------------------- HF model directories and .safetensors

def read_pretrained(name_or_path):
    """(GPTConfig's fields, tensors, path) of `gpt2` ... `gpt2-xl` from the hub (cached), an HF
    directory (config.json + model.safetensors), or a .safetensors file whose config is read off
    its tensor shapes."""
    path = Path(name_or_path)
    if str(name_or_path) in HUB_MODELS:
        import hub  # only needed for downloads
        repo = HUB_MODELS[str(name_or_path)]
        path = hub.cached_download(repo, "config.json").parent
        hub.cached_download(repo, "model.safetensors")
        try:
            return read_pretrained(path)
        # a cached file that does not parse (cached by an older version, or changed)
        except ValueError as e:
            raise ValueError(f"{e}; it is a cached download: delete {path} and run again to "
                             f"download it afresh") from None
    if path.is_dir():
        config = config_from_hf_json(path / "config.json")
        tensors, _ = load_safetensors(path / "model.safetensors")
    elif path.is_file() and path.suffix == ".safetensors":
        tensors, metadata = load_safetensors(path)
        config = config_from_shapes(path, tensors, metadata)
    elif path.exists():
        raise ValueError(f"{path}: expected a directory with config.json + model.safetensors, "
                         f"or a .safetensors file")
    else:
        raise FileNotFoundError(f"{name_or_path}: no such file or directory, and not one of the "
                                f"hub models {', '.join(HUB_MODELS)}")
    return config, tensors, path


def write_pretrained(directory, c, tensors):
    """Write config.json + model.safetensors as transformers' save_pretrained does, for the
    GPTConfig `c` and the state dict `tensors` (lm_head.weight left out: it is wte's). Each file
    goes to a temp name and is renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
          "activation_function": "gelu_new",
          "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
          "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
          "layer_norm_epsilon": 1e-5, "n_inner": None,
          "bos_token_id": EOT, "eos_token_id": EOT, "tie_word_embeddings": True,
          "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout}
    metadata = {"format": "pt", "n_head": str(c.n_head)}
    # transformers keeps the extra field; its logits are over these rows
    if c.token_ids is not None:
        hf["token_ids"] = list(c.token_ids)
        metadata["token_ids"] = json.dumps(list(c.token_ids))
    chat.write_atomic(directory / "config.json", json.dumps(hf, indent=2))
    save_safetensors(tensors, directory / "model.safetensors", metadata)


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# a header is JSON describing tensors; anything bigger is not a checkpoint
MAX_HEADER = 100 * 1024 * 1024


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor}, checking every byte range first.

    Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets}, and an optional "__metadata__"}, then the data section; offsets are relative to
    the data section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the "
                             f"{MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise ValueError(f"{path}: safetensors header length {n} is larger than the file "
                             f"({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not (isinstance(metadata, dict)
                and all(isinstance(v, str) for v in metadata.values())):
            raise ValueError(f"{path}: safetensors __metadata__ must map strings to strings")
        data_size = size - 8 - n
        spans = []  # (begin, stop, name): where each tensor's bytes lie in the data section
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"{path}: tensor '{name}' needs exactly dtype, shape and "
                                 f"data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {dtype} "
                                 f"(F32, F16, BF16 only)")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise ValueError(f"{path}: tensor '{name}' has invalid shape {shape}")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data_size):
                raise ValueError(f"{path}: tensor '{name}' data_offsets {offsets} lie outside the "
                                 f"data section ({data_size} bytes; file truncated?)")
            nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise ValueError(f"{path}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes "
                                 f"but {dtype}{shape} needs {nbytes}")
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            # the data section must be covered exactly once, with no overlap and no hole
            if begin != end:
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
            # little-endian on disk, as on every host we run on
            f.readinto(t.view(-1).view(torch.uint8).numpy())
            tensors[name] = t
    # a diverged run saves NaNs that would only show up as garbage text later
    for name, t in tensors.items():
        if non_finite(t):
            raise ValueError(f"{path}: tensor '{name}' has {non_finite(t)} NaN or Inf values "
                             f"(a diverged or corrupted checkpoint)")
    return tensors, metadata


def non_finite(t):
    """How many NaN or Inf values `t` holds. A sum is finite only if every value is, and summing is
    20x faster than isfinite(t) on a CPU (1 s for GPT-2's 124M weights); only a non-finite sum (or
    one that overflowed float16) pays for the exact count."""
    if torch.isfinite(t.sum()):
        return 0
    return t.numel() - int(torch.isfinite(t).sum())


def save_safetensors(tensors, path, metadata):
    """Write {name: tensor} as a .safetensors file (the format load_safetensors reads),
    atomically."""
    # torch.float32 -> "F32", ...
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header = {"__metadata__": metadata}
    offset = 0  # where the next tensor's bytes start in the data section
    for name, t in tensors.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # pad the header so tensor data starts 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


# HF's names; n_positions is block_size
SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")


def config_from_hf_json(path):
    """GPTConfig's fields from an HF GPT-2 config.json, refusing variants this GPT does not
    implement."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an HF model directory needs config.json + "
                                f"model.safetensors)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(hf, dict):
        kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(hf), "a number")
        raise ValueError(f"{path}: expected a JSON object, not {kind}")
    for key in SIZES:
        if type(hf.get(key)) is not int:  # not isinstance: true and false are ints to Python
            raise ValueError(f"{path}: missing or non-integer field '{key}'")
    unsupported = {"activation_function": "gelu_new", "n_inner": None, "layer_norm_epsilon": 1e-5,
                   "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                   "scale_attn_weights": True, "add_cross_attention": False,
                   "tie_word_embeddings": True}
    for key, expected in unsupported.items():
        value = hf.get(key, expected)
        if value != expected and not (key == "n_inner" and value == 4 * hf["n_embd"]):
            raise ValueError(f"{path}: field '{key}' is {value!r}; this GPT-2 implements only "
                             f"{expected!r}")
    config = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                  n_head=hf["n_head"], n_embd=hf["n_embd"],
                  token_ids=check_token_ids(path, hf.get("token_ids")))
    return check_sizes(path, config, {key: f"field '{key}'" for key in SIZES})


def check_sizes(path, config, names):
    """`config` (GPTConfig's fields) if a GPT can be built from it, else a one-line ValueError:
    every size must be positive and the heads must split n_embd evenly. `names` says what each size
    in SIZES is called in the file. A model with fewer rows than GPT-2 and no token_ids (a cut-down
    export) knows the ids 0 .. vocab_size - 1: said so as token_ids, so that an id past its rows is
    refused by name instead of indexing past wte."""
    sizes = {"n_layer": config["n_layer"], "n_head": config["n_head"], "n_embd": config["n_embd"],
             "n_positions": config["block_size"], "vocab_size": config["vocab_size"]}
    for key, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{path}: {names[key]} is {value}; it must be positive")
    if config["n_embd"] % config["n_head"]:
        raise ValueError(f"{path}: {names['n_head']} is {config['n_head']}, which does not divide "
                         f"n_embd {config['n_embd']} (each head gets n_embd / n_head dimensions)")
    if config["token_ids"] is not None and len(config["token_ids"]) != config["vocab_size"]:
        raise ValueError(f"{path}: token_ids has {len(config['token_ids'])} ids for vocab_size "
                         f"{config['vocab_size']} (one per row of wte)")
    if config["token_ids"] is None and config["vocab_size"] < VOCAB:
        config["token_ids"] = tuple(range(config["vocab_size"]))
    return config


def check_token_ids(where, ids):
    """A restricted vocabulary's GPT-2 ids (a JSON list) as a tuple; None stays None (all of
    GPT-2's)."""
    if ids is None:
        return None
    if not (isinstance(ids, list) and ids and all(type(i) is int and 0 <= i < VOCAB for i in ids)
            and len(set(ids)) == len(ids)):
        raise ValueError(f"{where}: token_ids must be a list of distinct GPT-2 ids "
                         f"(0 to {VOCAB - 1})")
    return tuple(ids)


def config_from_shapes(path, tensors, metadata):
    """GPTConfig's fields for a bare .safetensors file. Shapes fix all sizes but the head count:
    taken from the file's metadata when it says (our exports do), else GPT-2's 64-dimensional heads
    (true of all four sizes)."""
    key = {k.removeprefix("transformer."): k for k in tensors}
    for name in ("wte.weight", "wpe.weight"):
        if name not in key:
            raise ValueError(f"{path}: missing tensor '{name}'")
        # (rows, n_embd); anything else would fail to unpack below
        if tensors[key[name]].dim() != 2:
            raise ValueError(f"{path}: tensor '{name}' has shape "
                             f"{tuple(tensors[key[name]].shape)}; expected 2 dimensions")
    vocab_size, n_embd = tensors[key["wte.weight"]].shape
    n_layer = len({k.split(".")[1] for k in key if k.startswith("h.")})
    n_head = metadata.get("n_head", str(max(1, n_embd // 64)))
    # int() would also take " 4", "+4", "4_0" and "٤"
    if not (n_head.isascii() and n_head.isdigit()):
        raise ValueError(f"{path}: metadata 'n_head' is {n_head[:40]!r}; expected a positive "
                         f"integer")
    token_ids = None
    if "token_ids" in metadata:
        try:
            token_ids = json.loads(metadata["token_ids"])
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{path}: metadata token_ids is not JSON") from None
    config = dict(block_size=tensors[key["wpe.weight"]].shape[0], vocab_size=vocab_size,
                  n_layer=n_layer, n_head=int(n_head), n_embd=n_embd,
                  token_ids=check_token_ids(path, token_ids))
    # what each size is called in the error messages: where it was read off the file
    names = {"n_layer": "the number of blocks (tensors h.N.*)",
             "n_embd": "n_embd (columns of wte.weight)",
             "n_positions": "n_positions (rows of wpe.weight)",
             "vocab_size": "vocab_size (rows of wte.weight)",
             "n_head": "metadata 'n_head'"}
    if "n_head" not in metadata:
        names["n_head"] = "n_head (n_embd // 64: no metadata 'n_head')"
    return check_sizes(path, config, names)


def load_hf_state_dict(model, tensors, path):
    """Copy HF GPT-2 tensors into `model`, accepting both the hub's layout and
    save_pretrained's."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, tensors.get("wte.weight", lm_head)):
        raise ValueError(f"{path}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    # the causal-mask buffers of older HF versions are constants, not weights
    masks = (".attn.bias", ".attn.masked_bias")
    tensors = {k: v for k, v in tensors.items() if not k.endswith(masks)}
    expected = {k.removeprefix("transformer."): p for k, p in model.state_dict().items()
                if k != "lm_head.weight"}
    for key in tensors:
        if key not in expected:
            raise ValueError(f"{path}: unexpected tensor '{key}' (not a GPT-2 checkpoint?)")
    for key, param in expected.items():
        if key not in tensors:
            raise ValueError(f"{path}: missing tensor '{key}'")
        if tensors[key].shape != param.shape:
            raise ValueError(f"{path}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                             f"expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensors[key])


# ------------------------------------------------------------------------ a train.py run directory

RUN_FILES = ("ckpt.pt", "progress.json", "log.jsonl", "config.json", "model.safetensors",
             "loss.png")
# a directory with any of these holds a run (or a model)
MARKS = ("ckpt.pt", "progress.json", "model.safetensors")
# an --overwrite run's predecessor waits here until the new run's first checkpoint
REPLACED = ".replaced"


def progress(out_dir):
    """{"step", "max_iters", "finished", "init_from", "data", "settings"} of the run in out_dir
    (progress.json, written with every checkpoint), or None if out_dir holds no run of train.py. A
    run is finished when its last step is its max_iters; init_from is the model it started from
    (kept through resumes); settings are the flags that define what it learned (train.py
    --print_config prints them; {} in runs from before they were kept)."""
    path = Path(out_dir) / "progress.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        return {"step": int(state["step"]), "max_iters": int(state["max_iters"]),
                "finished": bool(state["finished"]), "init_from": str(state.get("init_from", "")),
                "data": str(state.get("data", "")), "settings": dict(state.get("settings", {}))}
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a progress file of train.py (delete it, or the "
                         f"run)") from None


def holds_run(out_dir):
    return any((Path(out_dir) / name).exists() for name in MARKS)


def save_run(out_dir, model, state, marks):
    """Write a checkpoint: ckpt.pt (to resume), the HF export (config.json + model.safetensors) and
    progress.json (`marks`, see progress()), all from the same step. Everything is written into
    out_dir/.saving first; only when all of it is on disk are the files moved in, progress.json
    last, so a full disk or a kill leaves the previous step's files whole, and progress.json never
    speaks for files older than itself (a resume repairs the rest). The first checkpoint of an
    --overwrite run lets the run it replaced go (set_aside)."""
    out_dir = Path(out_dir)
    staging = out_dir / ".saving"
    try:
        staging.mkdir(exist_ok=True)
        model.save_pretrained(staging)
        save_checkpoint(state, staging / "ckpt.pt")
        chat.write_atomic(staging / "progress.json", json.dumps(marks))
    # OSError, or torch.save's RuntimeError ("file write failed") on a full disk
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        why = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
        raise OSError(f"could not write the checkpoint of step {state['step']} into {out_dir} "
                      f"({why}); nothing of it was kept, and the files already there are "
                      f"intact") from None
    for name in ("ckpt.pt", "config.json", "model.safetensors", "progress.json"):
        os.replace(staging / name, out_dir / name)
    staging.rmdir()
    shutil.rmtree(out_dir / REPLACED, ignore_errors=True)


def set_aside(out_dir):
    """--overwrite, once the new run has checked its flags, data and model: move the old run's
    files into out_dir/.replaced. The new run's first checkpoint deletes them (save_run); if it
    fails before one, put_back returns them, so a mistake never costs the run that was there. They
    gather in .replacing, renamed .replaced in one step once all are there: from then on every run
    file in out_dir is the new run's."""
    out_dir = Path(out_dir)
    moving = out_dir / ".replacing"
    moving.mkdir(exist_ok=True)
    for name in RUN_FILES:
        if (out_dir / name).exists():
            os.replace(out_dir / name, moving / name)
    os.replace(moving, out_dir / REPLACED)


def put_back(out_dir):
    """The new run ended before its first checkpoint: delete what it wrote and return the run it
    was to replace."""
    out_dir = Path(out_dir)
    moving = out_dir / ".replacing"
    aside = out_dir / REPLACED
    # stopped while setting aside: every file is the old run's, part of them not yet moved
    if moving.is_dir():
        for path in moving.iterdir():
            os.replace(path, out_dir / path.name)
        moving.rmdir()
    if aside.is_dir():
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)  # the new run's (its log.jsonl)
            if (aside / name).exists():
                os.replace(aside / name, out_dir / name)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(out_dir / ".saving", ignore_errors=True)


def settle(out_dir):
    """Finish what a killed --overwrite run left undone: its predecessor still set aside, with
    (delete it) or without (put it back) a checkpoint of the new run in out_dir. Called under the
    lock, before anything reads out_dir."""
    out_dir = Path(out_dir)
    if (out_dir / REPLACED).is_dir() and (out_dir / "ckpt.pt").exists():
        shutil.rmtree(out_dir / REPLACED, ignore_errors=True)
    put_back(out_dir)


def save_checkpoint(state, path):
    """torch.save to a temp file, then rename: a crash or SIGKILL mid-write leaves the old
    checkpoint whole."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, weights=True):
    """ckpt.pt of a run, loaded without pickle's code execution (weights_only); a file that is not
    one of train.py's checkpoints (truncated, random bytes, another program's) is one line. The
    tensors are mapped from the file, not read, until used; weights=False skips the check that they
    are finite (which reads them)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # a truncated, random or foreign file: the unpickler can fail in any way on bad bytes
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        first = lines[0][:120]  # the message's first line, or the error's name
        raise ValueError(f"{path}: not a readable checkpoint of train.py ({first})") from None
    keys = {"model", "model_config", "optimizer", "scaler", "config", "step", "log", "rng"}
    if not isinstance(ckpt, dict) or not keys <= set(ckpt):
        missing = sorted(keys - set(ckpt or {}))[:3]
        raise ValueError(f"{path}: not a checkpoint of train.py (missing {missing})")
    bad = [k for k, t in ckpt["model"].items()
           if weights and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: tensor '{bad[0]}' holds NaN or Inf; resume from an earlier run "
                         f"instead")
    return ckpt


def unfinished(out_dir):
    """Why the train.py run in out_dir is not a finished model (a one-line reason with what to do),
    or None if it is one, or out_dir holds no run. Its ckpt.pt knows the step it reached and the
    run's max_iters; progress.json must agree with it, or the run was stopped while it saved."""
    out_dir = Path(out_dir)
    state = progress(out_dir)
    path = out_dir / "ckpt.pt"
    resume = f"python train.py --init_from=resume --out_dir={out_dir}"
    if not path.is_file():
        if state is None or state["finished"]:
            return None
        return (f"{out_dir} is an unfinished run (step {state['step']} of {state['max_iters']}) "
                f"and has no ckpt.pt to finish it from")
    ckpt = load_checkpoint(path, weights=False)
    step = ckpt["step"]
    max_iters = ckpt.get("max_iters", step)
    if step < max_iters:
        return (f"{out_dir} is an unfinished run (step {step} of {max_iters}); finish it with: "
                f"{resume}")
    if not marks_agree(state, ckpt):
        return (f"{out_dir}: its progress.json does not match its ckpt.pt (stopped while "
                f"saving?); repair it with: {resume}")
    return None


def marks_agree(state, ckpt):
    """Whether progress.json (`state`, see progress()) speaks for the checkpoint `ckpt`: written
    with it, so that the HF export beside it is the checkpoint's too (save_run moves progress.json
    in last)."""
    if state is None:
        return False
    max_iters = ckpt.get("max_iters", ckpt["step"])
    said = (state["step"], state["max_iters"], state["finished"])  # what progress.json says
    saved = (ckpt["step"], max_iters, ckpt["step"] >= max_iters)  # what the checkpoint holds
    return said == saved
