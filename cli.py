"""
The command line and the machine, shared by the scripts (train.py, sample.py, evaluate.py): flags
from a TOML file and --key=value, each numeric flag's range, the signals that stop a script,
outputs that must not be inputs, the device and precision to run in, and matplotlib when it is
installed.
"""
import os
import signal
import sys
import tomllib
from pathlib import Path

import torch

# where and in what precision to run: train.py, sample.py and evaluate.py all take these
DEVICE_FLAGS = {
    "device": ("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"),
    "dtype": ("auto", "auto (bfloat16 on CUDA if supported, else float16; float32 on CPU), or one "
                      "of those; on a CPU, bfloat16 generates and scores in bfloat16 weights: "
                      "measured 1.5-1.7x faster decoding at batch 1 on AMD EPYC (Zen 3), but "
                      "0.88x (slower) on an Intel Xeon; python tests/bench.py generate measures "
                      "yours"),
    "threads": (0, "CPU threads for PyTorch; 0 = its default, one per core. 1 is fastest for "
                   "tiny models on a busy machine (a TinyWorld step: 0.22 s with 1 thread, 1.9 s "
                   "with 2 while the other core is busy)"),
}
DEVICE_RANGES = {"threads": "[0, inf)"}


def parse_flags(defaults, argv, doc):
    """nanoGPT's configuration without exec: an optional TOML file, then --key=value flags, each
    parsed as the type of its default (a bare --flag means True). --help prints every flag with its
    default."""
    config = {key: value for key, (value, _) in defaults.items()}
    for arg in argv:
        if arg in ("-h", "--help"):
            lines = [doc.strip(), "", "flags, with their defaults:"]
            for key, (value, text) in defaults.items():
                lines.append(f"  {f'--{key}={value}':<30} {text}")
            try:
                print("\n".join(lines))
            except BrokenPipeError:  # --help | head
                pass
            sys.exit(0)
        if arg.endswith(".toml") and not arg.startswith("--"):
            for key, value in read_toml(arg).items():
                if key not in config:
                    raise ValueError(f"{arg}: unknown key '{key}' (see --help)")
                config[key] = convert(f"{arg}: {key}", str(value), type(config[key]))
            continue
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in config:
            raise ValueError(f"unknown argument {arg!r} (see --help)")
        config[key] = convert(f"--{key}", value if eq else "True", type(config[key]))
    return config


def given_keys(argv):
    """The flags this command line sets, by a TOML file or a --key=value flag (parse_flags has
    checked them all)."""
    keys = set()
    for arg in argv:
        if arg.endswith(".toml") and not arg.startswith("--"):
            keys |= set(read_toml(arg))
        elif arg.startswith("--"):
            keys.add(arg.removeprefix("--").partition("=")[0])
    return keys


def check_ranges(config, ranges):
    """Every numeric flag in its interval, or a one-line ValueError naming it. `ranges` maps a flag
    to an interval written as in mathematics: "[0, 1)" holds 0 and not 1, "(0, inf)" every positive
    number. NaN lies in no interval and an infinity only in one closed at it, so one check also
    refuses what is not a finite number."""
    for key, interval in ranges.items():
        value = config[key]
        low, high = (float(end) for end in interval[1:-1].split(","))
        above = value >= low if interval[0] == "[" else value > low
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):
            raise ValueError(f"--{key}={value}: expected {in_words(interval, low, high)}")


def in_words(interval, low, high):
    """An interval in words, for an error message: "1 or more", "more than 0", "a number in [0,
    1)"."""
    if (low, high) == (float("-inf"), float("inf")):
        return "a finite number"
    if high == float("inf"):
        low = int(low) if low.is_integer() else low
        return f"{low} or more" if interval[0] == "[" else f"more than {low}"
    return f"a number in {interval}"


def refuse_overwriting(outputs, inputs):
    """One line if an output file (flag -> path) is an input file (flag -> path), the same file by
    inode, so that another spelling, a link or a relative path cannot overwrite what a run
    reads."""
    for out_flag, out in outputs.items():
        for in_flag, source in inputs.items():
            if not source or not Path(out).exists() or not Path(source).exists():
                continue
            if os.path.samefile(out, source):
                raise ValueError(f"{out_flag}={out} is the input {in_flag}={source}: writing it "
                                 f"would destroy the input; choose another {out_flag}")


