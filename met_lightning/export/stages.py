"""One exit stage of a MultiExitViT as a self-contained module, for graph export (ONNX).

Stage k runs the blocks of exit k on the tokens that stage k-1 left (stage 0 takes the images and
embeds them) and returns the tokens for stage k+1 and exit k's logits; the last stage returns the
logits only. Shapes are static per stage (the batch axis may vary) and nothing branches on data,
so a runtime can do early exit between stages: run stage k, score its logits, keep the rows that
stay. This is the one place that knows the network's stage API (`embed`, `run_stage`,
`exit_features`, `heads`, `leave`).
"""

from __future__ import annotations

import torch
from torch import nn


class ExitStage(nn.Module):
    """Stage `stage` of `net`: x -> (tokens [B, T_{k+1}, d], logits [B, C]), or logits [B, C]
    for the last stage. x: images [B, C, H, W] for stage 0, else tokens [B, T_k, d]."""

    def __init__(self, net: nn.Module, stage: int) -> None:
        super().__init__()
        self.net = net
        self.stage = stage
        self.last = stage == net.num_exits - 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        net, stage = self.net, self.stage
        if stage == 0:
            x = net.embed(x)
        x = net.run_stage(stage, x)
        logits = net.heads[stage](net.exit_features(stage, x))
        if self.last:
            return logits
        return net.leave(stage, x), logits


def stage_inputs(net: nn.Module, input_size: tuple[int, int, int], batch: int = 2) -> list:
    """Example inputs of every stage (zeros; stage 0: images [B, C, H, W]), for export."""
    device = next(net.parameters()).device
    x = torch.zeros(batch, *input_size, device=device)
    inputs = []
    with torch.no_grad():  # not inference_mode: the network caches index tensors
        for stage in range(net.num_exits):
            inputs.append(x.clone())
            out = ExitStage(net, stage)(x)
            if stage < net.num_exits - 1:
                x = out[0]
    return inputs
