"""The tiny llama and its three adapters served by ``deltatune serve`` on 127.0.0.1 in a thread of the test process
(see serving.py)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serving import Server, make_adapters  # noqa: E402


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(engine, server, base folder, adapter folders); the server allows runtime loads from the adapters folder."""
    from deltatune.serve import build_engine
    from deltatune.serve.app import create_app

    root = str(tmp_path_factory.mktemp("serve"))
    base, folders = make_adapters(root)
    engine = build_engine(base, folders, max_batch_size=32, max_wait_ms=5)
    server = Server(create_app(engine, adapter_dir=os.path.join(root, "adapters"), max_tokens=64))
    yield engine, server, base, folders
    server.stop()
    engine.close()
