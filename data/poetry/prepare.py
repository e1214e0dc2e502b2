"""
Poetry (merve/poetry, 573 poems): the paper's single-task finetuning set (section 4), formatted as
`Write a poem called {title}` -> the poem.

    python data/poetry/prepare.py         # writes data/poetry/poetry_{train,val}.jsonl
"""
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402


def convert(path, limit=1000):
    """Rows with a title, up to `limit`. Poems hold newlines, commas and quotes: read as real CSV."""
    conversations = []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            title, poem = (row.get("poem name") or "").strip(), (row.get("content") or "").strip()
            if title and poem and len(conversations) < limit:
                conversations.append([{"role": "user", "content": f"Write a poem called {title}"},
                                      {"role": "assistant", "content": poem}])
    return conversations


def main(argv):
    out_dir = Path(argv[0].removeprefix("--out_dir=")) if argv else Path(__file__).parent
    path = hub.cached_download("merve/poetry", "poetry.csv", "dataset")
    chat.write_split(out_dir, "poetry", convert(path), n_val=20)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
