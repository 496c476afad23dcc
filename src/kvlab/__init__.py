"""kvlab: build, convert and measure transformer attention whose KV cache is smaller."""

from kvlab import registry as _registry  # noqa: F401  (installs the technique loader; torch-free)
from kvlab._version import __version__
from kvlab.config import LayerSpec, ModelConfig, RopeConfig
from kvlab.errors import ConfigError, InputError, InputTypeError, KvlabError, UnsupportedError

__all__ = ["ConfigError", "InputError", "InputTypeError", "KvlabError", "LayerSpec", "ModelConfig", "RopeConfig",
           "UnsupportedError",
           "Model", "Cache", "load", "plan", "__version__"]


def __getattr__(name: str):  # lazy imports keep `import kvlab` light (torch loads on first use)
    if name == "Model":
        from kvlab.model import Model

        return Model
    if name == "Cache":
        from kvlab.cache import Cache

        return Cache
    if name == "load":
        from kvlab.loading import load

        return load
    if name == "plan":
        from kvlab.planner import plan

        return plan
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
