"""The `flaxlm` command (also `python -m flaxlm`): train, eval, sample, translate, attention, bench.

Every user error (bad config key, missing or malformed data, mismatched checkpoint) prints one line
`flaxlm: error: ...` and exits with status 2; nothing in the workdir is deleted. Ctrl-C outside the training
loop exits with status 130 (inside it, training stops after the current step and saves a checkpoint).
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import pathlib
import sys
import warnings

from flaxlm.errors import FlaxlmError
from flaxlm.hugepage_malloc import reexec_with_hugepage_malloc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flaxlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("config", help="YAML experiment config, e.g. configs/char_gpt_cpu.yaml")
    p.add_argument("--workdir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    p = sub.add_parser("eval", help="evaluate a run's checkpoint (default: the latest)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    _add_checkpoint_argument(p)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.test=PATH")

    p = sub.add_parser("sample", help="generate text from a language-model run's checkpoint (default: the latest)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: fill the model's context after the prompt)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _add_checkpoint_argument(p)

    p = sub.add_parser("translate", help="translate sentences with a translation run, one per line")
    p.add_argument("--workdir", required=True)
    p.add_argument("--input", default=None, help="file of source sentences, one per line (default: stdin)")
    p.add_argument("--output", default=None, help="file for the translations (default: stdout)")
    p.add_argument("--beam-size", type=int, default=4, help="1 = greedy decoding (default: 4)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="GNMT length penalty alpha (default: 0.6)")
    _add_checkpoint_argument(p)

    p = sub.add_parser(
        "attention", help="draw a PNG heatmap of attention weights for one sentence",
        description="Translate runs: cross-attention of the greedy translation (generated target tokens x source "
                    "tokens; Transformer: one decoder layer, heads averaged; Seq2Seq: needs attention luong or "
                    "bahdanau). Classify runs with backbone 'transformer': one encoder layer's self-attention.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--text", required=True, help="the source sentence (translate) or input text (classify)")
    p.add_argument("--output", default=None, help="PNG path (default: WORKDIR/attention.png)")
    p.add_argument("--layer", type=int, default=None, help="Transformer layer, from 0 (default: the last)")
    _add_checkpoint_argument(p)

    p = sub.add_parser("bench", help="time a config's train step; prints one JSON object")
    p.add_argument("config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("overrides", nargs="*")
    return parser


def _add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (default), 'best' (the kept checkpoint best by the run's train.best_metric) or a "
                        "step number")


def _default_workdir(config: str) -> pathlib.Path:
    return pathlib.Path("runs") / pathlib.Path(config).stem


def _saved_config(workdir: pathlib.Path, overrides):
    from flaxlm.experiment import load_experiment

    path = workdir / "config.yaml"
    if not path.is_file():
        raise FlaxlmError(f"{path}: no run here (config.yaml missing); train one with `flaxlm train`")
    return load_experiment(path, overrides)


def _restored_run(workdir: pathlib.Path, overrides, checkpoint: str = "latest"):
    """Build a run from a workdir and load the parameters of its `checkpoint` ('latest', 'best' or a step)."""
    from flaxlm.checkpoint import restore_params
    from flaxlm.data.tokenizers import load_tokenizer
    from flaxlm.trainer import build_run

    cfg = _saved_config(workdir, overrides)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None))
    step = _checkpoint_step(workdir, cfg, checkpoint)
    tokenizer = load_tokenizer(workdir / "tokenizer.json")
    run = build_run(cfg, tokenizer)
    model = restore_params(workdir, run.state.model, step=step, tokenizer=tokenizer.to_json())
    return run, model


def _checkpoint_step(workdir: pathlib.Path, cfg, checkpoint: str) -> int | None:
    """--checkpoint as a step number; None for 'latest' (and for 'best' of a run without checkpoints, which
    restore_params then reports)."""
    from flaxlm.checkpoint import Checkpointer

    if checkpoint == "latest":
        return None
    if checkpoint.isdigit():
        return int(checkpoint)
    if checkpoint != "best":
        raise FlaxlmError(f"--checkpoint must be 'latest', 'best' or a step number, got {checkpoint!r}")
    with Checkpointer(workdir, best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode,
                      read_only=True) as checkpointer:
        return checkpointer.best_step()


def _command(args) -> None:
    if args.command == "train":
        from flaxlm.experiment import load_experiment
        from flaxlm.trainer import train

        cfg = load_experiment(args.config, args.overrides)
        workdir = pathlib.Path(args.workdir) if args.workdir else _default_workdir(args.config)
        result = train(cfg, workdir, progress=False if args.no_progress else None)
        print(json.dumps({"workdir": str(workdir), **result}))
    elif args.command == "eval":
        from flaxlm.trainer import evaluate

        run, model = _restored_run(pathlib.Path(args.workdir), args.overrides, args.checkpoint)
        print(json.dumps({f"{args.split}/{k}": v for k, v in evaluate(run, model, args.split).items()}))
    elif args.command == "sample":
        import jax
        import jax.numpy as jnp

        from flaxlm.decode import sample, validate_sampling

        run, model = _restored_run(pathlib.Path(args.workdir), [], args.checkpoint)
        if run.cfg.task != "lm":
            raise FlaxlmError(f"{args.workdir}: sample needs a language-model run (task: lm), got {run.cfg.task}")
        tokenizer = run.task.tokenizer
        try:
            prompt = tokenizer.encode(args.prompt)
        except FlaxlmError as e:
            raise FlaxlmError(f"--prompt: {e}") from None
        if not prompt:
            raise FlaxlmError("--prompt encodes to no tokens")
        if args.max_new_tokens is None:
            args.max_new_tokens = max(1, model.cfg.block_size - len(prompt))
        validate_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, len(prompt),
                          model.cfg.block_size)
        tokens = sample(model, jnp.asarray([prompt], jnp.int32), jax.random.key(args.seed),
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p)
        print(args.prompt + tokenizer.decode([int(t) for t in tokens[0]]))
    elif args.command == "translate":
        _translate(args)
    elif args.command == "attention":
        from flaxlm.attention_plot import attention_map, plot_attention

        workdir = pathlib.Path(args.workdir)
        run, model = _restored_run(workdir, [], args.checkpoint)
        if run.cfg.task not in ("translate", "classify"):
            raise FlaxlmError(f"{workdir}: attention needs a translate or classify run, got task {run.cfg.task}")
        output = pathlib.Path(args.output) if args.output else workdir / "attention.png"
        with _warnings_as_messages():
            plot_attention(attention_map(run.task, model, args.text, args.layer), output)
        print(output)
    elif args.command == "bench":
        from flaxlm.bench import bench
        from flaxlm.experiment import load_experiment

        print(json.dumps(bench(load_experiment(args.config, args.overrides), args.steps)))


@contextlib.contextmanager
def _warnings_as_messages():
    """Show warnings raised inside as one line each, `flaxlm: warning: ...`, on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        print(f"flaxlm: warning: {warning.message}", file=sys.stderr)


