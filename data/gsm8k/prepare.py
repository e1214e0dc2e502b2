"""
GSM8K (openai/gsm8k): grade-school math word problems, one of the paper's single-task sets (section 4):
the question as the instruction, the worked solution (ending in `#### answer`) as the response.

    pip install pyarrow                   # the hub hosts GSM8K only as parquet
    python data/gsm8k/prepare.py          # writes data/gsm8k/gsm8k_{train,val}.jsonl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402


def main(argv):
    out_dir = Path(argv[0].removeprefix("--out_dir=")) if argv else Path(__file__).parent
    rows = hub.read_parquet(hub.cached_download("openai/gsm8k", "main/train-00000-of-00001.parquet", "dataset"))
    conversations = [[{"role": "user", "content": r["question"].strip()}, {"role": "assistant", "content": r["answer"].strip()}]
                     for r in rows]
    chat.write_split(out_dir, "gsm8k", conversations, n_val=200)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
