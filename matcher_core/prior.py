"""Location prior: where in a target the reference object probably is (PerSAM's first step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def location_prior(target_embedding: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between one embedding and every cell of a feature map.

    Args:
        target_embedding: ``(C,)`` mean feature of the reference object.
        feature_map: ``(h, w, C)`` features of the target (channels last; any feature space, the
            same as ``target_embedding``'s: SAM's embedding or the matching encoder's patches).

    Returns:
        ``(h, w)`` cosine similarity in [-1, 1].
    """
    embedding = F.normalize(torch.as_tensor(target_embedding, dtype=torch.float32), dim=0)
    cells = F.normalize(feature_map.float(), dim=-1)
    return cells @ embedding.to(cells.device)