def _read_source_lines(path) -> list[str]:
    """Lines of --input (or stdin when None), never failing on bytes that are not UTF-8 (they become U+FFFD)."""
    if path is None:
        stream = getattr(sys.stdin, "buffer", None)
        text = stream.read().decode("utf-8", "replace") if stream is not None else sys.stdin.read()
    else:
        from flaxlm.data.sources import read_bytes

        file = pathlib.Path(path)
        data = b"" if file.is_file() and file.stat().st_size == 0 else read_bytes(file)
        text = data.decode("utf-8", "replace")
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _translate(args) -> None:
    """`flaxlm translate`: one translation per input line (blank lines stay blank) to --output or stdout."""
    if args.beam_size < 1:
        raise FlaxlmError(f"--beam-size must be >= 1, got {args.beam_size}")
    if not args.length_penalty >= 0:
        raise FlaxlmError(f"--length-penalty must be >= 0, got {args.length_penalty}")
    lines = _read_source_lines(args.input)
    workdir = pathlib.Path(args.workdir)
    run, model = _restored_run(workdir, [], args.checkpoint)
    if run.cfg.task != "translate":
        raise FlaxlmError(f"{workdir}: translate needs a translation run (task: translate), got {run.cfg.task}")
    with _warnings_as_messages():
        outputs = run.task.translate(model, lines, beam_size=args.beam_size, length_penalty=args.length_penalty,
                                     source=args.input or "<stdin>")
    text = "".join(line + "\n" for line in outputs)
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        pathlib.Path(args.output).write_text(text, encoding="utf-8")
    except OSError as e:
        raise FlaxlmError(f"{args.output}: cannot write the translations: {e.strerror or e}") from None


def _parse(argv) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may come before or after the options."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = args.overrides + extra
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        _command(args)
    except (FlaxlmError, ValueError, FloatingPointError) as e:
        print(f"flaxlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flaxlm: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> int:
    """The `flaxlm` console command and `python -m flaxlm`: restart with huge-page malloc, then `main()`."""
    reexec_with_hugepage_malloc()
    return main()
