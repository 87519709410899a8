"""Many LoRA adapters in one forward pass, one adapter per batch row, with two batched matmuls per
layer.

PEFT's mixed-adapter batches (``adapter_names=[...]``) loop over the adapters in every LoRA layer
(select the rows, run A and B, scatter back): with C + 1 adapters that is C + 1 small kernels and
two copies per layer and step, which on a CPU costs more than the backbone's own matmuls at decode
time. Here the base model runs with its adapters disabled and a forward hook on every LoRA layer
adds ``scaling_a * B_a A_a x`` for each row's adapter ``a``, the same sum PEFT computes, as two
plain matmuls against the adapters' concatenated weights: ``x @ [A_0; ...; A_n]^T`` gives every
adapter's rank-r code, a 0/1 mask keeps only the row's own adapter block, and
``@ [B_0, ..., B_n]^T`` maps it back. Nothing is copied per row, so memory does not grow with the
number of (prompt, adapter) rows; the extra multiply-adds (n x r columns) are a few percent of the
backbone's.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch


class BatchedLoraRows:
    """Stacked LoRA weights of ``adapter_names`` for every LoRA layer of ``peft_model``.

    Build once per set of adapters (weights are copied at construction), then use
    :meth:`apply` around forward calls."""

    def __init__(self, peft_model, adapter_names: Sequence[str]):
        self.peft_model = peft_model
        self.adapter_names = list(adapter_names)
        self.layers = []  # (module, A [n * r, in], B [out, n * r] * scaling); r may differ by layer
        self._handles: list = []
        self._masks: dict = {}
        for module in peft_model.modules():
            lora_A = getattr(module, "lora_A", None)
            if not isinstance(lora_A, torch.nn.ModuleDict) or not all(n in lora_A for n in self.adapter_names):
                continue
            if any(n in getattr(module, "lora_magnitude_vector", {}) for n in self.adapter_names):
                raise NotImplementedError("batched LoRA rows do not support DoRA adapters")
            ranks = {lora_A[n].weight.shape[0] for n in self.adapter_names}
            if len(ranks) != 1:
                raise NotImplementedError(f"adapters of different ranks {sorted(ranks)} cannot be stacked")
            A = torch.cat([lora_A[n].weight.detach() for n in self.adapter_names])
            B = torch.cat([module.lora_B[n].weight.detach() * module.scaling[n] for n in self.adapter_names], dim=1)
            self.layers.append((module, A, B))
        if not self.layers:
            raise ValueError(f"no LoRA layer holds all of the adapters {self.adapter_names}")

    def version(self) -> tuple:
        """Changes whenever a stacked adapter weight is modified in place or replaced."""
        out = []
        for module, _, _ in self.layers:
            for n in self.adapter_names:
                for w in (module.lora_A[n].weight, module.lora_B[n].weight):
                    out.append((id(w), w._version))
        return tuple(out)

    @property
    def active(self) -> bool:
        """True inside :meth:`apply` (hooks registered, adapters disabled)."""
        return bool(self._handles)

    @contextmanager
    def apply(self, row_adapters: torch.Tensor):
        """Within the block, a forward of ``peft_model`` applies adapter ``row_adapters[i]`` (an index
        into ``adapter_names``) to row ``i`` of the batch.

        Entering is the costly part (PEFT's ``disable_adapter`` walks the whole model), so
        ``generate`` enters once for all decoding steps; a nested ``apply`` (each step's forward)
        only swaps the row layout."""
        masks = self._masks_for(row_adapters)
        if self.active:
            saved, self._masks = self._masks, masks
            try:
                yield
            finally:
                self._masks = saved
            return
        self._masks = masks
        self._handles = [module.register_forward_hook(self._hook(A, B)) for module, A, B in self.layers]
        try:
            with self.peft_model.disable_adapter():
                yield
        finally:
            for h in self._handles:
                h.remove()
            self._handles, self._masks = [], {}

    def _masks_for(self, row_adapters: torch.Tensor) -> dict:
        """One [rows, 1, n * r] 0/1 mask per distinct (n * r, device) of the layers."""
        rows = row_adapters.long().cpu()
        masks = {}
        for _, A, _ in self.layers:
            key = (A.shape[0], A.device)
            if key not in masks:
                m = torch.zeros(len(rows), len(self.adapter_names), A.shape[0] // len(self.adapter_names))
                m[torch.arange(len(rows)), rows] = 1.0
                masks[key] = m.view(len(rows), 1, -1).to(A.device)
        return masks

    def _hook(self, A: torch.Tensor, B: torch.Tensor):
        key = (A.shape[0], A.device)

        def hook(module, args, output):
            x = args[0]
            shape = x.shape
            x3 = x.reshape(shape[0], -1, shape[-1]).to(A.dtype)
            codes = (x3 @ A.T) * self._masks[key]
            return output + (codes @ B.T).reshape(*shape[:-1], -1).to(output.dtype)

        return hook
