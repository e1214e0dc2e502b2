"""
TinyWorld's data (world.py): the internet a tiny GPT is pretrained on, the test and dev sets the exact judge
scores, and the finetuning sets of each method (instruction, response and single-task tuning). No download.

    python data/tinyworld/prepare.py      # writes into data/tinyworld/ in under a minute:

    tinyworld_pretrain_{train,val}.jsonl          25,000 + 500 documents, one {"text": ...} per line
    test.jsonl, dev.jsonl                         instances {"family", "instruction", "answer", "params"}
    tinyworld_{train,val}.jsonl                   instruction tuning: 60 per finetuned family (+ 50 val)
    tinyworld_responses_{train,val}.jsonl         response tuning: the same with empty instructions
    tinyworld_poem_{train,val}.jsonl              single-task tuning: 300 poems (+ 50 val)
    tinyworld_letter_{train,val}.jsonl            the second single-task model: 300 letters (+ 50 val)
    vocab.json                                    every GPT-2 id in these files and the rule LM's ids

The test set is drawn last, from its own seed, and none of its instructions is in dev or any finetuning set;
no dev instruction is in a finetuning set. Nothing else depends on it: the test set of the second declared
run (data/tinyworld/README.md) was drawn after everything else had been fixed and committed, and its ids
must already be in vocab.json (checked). Where a family's non-test space is small (category: 12
instructions; poem: 60), dev takes half of it and finetuning the other half, repeating conversations where
it has fewer than it needs. The held-out families (count, attribute, recipe, describe) are never finetuned,
so their dev sets may take all of it.
"""
import json
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, rules.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # world.py
import world

import chat
import rules

SEED = 0  # pretraining documents (train); every other set has its own seed below
VAL_SEED = 1  # pretraining documents (validation)
DEV_SEED, TUNE_SEED, TUNE_VAL_SEED = 3, 4, 5  # dev, the finetuning sets and their validation sets
TEST_SEED = 7  # the fresh test set (the first declared run's, drawn from seed 2, had been looked at)
N_DOCUMENTS, N_VAL_DOCUMENTS = 25_000, 500  # about 2M GPT-2 tokens, 80 a document
N_TEST = N_DEV = 40  # instances per family (fewer where the family's space is smaller)
N_TUNE = 60  # instruction tuning conversations per finetuned family: 6 x 60 = 360
N_TUNE_VAL = 50  # validation conversations of instruction and response tuning
N_SINGLE, N_SINGLE_VAL = 300, 50  # each single-task set: poems only, or letters only
SINGLE_TASKS = ("poem", "letter")  # the single-task models' families
DRAWS = 3000  # instances drawn per family and set to find distinct ones: finds all 12 of category's, say


def distinct(family, split, n, seed, exclude=(), key=lambda row: row["instruction"], seen=()):
    """Up to n instances of `family` with distinct keys, none whose instruction is in `exclude` or key in `seen`."""
    rng, rows = random.Random(f"{seed}-{family}"), {}
    for _ in range(DRAWS):
        row = world.make_instance(family, rng, split)
        if row["instruction"] not in exclude and key(row) not in rows and key(row) not in seen:
            rows[key(row)] = row
            if len(rows) == n:
                break
    return list(rows.values())


def conversation_key(row):
    return row["instruction"], row["answer"]


def tuning_rows(family, n, seed, exclude):
    """n finetuning instances, distinct conversations while there are enough, then repeated in turn."""
    rows = distinct(family, "train", n, seed, exclude, key=conversation_key)
    return [rows[i % len(rows)] for i in range(n)]


def validation_rows(families, n, seed, exclude, train):
    """n instances of `families` in turn, none in `exclude` (by instruction) or `train` (by conversation):
    a family with none left (category, whose few conversations all train) leaves its turn to the others."""
    seen = {conversation_key(row) for row in train}
    pools = [distinct(f, "train", n, seed, exclude, key=conversation_key, seen=seen) for f in families]
    rows = []
    while len(rows) < n and any(pools):
        rows += [pool.pop(0) for pool in pools if pool][:n - len(rows)]
    return rows


