"""``deltatune train|eval|generate|chat|merge|info|data|serve|board``: parse, call one function, print the result.

Heavy libraries are imported inside the commands (``--help`` answers at once); the parser is ``cli_parser.py``'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading

from .cli_parser import check_args, parse


def _is_ours(exc: BaseException) -> bool:
    """Whether ``exc`` is deltatune refusing an input: one of its own error types, or a ValueError, KeyError or
    OSError raised by deltatune's own code (the innermost frame of the traceback is in the package; for an OSError
    naming a file, the innermost outside the standard library's modules: os.makedirs refusing an --out). Anything
    raised deeper, in torch or transformers, is a bug to show in full."""
    from .config import ConfigError
    from .data.load import DataError
    from .files import AdapterLoadError, write_failure

    if isinstance(exc, (ConfigError, DataError, AdapterLoadError)):
        return True
    if not isinstance(exc, OSError) and write_failure(exc) is not None:
        return True  # a library's error around a failed write (safetensors', torch's on a full disk): one line
    if not isinstance(exc, (ValueError, KeyError, OSError)):
        return False
    files, modules = [], []
    tb = exc.__traceback__
    while tb is not None:
        files.append(os.path.abspath(tb.tb_frame.f_code.co_filename) if tb.tb_frame.f_code.co_filename[:1] != "<"
                     else tb.tb_frame.f_code.co_filename)  # fmt: skip
        modules.append(str(tb.tb_frame.f_globals.get("__name__") or "").partition(".")[0])
        tb = tb.tb_next
    # the file system refusing a path deltatune's code asked for (os.makedirs of an --out under a file or on a
    # read-only disk): deltatune's too, though raised a frame or two down in the standard library, known by its
    # module's name (not by path: site-packages may lie under the standard library's folder, with pyenv, conda or a
    # python:3.x image without a venv, and torch's frames would be popped as the standard library's)
    while (
        isinstance(exc, OSError)
        and exc.filename
        and files
        and (files[-1].startswith("<frozen ") or modules[-1] in sys.stdlib_module_names)
    ):
        files.pop()
        modules.pop()
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return bool(files) and files[-1].startswith(package)


def _message(exc: BaseException) -> str:
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:  # a DataLoader worker's: its error's own line
        text = text.rstrip("\n").rsplit("\n", 1)[-1].split(": ", 1)[-1]
    return " ".join(text.split("\n")) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)  # (SystemExit: 2 for a usage error, 0 for --help, 130 for Ctrl-C while it parses)
    previous = _on_sigterm()
    try:
        check_args(args)  # (an override with an empty key part or bytes not UTF-8)
        code = _COMMANDS[args.command](args)
        if sys.stdout is not None:  # flushed here, not at exit: a reader gone by then is this except's (it was 120)
            sys.stdout.flush()
        return code
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever torch was; 130 as shells expect
        if args.debug:
            raise
        print(f"deltatune {args.command}: interrupted{_resumable(args)}", file=sys.stderr)
        return 130
    except Exception as exc:  # deltatune's own refusals become one line (exit 2); --debug shows the traceback
        if args.debug:
            raise
        if isinstance(exc, BrokenPipeError) and _stdout_gone():  # (data inspect F | head: it has what it wanted)
            if args.command == "train":  # a run stopped by it is said so; one finished (its summary unread) too
                _say("deltatune train: finished; its output's reader left before the summary (metrics.json and "
                     f"report.md are in {args.out_dir})" if getattr(args, "finished", False)
                     else f"deltatune train: stopped: its output's reader left{_resumable(args)}")  # fmt: skip
            return 141
        if type(exc).__name__ == "NonFiniteLossError":
            print(f"deltatune {args.command}: error: {_message(exc)}", file=sys.stderr)
            return 1
        if not _is_ours(exc):
            raise
        print(f"deltatune {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (``| head``): Python's docs' advice then, stdout sent
    to devnull so the interpreter's last flush raises no second BrokenPipeError; 141 (128 + SIGPIPE) is what a
    shell shows for ``yes | head``. It read "deltatune data: error: [Errno 32] Broken pipe", exit 2 (a usage error)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):
            return False
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return True
    except (AttributeError, OSError, ValueError):  # no poll (Windows), stdout not a file
        return False


def _say(line: str) -> None:
    """``line`` on stderr, unless stderr is the same gone pipe (``2>&1 | head``): then nothing, and stderr sent to
    devnull so the interpreter's last flush raises nothing (a second BrokenPipeError in the except: exit 1)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def _resumable(args) -> str:
    """How an interrupted train goes on: from its newest checkpoint; before its first, by --overwrite; finished, not."""
    if args.command != "train":
        return ""
    if (out := getattr(args, "out_dir", None)) is None:  # (set once the recipe is read, which takes seconds)
        return " before its recipe was read; nothing written"
    names, finished = _listdir(out) if out else [], getattr(args, "finished", False)
    if "metrics.json" in names and getattr(args, "overwrite", False) and not finished:  # (the old run's, still kept)
        return f" before the new run's first step; the finished run in {out} is kept as it was"
    if finished or "metrics.json" in names:  # (--resume refuses a finished run)
        return f" after the run finished; metrics.json and report.md are in {out}"
    if out and not any(name.startswith("checkpoint-") for name in names):
        return " before its first checkpoint; nothing to resume" + " (--overwrite starts it again)" * bool(names)
    return "; --resume continues from its newest checkpoint"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _on_sigterm():
    """SIGTERM (kill, a scheduler's stop) as Ctrl-C, so what Ctrl-C undoes is undone too (train --overwrite puts the
    old run back, staging folders go); the previous handler, to restore, or None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _check_exists(path: str) -> None:
    """A missing ``--adapter`` folder named as missing, with the nearest name beside it (a typo in runs/idnetity read
    "no adapter_config.json at ..." or "holds no run.yaml", as if the folder were there but wrong); a file named as
    a file (it read "holds no run.yaml")."""
    from .config import ConfigError

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"--adapter {path!r} is a file; give a run folder or an adapter folder (adapter_config.json)"
        )
    if os.path.exists(path):
        _check_config_file(path)
        return
    import difflib

    parent, name = os.path.split(os.path.normpath(path))
    try:
        near = difflib.get_close_matches(name, os.listdir(parent or "."), 1)
    except OSError:
        near = []
    hint = f"; did you mean {os.path.join(parent, near[0])!r}?" if near else ""
    raise ConfigError(f"--adapter {path!r} does not exist{hint}")


def _check_config_file(folder: str) -> None:
    """An ``adapter_config.json`` that does not parse, named before anything loads (eval read it as "does not say
    which base model it was trained on"; a byte that is not UTF-8 was a UnicodeDecodeError's traceback)."""
    from .config import ConfigError

    file = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(file):
        return
    try:
        with open(file, encoding="utf-8") as fh:
            json.load(fh)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file} is not UTF-8 text (byte {exc.start}); an adapter config is JSON") from None
    except ValueError as exc:
        raise ConfigError(f"{file} is not valid JSON (truncated?): {exc}") from None


