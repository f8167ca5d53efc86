"""One exit stage of a MultiExitViT as a self-contained module, for graph export (ONNX).

`ExitStage` k runs `MultiExitViT.stage(k, ...)`: images (stage 0) or the tokens stage k-1 left
in, the tokens for stage k+1 and exit k's logits out (the last stage: the logits only). The two
streams between stages (`StreamState`: main tokens [B, T, d], early class tokens [B, E, d]) pass
as one tensor ``[c_1, ..., c_{K-1}, c_K, R, P]`` (early tokens first): one array per stage.
"""

from __future__ import annotations

import torch
from torch import nn

from met_lightning.models.multi_exit_vit import StreamState


def pack(state: StreamState) -> torch.Tensor:
    """StreamState -> tokens [B, E + T, d], the early class tokens first."""
    return state.main if state.early is None else torch.cat([state.early, state.main], dim=1)


def unpack(tokens: torch.Tensor, n_early: int) -> StreamState:
    """tokens [B, E + T, d] with `n_early` = E leading early class tokens -> StreamState."""
    if not n_early:
        return StreamState(tokens, None)
    return StreamState(tokens[:, n_early:], tokens[:, :n_early])


class ExitStage(nn.Module):
    """Stage `stage` of `net`: x -> (tokens [B, T_{k+1}, d], logits [B, C]), or logits [B, C]
    for the last stage. x: images [B, C, H, W] for stage 0, else tokens [B, T_k, d]."""

    def __init__(self, net: nn.Module, stage: int) -> None:
        super().__init__()
        self.net = net
        self.stage = stage

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        net, k = self.net, self.stage
        after, _, logits = net.stage(k, x if k == 0 else unpack(x, net.num_early_tokens(k)))
        return logits if after is None else (pack(after), logits)


def stage_inputs(net: nn.Module, input_size: tuple[int, int, int], batch: int = 2) -> list:
    """Example inputs of every stage (zeros; stage 0: images [B, C, H, W]), for export."""
    inputs = [torch.zeros(batch, *input_size, device=next(net.parameters()).device)]
    with torch.no_grad():  # not inference_mode: the network caches index tensors
        for stage in range(net.num_exits - 1):
            inputs.append(ExitStage(net, stage)(inputs[-1])[0])
    return inputs