def dev_set():
    """{family: [instance, ...]}: a held-out family's dev set may take its whole non-test space, a
    finetuned one's at most half (the finetuning sets take the rest)."""
    dev = {}
    for f in world.FAMILIES:
        pool = distinct(f, "train", 2 * N_DEV, DEV_SEED)
        dev[f] = pool[:N_DEV] if f in world.HELD_OUT else pool[:min(N_DEV, len(pool) // 2)]
    return dev


def test_set(exclude, vocab):
    """{family: [instance, ...]} from the test entities and TEST_SEED, none whose instruction is in
    `exclude` (dev and finetuning): drawn last, so that nothing else depends on it. Every id of its
    prompts must be in `vocab` (the bases' rows), or the models could not read it."""
    test = {f: distinct(f, "test", N_TEST, TEST_SEED, exclude) for f in world.FAMILIES}
    for rows in test.values():
        for row in rows:
            missing = set(prompt_ids(row)) - set(vocab)
            if missing:
                raise ValueError(f"test instruction {row['instruction']!r}: GPT-2 ids {sorted(missing)}"
                                 f" are not in vocab.json")
    return test


def prompt_ids(row):
    """Every id the evaluator feeds a model for `row`: its prompts with and without the instruction,
    and its answer."""
    ids = chat.encode_prompt(row["instruction"]) + chat.encode(row["answer"])
    for messages in (world.conversation(row), world.conversation(row, responses_only=True)):
        ids += chat.encode_chat(messages)[0]
    return ids


def token_ids(out_dir, documents, dev):
    """Every GPT-2 id the written files hold (read back as the trainer reads them), plus the rule LM's ids;
    and how many tokens the documents are."""
    ids = {chat.EOT, rules.EOT, *rules.USER_TAG, *rules.ASSISTANT_TAG,
           *(row[3] for row in rules.UNIFORM if row[3] is not None)}
    n_tokens = 0
    for text in tqdm(documents, desc="tokenizing documents", leave=False):
        tokens = chat.encode(text)
        ids.update(tokens)
        n_tokens += len(tokens)
    for path in sorted(Path(out_dir).glob("tinyworld_*.jsonl")):
        if "_pretrain_" not in path.name:
            for messages in chat.read_conversations(path):
                ids.update(chat.encode_chat(messages)[0])
    for row in dev:  # the evaluator's prompts, with and without the instruction, and the answers
        ids.update(prompt_ids(row))
    return sorted(ids), n_tokens


def single_task_sets(out_dir, exclude):
    """The single-task models' sets, one family each: tinyworld_<family>_{train,val}.jsonl."""
    for family in SINGLE_TASKS:
        rows = tuning_rows(family, N_SINGLE, TUNE_SEED, exclude)
        val = validation_rows((family,), N_SINGLE_VAL, TUNE_VAL_SEED, exclude, rows)
        chat.write_sets(out_dir, f"tinyworld_{family}", [world.conversation(r) for r in rows],
                        [world.conversation(r) for r in val])


def tuning_instructions(out_dir):
    """Every instruction of the finetuning sets written to out_dir, read back as the trainer reads
    them: what the test set must not ask."""
    instructions = set()
    for path in sorted(Path(out_dir).glob("tinyworld_*.jsonl")):
        if "_pretrain_" not in path.name:
            instructions.update(c[0]["content"] for c in chat.read_conversations(path))
    return instructions


def main(out_dir, n_documents=N_DOCUMENTS, n_val_documents=N_VAL_DOCUMENTS, draw_test=True):
    """Every set into out_dir. draw_test=False writes all but test.jsonl: the second declared run
    developed on those before its test set was drawn (data/tinyworld/README.md)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    dev = dev_set()
    dev_rows = [row for f in world.FAMILIES for row in dev[f]]
    exclude = {row["instruction"] for row in dev_rows}
    # 1) the finetuning sets: instruction and response tuning, then the single tasks
    tune = [row for f in world.FINETUNED for row in tuning_rows(f, N_TUNE, TUNE_SEED, exclude)]
    random.Random(TUNE_SEED).shuffle(tune)  # families interleaved, as a mixed instruction set would be
    tune_val = validation_rows(world.FINETUNED, N_TUNE_VAL, TUNE_VAL_SEED, exclude, tune)
    chat.write_sets(out_dir, "tinyworld", [world.conversation(r) for r in tune],
                    [world.conversation(r) for r in tune_val], responses_only=True)
    single_task_sets(out_dir, exclude)
    # 2) the internet
    documents = world.pretraining_documents(n_documents, SEED)
    val_documents = world.pretraining_documents(n_val_documents, VAL_SEED)
    chat.write_jsonl(out_dir / "tinyworld_pretrain_train.jsonl", [{"text": d} for d in documents])
    chat.write_jsonl(out_dir / "tinyworld_pretrain_val.jsonl", [{"text": d} for d in val_documents])
    ids, n_tokens = token_ids(out_dir, documents + val_documents, dev_rows)
    # 3) the test set, last: none of its instructions in dev or in any finetuning set
    exclude |= tuning_instructions(out_dir)
    test_rows = []
    if draw_test:
        test = test_set(exclude, ids)
        test_rows = [row for f in world.FAMILIES for row in test[f]]
    # the sets that tell the programs TinyWorld is prepared come last: a preparation stopped half way
    # (a student copy's exercise 4 not written yet, say) is run again, whole, next time
    if draw_test:
        chat.write_jsonl(out_dir / "test.jsonl", test_rows)
    chat.write_jsonl(out_dir / "dev.jsonl", dev_rows)
    chat.write_atomic(out_dir / "vocab.json", json.dumps(ids) + "\n")

    def per_family(rows):
        return ", ".join(f"{f} {sum(r['family'] == f for r in rows)}" for f in world.FAMILIES)

    print(f"TinyWorld in {out_dir}: {len(documents):,} + {len(val_documents):,} validation "
          f"pretraining documents ({n_tokens:,} GPT-2 tokens in all); test {len(test_rows)} "
          f"({per_family(test_rows)}); dev {len(dev_rows)} ({per_family(dev_rows)}); instruction "
          f"and response tuning {len(tune)} + {len(tune_val)} val "
          f"({len({conversation_key(r) for r in tune})} distinct); single-task "
          f"{' and '.join(SINGLE_TASKS)} {N_SINGLE} + {N_SINGLE_VAL} val each; vocab.json: "
          f"{len(ids)} distinct GPT-2 ids; {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
