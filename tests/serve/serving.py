"""Helpers of the serve and board tests: a tiny llama with three adapters of different methods (LoRA, IA3: mixed
batches; prompt tuning: a batch of its own), all non-trivial, and a uvicorn server on 127.0.0.1 in a thread."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from tiny import save_tiny  # noqa: E402

import deltatune as dt  # noqa: E402

ADAPTERS = {
    "lora": lambda: dt.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    # IA3 on other modules than LoRA's: two layer methods do not wrap the same module.
    "ia3": lambda: dt.IA3Config(
        init_ia3_weights=False, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3),
}


def make_adapters(root: str) -> tuple[str, dict[str, str]]:
    """Save the tiny base and its three adapters under ``root``; returns (base folder, {name: adapter folder})."""
    from transformers import AutoModelForCausalLM

    base = save_tiny(os.path.join(root, "base"), "llama", seed=0)
    folders = {}
    for seed, (name, make) in enumerate(ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), make())
        with torch.no_grad():  # make every adapter change the output a lot, so a mix-up shows in the text
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * (4.0 if "ia3" in n else 1.0))
        folders[name] = os.path.join(root, "adapters", name)
        model.save_pretrained(folders[name])
    return base, folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; ``url`` is its base URL."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
