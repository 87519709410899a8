"""Routing weights (paper eq 8-9).

For a prompt feature and the C unit-norm cluster centroids: ``cos_c = <feature, centroid_c>``,
``z = (cos - mean(cos)) / std(cos)`` (population std over the C clusters; std 0 gives z = 0),
``w_c = softmax(z)_c`` and ``w_base = 1 - max_c cos_c``. Top-k and a minimum weight can zero
experts; kept weights are not renormalised unless asked (the paper does not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class RoutingConfig:
    top_k: int | None = None
    min_weight: float = 0.0
    renormalize: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RoutingConfig":
        d = d or {}
        return cls(**{k: d[k] for k in ("top_k", "min_weight", "renormalize") if k in d})


def cluster_centroids(features: torch.Tensor, labels, n_clusters: int) -> torch.Tensor:
    """Eq 8: the normalised mean feature of each cluster, [C, d]."""
    labels = torch.as_tensor(labels)
    rows = []
    for c in range(n_clusters):
        members = features[labels == c]
        if len(members) == 0:
            raise ValueError(f"cluster {c} has no members")
        mean = members.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def routing_weights(prompt_features: torch.Tensor, centroids: torch.Tensor, top_k: int | None = None,
                    min_weight: float = 0.0, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 9: (w_base [B], w_experts [B, C])."""
    cos = prompt_features.float() @ centroids.float().T
    std = cos.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 0, (cos - cos.mean(dim=1, keepdim=True)) / std.clamp_min(1e-12), torch.zeros_like(cos))
    w = torch.softmax(z, dim=1)
    w_base = 1 - cos.max(dim=1).values
    total = w.sum(dim=1, keepdim=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    if top_k is not None and top_k < w.shape[1]:
        keep &= torch.zeros_like(keep).scatter_(1, w.topk(top_k, dim=1).indices, True)
    if min_weight > 0:
        keep &= w >= min_weight
    w = w * keep
    if renormalize:
        w = w * total / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return w_base, w
