"""slimrarts: make CNNs slimmer by searching their width with RARTS."""

from .version import __version__ as __version__

__all__ = ["__version__"]