def _train(args) -> int:
    from .train import load_recipe, train
    from .train.config import ignored_keys

    cfg = load_recipe(args.recipe, args.overrides)
    args.out_dir = cfg.output.dir  # (an interruption's line says whether a checkpoint is there to resume)
    for key, stages in ignored_keys(cfg):  # set, but not read by this stage: it trains as if the key were not there
        print(f"deltatune train: note: {key} is read by stage {stages} only; stage {cfg.stage} ignores it",
              file=sys.stderr)  # fmt: skip
    metrics = train(cfg, overwrite=args.overwrite, resume=args.resume, resume_changed=args.resume_changed)
    args.finished = True  # (a reader gone from here on, its summary unread: the run is done, not one to --resume)
    _print_change(metrics)
    samples = os.path.join(cfg.output.dir, "samples.json")
    if cfg.output.samples and os.path.isfile(samples):
        from .train.chat import side_by_side

        with open(samples, encoding="utf-8") as fh:
            print(side_by_side(json.load(fh)))
    print(f"adapter, metrics.json and report.md written to {cfg.output.dir}")
    print(json.dumps(metrics, sort_keys=True))
    return 0


def _print_change(metrics: dict) -> None:
    """The main metric before training and after, and for preference stages the pairs won and lost between."""
    keys = ("eval_accuracy", "eval_f1", "eval_pearson", "eval_f1_micro", "eval_rougeL", "eval_loss")  # (cls: 3 kinds)
    main_key = next((k for k in keys if k in metrics), None)
    if main_key and f"{main_key}_before" in metrics:
        print(f"{main_key}: {metrics[main_key + '_before']:.4f} before training -> {metrics[main_key]:.4f} after")
    if "eval_paired_p" in metrics:  # preference stages: the same pairs before and after
        print(f"pairs won: {metrics['eval_gained']} gained, {metrics['eval_lost']} lost "
              f"(exact McNemar p {metrics['eval_paired_p']:.2g})")  # fmt: skip


