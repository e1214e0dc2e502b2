"""
MBPP (google-research-datasets/mbpp): short Python programming problems, one of the paper's single-task sets
(section 4): the problem text as the instruction, the reference code as the response.

    pip install pyarrow                   # the hub hosts MBPP only as parquet
    python data/mbpp/prepare.py           # writes data/mbpp/mbpp_{train,val}.jsonl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402

SPLITS = ("train", "test", "validation", "prompt")  # all 974 problems: a finetuning set, not a benchmark here


def main(argv):
    out_dir = Path(argv[0].removeprefix("--out_dir=")) if argv else Path(__file__).parent
    rows = []
    for split in SPLITS:
        rows += hub.read_parquet(hub.cached_download("google-research-datasets/mbpp", f"full/{split}-00000-of-00001.parquet", "dataset"))
    conversations = [[{"role": "user", "content": r["text"].strip()}, {"role": "assistant", "content": r["code"].strip()}]
                     for r in rows]
    chat.write_split(out_dir, "mbpp", conversations, n_val=50)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