class Stopped(BaseException):
    """Ctrl-C or SIGTERM: stop and say what was kept. `code` is the exit status a shell expects,
    128 + the signal. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    swallows it."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def on_sigterm(signum, frame):
    """The SIGTERM handler of the scripts but train.py: raise Stopped where the script is, so that
    its own code keeps what it has and stops its children, as on Ctrl-C."""
    raise Stopped(128 + signal.SIGTERM, "terminated")


def run_main(main, kept):
    """The last lines of evaluate.py and the programs beside it: main(sys.argv[1:]) with SIGTERM
    handled (here, not on import: tests import the scripts). A user mistake (ValueError, OSError)
    is one line and exit 1. Ctrl-C or SIGTERM, once the children have checkpointed and exited,
    exits 130 or 143 with one line saying what was `kept`."""
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, Stopped) as e:
        code = 128 + signal.SIGINT
        if isinstance(e, Stopped):
            code = e.code
        word = "interrupted"
        if code == 128 + signal.SIGTERM:
            word = "terminated"
        print(f"{word}: {kept}", file=sys.stderr)
        sys.exit(code)


def read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None


def convert(where, value, kind):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}={value}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{where}={value}: expected {kind.__name__}") from None


# ------------------------------------------------------------------- device, precision and plots

def numbers(config, flag, kind):
    """A flag holding numbers separated by spaces, e.g. --seeds='1 2 3', as a list of `kind`."""
    try:
        return [kind(x) for x in config[flag].split()]
    except ValueError:
        raise ValueError(f"--{flag}={config[flag]!r}: expected {kind.__name__}s separated by "
                         f"spaces") from None


def cell(value, spec):
    """A table cell: the value formatted, or "–" where there is none."""
    if value is None:
        return "–"
    return format(value, spec)


def use_threads(n):
    """--threads: how many CPU threads PyTorch's operations use (0: leave PyTorch's default)."""
    if n:
        torch.set_num_threads(n)


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else must be a device this machine has."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device={name}: not a device (cpu, cuda, cuda:1, mps, or auto)") \
                from None
        mps = getattr(torch.backends, "mps", None)
        available = {"cpu": True,
                     "cuda": torch.cuda.is_available(),
                     "mps": mps is not None and mps.is_available()}
        if not available.get(device.type, False):
            raise ValueError(f"--device={name}: this machine has no {device.type} device")
        if device.type == "cuda" and device.index is not None:
            count = torch.cuda.device_count()
            if device.index >= count:
                raise ValueError(f"--device={name}: this machine has {count} CUDA device(s)")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device, name="auto"):
    """'auto': bfloat16 autocast on CUDA where supported, else float16 (with a GradScaler when
    training), float32 on CPU and MPS."""
    if name != "auto":
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype={name}: expected auto, float32, bfloat16 or float16")
        return name
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def machine(config):
    """--threads, --device and --dtype as a script that generates or scores runs with them:
    (device, dtype). The threads are set first, before PyTorch does any work."""
    use_threads(config["threads"])
    device = pick_device(config["device"])
    return device, pick_dtype(device, config["dtype"])


def autocast(device, dtype):
    """The context every forward pass runs under: mixed precision on GPUs, nothing on CPU in
    float32."""
    if dtype == "float32":
        return torch.autocast(device_type=device.split(":")[0], enabled=False)
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def for_inference(model, device, dtype):
    """The model on `device` in eval mode, to generate and score. On a CPU, --dtype=bfloat16 makes
    the weights themselves bfloat16: decoding reads every weight once a token, and half the bytes
    measured 1.5-1.7x the speed at batch 1 and 2.1-2.3x at batch 8 on our CPU (tests/bench.py
    generate; autocast over float32 weights casts them again every step: 0.96x). Training keeps
    float32 weights under autocast; on GPUs autocast does the mixed precision."""
    model = model.to(device).eval()
    return model.to(torch.bfloat16) if device == "cpu" and dtype == "bfloat16" else model


def pyplot(what):
    """matplotlib's pyplot, drawing to files, or None with a note on how to get `what` (it is
    optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"(pip install matplotlib to get {what})", file=sys.stderr)
        return None
