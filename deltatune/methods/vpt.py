"""Visual prompt tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim, 2022; arXiv:2203.12119).

Prompt tuning for a Vision Transformer: n trainable vectors are inserted into the token sequence after the
class token(s), after the patch embeddings and their position embeddings (the prompts have no position):

    shallow: z0 = [cls ; P ; E(patches) + pos]                      P: (n, d), one set for the whole model
    deep:    z0 = [cls ; P_0 ; E(patches) + pos]  and before block i >= 1 the n prompt outputs of block i - 1 are
             replaced by P_i:  z_i = [cls_i ; P_i ; patches_i]      P: (L, n, d), one set per block

Only P (and the classifier head, through modules_to_save) trains; the base stays frozen. The head reads the class
token, which stays at position 0; the backbone's per-token outputs (``last_hidden_state``, ``hidden_states``) lose
the prompt positions again, so they have the base model's shape. Nothing to merge (the prompts are extra tokens).
Init: uniform in +-sqrt(6 / (3 p^2 + d)) for patch size p (the paper's Xavier init over the patch projection's fan).

Models: ViT (one class token) and DeiT (class and distillation tokens): the backbone's ``embeddings`` module and
its list of blocks (``layers``). Saved as ``visual_prompts.prompt_embeddings`` (L or 1, n, d); PEFT has no VPT.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, DeltaConfig
from ..layer import DeltaLayer
from ..targets import model_type
from ._token_geometry import expand_cast

ATTR = "visual_prompts"
"""Name of the child module of the base model holding every visual prompt adapter."""
LEADING_TOKENS = {"vit": 1, "deit": 2}
"""Special tokens before the patches (class; class + distillation), after which the prompts go."""


@dataclass
class VisualPromptConfig(DeltaConfig):
    """Visual prompt tuning: n trainable tokens after the class token of a ViT, at the input (shallow) or at every
    block (deep)."""

    method = "vpt"
    peft_type = "VPT"
    no_targets = "visual prompt tuning adds tokens and adapts no module"

    num_virtual_tokens: int = 10
    """Prompt tokens n per set (the paper uses 1-200; 10 or 50 are common)."""
    deep: bool = False
    """False: one set at the input (VPT-shallow); True: a new set before every block (VPT-deep)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"num_virtual_tokens must be an integer >= 1, got {n!r}")
        if not isinstance(self.deep, bool):
            raise ConfigError(f"deep must be true or false, got {self.deep!r}")


def _backbone(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, int]:
    """(backbone, its embeddings module, its block list, leading special tokens) of a ViT-style model."""
    mtype = model_type(model)
    if mtype not in LEADING_TOKENS:
        raise ConfigError(
            f"vpt: visual prompt tuning works on ViT-style models ({', '.join(LEADING_TOKENS)}), got model type "
            f"{mtype!r}; use prompt_tuning for text models"
        )
    backbone = getattr(model, "base_model", model)
    embeddings = getattr(backbone, "embeddings", None)
    blocks = getattr(backbone, "layers", None)
    if blocks is None and hasattr(backbone, "encoder"):
        blocks = getattr(backbone.encoder, "layer", None)  # transformers 4's layout
    if not isinstance(embeddings, nn.Module) or not isinstance(blocks, nn.ModuleList):
        raise ConfigError(f"vpt: cannot find the embeddings and the block list of model type {mtype!r}")
    return backbone, embeddings, blocks, LEADING_TOKENS[mtype]


