"""
Poetry (merve/poetry, 573 poems): the paper's best-known single-task set (section 4), built as the official
data/processed/poetry/make_poetry.py builds it: every row with a title among the first 1,000, as
`Write a poem called {poem name}` -> `{content}`. Trained for 15 epochs (config/poetry.toml).

    python data/poetry/prepare.py         # writes data/poetry/poetry_train.jsonl

A title is missing where make_poetry.py sees None: an empty field, or one that pandas reads as missing (NA,
null, ...); a blank title is kept. A titled row without a poem stops the script (data/poetry/README.md).
There is no validation set: the official set takes every titled row, so none is left outside it. (The CSV
lists some poems twice; the official set keeps both copies, and so do we.) The poems' Windows line ends
(\\r\\n) become \\n (chat.normalize).
"""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402

LIMIT = 1000  # make_poetry.py stops at row 1,000 (the file has fewer)
# make_poetry.py reads the CSV with `datasets`, which reads it with pandas: a field holding one of pandas'
# default missing-value strings (read_csv's na_values; "None" since pandas 2.0) comes back as None
MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
           "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def convert(path):
    """Titled rows among the first LIMIT, and how many were skipped. Poems hold newlines, commas and quotes:
    read as real CSV."""
    conversations, skipped = [], 0
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i == LIMIT:
                break
            title = row.get("poem name")
            poem = row.get("content")
            if title is None or title in MISSING:  # make_poetry.py skips a None title; a blank one it keeps
                skipped += 1
                continue
            where = f"{path}: row {i} (make_poetry.py's merve_poetry_{i}, titled {title!r})"
            if poem is None or poem in MISSING:
                raise ValueError(f"{where} has no poem: make_poetry.py keeps it as null, on which the official "
                                 "training fails, so the file the paper used had no such row")
            if not poem.strip():
                raise ValueError(f"{where} has a blank poem: make_poetry.py keeps it, to train <|endoftext|> "
                                 "alone, and chat.py refuses an empty response")
            conversations.append([{"role": "user", "content": f"Write a poem called {title}"},
                                  {"role": "assistant", "content": poem}])
    return conversations, skipped


def main(out_dir):
    conversations, skipped = convert(hub.cached_download("merve/poetry", "poetry.csv", "dataset"))
    print(f"poetry: skipped {skipped} rows without a title")
    chat.write_sets(out_dir, "poetry", conversations)


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
