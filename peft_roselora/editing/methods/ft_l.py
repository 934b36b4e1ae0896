"""FT-L: constrained fine-tuning of one MLP down projection (Zhu et al. 2020; EasyEdit's FT-L)."""

from __future__ import annotations

import torch

from .base import EditBackend, EditOutcome


class FtLBackend(EditBackend):
    """Adam on one decoder layer's ``mlp.down_proj.weight`` (``ft_layer``, default the middle one), the weight change
    clamped to ``[-ft_norm, ft_norm]`` after every step; stops early once the loss is below ``early_stop_loss``
    after ``prune_end_step`` steps."""

    name = "ft-l"

    def _weight(self) -> torch.nn.Parameter:
        layers = self.base.get_decoder().layers
        index = self.hparams.ft_layer if self.hparams.ft_layer is not None else len(layers) // 2
        return layers[index].mlp.down_proj.weight

    def editable_parameters(self) -> dict[str, torch.nn.Parameter]:
        weight = self._weight()
        return {name: p for name, p in self.base.named_parameters() if p is weight}

    def edit(self, requests, memory, keep) -> EditOutcome:
        h, model = self.hparams, self.base
        loss_of = self.objective.loss_for(model, requests, memory)
        weight = self._weight()
        original = weight.detach().clone()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        weight.requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=h.lr)
        losses = []
        model.train()
        for step in range(h.steps):
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():  # the L-infinity constraint of FT-L
                weight.copy_(original + (weight - original).clamp(-h.ft_norm, h.ft_norm))
            losses.append(loss.item())
            if step + 1 > h.prune_end_step and loss.item() < h.early_stop_loss:
                break
        model.eval()
        weight.requires_grad_(False)
        changed = int(torch.count_nonzero(weight.detach() - original))

        def restore():
            with torch.no_grad():
                weight.copy_(original)

        return EditOutcome(model, losses, changed, weight.numel(), None if keep else restore)
