"""
AlpacaEval's 805 instructions (tatsu-lab/alpaca_eval), with text-davinci-003's answers as references, for
evaluate.py: the prompts the paper's win rates are measured on (section 3).

    python data/alpaca_eval/prepare.py         # writes data/alpaca_eval/alpaca_eval.jsonl
    python evaluate.py --eval_set=data/alpaca_eval/alpaca_eval.jsonl --models="gpt2 gpt2+rules"
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402


def main(out_dir):
    path = hub.cached_download("tatsu-lab/alpaca_eval", "alpaca_eval.json", "dataset")
    rows = json.loads(path.read_text(encoding="utf-8"))  # [{"instruction", "output", "generator", "dataset"}]
    chat.write_jsonl(out_dir / "alpaca_eval.jsonl", [{"instruction": r["instruction"], "reference": r["output"],
                                                       "dataset": r["dataset"]} for r in rows])
    print(f"wrote {len(rows)} instructions with text-davinci-003 references to {out_dir / 'alpaca_eval.jsonl'}")


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
