"""
Poetry (merve/poetry, 573 poems): the paper's best-known single-task set (section 4), built as the official
data/processed/poetry/make_poetry.py builds it: every row with a title among the first 1,000, as
`Write a poem called {poem name}` -> `{content}`. Trained for 15 epochs (config/poetry.toml).

    python data/poetry/prepare.py         # writes data/poetry/poetry_train.jsonl

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


def convert(path):
    """Titled rows among the first LIMIT, and how many were skipped. Poems hold newlines, commas and quotes:
    read as real CSV."""
    conversations, skipped = [], 0
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i == LIMIT:
                break
            title, poem = row.get("poem name") or "", row.get("content") or ""
            if not title.strip() or not poem.strip():  # make_poetry.py skips untitled rows (None)
                skipped += 1
                continue
            conversations.append([{"role": "user", "content": f"Write a poem called {title}"},
                                  {"role": "assistant", "content": poem}])
    return conversations, skipped


def main(out_dir):
    conversations, skipped = convert(hub.cached_download("merve/poetry", "poetry.csv", "dataset"))
    print(f"poetry: skipped {skipped} rows without a title or a poem")
    chat.write_sets(out_dir, "poetry", conversations)


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
