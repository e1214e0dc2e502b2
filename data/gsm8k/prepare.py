"""
GSM8K (openai/gsm8k, MIT): grade-school math word problems, one of the paper's five single-task sets
(section 4), built as the official data/processed/gsm_train/make_gsm.py builds it: the first 1,000 problems of
the `main` train split, question -> worked answer (which ends in `#### answer`). Trained for 7 epochs
(config/gsm8k.toml, as scripts/iclr2025/expt2_llama/gsm/finetune_seed1.sh).

    pip install pyarrow                   # the hub hosts GSM8K only as parquet
    python data/gsm8k/prepare.py          # writes data/gsm8k/gsm8k_{train,val}.jsonl

The validation set is the first 200 problems of the test split: outside the official training set.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402

N_TRAIN, N_VAL = 1000, 200  # make_gsm.py stops at i == 1000


def conversations(rows):
    return [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]


def main(out_dir):
    train = hub.read_parquet(hub.cached_download("openai/gsm8k", "main/train-00000-of-00001.parquet", "dataset"))
    test = hub.read_parquet(hub.cached_download("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset"))
    chat.write_sets(out_dir, "gsm8k", conversations(train[:N_TRAIN]), conversations(test[:N_VAL]))


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
