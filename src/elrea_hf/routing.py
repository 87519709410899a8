"""Routing a prompt to the expert adapters (paper §3.4, design §5).

Pure functions on torch tensors, so that the model, the builder and the tests share one
implementation of the math:

- `cluster_centroids`: eq 8, ``centroid_c = normalise(mean of the training features of c)``.
- `routing_weights`: eq 9 and the base weight. For a prompt's unit-norm gradient feature
  ``delta`` (eq 7): ``cos_c = <delta, centroid_c>``, standardised over the C clusters,
  ``z_c = (cos_c - mean_c cos) / std_c cos``, expert weights ``w_c = softmax(z)_c`` and base weight
  ``w_base = 1 - max_c cos_c``. Decoding then takes the argmax of
  ``w_base * logits_base + sum_c w_c * logits_c`` (eq 10).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["RoutingConfig", "cluster_centroids", "routing_weights"]


@dataclass
class RoutingConfig:
    """How expert weights are post-processed at inference (the arguments of `routing_weights`).

    The defaults are the paper's: every expert kept, weights not renormalised.
    """

    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Keep only the k experts with the largest weights (others get weight 0); "
            "None keeps all. The base adapter is always kept."
        },
    )
    min_weight: float = field(
        default=0.0,
        metadata={
            "help": "Drop experts whose weight is below this value (the strongest expert is "
            "always kept)."
        },
    )
    renormalize: bool = field(
        default=False,
        metadata={
            "help": "Rescale the kept expert weights to the sum of all expert weights (1). The "
            "paper does not; the weights then sum to less than 1 after top_k/min_weight."
        },
    )

    def __post_init__(self) -> None:
        _check_routing_options(self.top_k, self.min_weight)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RoutingConfig:
        """Build from `to_dict` output (None: defaults); unknown keys (e.g. from a newer version)
        are ignored with a warning."""
        data = data or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("Ignoring unknown routing settings %s.", unknown)
        return cls(**{key: value for key, value in data.items() if key in known})


def cluster_centroids(
    features: torch.Tensor, labels: torch.Tensor, n_clusters: int
) -> torch.Tensor:
    """Unit-norm cluster centroids, eq 8: ``normalise(mean of the features of cluster c)``.

    Args:
        features: ``[N, d]`` training gradient features (eq 7).
        labels: ``[N]`` cluster of each feature, in ``0..n_clusters-1``.
        n_clusters: C; every cluster must have at least one member.

    Returns:
        ``[C, d]`` centroids in the features' dtype (at least float32).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, d], got shape {tuple(features.shape)}.")
    labels = torch.as_tensor(labels, device=features.device)
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be [N] with N = {features.shape[0]} (one per feature row), got shape "
            f"{tuple(labels.shape)}."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got {labels.dtype}.")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}.")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_clusters):
        raise ValueError(
            f"labels must lie in 0..{n_clusters - 1}, got values from {int(labels.min())} to "
            f"{int(labels.max())}."
        )
    counts = torch.bincount(labels, minlength=n_clusters)
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel():
        raise ValueError(
            f"Cluster {int(empty[0])} has no members ({empty.numel()} empty cluster(s)); a "
            "centroid needs at least one feature."
        )
    dtype = torch.promote_types(features.dtype, torch.float32)
    sums = torch.zeros(n_clusters, features.shape[1], dtype=dtype, device=features.device)
    sums.index_add_(0, labels, features.to(dtype))
    # Normalising the sum gives the same direction as normalising the mean.
    norms = sums.norm(dim=1)
    cancelled = torch.nonzero(norms == 0).flatten()
    if cancelled.numel():
        raise ValueError(
            f"The features of cluster {int(cancelled[0])} sum to zero, so its centroid has no "
            "direction (eq 8)."
        )
    return sums / norms[:, None]


