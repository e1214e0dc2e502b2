"""
LIMA (GAIR/lima, 1,030 curated conversations): the paper's instruction-tuning data, and its response-only
variant with every instruction emptied, exactly as the paper trained (section 3):
`<|user|>\\n\\n<|assistant|>\\n{response}<|endoftext|>`.

    HF_TOKEN=hf_... python data/lima/prepare.py      # writes data/lima/lima{,_responses}_{train,val}.jsonl

LIMA is gated: accept its terms at https://huggingface.co/datasets/GAIR/lima and set HF_TOKEN. Without access,
use the open Dolly set instead: python data/dolly/prepare.py (--data=dolly / dolly_responses).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402


def convert(path):
    """{"conversations": [user, assistant, user, ...], "source": ...} per line -> messages."""
    conversations = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        turns = json.loads(line)["conversations"]
        messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
        conversations.append(chat.check_messages(messages, f"{path}:{n}"))
    return conversations


def main(out_dir):
    try:
        path = hub.cached_download("GAIR/lima", "train.jsonl", "dataset")
    except OSError as e:
        raise OSError(f"{e}. No access? The open alternative: python data/dolly/prepare.py, then "
                      f"--data=dolly or --data=dolly_responses") from None
    chat.write_split(out_dir, "lima", convert(path), n_val=30, responses_only=True)


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
