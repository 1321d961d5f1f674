"""How a model turns a volume into outputs: a registry of methods by name.

A model card names its method (``"method": {"name": "single", "config": {...}}``; a card
without one is ``single``).  The pipeline looks the name up here — a card never names a
module to import, so a card from a stranger cannot run code.  Every method gets the volume on
the model's working grid and returns its outputs on that same grid; the pipeline resamples
them back to the input and derives the labels.

A method is a function ``run(context: MethodContext) -> MethodOutput`` registered with
``@register_method("name")``.
"""
from .registry import (METHODS, OPTIONS, MethodContext, MethodOutput, check_options, get_method,  # noqa: F401
                       register_method)
from . import cascade, dbt, multiview, single  # noqa: F401,E402  (each registers its method)

__all__ = ["METHODS", "MethodContext", "MethodOutput", "check_options", "get_method", "register_method"]
