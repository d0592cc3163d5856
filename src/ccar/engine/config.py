"""The run configuration, importable from its documented place: it lives in :mod:`ccar.config`."""

from ..config import *  # noqa: F401,F403
from ..config import __all__  # noqa: F401
