"""ELREA (Ensembles of Low-Rank Expert Adapters) for transformers, PEFT and TRL."""

__version__ = "0.1.0"

from .backbone import default_backbone  # noqa: E402
from .callback import ELREAGradientCallback  # noqa: E402
from .config import ELREAConfig  # noqa: E402
from .modeling import ELREAForCausalLM, register_auto_classes  # noqa: E402

register_auto_classes()

__all__ = ["ELREAConfig", "ELREAForCausalLM", "ELREAGradientCallback", "default_backbone", "__version__"]