class VisualPrompts(DeltaLayer):
    """Every visual prompt adapter of one model and the hooks that insert (and later drop) its tokens.

    Args:
        model: the ViT-style model it is attached to (hooked, not held: the layer is its child).
    """

    adapter_attrs = ("prompt_embeddings",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_embeddings = nn.ParameterDict()
        backbone, embeddings, blocks, self.lead = _backbone(model)
        self.num_blocks = len(blocks)
        self._handles = [
            embeddings.register_forward_hook(self._insert),
            backbone.register_forward_hook(self._drop),
            *(b.register_forward_pre_hook(functools.partial(self._replace, i), with_kwargs=True)
              for i, b in enumerate(blocks) if i > 0),
        ]  # fmt: skip

    def add(self, name: str, prompts: torch.Tensor) -> None:
        """Add adapter ``name`` with prompts (sets, n, d): sets = 1 (shallow) or the number of blocks (deep)."""
        self.prompt_embeddings[name] = nn.Parameter(prompts)

    def unwrap(self) -> None:
        """The layer leaves nothing in its place; its hooks go with it."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return None

    def _active(self) -> torch.Tensor | None:
        if self.disabled:
            return None
        names = [n for n in self.active_adapters if n in self.prompt_embeddings]
        if len(names) > 1:
            raise ValueError(f"only one visual prompt adapter can be active at a time; active: {', '.join(names)}")
        return self.prompt_embeddings[names[0]] if names else None

    def _insert(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        prompts = self._active()
        if prompts is None:
            return None
        p = expand_cast(prompts[0].unsqueeze(0), (output.shape[0], -1, -1), output.dtype)  # (batch, n, d)
        return torch.cat([output[:, : self.lead], p, output[:, self.lead :]], dim=1)  # (batch, lead + n + patches, d)

    def _replace(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        prompts = self._active()
        if prompts is None or prompts.shape[0] == 1:  # shallow: the prompts' outputs flow on through the blocks
            return None
        hidden = args[0] if args else kwargs["hidden_states"]  # (batch, tokens, d)
        n = prompts.shape[1]
        p = expand_cast(prompts[index].unsqueeze(0), (hidden.shape[0], -1, -1), hidden.dtype)  # batch sums in float32
        hidden = torch.cat([hidden[:, : self.lead], p, hidden[:, self.lead + n :]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _drop(self, module: nn.Module, args: tuple, output: Any) -> Any:
        prompts = self._active()
        if prompts is None:
            return None
        n, lead = prompts.shape[1], self.lead

        def strip(t: Any) -> Any:
            return torch.cat([t[:, :lead], t[:, lead + n :]], dim=1) if isinstance(t, torch.Tensor) else t

        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):  # return_dict=False
            tokens = output[0].shape[1]  # (last_hidden_state, [pooler_output], [hidden_states], [attentions])

            def states(t: Any) -> bool:  # the hidden states: (batch, tokens, d) each; attentions are 4-d
                return (
                    isinstance(t, tuple)
                    and all(isinstance(h, torch.Tensor) and h.dim() == 3 for h in t)
                    and all(h.shape[1] == tokens for h in t)
                )

            return (strip(output[0]), *(tuple(map(strip, t)) if states(t) else t for t in output[1:]))
        if not hasattr(output, "keys"):
            return None
        if output.get("last_hidden_state") is not None:
            output["last_hidden_state"] = strip(output["last_hidden_state"])
        if isinstance(output.get("hidden_states"), tuple):
            output["hidden_states"] = tuple(strip(h) for h in output["hidden_states"])  # each after the insertion
        return output


def inject(model: nn.Module, config: VisualPromptConfig, adapter_name: str) -> list[nn.Module]:
    """Add a visual prompt adapter (the shared layer is created on first use). Returns [the layer].

    Raises:
        ConfigError: the model is not ViT-style; the model is left as it was.
    """
    existing = getattr(model, ATTR, None) if ATTR in getattr(model, "_modules", {}) else None
    layer = existing or VisualPrompts(model)
    cfg = model.config
    d, patch = cfg.hidden_size, getattr(cfg, "patch_size", 16)
    patch = patch if isinstance(patch, int) else patch[0]
    sets = layer.num_blocks if config.deep else 1
    bound = math.sqrt(6.0 / (3 * patch * patch + d))
    param = next(p for p in model.parameters() if p.is_floating_point())
    prompts = torch.empty(sets, config.num_virtual_tokens, d, device=param.device).uniform_(-bound, bound)
    layer.add(adapter_name, prompts)  # float32 whatever the base dtype: the prompts are all that trains
    if existing is None:
        model.add_module(ATTR, layer)
    return [layer]


CONFIG, INJECT = VisualPromptConfig, inject

__all__ = ["VisualPromptConfig", "VisualPrompts"]