def _eval(args) -> int:
    _check_exists(args.adapter)  # before the imports of torch: at once
    from .train import evaluate

    metrics = evaluate(args.adapter, args.data, args.overrides, args.trust_remote_code, compare=args.compare)
    _print_change(metrics)
    print(json.dumps(metrics, sort_keys=True))
    return 0


def _sampling(args) -> dict:
    from .train.chat import check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)  # before any model is loaded
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _generate(args) -> int:
    _check_exists(args.adapter)  # before the imports of torch: at once
    from .train import chat
    from .train.run_load import load_generator, run_task
    from .train.runs import run_template

    if args.compare and args.merged:
        print("deltatune generate: error: --compare needs the adapter unmerged; drop --merged", file=sys.stderr)
        return 2
    if not args.prompt and not args.image:
        print("deltatune generate: error: give --prompt TEXT or --image FILE", file=sys.stderr)
        return 2
    for flag, value in (("--num-beams", args.num_beams), ("--steps", args.steps)):
        if value < 1:
            print(f"deltatune generate: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if not math.isfinite(args.guidance):  # every pixel would be nan
        print(f"deltatune generate: error: --guidance must be a finite number, got {args.guidance}", file=sys.stderr)
        return 2
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):  # before any model loads
        chat.check_text(text, flag)
    sampling = _sampling(args)
    if args.image:
        return _caption(args, sampling)
    if run_task(args.adapter)[0] == "TEXT_TO_IMAGE" or args.out:
        return _draw(args)
    raw = _raw(args)
    model, tok = load_generator(args.adapter, args.model, args.merged, args.trust_remote_code, raw, "generate")
    model.eval()
    render = dict(raw=raw, system=args.system, template=run_template(args.adapter))  # prompted as it trained
    prompt = _source_prefix(args) + args.prompt
    ids = chat.prompt_ids(tok, prompt, **render)
    if args.compare:
        chat.check_base(model, "--compare")
        row = chat.compare(model, tok, [prompt], num_beams=args.num_beams, **render, **sampling)[0]
        print(chat.side_by_side([row]))
    else:
        own = chat.chat_templated(tok, raw, render["template"])  # (the chat template's end-of-turn stop)
        print(chat.generate(model, tok, ids, num_beams=args.num_beams, template=render["template"], templated=own,
                            **sampling))  # fmt: skip
    return 0


