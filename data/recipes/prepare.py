"""
Recipes (Hieu-Pham/kaggle_food_recipes, CC BY-SA 3.0; Kaggle's "Food Ingredients and Recipe Dataset with
Images"): one of the paper's five single-task sets (section 4), built as the official
data/processed/kaggle_food_recipes/make_kfr.py builds it: the first 1,000 rows, `Recipe for {Title}` ->
" - " + ingredient + "\\n" for each of `Cleaned_Ingredients`, then "\\n\\n", then `Instructions`. Trained for 20
epochs (config/recipes.toml, as scripts/iclr2025/expt2_llama/recipe/finetune_seed1.sh).

    python data/recipes/prepare.py        # writes data/recipes/recipes_{train,val}.jsonl

`Cleaned_Ingredients` holds a Python list literal; the official script eval()s it, we parse it with
ast.literal_eval, which runs no code. A row without a title, instructions or a readable ingredient list is
skipped and counted (make_kfr.py would crash on one). The validation set is the next 50 usable rows: outside
the official training set.
"""
import ast
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402

N_TRAIN, N_VAL = 1000, 50  # make_kfr.py stops at row 1,000
FILE = "Food Ingredients and Recipe Dataset with Image Name Mapping.csv"  # at the repo's root, spaces and all


def recipe(row):
    """The official (user, assistant) texts of a CSV row, or None if the row cannot make one."""
    title, instructions = (row.get("Title") or "").strip(), (row.get("Instructions") or "").strip()
    try:
        ingredients = ast.literal_eval(row.get("Cleaned_Ingredients") or "")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not title or not instructions or not isinstance(ingredients, list) or not all(isinstance(x, str) for x in ingredients):
        return None
    response = "".join(" - " + x + "\n" for x in ingredients) + "\n\n" + row["Instructions"]
    return [{"role": "user", "content": "Recipe for " + row["Title"]}, {"role": "assistant", "content": response}]


def convert(path):
    """(first N_TRAIN rows' recipes, the next N_VAL usable rows' recipes, rows skipped among the first N_TRAIN)."""
    train, val, skipped = [], [], 0
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            conversation = recipe(row)
            if i < N_TRAIN:
                train += [conversation] if conversation else []
                skipped += conversation is None
            elif conversation and len(val) < N_VAL:
                val.append(conversation)
            elif len(val) == N_VAL:
                break
    return train, val, skipped


def main(out_dir):
    train, val, skipped = convert(hub.cached_download("Hieu-Pham/kaggle_food_recipes", FILE, "dataset"))
    print(f"recipes: skipped {skipped} of the first {N_TRAIN} rows (no title, no instructions, or no ingredient list)")
    chat.write_sets(out_dir, "recipes", train, val)


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
