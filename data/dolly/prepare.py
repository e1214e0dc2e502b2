"""
Dolly (databricks/databricks-dolly-15k, CC BY-SA 3.0): an open, ungated instruction set, so that a class
without access to LIMA can run every experiment. Also written as response-only data (user turns emptied).

    python data/dolly/prepare.py          # writes data/dolly/dolly{,_responses}_{train,val}.jsonl
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402


def convert(path):
    """{"instruction", "context", "response", "category"} per line -> one user turn and one assistant turn.
    A non-empty context (a passage to summarize or answer from) follows the instruction in the user turn."""
    conversations = []
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        if not row["response"].strip():
            continue
        user = row["instruction"].strip()
        if row.get("context", "").strip():
            user += "\n\n" + row["context"].strip()
        conversations.append([{"role": "user", "content": user}, {"role": "assistant", "content": row["response"].strip()}])
    return conversations


def main(out_dir):
    path = hub.cached_download("databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl", "dataset")
    chat.write_split(out_dir, "dolly", convert(path), n_val=300, responses_only=True)


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
