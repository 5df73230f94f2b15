"""The ``revnet-zero`` command: demo, train, bench, profile.

Needs the ``cli`` extra (typer, tqdm, matplotlib, safetensors): ``pip install 'revnet-zero[cli]'``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

try:
    import typer
except ImportError:
    sys.exit("the revnet-zero command needs typer: pip install 'revnet-zero[cli]'")

app = typer.Typer(help="RevNet-Zero: reversible transformers that train without keeping activations.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

MiB = 2 ** 20
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="model field, e.g. num_layers=4")]

# train options and their defaults; a --config file may set any of them, flags win over the file
TRAIN_DEFAULTS = {"data": None, "pattern": "**/*.txt", "tokenizer": "byte", "preset": "tiny", "model": {},
                  "steps": 1000, "batch_size": 8, "seq_len": 256, "lr": 1e-3, "out_dir": "revnet-zero-run",
                  "resume": False, "precision": "fp32", "grad_accum": 1, "eval_fraction": 0.02,
                  "eval_every": 200, "save_every": 200, "device": None, "seed": 0}


# what a command may fail with and report as one error: line (anything else is a bug: traceback)
USER_ERRORS = (ValueError, TypeError, FloatingPointError, ImportError, OSError)

# `revnet-zero bench` with no task flag runs this sweep; the runner's own tasks are these flags
BENCH_DEFAULT_MODES = "standard,full_ac,revnet_zero"
BENCH_TASKS = ("--modes", "--sdpa-backends", "--check-grads", "--max-context")
BENCH_MODE_FLAGS = ("--modes", "--grad-modes", "--max-context")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(1)


def _describe(e: Exception) -> str:
    """One line for a user error; an OSError says which file when it knows."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e)


def _check_out_dir(path) -> None:
    """Create ``path`` and write a file there now, so a bad --out-dir fails before training starts."""
    import tempfile
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {path}: {e.strerror or e}") from None


@app.command()
def demo(minutes: Annotated[float, typer.Option(help="training time budget")] = 3.0,
         steps: Annotated[Optional[int], typer.Option(help="train exactly this many steps instead")] = None,
         out_dir: Annotated[Path, typer.Option(help="where the plot, checkpoint and metrics go")] = Path(
             "revnet-zero-demo"),
         layers: Annotated[int, typer.Option(help="reversible blocks")] = 4,
         d_model: Annotated[int, typer.Option(help="width of each stream")] = 256,
         heads: Annotated[int, typer.Option(help="attention heads")] = 4,
         seq_len: Annotated[int, typer.Option(help="bytes per training sequence")] = 256,
         batch_size: Annotated[int, typer.Option(help="sequences per step")] = 4,
         device: Annotated[Optional[str], typer.Option(help="cpu, cuda, ... (default: cuda if present)")] = None,
         seed: int = 0):
    """Train a small reversible GPT on the Python standard library's source; compare its activation
    memory with standard training; save a loss plot and a checkpoint; print a sample."""
    from .demo import run_demo
    try:
        _check_out_dir(out_dir)
        run_demo(out_dir, minutes=minutes, steps=steps, num_layers=layers, d_model=d_model, num_heads=heads,
                 seq_len=seq_len, batch_size=batch_size, device=device, seed=seed, echo=typer.echo)
    except USER_ERRORS as e:
        _fail(_describe(e))