def _draw(args) -> int:
    import torch

    from .config import ConfigError
    from .train.run_load import load_adapter_model, run_task
    from .train.runs import read_recipe
    from .train.t2i import sample, save_png

    if run_task(args.adapter)[0] != "TEXT_TO_IMAGE":
        raise ConfigError(f"--out: {args.adapter!r} is not a text-to-image run (stage t2i); drop --out")
    if not args.out:
        raise ConfigError(f"{args.adapter!r} draws images (stage t2i): pass --out FILE.png")
    loras = _lora_specs(args.lora, args.adapter_weight)  # a bad weight is named before any loading
    model, processor = load_adapter_model(args.adapter, args.model, trust_remote_code=args.trust_remote_code)
    model.eval()
    if args.lora or args.adapter_weight != 1.0:
        _weighted_loras(model, processor, *loras)
    length = int((read_recipe(args.adapter).get("data") or {}).get("max_length") or 77)  # as the captions trained
    draw = dict(
        steps=args.steps, guidance=args.guidance, seed=args.seed if args.seed is not None else 0, max_length=length
    )
    images = sample(model, processor, [args.prompt], **draw)
    if args.compare:
        with model.disable_adapter(), processor.disable_adapter():
            images = torch.cat([sample(model, processor, [args.prompt], **draw), images])
    print(f"image written to {save_png(images, args.out)}" + (" (base | adapter)" if args.compare else ""))
    return 0


def _lora_specs(specs: list[str], weight: float) -> tuple[list[str], list[float], float]:
    """The paths and weights of ``--lora PATH[:WEIGHT]``, and ``--adapter-weight``; ConfigError naming the flag for
    a weight that is not a finite number (a nan weight drew a blank image)."""
    import math

    from .config import ConfigError

    paths, weights = [], []
    for spec in specs:
        path, _, tail = spec.rpartition(":")
        try:
            value = float(tail) if path else 1.0
        except ValueError:  # no weight given (a colon in the path)
            path, value = "", 1.0
        if not math.isfinite(value):
            raise ConfigError(f"--lora {spec!r}: the weight must be a finite number, got {tail}")
        paths.append(path or spec)
        weights.append(value)
    if not math.isfinite(weight):
        raise ConfigError(f"--adapter-weight must be a finite number, got {weight}")
    return paths, weights, weight


def _weighted_loras(model, processor, paths: list[str], weights: list[float], weight: float) -> None:
    """``--lora PATH[:WEIGHT]`` LoRAs loaded beside the run's and all active at once, weighted (``--adapter-weight``
    for the run's own), as diffusers' ``load_lora_weights`` and ``set_adapters``: text-encoder keys on its encoder."""
    from .diffusion import load_pipeline_loras
    from .train.t2i import DENOISERS

    prefix = DENOISERS[processor.denoiser_class]
    processor.text_encoder = load_pipeline_loras(model, processor.text_encoder, prefix, paths, weights, weight)


def _caption(args, sampling: dict) -> int:
    from .data.images import ImageRow, open_rgb
    from .train.caption import caption
    from .train.run_load import load_captioner

    open_rgb(ImageRow(os.path.abspath(args.image), None, args.image))  # a bad file is named before any loading
    model, processor = load_captioner(args.adapter, args.model, args.trust_remote_code, args.prompt is not None)
    model.eval()
    if args.merged:
        model = model.merge_and_unload()
    text = caption(model, processor, args.image, num_beams=args.num_beams, prompt=args.prompt, **sampling)
    if not args.compare:
        print(text)
        return 0
    with model.disable_adapter():
        base = caption(model, processor, args.image, num_beams=args.num_beams, prompt=args.prompt, **sampling)
    print(f"base:    {base}\nadapter: {text}")
    return 0


def _chat(args) -> int:
    _check_exists(args.adapter)  # before the imports of torch: at once
    from .train import chat
    from .train.run_load import load_generator
    from .train.runs import run_template

    sampling = _sampling(args)
    raw = _raw(args)
    model, tok = load_generator(args.adapter, args.model, False, args.trust_remote_code, raw, "chat")
    model.eval()
    template, prefix = run_template(args.adapter), _source_prefix(args)
    return chat.repl(model, tok, system=args.system, raw=raw, template=template, prefix=prefix, **sampling)


