"""Architecture-search algorithms behind one interface: rarts, rarts-jacobi, darts1, darts2, milenas, joint."""

from . import darts as _darts  # noqa: F401  (registers darts1, darts2)
from . import joint as _joint  # noqa: F401
from . import milenas as _milenas  # noqa: F401
from . import rarts as _rarts  # noqa: F401
from .base import Problem as Problem
from .base import SearchMethod as SearchMethod
from .base import SearchState as SearchState
from .base import get_search as get_search
from .base import list_searches as list_searches
from .base import register_search as register_search

__all__ = ["Problem", "SearchMethod", "SearchState", "get_search", "list_searches", "register_search"]
