"""The command layer behind `slimrarts ...`: functions that read a recipe, make a run folder, run and print.

Library modules never import this package; `slimrarts.cli` parses arguments and calls these.
"""

from .cell import AuxLoss as AuxLoss
from .cell import load_nas_recipe as load_nas_recipe
from .cell import search_command as search_command
from .cell import train_command as train_command

__all__ = ["AuxLoss", "load_nas_recipe", "search_command", "train_command"]