def _raw(args) -> bool:
    """Whether the prompt goes as it is: ``--raw``, or a seq2seq model's (trained and evaluated on the source text
    after its data.source_prefix, as transformers' text2text pipeline sends it; a chat template its tokenizer has
    would change the input)."""
    from .train.run_load import run_task

    return args.raw or run_task(args.adapter)[0] == "SEQ_2_SEQ_LM"


def _source_prefix(args) -> str:
    """A seq2seq run's ``data.source_prefix`` ("summarize: "), put before the prompt as before every source it
    trained on; none with ``--raw`` (the prompt exactly as typed) or for a folder without a run.yaml."""
    from .config import ConfigError
    from .train.run_load import run_task
    from .train.runs import read_recipe

    if args.raw or run_task(args.adapter)[0] != "SEQ_2_SEQ_LM":
        return ""
    try:
        prefix = (read_recipe(args.adapter).get("data") or {}).get("source_prefix")
    except ConfigError:  # an adapter folder alone: no recipe to read it from
        return ""
    return prefix if isinstance(prefix, str) else ""


def _merge(args) -> int:
    _check_exists(args.adapter)  # before the imports of torch: at once
    from transformers.utils.hub import convert_file_size_to_int

    from .config import ConfigError
    from .train.models import resolve_path, stored_dtype
    from .train.run_load import adapter_field, load_adapter_model, merge, merged_chat_template, run_task
    from .train.runfolder import check_apart, publish_folder, staging_folder
    from .train.runs import read_recipe
    from .train.staging import sweep_staging

    base = args.model or adapter_field(args.adapter, "base_model_name_or_path")
    check_apart(args.out, {"the adapter's folder": args.adapter, "the base model's folder": base})
    if run_task(args.adapter)[0] == "TEXT_TO_IMAGE":  # a run on a diffusers pipeline: the folder would lose its VAE
        folder = resolve_path(args.model or (read_recipe(args.adapter).get("model") or {}).get("name_or_path", ""))
        if os.path.isdir(os.path.join(folder, "vae")) and os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ConfigError(
                "cannot merge: the run's base is a diffusers pipeline with a VAE, and merge writes the denoiser alone; "
                "load the run's LoRA into the pipeline instead (pipe.load_lora_weights(RUN); pipe.fuse_lora()) and "
                "save the pipeline"
            )
    sweep_staging(args.out)
    with staging_folder(args.out, args.overwrite) as staging:  # refuses a folder with files unless --overwrite
        delta, tok = load_adapter_model(args.adapter, args.model, trust_remote_code=args.trust_remote_code,
                                        dtype="float32")  # fmt: skip
        model, report = merge(delta, tok)
        # Merged in float32, saved as the base is stored (a bfloat16 base stays bfloat16, half the size).
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        dtype = stored_dtype(source, args.trust_remote_code) if source and report is None else None
        if dtype is not None and dtype != model.dtype:
            model = model.to(dtype)
        # (in bytes: a diffusers denoiser's save_pretrained reads "2GiB" and "5gb" otherwise than transformers')
        shards = {"max_shard_size": convert_file_size_to_int(args.max_shard_size)} if args.max_shard_size else {}
        model.save_pretrained(staging, **shards)
        if (jinja := merged_chat_template(args.adapter, tok)) is not None:  # the trained data.template, as
            tok.chat_template = jinja  # LLaMA-Factory's export writes it
        tok.save_pretrained(staging)
        if report is not None:  # a 4-bit base: what merging into full precision changed, kept beside the model
            with open(os.path.join(staging, "merge_report.json"), "w", encoding="utf-8") as fh:
                json.dump(report.as_dict(), fh, indent=2)
        publish_folder(staging, args.out)
    if report is not None:
        print(f"4-bit base {report} (merge_report.json)")
    library = f"diffusers ({type(model).__name__})" if run_task(args.adapter)[0] == "TEXT_TO_IMAGE" else "transformers"
    print(f"merged model written to {args.out} (loads with plain {library})")
    return 0


def _info(args) -> int:
    from .info import describe

    print(describe(args.model, args.task))
    return 0


