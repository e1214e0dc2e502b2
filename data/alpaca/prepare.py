"""
Stanford Alpaca (tatsu-lab/alpaca, CC BY-NC 4.0), the data of the paper's response ranking (section 4.2,
Table 2), prepared as the official code prepares it: open-instruct's reformat_datasets.py turns each example's
instruction and input into a user turn through a template drawn at random (weighted) from
instruction_encode_templates.py, the output into the assistant turn; ratio_eval.py (--max_examples 1000)
scores the first 1,000.

    pip install pyarrow                   # the hub hosts Alpaca as parquet
    python data/alpaca/prepare.py         # writes data/alpaca/alpaca.jsonl
    python evaluate.py --compare          # ranks on it

The templates are drawn with Python's `random` seeded 42, reformat_datasets.py's default, one draw per example
in file order: what `python open_instruct/reformat_datasets.py --dataset stanford_alpaca` writes. (Its default
run converts every dataset in turn, each drawing from the same generator, so the official file may have been
drawn at another point of that generator; this is the reproducible reading.) The official script read GitHub's
alpaca_data.json; the hub's parquet holds the same 52,002 examples in the same order.
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402

N, SEED = 1000, 42  # ratio_eval.py --max_examples 1000; reformat_datasets.py --seed default
# open_instruct/instruction_encode_templates.py: (prompt template, completion template, weight)
WITH_INPUT = [
    ("{instruction}\n\n{input}\n\n", "{output}", 0.2),
    ("{instruction}\n{input}\n\n", "{output}", 0.1),
    ("{instruction}\n{input}\n", "{output}", 0.1),
    ("{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05),
    ("{instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("{instruction}\n{input}\n\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\n", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05),
    ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
     "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
     "### Response:", "{output}", 0.1),
]
WITHOUT_INPUT = [
    ("{instruction}\n\n", "{output}", 0.2),
    ("{instruction}\n", "{output}", 0.1),
    ("{instruction}", "\n{output}", 0.1),
    ("{instruction} Output:", "{output}", 0.05),
    ("{instruction}\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\n\n", "{output}", 0.05),
    ("Instruction: {instruction}\n", "{output}", 0.05),
    ("Instruction: {instruction}\nOutput:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n", "{output}", 0.05),
    ("Can you help with this?\n\n{instruction}\n", "{output}", 0.05),
    ("Plase answer the following request: {instruction}\nAnswer:", "{output}", 0.05),  # sic
    ("Tell me how would you respond to the following request.\n{instruction}\n", "{output}", 0.05),
    ("Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:",
     "{output}", 0.1),
]


def encode(row, rng):
    """encode_instruction_example(..., random_template=True): (user turn, assistant turn) of an Alpaca row."""
    has_input = row["input"] is not None and row["input"].strip() != ""
    templates = WITH_INPUT if has_input else WITHOUT_INPUT
    prompt, completion, _ = rng.choices(templates, weights=[w for _, _, w in templates])[0]
    user = prompt.format(instruction=row["instruction"].strip(), input=row["input"].strip() if has_input else "")
    return user, completion.format(output=row["output"].strip())


def main(out_dir):
    files = [f for f in hub.list_files("tatsu-lab/alpaca", "data", "dataset") if f.endswith(".parquet")]
    if not files:
        raise OSError("tatsu-lab/alpaca: no parquet file in its data/ folder (has the dataset changed?)")
    rows = [r for f in files for r in hub.read_parquet(hub.cached_download("tatsu-lab/alpaca", f, "dataset"))]
    rng = random.Random(SEED)
    pairs = [encode(row, rng) for row in rows[:N]]  # one draw per example, so the first N need only N draws
    chat.write_jsonl(out_dir / "alpaca.jsonl", [{"instruction": user, "reference": response, "dataset": "stanford_alpaca"}
                                                 for user, response in pairs])
    print(f"wrote the first {len(pairs)} of {len(rows)} Alpaca examples, templated, to {out_dir / 'alpaca.jsonl'}")


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
