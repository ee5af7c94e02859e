"""``deltatune serve``: one base model in memory, adapters of any method beside it, an OpenAI-compatible API.

Needs the ``serve`` extra (``pip install 'deltatune[serve]'``: FastAPI and uvicorn). See ``engine`` for how
requests are batched across adapters and ``app`` for the routes.
"""

from __future__ import annotations

import os
from typing import Any

from .engine import BASE, Engine, Request, RequestError, check_servable
from .guard import is_loopback

__all__ = ["BASE", "Engine", "Request", "RequestError", "base_model_of", "build_engine", "serve"]


def base_model_of(adapter_path: str) -> str | None:
    """The base model an adapter (or run folder) was trained on: the run's recipe, else its adapter config."""
    import json

    import yaml

    from ..config import ConfigError

    run_file = os.path.join(adapter_path, "run.yaml")
    if os.path.isfile(run_file):
        with open(run_file, encoding="utf-8") as fh:
            model = (yaml.safe_load(fh) or {}).get("model") or {}
        if not isinstance(model, dict):  # `model: smollm2` (a hand-written run.yaml): an AttributeError's traceback
            raise ConfigError(f"{run_file}: model must be a mapping with name_or_path, got {model!r}; or pass --model")
        if model.get("name_or_path"):
            return str(model["name_or_path"])
    config = os.path.join(adapter_path, "adapter_config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_path!r}")
    with open(config, encoding="utf-8") as fh:
        return json.load(fh).get("base_model_name_or_path")


def build_engine(
    model: str | None,
    adapters: dict[str, str],
    max_batch_size: int = 32,
    max_wait_ms: float = 10.0,
    dtype: str = "float32",
) -> Engine:
    """Load the base once, every adapter of ``adapters`` ({name: folder}) beside it, and start an Engine.

    Raises:
        ConfigError: no base model named and none recorded in the first adapter; a base that cannot be loaded.
        FileNotFoundError, AdapterLoadError: an adapter folder is missing, corrupt, or made for another base.
    """
    from ..config import ConfigError
    from ..model import DeltaModel
    from ..train.models import load_model, load_tokenizer
    from ..train.runs import run_template

    for adapter, path in adapters.items():  # what the files say is checked before the base loads
        if adapter == BASE:
            raise ConfigError(f"--adapter {adapter}={path}: the name {BASE!r} is the base model's; choose another")
        _named(adapter, path, check_servable, None, path, adapter)
        _named(adapter, path, run_template, path)
    if model:  # a path that is no folder, named before anything loads (after the adapters' own refusals)
        from ..train.checks import check_model_path

        check_model_path(model, "--model")
    name = model or (base_model_of(next(iter(adapters.values()))) if adapters else None)
    if not name:
        raise ConfigError("no base model: pass --model (the first adapter does not record one)")
    revision, attn = _recorded_load(next(iter(adapters.values())), model) if adapters else (None, None)
    tok = load_tokenizer(name, revision=revision)
    base = load_model(
        name, "CAUSAL_LM", dtype, pad_token_id=tok.pad_token_id, revision=revision, attn_implementation=attn
    )
    engine = Engine(DeltaModel(base, fused_loss=False), tok, max_batch_size, max_wait_ms / 1000)
    try:
        for adapter, path in adapters.items():
            _named(adapter, path, engine.load_adapter, adapter, path)
    except BaseException:
        engine.close()
        raise
    return engine


def _recorded_load(adapter_path: str, model: str | None) -> tuple[str | None, str | None]:
    """The (revision, attn_implementation) the first adapter's base loads with, as ``generate`` loads it
    (``run_load.recorded_load``): its run's model.revision and model.attn_implementation, else adapter_config.json's
    revision (peft's AutoPeftModel: base_model_revision); the revision only for the base it records."""
    import json
    from types import SimpleNamespace

    import yaml

    from ..train.run_load import recorded_load

    recorded: dict = {}
    for file, section in (("run.yaml", "model"), ("adapter_config.json", None)):
        try:
            with open(os.path.join(adapter_path, file), encoding="utf-8") as fh:
                data = yaml.safe_load(fh) if file == "run.yaml" else json.load(fh)
        except (OSError, ValueError):
            continue
        data = (data.get(section) if section else data) if isinstance(data, dict) else None
        if isinstance(data, dict) and (data.get("name_or_path") or data.get("base_model_name_or_path")):
            recorded = data
            break
    keys = ("name_or_path", "base_model_name_or_path", "revision", "attn_implementation")
    return recorded_load(SimpleNamespace(**{k: recorded.get(k) for k in keys}), model)


def _named(adapter: str, path: str, call: Any, *args: Any) -> None:
    """``call(*args)``, its refusal prefixed with the ``--adapter`` it is about."""
    try:
        call(*args)
    except (FileNotFoundError, ValueError) as exc:
        raise type(exc)(f"--adapter {adapter}={path}: {exc}") from None


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key (ConfigError)."""
    from ..config import ConfigError

    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host} listens beyond this machine: give --api-key (clients send it as Bearer)")


def check_limits(max_batch_size: int, max_wait_ms: float, max_tokens: int, adapter_dir: str | None) -> None:
    """Refuse serve's batching and loading options out of range before anything loads (ConfigError naming the flag):
    a batch of 0 rows left every request waiting; a runtime adapter folder that is not there failed only later."""
    from ..config import ConfigError

    for flag, value, least in (("--max-batch-size", max_batch_size, 1), ("--max-wait-ms", max_wait_ms, 0),
                               ("--max-tokens", max_tokens, 1)):  # fmt: skip
        if not value >= least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    if adapter_dir is not None and not os.path.isdir(adapter_dir):
        raise ConfigError(f"--adapter-dir {adapter_dir!r}: no such folder")


def check_port(host: str, port: int) -> None:
    """Refuse a port out of range, or one this host cannot listen on (in use, privileged), before anything loads."""
    import socket

    from ..config import ConfigError

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: a port is 0-65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    adapter_dir: str | None = None,
    max_tokens: int = 1024,
) -> Any:
    """Run the API with uvicorn until interrupted."""
    import uvicorn

    from .app import create_app

    check_bind(host, api_key)
    app = create_app(engine, adapter_dir=adapter_dir, api_key=api_key, max_tokens=max_tokens)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.close()
