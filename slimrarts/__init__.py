"""slimrarts: make CNNs slimmer by searching their width with RARTS, then removing channels for real."""

from .api import PruneResult as PruneResult
from .api import WidthSearch as WidthSearch
from .api import load as load
from .api import prune as prune
from .api import search_width as search_width
from .deploy import export as export
from .version import __version__ as __version__

__all__ = ["PruneResult", "WidthSearch", "__version__", "export", "load", "prune", "search_width"]
