"""The command line's grammar: every ``deltatune`` command with its flags and help texts, and the long help of
``deltatune train --help`` (the recipe keys and every registered method's fields, read from their docstrings).

``cli.py`` parses with ``parse`` and runs the command. Split from cli.py in session 46 to give it headroom. Only
argparse, os and sys are imported here at module level: the help texts import the recipe table and the registry
inside the function that builds them, so ``deltatune --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

NEAR = 0.8
"""difflib's cutoff for a mistyped flag's nearest flag (its default 0.6 took --dtype for --adapter)."""


def _train_help() -> str:
    from .train.config import STAGES, field_help

    lines = [
        "recipe keys (set in the YAML or override as section.key=value):",
        f"  stage: one of {', '.join(STAGES)}",
        "  method.name: lora | ... (deltatune info lists them); other method.* keys are that method's fields",
        "  method.towers (default [language]): the towers of a vision-language model the method adapts (language, "
        "vision; docs/vision.md)",
    ]
    for section, rows in field_help().items():
        for key, default, text in rows:
            lines.append(f"  {section}.{key} (default {default!r}): {text}")
    lines += _method_help()
    return "\n".join(lines)


def _method_help() -> list[str]:
    """Every registered method's fields (read from the source: Python drops attribute docstrings); the fields all
    methods share are listed once."""
    from . import registry
    from .config import DeltaConfig, field_docs

    shared = {name for name, _, _ in field_docs(DeltaConfig)}
    lines = ["", "method fields (method.name=NAME, then method.KEY=VALUE):"]
    lines += [f"  every method: {key} (default {default!r}): {text}" for key, default, text in field_docs(DeltaConfig)]
    for name in registry.names():
        for key, default, text in field_docs(registry.get(name).config_class):
            if key not in shared:
                lines.append(f"  {name}: {key} (default {default!r}): {text}")
    return lines


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusal of a choice (a command, a --dtype) names the nearest one: ``deltatune trian``
    said only "invalid choice" (Python 3.14's suggest_on_error does this; 3.10-3.13 have none). Subparsers are made
    of this class too (add_subparsers takes the parser's class)."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            import difflib

            near = difflib.get_close_matches(str(value), [str(c) for c in action.choices or ()], 1)
            if not near or "did you mean" in exc.message:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}; did you mean {near[0]!r}?") from None

    def parse_known_args(self, args=None, namespace=None):  # (argparse's signature)
        self._given = list(args) if args is not None else []  # (error names the nearest flag of a mistyped one)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # (argparse's: it exits)
        """argparse's refusal; a missing required flag beside a mistyped one (``--adaptr x``) names the nearest
        flag too: argparse refuses the missing one before the unknown one is reported."""
        if message.startswith("the following arguments are required"):
            import difflib

            flags = list(self._option_string_actions)
            given = [
                w.split("=")[0] for w in getattr(self, "_given", []) if w[:1] == "-" and w.lstrip("-")[:1].isalpha()
            ]
            known = [f for f in given if f[:2] == "--" and any(k.startswith(f) for k in flags)]  # (--de: --debug)
            unknown = [f for f in given if f not in flags and f not in known]  # (-x read "required: command", unnamed)
            for flag in unknown:
                if near := difflib.get_close_matches(flag, flags, 1, NEAR):
                    message += f"; unrecognized argument {flag}: did you mean {near[0]}?"
                    break
            else:
                message += f"; unrecognized arguments: {' '.join(unknown)}" if unknown else ""
        super().error(message)


def _is_help(arg: str) -> bool:
    """-h, --help, or an abbreviation argparse takes for it (--he, --hel: no other flag of train's starts so)."""
    return arg == "-h" or len(arg) > 2 and "--help".startswith(arg)


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = _Parser(prog="deltatune", description="Parameter-efficient fine-tuning of transformer models.")
    p.add_argument("--debug", action="store_true", help="on an error, show the full Python traceback")
    p.add_argument("--version", action="version", version=f"deltatune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="run a recipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune with a YAML recipe. Example:\n  deltatune train recipes/sst2-lora.yaml "
        "method.r=16 train.lr=1e-4",
        # (built for --help alone: it imports torch and every method, 4 s outside main's Ctrl-C handling)
        epilog=_train_help() if "train" in argv and any(_is_help(a) for a in argv) else None,
    )
    t.add_argument("recipe", help="the recipe YAML")
    # default: argparse takes a nargs="*" positional without one as required ("required: recipe, overrides")
    t.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    t.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    t.add_argument(
        "--resume-changed",
        action="store_true",
        help="with --resume: continue although the recipe differs from the run's (lr, seed, method, data, ...)",
    )

    e = sub.add_parser("eval", help="evaluate a trained run on a data file; prints metrics as JSON on the last line")
    e.add_argument(
        "--adapter",
        required=True,
        help="a run folder written by 'deltatune train', one of its checkpoint-N, or a peft adapter folder "
        "(with --data)",
    )
    e.add_argument("--data", help="data file to evaluate on (default: the recipe's eval file)")
    e.add_argument(
        "--compare",
        action="store_true",
        help="also evaluate the run's start (the base and the method's initial delta, from the recipe's seed) on "
        "the same rows: <key>_before, and preference runs pair the two pair by pair",
    )
    e.add_argument(
        "overrides", nargs="*", default=[], help="section.key=value overrides (e.g. data.text_column=sentence)"
    )
    _trust_flag(e)

    g = sub.add_parser(
        "generate",
        help="answer a prompt with an adapter (through the model's chat template); --compare adds the base's answer",
    )
    g.add_argument("--prompt", help="the prompt text (a user message, unless --raw); with --image: about the image")
    g.add_argument("--image", help="an image file to caption (a stage caption run)")
    g.add_argument("--compare", action="store_true", help="also print the base model's answer (adapter off)")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--merged", action="store_true", help="merge the adapter into the weights first")
    g.add_argument("--out", help="text-to-image runs: the PNG to write (with --compare: base | adapter)")
    g.add_argument("--steps", type=int, default=50, help="text-to-image: DDIM sampling steps (default 50)")
    g.add_argument("--guidance", type=float, default=1.0, help="text-to-image: classifier-free guidance (1: none)")
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="text-to-image: another LoRA (a t2i run, a diffusers or kohya file) active with the run's, weighted "
        "(default 1); repeat for more",
    )
    g.add_argument("--adapter-weight", type=float, default=1.0, help="text-to-image: the run's own LoRA's weight")
    _generation_flags(g)

    c = sub.add_parser(
        "chat",
        help="talk to an adapter: history kept, /reset (/clear) clears it, /base toggles the adapter off and on, /help",
        description="An interactive chat with a trained adapter. Reads one message per line from stdin when it is "
        "not a terminal (so it can be scripted).",
    )
    _generation_flags(c)

    m = sub.add_parser("merge", help="fold an adapter into its base and save a plain transformers model")
    m.add_argument("--adapter", required=True, help="adapter or run folder")
    m.add_argument("--out", required=True, help="output folder for the merged model")
    m.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    m.add_argument("--overwrite", action="store_true", help="replace what --out holds (only once the merge succeeded)")
    m.add_argument("--max-shard-size", type=_shard_size, metavar="SIZE",
                   help="largest weights file, e.g. 5GB (LLaMA-Factory's export_size: 5) or 500MB; bigger models are "
                        "split into shards with an index, as transformers' save_pretrained(max_shard_size=) "
                        "(default: transformers', 50GB)")  # fmt: skip
    _trust_flag(m)

    i = sub.add_parser("info", help="a model's family, default targets and trainable parameters per method")
    i.add_argument("model", help="model folder, hub id, or 'minilm'")
    i.add_argument(
        "--task",
        default=None,
        type=str.upper,  # peft's names; seq_cls reads as SEQ_CLS
        help="CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, IMAGE_CLS or IMAGE_TO_TEXT (default: guessed)",
    )

    d = sub.add_parser("data", help="check a data file before training (deltatune data inspect FILE)")
    dsub = d.add_subparsers(dest="data_command", metavar="{inspect}", required=True)  # (not "data_command")
    d.commands = dsub.choices
    di = dsub.add_parser("inspect", help="detected format, rows, token lengths, and the first rows as rendered")
    di.add_argument("file", help="the data file")
    di.add_argument("--model", help="model whose tokenizer renders and counts (default: built-in chatml, no counts)")
    di.add_argument("--stage", help="render as this stage does (default: the format's usual stage)")
    di.add_argument("--max-length", type=int, default=512, help="data.max_length: rows longer are counted")
    di.add_argument(
        "--template",
        help="data.template: chatml, alpaca (LLaMA-Factory's), plain or raw (TRL's plain text of standard rows; "
        "default: the tokenizer's); alpaca_v0 is the alpaca of runs begun before 2026-12-08 (no default system)",
    )
    di.add_argument("--format", dest="data_format", help="data.format (default: detected from the rows)")
    di.add_argument("--rows", type=int, default=2, help="how many rows to render (default 2)")

    sv = sub.add_parser(
        "serve",
        help="serve a base model and its adapters with an OpenAI-compatible API (needs deltatune[serve])",
        description="One base in memory, every adapter beside it; concurrent requests for different adapters are "
        "batched together. Example:\n  deltatune serve --model smollm2 --adapter identity=runs/identity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sv.add_argument("--model", help="base model: folder, hub id or alias (default: the first adapter's base)")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="an adapter to serve (repeat)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="required Bearer key (needed when --host is not a loopback address)")
    sv.add_argument("--adapter-dir", help="folder from which POST /v1/adapters may load adapters at run time")
    sv.add_argument("--max-batch-size", type=int, default=32, help="most rows decoded together (default 32)")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (default 10)")
    sv.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask (default 1024)")
    sv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    bd = sub.add_parser("board", help="web board over a runs folder: runs, live curves, compare, playground")
    bd.add_argument("--runs", default="runs", help="the folder holding run folders (default runs/)")
    bd.add_argument("--host", default="127.0.0.1")
    bd.add_argument("--port", type=int, default=7860)
    bd.add_argument("--serve", dest="serve_url", help="playground: a running 'deltatune serve' (its URL)")
    bd.add_argument("--serve-key", help="the API key of that serve process (kept on the board's side)")
    bd.add_argument("--model", help="playground: start a serve engine inside the board on this base model")
    bd.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="with --model: an adapter")
    bd.add_argument(
        "--inspect",
        action="store_true",
        help="print the runs of --runs (or of one run's folder): status, step, stage/method, metrics; then exit "
        "(as tensorboard --inspect)",
    )

    for command in sub.choices.values():  # --debug after the command too (SUPPRESS: the top-level value stands)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.commands = sub.choices  # (an unknown flag is named by its command, with the nearest of its flags)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` as its command's arguments: ``key=value`` after a flag is an override too (``train RECIPE
    --overwrite train.lr=1e-3``), an unknown flag is named by its command with the nearest of its flags
    (``--overwite``: did you mean --overwrite?). SystemExit as argparse's: 2 for a usage error, 0 after --help; 130
    for Ctrl-C while the parser is built (``train --help`` imports torch and every method: it was the traceback of
    wherever the import was, before main's handling of Ctrl-C)."""
    try:
        parser = _parser(argv)
        args, extra = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("deltatune: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    unknown = [e for e in extra if e.startswith("-")] if takes_overrides else extra
    if unknown:
        import difflib
        import re

        command = parser.commands[args.command]
        command = getattr(command, "commands", {}).get(getattr(args, "data_command", None), command)  # data inspect
        flags = re.findall(r"--[\w-]+", command.format_usage())
        near = difflib.get_close_matches(unknown[0].split("=")[0], flags, 1, NEAR)  # (0.6: --dtype -> --adapter)
        command.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {near[0]}?" if near else ""))
    if extra:
        args.overrides += extra
    return args


def check_args(args: argparse.Namespace) -> None:
    """A ConfigError naming the first ``key=value`` override whose key has an empty part (``=1``, ``train.=1``,
    ``train..lr=1``: they read "unknown key ''" or "unknown key 'train.'" and every key of the section), or the first
    override or ``merge --out`` whose text is not UTF-8 (bytes a shell passed through: ``output.dir=$'run\\xff'``
    made the folder, then the tokenizer's save raised a UnicodeEncodeError's traceback, the folder left
    half-written; ``merge --out`` merged, then raised the same). A key overridden with two values
    (``train.lr=1e-3 ... train.lr=1e-4``, not ``1e-3`` then ``0.001``) is said in one line on stderr: the last wins,
    as it did unsaid."""
    for flag, item in [("override", item) for item in getattr(args, "overrides", None) or ()] + (
        [("--out", args.out)] if args.command == "merge" else []
    ):
        key, why = item.split("=", 1)[0].strip(), None
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            item = os.fsencode(item).decode("utf-8", "backslashreplace")
            why = "is not UTF-8 text; " + (
                "a run's recipe is written as UTF-8 (run.yaml, the tokenizer's files)"
                if flag == "override"
                else "the tokenizer saves only under UTF-8 paths"
            )
        if why is None and flag == "override" and "=" in item and "" in key.split("."):
            why = (f"has an empty part in its key {key!r}" if key else "names no key") + "; write section.key=value "
            why += "(e.g. train.lr=1e-4)"
        if why:
            from .config import ConfigError

            raise ConfigError(f"{flag} '{item}' {why}")
    given: dict[str, list[str]] = {}  # a key set to two values: the last wins, as argparse's and OmegaConf's, said
    for item in [item for item in getattr(args, "overrides", None) or () if "=" in item]:
        given.setdefault(item.split("=", 1)[0].strip(), []).append(item)
    for key, items in given.items():
        if any(_value(item) != _value(items[0]) for item in items[1:]):  # (1e-3 and 0.001 one value; 1, 1.0, true not)
            times, said = "twice" if len(items) == 2 else f"{len(items)} times", "', then '".join(items)
            print(f"deltatune: override {key!r} is given {times} ('{said}'): the last is used", file=sys.stderr)


def _value(item: str) -> str:
    """An override's value as the recipe reads it (``train.config._coerce``), as its repr: typed, so that ``1``,
    ``1.0`` and ``true`` are three values (Python's == makes them one) and ``.nan`` equals itself."""
    from .train.config import _coerce

    return repr(_coerce(item.split("=", 1)[1]))


def _version() -> str:
    from . import __version__

    return __version__


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter or run folder")
    parser.add_argument("--model", help="base model (default: the one the adapter was trained on)")
    parser.add_argument("--system", help="a system message (chat models)")
    parser.add_argument("--raw", action="store_true", help="send the text as it is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in new tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; > 0 samples")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling mass (with --temperature > 0; default: the model's generation config's)")  # fmt: skip
    parser.add_argument("--seed", type=int, help="seed for sampling")
    _trust_flag(parser)


def _shard_size(text: str) -> str:
    """``--max-shard-size``: a size transformers' ``save_pretrained(max_shard_size=)`` reads (5GB, 500MB, 2GiB, more
    than zero), refused here in one line (transformers raised its ValueError after the merge, from deep inside); a
    lowercase final b of GB, MB, KB (bits to transformers: 5gb is 625,000,000 bytes) refused too."""
    import re

    if not re.fullmatch(r"0*[1-9][0-9]*([GMK]i?B)", text, re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: a whole number and a unit, e.g. 5GB, 500MB, 2GiB")
    if text.endswith("b") and text[-2] not in "iI":  # transformers' convert_file_size_to_int: 5Gb, 5gb gigabits
        raise argparse.ArgumentTypeError(f"{text!r}: write the unit with a capital B (bytes: {text[:-1]}B); "
                                         "transformers reads a lowercase b as bits, shards 8 times smaller")  # fmt: skip
    return text


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run the base model's own Python code (only for models you trust); a run folder's "
        "run.yaml never turns this on",
    )