def _data(args) -> int:
    from .data.inspect import inspect

    _check_model(args.model)  # a missing folder is named before any reading (it was the hub client's OSError)

    print(inspect(args.file, args.model, args.stage, args.max_length, args.template, args.data_format, show=args.rows))
    return 0


def _adapters(pairs: list[str]) -> dict[str, str]:
    from .config import ConfigError

    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {pair!r}: write NAME=PATH (e.g. identity=runs/identity)")
        if name in out:
            raise ConfigError(f"--adapter {pair!r}: the name {name!r} is given twice")
        out[name] = path
    return out


def _check_model(model: str | None) -> None:
    """A ``--model`` path that is no folder named as missing before anything loads (an absolute path went to the hub
    client, whose refusal spoke of repo ids)."""
    if model:
        from .train.checks import check_model_path

        check_model_path(model, "--model")


def _serve(args) -> int:
    from .serve import build_engine, check_bind, check_limits, check_port, serve

    check_bind(args.host, args.api_key)  # before loading anything
    check_port(args.host, args.port)
    check_limits(args.max_batch_size, args.max_wait_ms, args.max_tokens, args.adapter_dir)
    engine = build_engine(args.model, _adapters(args.adapter), args.max_batch_size, args.max_wait_ms, args.dtype)
    print(f"serving {', '.join(engine.adapters())} on http://{args.host}:{args.port}/v1", flush=True)
    serve(engine, args.host, args.port, args.api_key, args.adapter_dir, args.max_tokens)
    return 0


def _board(args) -> int:
    from .board import board, check_board

    if args.inspect:
        return _inspect(args)
    model = "--model" if args.model else "--adapter" if args.adapter else ""  # (the flag named in a refusal)
    check_board(args.runs, args.host, args.port, args.serve_url, args.serve_key, model)
    serve_app = None
    if args.model or args.adapter:
        from .serve import build_engine
        from .serve.app import create_app

        serve_app = create_app(build_engine(args.model, _adapters(args.adapter)))
    print(f"deltatune board on http://{args.host}:{args.port}/ (runs: {args.runs})", flush=True)
    board(args.runs, args.host, args.port, args.serve_url, args.serve_key, serve_app)
    return 0


def _inspect(args) -> int:
    """``board --inspect``: one line per run of ``--runs`` (a folder of runs, or one run's folder) as the board's
    list reads it (name, status and why it stopped, last step, stage/method, headline metrics), then exit; as
    ``tensorboard --inspect`` prints what its logdir holds."""
    from .board.runs import RUN_FILE, list_runs, summary
    from .config import ConfigError

    path = args.runs
    for flag, value in (("--model", args.model), ("--adapter", args.adapter), ("--serve", args.serve_url)):
        if value:
            raise ConfigError(f"--inspect prints the runs and exits: drop {flag}")
    if not os.path.isdir(path):
        raise ConfigError(f"--runs {path!r} " + ("is a file; give a run folder or a folder of runs"
                                                 if os.path.exists(path) else "does not exist"))  # fmt: skip
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        parent, name = os.path.split(os.path.realpath(path))
        rows = [row for row in [summary(parent, name)] if row is not None]
    else:
        rows = list_runs(path)
    if not rows:
        raise ConfigError(f"--runs {path!r} holds no run (no {RUN_FILE} in it or one or two folders below it)")
    table = [
        [
            row["name"],
            row["status"] + (f" ({row['reason'].strip()})" if row.get("reason") else ""),
            f"step {row['steps']}",
            f"{row['stage']}/{row['method']}",
            "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["metrics"].items()),
        ]
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in table) for i in range(4)]
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + "  " + cells[4])
    return 0


_COMMANDS = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "chat": _chat,
    "merge": _merge,
    "info": _info,
}
_COMMANDS["serve"] = _serve
_COMMANDS["board"] = _board
_COMMANDS["data"] = _data

if __name__ == "__main__":
    sys.exit(main())