def routing_weights(
    prompt_features: torch.Tensor,
    centroids: torch.Tensor,
    top_k: int | None = None,
    min_weight: float = 0.0,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the base adapter and of each expert for each prompt (eq 9, design §5).

    ``cos_c = <delta, centroid_c>`` (both unit-norm, so this is the cosine similarity; the inputs
    are used as given), ``z_c = (cos_c - mean(cos)) / std(cos)`` over the C clusters with the
    population standard deviation (divide by C, as "the standard deviation of the cosine
    similarities across clusters"), ``w_c = softmax(z)_c`` and ``w_base = 1 - max_c cos_c``.
    When all cosines are equal (std 0, including C = 1) every ``z_c`` is 0, so the experts share
    the weight equally; a std within 16 machine epsilons of 0 counts as 0, so that rounding in the
    dot products does not turn an exact tie into z = +-1. ``w_base`` is not clipped: it lies in
    [0, 2] and the weights need not sum to 1 (paper).

    Args:
        prompt_features: ``[B, d]`` (or ``[d]``) unit-norm prompt gradient features (eq 7).
        centroids: ``[C, d]`` unit-norm cluster centroids (eq 8, `cluster_centroids`).
        top_k: keep only the ``k`` largest expert weights, the rest become 0. None keeps all.
        min_weight: expert weights below this become 0. The largest expert weight is always kept,
            so that no prompt loses every expert.
        renormalize: rescale the kept expert weights so that they sum to the sum of all expert
            weights before dropping (1). Off by default, as in the paper.

    Returns:
        ``(w_base, w_experts)``: ``[B]`` and ``[B, C]`` (``[]`` and ``[C]`` for a ``[d]`` input),
        in the prompt features' dtype (at least float32), on their device.
    """
    _check_routing_options(top_k, min_weight)
    single = prompt_features.dim() == 1
    prompts = prompt_features.unsqueeze(0) if single else prompt_features
    if prompts.dim() != 2:
        raise ValueError(
            f"prompt_features must be [B, d] or [d], got shape {tuple(prompt_features.shape)}."
        )
    if centroids.dim() != 2 or centroids.shape[0] < 1:
        raise ValueError(
            f"centroids must be [C, d] with C >= 1, got shape {tuple(centroids.shape)}."
        )
    if centroids.shape[1] != prompts.shape[1]:
        raise ValueError(
            f"prompt features have {prompts.shape[1]} dimensions but the centroids have "
            f"{centroids.shape[1]}; were they computed with the same projection (d_proj, seed)?"
        )
    bad = torch.nonzero(~torch.isfinite(prompts).all(dim=1)).flatten()
    if bad.numel():
        raise ValueError(f"Prompt {int(bad[0])} has a non-finite gradient feature (NaN or inf).")

    dtype = torch.promote_types(prompts.dtype, torch.float32)
    prompts = prompts.to(dtype)
    cos = prompts @ centroids.to(device=prompts.device, dtype=dtype).T  # [B, C]
    mean = cos.mean(dim=1, keepdim=True)
    std = cos.std(dim=1, correction=0, keepdim=True)
    tie = std <= 16 * torch.finfo(dtype).eps
    z = torch.where(tie, torch.zeros_like(cos), (cos - mean) / torch.where(tie, 1.0, std))
    weights = torch.softmax(z, dim=1)
    base_weight = 1.0 - cos.max(dim=1).values

    n_experts = weights.shape[1]
    keep = torch.ones_like(weights, dtype=torch.bool)
    if top_k is not None and top_k < n_experts:
        keep = torch.zeros_like(keep)
        keep.scatter_(1, weights.topk(top_k, dim=1).indices, True)
    if min_weight > 0.0:
        keep &= weights >= min_weight
        keep.scatter_(1, weights.argmax(dim=1, keepdim=True), True)
    expert_weights = torch.where(keep, weights, torch.zeros_like(weights))
    if renormalize:
        expert_weights = expert_weights * (
            weights.sum(dim=1, keepdim=True) / expert_weights.sum(dim=1, keepdim=True)
        )
    if single:
        return base_weight[0], expert_weights[0]
    return base_weight, expert_weights


def _check_routing_options(top_k: int | None, min_weight: float) -> None:
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}.")
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"min_weight must lie in [0, 1], got {min_weight!r}.")
