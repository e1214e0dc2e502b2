"""
The paper's chat format and its loss mask: the one place that turns conversations into GPT-2
tokens.

    python chat.py "Write a poem called Spring"     # the tokens of a generation prompt
    python chat.py ../shared/data/lima_data.jsonl   # checks a messages JSONL file: its statistics

One turn (paper section 3, Figure 1):

    <|user|>\\n{instruction}\\n<|assistant|>\\n{response}<|endoftext|>

Every message ends in "\\n", except a response that ends the conversation; a system message, if
any, is `<|system|>\\n{content}\\n`; every content is stripped of surrounding whitespace (all three
as in open-instruct, whose Tulu format the paper's code uses). The tags are plain text to GPT-2,
not special tokens; the only special token is <|endoftext|> (id 50256), which ends every response.
The loss mask is open-instruct's (finetune.py 361-381): each system and user message is masked (0),
and so is an assistant tag right after one; everything else is trained (1): each response, its
<|endoftext|>, the "\\n" after that when another message follows, and an assistant tag that follows
a response or opens the conversation. Response tuning (section 3) is this same format with every
user content empty: `<|user|>\\n\\n<|assistant|>\\n{response}`.

A generation prompt is the same text ending in `<|assistant|>\\n`, with the user and system
contents as given, not stripped: the official evaluation's template (eval/templates.py 4-19) strips
only assistant contents. For stripped contents it is exactly the training prefix of the response.

Tokenization is done piece by piece, cut where the mask changes, so a mask boundary is always a
token boundary. Text written by a user is always ordinary text: "<|endoftext|>" typed into an
instruction is 7 tokens of text, never the special token.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import tiktoken
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent  # the repository: prepared data lives in data/<name>/
EOT = 50256  # <|endoftext|>
ROLES = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
_encoding = None


def tokenizer():
    global _encoding
    if _encoding is None:  # loaded on first use: tiktoken reads (or downloads) the GPT-2 BPE files
        try:
            _encoding = tiktoken.get_encoding("gpt2")
        # no network and no cache: tiktoken's own error names a URL, not the fix
        except Exception as e:
            raise OSError(f"GPT-2's tokenizer files could not be read or downloaded "
                          f"({type(e).__name__}); offline, set TIKTOKEN_CACHE_DIR to a directory "
                          f"holding tiktoken's cache of them "
                          f"(docs/design.md: 'The tokenizer offline')") from e
    return _encoding


def encode(text):
    """Token ids of `text`, special-token strings included as plain text."""
    return tokenizer().encode_ordinary(text)


def decode(ids):
    """Text of `ids`, <|endoftext|> dropped (it ends a response; it is not part of it)."""
    return tokenizer().decode([i for i in ids if i != EOT])


def _pieces(messages, strip_inputs=True):
    # (text or EOT, trained) in order. The mask is open-instruct's (finetune.py 361-381): a system
    # or user message is masked from its tag to its closing "\n", and so is the assistant tag when
    # a response follows it; everything else trains, the "\n" after <|endoftext|> included (it is
    # part of the response's message).
    pieces = []
    for i, message in enumerate(messages):
        role = message["role"]
        # a list or dict is unhashable: `in` would raise TypeError
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected system, user or assistant)")
        content = message["content"]
        if strip_inputs or role == "assistant":
            # stripped as finetune.py 342-347 does: 327 of LIMA's 2,168 turns end in whitespace,
            # which would otherwise be learned right before <|endoftext|>. Prompts keep user and
            # system contents as given, as eval/templates.py 8 and 10 do (only 12, the assistant's,
            # strips)
            content = content.strip()
        if role != "assistant":
            pieces.append((ROLES[role] + content + "\n", False))
            continue
        after_input = i > 0 and messages[i - 1]["role"] != "assistant"
        pieces += [(ROLES[role], not after_input), (content, True), (EOT, True)]
        if i < len(messages) - 1:
            # the official text is .strip()ped (finetune.py 352): no "\n" after the last response.
            # A conversation that ends in a user or system message keeps that message's last "\n":
            # untrained, it changes no loss
            pieces.append(("\n", True))
    # adjacent texts of the same kind are encoded together, as the official encodes its whole text:
    # an empty instruction's "<|user|>\n\n" alone ends in the one token "\n\n", where
    # "\n\n<|assistant|>" has "\n" twice
    merged = []
    for text, trained in pieces:
        if merged and text != EOT and merged[-1][0] != EOT and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _encode(pieces):
    # token ids and mask of _pieces: every cut falls between two GPT-2 pre-tokens ("\n" before
    # "<|", a tag's "\n" before a stripped response, <|endoftext|>), so the ids are those of the
    # whole text
    ids, mask = [], []
    for text, trained in pieces:
        if text == EOT:
            tokens = [EOT]
        else:
            tokens = encode(text)
        ids += tokens
        mask += [int(trained)] * len(tokens)
    return ids, mask


def encode_chat(messages):
    """Token ids and loss mask of a conversation [{"role": ..., "content": ...}, ...], for
    training.

    mask[t] is 1 where token t is trained: a response, its <|endoftext|> and what follows up to the
    next system or user message (open-instruct's mask; module docstring)."""
    return _encode(_pieces(messages))


def encode_prompt(instruction_or_messages):
    """Tokens that ask for the next assistant turn: the conversation so far (or one instruction)
    followed by `<|assistant|>\\n`, as the official evaluation formats it (eval/templates.py 4-19):
    user and system contents are not stripped. For contents without surrounding whitespace this is
    the training prefix of a response."""
    messages = instruction_or_messages
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    asking = list(messages) + [{"role": "assistant", "content": ""}]
    ids, _ = _encode(_pieces(asking, strip_inputs=False))
    # drop the empty response's <|endoftext|>: the prompt ends with "<|assistant|>\n"
    return ids[:-1]


def targets_from_mask(ids, mask):
    """Next-token targets for `ids` with untrained positions set to -1 (ignored by GPT.forward's
    loss): position t predicts token t+1, and counts only if token t+1 is trained."""
    return [nxt if m else -1 for nxt, m in zip(ids[1:], mask[1:])] + [-1]


# ------------------------------------------------------------------ conversations in JSONL files

def read_bytes(path):
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path, path.read_bytes()


# what json_line returns for a blank line (a JSON null is a row, and an error for every reader)
BLANK = object()


def json_line(where, line):
    """The JSON value of one line of JSONL bytes, or BLANK; a one-line ValueError naming `where`
    otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte {e.start} is 0x{line[e.start]:02x})") from None
    if not text.strip():
        return BLANK
    return parse_json(where, text)


def parse_json(where, text, whole_file=False):
    """json.loads with its failures as one-line ValueErrors naming `where` ("file:line" for a JSONL
    row; the file for a whole JSON document, whose line is then added)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if whole_file else where
        raise ValueError(f"{at}: malformed JSON ({e.msg}, column {e.colno})") from None
    # json.loads recurses once per [ or {: a line of 100,000 "[" exhausts the stack
    except RecursionError:
        raise ValueError(f"{where}: malformed JSON (nested too deeply)") from None


def numbered_lines(path, data):
    """("file:line", line) for each line of JSONL bytes, numbered from 1."""
    return ((f"{path}:{n}", line) for n, line in enumerate(data.split(b"\n"), 1))


def json_lines(path, data):
    """[(where, row)] for each non-blank line of JSONL bytes; `where` is "file:line", and every
    error names it."""
    rows = []
    for where, line in numbered_lines(path, data):
        row = json_line(where, line)
        if row is not BLANK:
            rows.append((where, row))
    return rows


def conversation(where, row):
    """The messages of one row of a messages JSONL file, checked (check_messages); a ValueError if
    malformed."""
    if not isinstance(row, dict) or "messages" not in row:
        raise ValueError(f"{where}: missing field 'messages'")
    return check_messages(row["messages"], where)


def scan(path, read_row, what):
    """(items, errors) of a JSONL file: every non-blank line is read by read_row(where, row), and
    each malformed one gives one error (one line of text naming file:line and field), in file
    order. `what` names the items."""
    path, data = read_bytes(path)
    items, errors = [], []
    for where, line in numbered_lines(path, data):
        try:
            row = json_line(where, line)
            if row is not BLANK:
                items.append(read_row(where, row))
        except ValueError as e:
            errors.append(str(e))
    if not items and not errors:
        errors.append(f"{path}: empty file, no {what}")
    return items, errors


def scan_conversations(path):
    """(conversations, errors) of a messages JSONL file (scan)."""
    return scan(path, conversation, "conversations")


def read_conversations(path):
    """Conversations from a messages JSONL file, one {"messages": [{"role", "content"}, ...]} per
    line (the open-instruct / Tulu format; other keys ignored). Every error names the file, line
    and field; the first malformed line is raised (`python chat.py FILE` lists them all)."""
    conversations, errors = scan_conversations(path)
    if errors:
        raise ValueError(errors[0])
    return conversations


def jsonl_kind(path):
    """"text" if the first row of a JSONL file is a document ({"text": ...}), else "messages"."""
    path, data = read_bytes(path)
    first = next((line for line in data.split(b"\n") if line.strip()), b"")
    rows = json_lines(path, first)
    row = rows[0][1] if rows else None
    if isinstance(row, dict) and "text" in row and "messages" not in row:
        return "text"
    return "messages"


def document(where, row):
    """The text of one row of a pretraining JSONL file; a ValueError if it has none."""
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: missing string field 'text'")
    return row["text"]


def scan_documents(path):
    """(documents, errors) of a pretraining JSONL file, one {"text": ...} per line (scan)."""
    return scan(path, document, "documents")


def read_documents(path):
    """Plain-text documents from a JSONL file, one {"text": ...} per line: pretraining data
    (TinyWorld's). The first malformed line is raised (`python chat.py FILE` lists them all)."""
    documents, errors = scan_documents(path)
    if errors:
        raise ValueError(errors[0])
    return documents


# what a non-string JSON value is called in an error message
JSON_KINDS = {list: "a list", dict: "an object", bool: "a boolean", int: "a number",
              float: "a number", type(None): "null"}


def shorten(text, limit=60):
    """repr(text), cut to `limit` characters: an error message quotes the field, not a whole
    document."""
    text = repr(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: {field} must be an object with 'role' and 'content'")
        # first: a list or dict is unhashable to `in ROLES`
        if "role" not in m or not isinstance(m["role"], str):
            what = "missing" if "role" not in m else JSON_KINDS[type(m["role"])]
            raise ValueError(f"{where}: {field}.role is {what}; "
                             f"expected system, user or assistant")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: {field}.role is {shorten(m['role'])}; "
                             f"expected system, user or assistant")
        if not isinstance(m.get("content"), str):
            kind = type(m.get("content")).__name__
            raise ValueError(f"{where}: {field}.content must be a string, not {kind}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: {field}.content is empty; "
                             f"an assistant turn is what training learns")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_instructions(path):
    """Instructions to answer: JSONL with an "instruction" field per line (the paper's val.jsonl),
    or AlpacaEval's JSON list of {"instruction", "output", "dataset", ...}. Returns
    [{"instruction", "dataset", "reference"}, ...], the reference being a "reference", "output" or
    "answer" (TinyWorld) field if the file gives one, else None."""
    path, data = read_bytes(path)
    if data.lstrip()[:1] == b"[":  # AlpacaEval: one JSON list
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 (byte {e.start})") from None
        items = parse_json(path, text, whole_file=True)
        rows = [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    else:
        rows = json_lines(path, data)
    out = []
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise ValueError(f"{where}: missing string field 'instruction'")
        if not row["instruction"].strip():
            raise ValueError(f"{where}: empty instruction")
        # a reference answer, if any
        reference = row.get("reference", row.get("output", row.get("answer")))
        if not isinstance(reference, str) or not reference.strip():
            reference = None
        out.append({"instruction": row["instruction"], "dataset": row.get("dataset", path.stem),
                    "reference": reference})
    if not out:
        raise ValueError(f"{path}: empty file, no instructions")
    return out


def write_atomic(path, text):
    """Write text to path through a temporary file renamed into place: never a half-written
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path, rows):
    """Write rows as JSON lines, atomically."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def empty_instructions(messages):
    """The paper's response tuning data (section 3): the same conversation with every user turn
    emptied, so that training sees `<|user|>\n\n<|assistant|>\n{response}<|endoftext|>`. Other
    turns are kept as they are."""
    return [{**m, "content": ""} if m["role"] == "user" else m for m in messages]


def normalize(messages):
    """Every content with its line ends as \\n: Windows' \\r\\n first, then any lone \\r (MBPP task
    732's code ends in one). MBPP's code and the poetry CSV carry \\r\\n, and a model trained on
    them learns to write \\r. (The official scripts keep them: a departure,
    docs/faithfulness.md.)"""
    normalized = []
    for m in messages:
        content = m["content"].replace("\r\n", "\n").replace("\r", "\n")
        normalized.append({**m, "content": content})
    return normalized


def write_sets(directory, name, train, val=(), responses_only=False):
    """Write {name}_train.jsonl and, if there is a validation set, {name}_val.jsonl, every content
    normalized; print counts and token lengths. A validation conversation that also occurs in the
    training set is dropped (and counted), so the validation loss never measures memorization.
    responses_only also writes {name}_responses_*: the same conversations with every user turn
    emptied (response tuning, section 3)."""
    train = [normalize(c) for c in train]
    seen = {json.dumps(c, sort_keys=True) for c in train}
    kept = [c for c in map(normalize, val) if json.dumps(c, sort_keys=True) not in seen]
    if len(kept) < len(val):
        print(f"{name}: dropped {len(val) - len(kept)} validation conversations that are also in "
              f"the training set")
    splits = {"train": train, "val": kept} if kept else {"train": train}
    variants = {name: lambda c: c}
    if responses_only:
        variants[f"{name}_responses"] = empty_instructions
    made = {}  # every file's rows, made before any is written: a failure leaves no file half made
    for variant, transform in variants.items():
        for split, rows in splits.items():
            path = Path(directory) / f"{variant}_{split}.jsonl"
            made[path] = [{"messages": transform(c)} for c in rows]
    for path, rows in made.items():
        write_jsonl(path, rows)
    for variant in variants:
        # an older preparation's validation file would otherwise be used with the new training set
        if not kept:
            (Path(directory) / f"{variant}_val.jsonl").unlink(missing_ok=True)
    describe(f"{name}_train", train)
    files = ", ".join(f"{v}_{s}.jsonl" for v in variants for s in splits)
    print(f"wrote {files} to {directory}: {len(train)} train, {len(kept)} val")


def write_split(directory, name, conversations, n_val, seed=0, responses_only=False):
    """Shuffle (seeded), hold out n_val conversations for validation, and write_sets the two."""
    conversations = list(conversations)
    random.Random(seed).shuffle(conversations)
    write_sets(directory, name, conversations[n_val:], conversations[:n_val], responses_only)


def prepare_command(main, doc, default_dir):
    """The command line every data/*/prepare.py shares: `[--out_dir=DIR]` (default: the script's
    own folder) or --help. main(out_dir) runs; a failed download or a malformed file ends in one
    line and exit status 1."""
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        flag = f"    --out_dir=DIR    where to write the files (default: {default_dir})"
        sys.exit(print(f"{doc.strip()}\n\n{flag}"))
    if len(argv) > 1 or (argv and not argv[0].startswith("--out_dir=")):
        sys.exit(f"error: unknown argument {argv[-1]!r} "
                 f"(the one flag is --out_dir=DIR; see --help)")
    # Path("") is the current directory
    if argv and not argv[0].removeprefix("--out_dir=").strip():
        sys.exit("error: --out_dir is empty; name a directory, e.g. --out_dir=.")
    try:
        main(Path(argv[0].removeprefix("--out_dir=")) if argv else Path(default_dir))
    except (ValueError, OSError, KeyError) as e:  # KeyError: a file without a field it must have
        sys.exit(f"error: {e}")


# ------------------------------------------------------------------- prepared data sets, by name

def data_files(name):
    """(train, val) paths for --data: a JSONL path (no val split), or a prepared name, prepared on
    first use by running data/<name>/prepare.py (which may download). X_responses (and X_anything)
    lives beside X."""
    if name.endswith(".jsonl"):
        return Path(name), None
    base = name.split("_")[0]
    train = ROOT / "data" / base / f"{name}_train.jsonl"
    val = ROOT / "data" / base / f"{name}_val.jsonl"
    prepare_data(base, train)
    if not train.is_file():
        prepared = (ROOT / "data").glob("*/*_train.jsonl")
        known = {p.name.removesuffix("_train.jsonl") for p in prepared}
        known |= {p.parent.name for p in (ROOT / "data").glob("*/prepare.py")}
        raise ValueError(f"--data={name}: unknown data name and not a .jsonl file "
                         f"(known: {', '.join(sorted(known))})")
    return train, val if val.is_file() else None


def prepare_data(name, path):
    """If `path` is missing, run data/<name>/prepare.py, which writes it (and may download)."""
    prepare = ROOT / "data" / name / "prepare.py"
    if not path.is_file() and prepare.is_file():
        print(f"{path.relative_to(ROOT)} is missing: running {prepare.relative_to(ROOT)}",
              file=sys.stderr)
        if subprocess.run([sys.executable, str(prepare)]).returncode != 0:
            raise OSError(f"{prepare.relative_to(ROOT)} failed (its message is above)")


def read_eval_set(name):
    """The instructions of an --eval_set. A path data/<name>/... is written by
    data/<name>/prepare.py on first use (TinyWorld's dev set)."""
    eval_set = Path(name)
    if not eval_set.is_absolute() and eval_set.parent.parent == Path("data"):
        prepare_data(eval_set.parent.name, ROOT / eval_set)
    return read_instructions(name)


def describe(name, conversations, block_size=1024):
    """Print how many conversations there are, how many are multi-turn, and their token lengths."""
    lengths = []
    for c in tqdm(conversations, desc=f"tokenizing {name}", leave=False):
        lengths.append(len(encode_chat(c)[0]))
    lengths.sort()
    multi = sum(sum(m["role"] == "assistant" for m in c) > 1 for c in conversations)
    over = sum(n > block_size for n in lengths)
    print(f"{name}: {len(lengths)} conversations ({multi} multi-turn); tokens: median "
          f"{lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}, "
          f"max {lengths[-1]}; over {block_size}: {over} ({100 * over / len(lengths):.1f}%)")


# malformed lines listed by check_file; a file broken on every line needs only the first few
MAX_SHOWN = 20


def check_file(path):
    """`python chat.py FILE.jsonl`: every malformed line on stderr, one line each (the first
    MAX_SHOWN, then a count), and exit status 1; or, for a good file, its statistics (describe). A
    file of documents ({"text"}, pretraining data) is checked as one, as train.py tells the two
    kinds apart (jsonl_kind)."""
    try:
        kind = jsonl_kind(path)
    except ValueError:  # a malformed first line: listed below with the rest, as conversations
        kind = "messages"
    if kind == "text":
        documents, errors = scan_documents(path)
        report(path, errors)
        lengths = []
        for d in tqdm(documents, desc=f"tokenizing {path}", leave=False):
            lengths.append(len(encode(d)) + 1)  # and its <|endoftext|>
        lengths.sort()
        print(f"{path}: {len(lengths)} documents to pretrain on; tokens with <|endoftext|>: "
              f"median {lengths[len(lengths) // 2]}, mean {sum(lengths) / len(lengths):.0f}, "
              f"max {lengths[-1]}, total {sum(lengths):,}")
        return
    conversations, errors = scan_conversations(path)
    report(path, errors)
    describe(str(path), conversations)


def report(path, errors):
    """The malformed lines of a file on stderr (the first MAX_SHOWN, then a count), and exit status
    1 if any."""
    for error in errors[:MAX_SHOWN]:
        print(f"error: {error}", file=sys.stderr)
    if len(errors) > MAX_SHOWN:
        print(f"error: ... and {len(errors) - MAX_SHOWN} more malformed lines in {path}",
              file=sys.stderr)
    if errors:
        sys.exit(1)


def main(argv):
    if argv[:1] in (["-h"], ["--help"]):
        sys.exit(print(__doc__.strip()))
    # a prompt cannot start with a dash; a typo can
    if argv[:1] and argv[0].startswith("-") and argv[0] != "-":
        sys.exit(f"error: unknown flag {argv[0]!r} (see --help)")
    # python chat.py data.jsonl: validate and describe it
    if argv[:1] and argv[0].endswith(".jsonl"):
        if len(argv) > 1:
            sys.exit(f"error: unexpected argument {argv[1]!r} (one file at a time; see --help)")
        try:
            check_file(argv[0])
        except OSError as e:  # no such file, a directory, unreadable: before any line is read
            sys.exit(f"error: {e}")
        return
    prompt = encode_prompt(" ".join(argv) or "Write a poem called Spring")
    print(prompt)
    print(repr(decode(prompt)))


if __name__ == "__main__":
    main(sys.argv[1:])
