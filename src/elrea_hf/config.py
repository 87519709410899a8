"""``ELREAConfig``: everything needed to rebuild an ELREA ensemble from its bundle."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class ELREAConfig(PretrainedConfig):
    """Configuration of an ELREA bundle (``model_type="elrea"``).

    The backbone is referenced (``base_model_name_or_path``), not copied; its config is kept in
    ``backbone_config`` so that a bundle loaded on a different backbone is refused and generation
    utilities (cache sizing, vocabulary) see the backbone's text config.
    """

    model_type = "elrea"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    backbone_config: dict | None = None
    adapter_names: list | None = None
    feature_adapter: str = "base"
    routing: dict | None = None
    projection: dict | None = None
    instruction_tokens: str = "user_content"
    gradient_epochs: list | None = None
    cluster_sizes: list | None = None
    # Routing runs a backward pass per prompt batch; this many padded tokens per batch at most keeps
    # its activation memory near that of generation (measured on SmolLM2-135M: ~2.5 MB per token).
    routing_max_batch_tokens: int | None = 256
    elrea_version: str | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """No-op: a bundle's ``auto_map`` always points at its ``elrea_auto.py`` shim
        (``ELREAForCausalLM.write_bundle``); transformers must not copy this package's modules
        into bundles when it loads one with ``trust_remote_code=True``."""

    @property
    def expert_names(self) -> list[str]:
        return [n for n in (self.adapter_names or []) if n != self.feature_adapter]

    def backbone(self) -> PretrainedConfig | None:
        if not self.backbone_config:
            return None
        cfg = dict(self.backbone_config)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        backbone = self.backbone()
        return backbone.get_text_config(*args, **kwargs) if backbone is not None else self