def _parse_overrides(pairs: list[str]) -> dict:
    """['num_layers=4', 'dropout=0.1'] -> {'num_layers': 4, 'dropout': 0.1} (values read as JSON if they parse)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _read_config(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path} is YAML, which needs PyYAML: pip install pyyaml (or use JSON)") from None
        loaded = yaml.safe_load(text)
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(loaded).__name__}")
    unknown = sorted(set(loaded) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(TRAIN_DEFAULTS)}")
    if not isinstance(loaded.get("model", {}), dict):
        raise ValueError(f"{path}: 'model' must be a mapping of model fields to values (e.g. "
                         f"{{\"num_layers\": 4}}), got {loaded['model']!r}")
    return loaded


def _load_corpus(opts: dict):
    from .data import load_hf_dataset, text_files
    data = opts["data"]
    if data is None:
        raise ValueError("no training data: pass --data PATH (a text file or a folder), or hf:NAME[:SPLIT]")
    if str(data).startswith("hf:"):
        name, _, split = str(data)[3:].partition(":")
        return load_hf_dataset(name, split or "train")
    return text_files(data, opts["pattern"])


def run_train(opts: dict, echo=print) -> dict:
    """``revnet-zero train`` with the options already merged."""
    from .data import PackedDataset, load_tokenizer
    from .models import ReversibleGPT, TransformerConfig
    from .training import Trainer, TrainingConfig
    from .training.trainer import resolve_device

    # everything that can be checked before the data and the model are built, is
    resolve_device(opts["device"])
    TrainingConfig(lr=opts["lr"], batch_size=opts["batch_size"], precision=opts["precision"],
                   gradient_accumulation_steps=opts["grad_accum"], save_every=opts["save_every"],
                   out_dir=opts["out_dir"], seed=opts["seed"])
    for name in ("steps", "seq_len"):
        if isinstance(opts[name], bool) or not isinstance(opts[name], int) or opts[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {opts[name]!r}")
    if not (isinstance(opts["eval_fraction"], (int, float)) and 0 <= opts["eval_fraction"] < 1):
        raise ValueError(f"--eval-fraction must be in [0, 1), got {opts['eval_fraction']!r}")
    _check_out_dir(opts["out_dir"])
    tok = load_tokenizer(opts["tokenizer"])
    corpus = _load_corpus(opts)
    if corpus.skipped:
        echo(f"skipped {len(corpus.skipped)} unusable files/rows, e.g. {corpus.skipped[0][1]}")
    data = PackedDataset.from_texts(corpus.texts, tok, opts["seq_len"])
    train_set, eval_set = data.split(opts["eval_fraction"]) if opts["eval_fraction"] else (data, None)
    echo(f"data: {len(corpus.texts)} documents -> {len(train_set)} train sequences of {opts['seq_len']} tokens"
         + (f", {len(eval_set)} held out" if eval_set is not None else ""))
    model_fields = {"vocab_size": tok.vocab_size, "max_seq_len": opts["seq_len"], **opts["model"]}
    model = ReversibleGPT(TransformerConfig.preset(opts["preset"], **model_fields))
    echo(f"model: ReversibleGPT {opts['preset']} {model_fields}, "
         f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    trainer = Trainer(model, lr=opts["lr"], batch_size=opts["batch_size"], out_dir=opts["out_dir"],
                      precision=opts["precision"], gradient_accumulation_steps=opts["grad_accum"],
                      eval_every=opts["eval_every"] if eval_set is not None else None,
                      save_every=opts["save_every"], device=opts["device"], seed=opts["seed"])
    summary = trainer.train(train_dataset=train_set, eval_dataset=eval_set, num_steps=opts["steps"],
                            resume=opts["resume"])
    echo(json.dumps(summary))
    return summary


@app.command()
def train(data: Annotated[Optional[str], typer.Option(help="text file, folder, or hf:NAME[:SPLIT]")] = None,
          config: Annotated[Optional[Path], typer.Option(help="JSON/YAML file with any of these options")] = None,
          pattern: Annotated[Optional[str], typer.Option(help="glob for files in a folder")] = None,
          tokenizer: Annotated[Optional[str], typer.Option(help="'byte' or a Hugging Face tokenizer")] = None,
          preset: Annotated[Optional[str], typer.Option(help="model preset: tiny, S, M, llama8b")] = None,
          set_: SetOption = None,
          steps: Optional[int] = None, batch_size: Optional[int] = None, seq_len: Optional[int] = None,
          lr: Optional[float] = None, out_dir: Optional[str] = None,
          resume: Annotated[Optional[bool], typer.Option("--resume/--no-resume",
                                                         help="go on from out_dir's latest checkpoint")] = None,
          precision: Annotated[Optional[str], typer.Option(help="fp32, bf16 or fp16")] = None,
          grad_accum: Optional[int] = None, eval_fraction: Optional[float] = None,
          eval_every: Optional[int] = None, save_every: Optional[int] = None,
          device: Optional[str] = None, seed: Optional[int] = None):
    """Train a reversible GPT on your text. Defaults < --config file < flags."""
    flags = {k: v for k, v in locals().items() if k in TRAIN_DEFAULTS and v is not None}
    try:
        opts = {**TRAIN_DEFAULTS, **(_read_config(config) if config else {}), **flags}
        opts["model"] = {**opts["model"], **_parse_overrides(set_ or [])}
        run_train(opts, echo=typer.echo)
    except USER_ERRORS as e:
        _fail(_describe(e))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context):
    """Run the benchmark runner; extra arguments are passed on to it (--help lists them). With no task
    (--modes, --sdpa-backends, --check-grads, --max-context) it sweeps the modes standard, full_ac and
    revnet_zero."""
    try:
        from . import benchmarks
    except ImportError as e:
        _fail(f"the benchmarks are not available in this install ({e})")
    runner = getattr(benchmarks, "main", None)
    if runner is None:
        _fail("this install's revnet_zero.benchmarks has no main() runner")
    args = list(ctx.args)
    try:
        args = _bench_args(args, typer.echo)
    except ValueError as e:
        _fail(str(e))
    # argparse names its program after sys.argv[0]: make its usage line read "revnet-zero bench"
    argv0, sys.argv[0] = sys.argv[0], ctx.command_path
    try:
        status = runner(args)
    finally:
        sys.argv[0] = argv0
    raise typer.Exit(status or 0)


def _flag_values(args: list[str], flag: str) -> list[str]:
    """Values given to ``flag`` in ``args``, as ``--flag value`` or ``--flag=value``."""
    out = [v.split("=", 1)[1] for v in args if v.startswith(flag + "=")]
    return out + [args[i + 1] for i, v in enumerate(args[:-1]) if v == flag]


def _bench_args(args: list[str], echo) -> list[str]:
    """The runner's arguments: the default sweep added when no task is asked for; every mode name
    checked, so a typo is one error line instead of a traceback after the model is built."""
    if any(a in ("-h", "--help") for a in args):
        return args
    if not any(a == f or a.startswith(f + "=") for a in args for f in BENCH_TASKS):
        echo(f"no task given: running --modes {BENCH_DEFAULT_MODES} (see revnet-zero bench --help)")
        args = [*args, "--modes", BENCH_DEFAULT_MODES]
    from .benchmarks.modes import check_mode
    for flag in BENCH_MODE_FLAGS:
        for value in _flag_values(args, flag):
            for mode in (m.strip() for m in value.split(",") if m.strip()):
                if not (flag == "--modes" and mode == "all"):
                    check_mode(mode)
    return args


@app.command()
def profile(preset: str = "tiny",
            set_: SetOption = None,
            batch_size: int = 2, seq_len: int = 256, device: Optional[str] = None):
    """Memory of one training step: saved-tensor bytes per block, reversible vs standard (and the CUDA
    peak on a GPU)."""
    import torch

    from .models import ReversibleGPT, TransformerConfig
    from .training import compare_policies, saved_bytes
    from .training.trainer import resolve_device
    try:
        dev = resolve_device(device)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"--batch-size and --seq-len must be >= 1, got {batch_size} and {seq_len}")
        overrides = {"max_seq_len": seq_len, **_parse_overrides(set_ or [])}
        model = ReversibleGPT(TransformerConfig.preset(preset, **overrides))
    except (ValueError, TypeError) as e:
        _fail(str(e))
    model.to(dev)
    ids = torch.randint(model.config.vocab_size, (batch_size, seq_len), device=dev)
    rows = {}
    for name, policy in (("standard", "store"), ("reversible", "recompute")):
        model.blocks.set_policy(policy)
        rows[name] = saved_bytes(model, ids, by_block=True)
    typer.echo(f"{preset} {overrides}, batch {batch_size} x {seq_len}, on {dev}")
    typer.echo("bytes saved for backward in one forward (MiB; saved_tensors_hooks, each storage once, "
               "parameters excluded)")
    typer.echo(f"{'':16}{'standard':>12}{'reversible':>12}")
    for key in [f"block {i}" for i in range(len(model.blocks.blocks))] + ["outside blocks", "total"]:
        typer.echo(f"{key:16}" + "".join(f"{rows[n].get(key, 0) / MiB:12.2f}" for n in rows))
    if dev.type == "cuda":
        mem = compare_policies(model, ids)
        typer.echo(f"CUDA peak of one forward + backward above weights and gradients: standard "
                   f"{mem['standard'] / MiB:.1f} MiB, reversible {mem['reversible'] / MiB:.1f} MiB")


def main() -> None:
    app(prog_name="revnet-zero")


if __name__ == "__main__":
    main()
