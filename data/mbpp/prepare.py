"""
MBPP (google-research-datasets/mbpp, CC BY 4.0): short Python programming problems, one of the paper's five
single-task sets (section 4), built as the official data/processed/mbpp/make_mbpp.py builds it: the `train`
split of the `full` configuration (374 problems), problem text -> reference code. Trained for 15 epochs
(config/mbpp.toml, as scripts/iclr2025/expt2_llama/mbpp/finetune_seed1.sh).

    pip install pyarrow                   # the hub hosts MBPP only as parquet
    python data/mbpp/prepare.py           # writes data/mbpp/mbpp_{train,val}.jsonl

The validation set is MBPP's own validation split (90 problems): outside the official training set. The
code's Windows line ends (\\r\\n) become \\n, and so does the lone \\r that ends task 732's (chat.normalize).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402


def split(name):
    path = hub.cached_download("google-research-datasets/mbpp", f"full/{name}-00000-of-00001.parquet", "dataset")
    rows = hub.read_parquet(path)
    return [[{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["code"]}] for r in rows]


def main(out_dir):
    chat.write_sets(out_dir, "mbpp", split("train"), split("validation"))


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
