"""
Chess (patrickfrank1/chess-pgn-games, CC0: Lichess games in PGN, one dataset row per line of text): one of
the paper's five single-task sets (section 4), built as the official data/processed/pgn/make_pgn.py builds it:
for each game, the user turn is its `[WhiteElo "..."]` line and its `[BlackElo "..."]` line, the assistant turn
its moves line (the one that starts with `1. `); the first 1,000 games. Trained for 15 epochs
(config/chess.toml, as scripts/iclr2025/expt2_llama/pgn/finetune_seed1.sh).

    python data/chess/prepare.py          # writes data/chess/chess_{train,val}.jsonl

The text files of the dataset's data/ folder (found with the hub's file listing, read in name order as the
datasets library reads them) are large, so they are streamed and read only as far as needed; nothing is cached.
A game whose moves line is missing, or a moves line without both ratings before it, is skipped and counted
(make_pgn.py stops with an assertion). The validation set is the next 50 games: outside the official set.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: chat.py, hub.py
import chat  # noqa: E402
import hub  # noqa: E402

N_TRAIN, N_VAL = 1000, 50  # make_pgn.py stops after 1,000 games
REPO = "patrickfrank1/chess-pgn-games"
COMPRESSED = (".zst", ".bz2", ".gz", ".xz", ".zip", ".7z")


def games(lines):
    """Yield, for each game in PGN `lines`, its conversation, or None for a game that cannot make one: ratings
    with no moves line after them (the next game began), or a moves line without both ratings before it."""
    white = black = None
    for line in lines:
        if "WhiteElo" in line:
            if white is not None:
                yield None
            white, black = line, None
        elif "BlackElo" in line:
            black = line
        elif line.startswith("1. "):
            if white is None or black is None:
                yield None
            else:
                yield [{"role": "user", "content": white + "\n" + black + "\n"}, {"role": "assistant", "content": line}]
            white = black = None


def pgn_lines(files):
    for name in files:
        yield from hub.stream_lines(REPO, name, "dataset")


def main(out_dir):
    files = [f for f in hub.list_files(REPO, "data", "dataset") if not f.endswith(COMPRESSED)]
    if not files:
        raise OSError(f"{REPO}: no uncompressed text file in its data/ folder (has the dataset changed?)")
    conversations, skipped = [], 0
    for conversation in games(pgn_lines(files)):
        skipped += conversation is None
        conversations += [conversation] if conversation else []
        if len(conversations) == N_TRAIN + N_VAL:
            break
    if len(conversations) < N_TRAIN + N_VAL:
        print(f"chess: only {len(conversations)} games in {', '.join(files)}")
    print(f"chess: skipped {skipped} games without both ratings and a moves line")
    chat.write_sets(out_dir, "chess", conversations[:N_TRAIN], conversations[N_TRAIN:])


if __name__ == "__main__":
    chat.prepare_command(main, __doc__, Path(__file__).parent)
