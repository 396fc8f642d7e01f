"""Model factory, architecture registry and encoder weights."""

from tlunet.models import smp_models  # noqa: F401  (registers the smp architectures)
from tlunet.models.factory import build_model, count_parameters
from tlunet.models.registry import MODELS, register_model

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
