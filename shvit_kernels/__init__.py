"""shvit_kernels: fused kernels for SHViT's single-head attention and depthwise blocks, and PVT's SRA."""
from . import _ext
from . import ops
from .backends import BackendUnavailableError, available_backends, current_backend, use_backend
from .convert import convert
from .nn import SHSA, SRA
from .onnx_export import export_onnx, reference_math

__version__ = "0.1.0"
_ext.load()

__all__ = ["BackendUnavailableError", "SHSA", "SRA", "available_backends", "convert", "current_backend",
           "export_onnx", "ops", "reference_math", "use_backend", "__version__"]
