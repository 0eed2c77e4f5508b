"""World-model reports: open-loop prediction video (real vs imagined frames).

The model filters the first ``context`` steps of replayed sequences, then predicts the
rest open loop from the replayed actions alone (prior, no observations); decoded
frames are laid out as rows true / predicted / error, one column per sequence.
"""

from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDictBase

from .agent import DreamerV3Agent
from .distributions import sample_onehot
from .sequence import sequence_from_steps


@torch.no_grad()
def open_loop_video(
    agent: DreamerV3Agent, batch: TensorDictBase, context: int = 5, columns: int = 4
) -> np.ndarray | None:
    """uint8 frames [T, 3·H, columns·W, C] from a replay batch [B, T+1]; None without images."""
    wm = agent.world_model
    key = next(iter(sorted(wm.space.images)), None)
    if key is None:
        return None
    seq = sequence_from_steps(batch[:columns], wm.space.keys)
    tokens = wm.encoder({k: v[:, :context] for k, v in seq.obs.items()})
    deter, stoch, _ = wm.rssm.observe(
        tokens, seq.prev_action[:, :context], seq.is_first[:, :context], seq.deter, seq.stoch
    )
    feats = [torch.cat([deter, stoch.flatten(-2)], -1)]
    d, s = deter[:, -1], stoch[:, -1]
    for t in range(context, seq.prev_action.shape[1]):
        d, prior = wm.rssm.img_step(d, s, seq.prev_action[:, t])
        s = sample_onehot(prior)
        feats.append(torch.cat([d, s.flatten(-2)], -1).unsqueeze(1))
    pred = wm.decoder(torch.cat(feats, 1))[key]  # [B, T, C, H, W] in [0, 1]
    true = seq.obs[key].float() / 255.0
    error = (pred - true + 1.0) / 2.0
    grid = torch.cat([true, pred, error], -2)  # rows: true / predicted / error
    grid = torch.cat(list(grid.unbind(0)), -1)  # one column per sequence
    frames = (grid.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    return frames.cpu().numpy()
