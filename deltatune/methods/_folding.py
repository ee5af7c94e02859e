"""Token encoders whose virtual tokens are the output of a reparametrisation (P-tuning's MLP or LSTM, prefix
tuning's MLP): folding them into a table, and keeping them unfolded across a training checkpoint.

An adapter file holds the folded tokens (PEFT's ``prompt_embeddings``), from which the encoder cannot be rebuilt,
so loading a file into an unfolded encoder folds it. A checkpoint taken while training also keeps the encoder's
own tensors (``training_state``, written beside the adapter file); resuming stages them (``stage``), and loading
the checkpoint's adapter then restores the encoder instead of folding it: training goes on with the parameters it
had (the optimizer's saved state fits them), and the run ends with the uninterrupted run's adapter.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_tensor(encoder: nn.Module) -> torch.Tensor:
    """The encoder's virtual tokens with any reparametrisation applied (eval mode, no gradient)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return encoder().detach().clone()
    finally:
        encoder.train(was_training)


def folded_embedding(weight: torch.Tensor, like: nn.Parameter | None) -> nn.Embedding:
    """An embedding table holding ``weight``, keeping ``like``'s requires_grad."""
    table = nn.Embedding(weight.shape[0], weight.shape[1], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        table.weight.copy_(weight)
    if like is not None:
        table.weight.requires_grad_(like.requires_grad)
    return table


class Reparametrised(nn.Module):
    """An ``embedding`` table fed through the submodules named in ``reparametrisation`` (None once folded)."""

    reparametrisation: tuple[str, ...] = ()
    embedding: nn.Embedding

    def folded(self) -> bool:
        return all(getattr(self, name) is None for name in self.reparametrisation)

    def fold(self, weight: torch.Tensor | None) -> None:
        """Replace the table and its reparametrisation by the table of their output (or of ``weight``, saved
        tokens); where ``stage`` left the encoder's own tensors, restore those instead (they must give ``weight``)."""
        staged = self.__dict__.pop("_staged", None)
        if staged is not None and weight is not None and not self.folded():
            self.load_state_dict(staged)
            if not torch.allclose(fold_tensor(self).to(weight.dtype), weight, rtol=1e-4, atol=1e-6):
                raise ValueError("the encoder's training state does not give the saved tokens (from another save?)")
            return
        weight = fold_tensor(self) if weight is None else weight
        self.embedding = folded_embedding(weight.to(self.embedding.weight.dtype), self.embedding.weight)
        for name in self.reparametrisation:
            setattr(self, name, None)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The tensors the adapter file does not keep: the unfolded encoder's own ({} once folded)."""
        return {} if self.folded() else {k: v.detach() for k, v in self.state_dict().items()}

    def stage(self, state: dict[str, torch.Tensor] | None) -> None:
        """Have the next ``fold`` of saved tokens restore ``state`` (``training_state``'s tensors) instead; None
        clears it."""
        if state is None:
            self.__dict__.pop("_staged", None)
        else:
            self._staged = state
