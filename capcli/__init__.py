"""capcli: caption images with a frozen language model and a small trained prefix mapper.

Importing this package is cheap: torch and transformers load only when a `Captioner` is used.
"""

__version__ = "0.6.0"
__all__ = ["Captioner", "CapcliError", "__version__"]


def __getattr__(name):  # lazy public API (PEP 562), so `import capcli` does not import torch
    if name == "Captioner":
        from capcli.model.pipeline import Captioner

        return Captioner
    if name == "CapcliError":
        from capcli.errors import CapcliError

        return CapcliError
    raise AttributeError(f"module 'capcli' has no attribute {name!r}")
