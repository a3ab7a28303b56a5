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


def reference_statistics(
    embedding: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What PerSAM keeps of a reference image's SAM embedding.

    Args:
        embedding: ``(C, He, We)`` SAM image embedding of the reference.
        inside: ``(He, We)`` bool, cells under the reference mask (at least one).
        valid: ``(He, We)`` bool, cells on the image (not SAM's padding).

    Returns:
        ``mean`` and ``max``, each ``(C,)``: channel-wise mean and max of the features of the
        cells inside (``persam.py`` uses the mean, ``persam_f.py`` ``(mean + max) / 2``), and
        ``background``, ``(2,)``: the highest cosine between a *background* cell (valid, not
        inside and not next to an inside cell, whose feature would mix the object's) and the
        mean, then the ``(mean + max) / 2`` embedding; ``-1`` when there is no background cell.
    """
    cells = embedding.float().flatten(1)  # (C, He * We)
    chosen = cells[:, inside.reshape(-1)]
    mean, maximum = chosen.mean(dim=1), chosen.max(dim=1).values
    near = F.max_pool2d(inside.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
    background = (valid & ~near).reshape(-1)
    baselines = torch.full((2,), -1.0)
    if background.any():
        feats = cells[:, background].T  # (N, C)
        for i, reference in enumerate((mean, (mean + maximum) / 2)):
            baselines[i] = location_prior(reference, feats[:, None, :]).max()
    return mean, maximum, baselines
