"""xdsl: a declarative experiment language and compiler for knowledge distillation and mutual learning."""

from xdsl.errors import SpecError, XdslError

__all__ = ["load", "SpecError", "XdslError", "__version__"]
__version__ = "0.1.0"


def load(path, **kwargs):
    """parse + check + build + cut + shapes + graph + lower a spec: see `xdsl.experiment.load`."""
    from xdsl.experiment import load as _load

    return _load(path, **kwargs)
