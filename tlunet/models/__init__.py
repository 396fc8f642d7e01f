"""Model factory, architecture registry and encoder weights."""

from tlunet.models import (  # noqa: F401  (importing registers the architectures)
    paper_decoder,
    scratch,
    smp_models,
)
from tlunet.models.factory import build_model, count_parameters
from tlunet.models.registry import MODELS, register_model

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
