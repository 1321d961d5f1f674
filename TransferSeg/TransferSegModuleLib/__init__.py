"""The TransferSeg module's Qt-free parts: scene logic, child-process runs, dependencies."""
from .logic import TransferSegLogic  # noqa: F401
