"""DARTS cell (topology) search: operations, genotypes, search and evaluation nets, op costs.

The commands that run it from a recipe (`search_command`, `train_command`) live in `slimrarts.commands`.
"""


from .eval_net import EvalNetwork as EvalNetwork
from .eval_net import build_eval_net as build_eval_net
from .eval_net import count_params_no_aux as count_params_no_aux
from .genotypes import DARTS_V1 as DARTS_V1
from .genotypes import DARTS_V2 as DARTS_V2
from .genotypes import GENOTYPES as GENOTYPES
from .genotypes import Genotype as Genotype
from .genotypes import count_skips as count_skips
from .genotypes import derive as derive
from .genotypes import load_genotype as load_genotype
from .genotypes import parse_genotype as parse_genotype
from .latency import OpCosts as OpCosts
from .latency import cost_penalty as cost_penalty
from .latency import op_costs as op_costs
from .operations import OPS as OPS
from .operations import PRIMITIVES as PRIMITIVES
from .recipe import NasRecipe as NasRecipe
from .search_net import SearchNetwork as SearchNetwork
from .topology import TopologyResult as TopologyResult
from .topology import search_topology as search_topology

__all__ = [
    "DARTS_V1", "DARTS_V2", "EvalNetwork", "GENOTYPES", "Genotype", "NasRecipe", "OPS", "OpCosts", "PRIMITIVES",
    "SearchNetwork", "TopologyResult", "build_eval_net", "count_params_no_aux", "count_skips", "cost_penalty",
    "derive", "load_genotype", "op_costs", "parse_genotype", "search_topology",
]

