"""Controllers: every built-in one behind the `palsctl.interfaces.Controller` interface.

QoS first, joules second: `SearchController` (``search``, the PALS method), `MPCController`
(``mpc``), `PIController` (``pi``), `CapOnlyController` (``cap-only``, PALS's Adaptive Cap
baseline) and `SearchTruthController` (``search-truth``, search on the simulator's ground
truth); the baselines `StaticController`, `CapToBudgetController`, `ZeusController`,
`BatchOnlyController` and `FixedController`. `ModelBasedController` and `ModelBasedConfig` are
the shared setup of the model-using ones (a new model-based controller implements ``decide``).

Each name is imported from its module on first use (``mpc`` pulls in cvxpy).

>>> from palsctl.controllers import PIController
>>> PIController(margin=0.2).config.margin
0.2
"""
from palsctl.lazy import lazy_exports

_LAZY = {
    "StaticController": "palsctl.controllers.baselines:StaticController",
    "CapToBudgetController": "palsctl.controllers.baselines:CapToBudgetController",
    "ZeusController": "palsctl.controllers.baselines:ZeusController",
    "BatchOnlyController": "palsctl.controllers.baselines:BatchOnlyController",
    "FixedController": "palsctl.controllers.baselines:FixedController",
    "PIController": "palsctl.controllers.pi:PIController",
    "MPCController": "palsctl.controllers.mpc:MPCController",
    "SearchController": "palsctl.controllers.search:SearchController",
    "CapOnlyController": "palsctl.controllers.cap_only:CapOnlyController",
    "SearchTruthController": "palsctl.controllers.truth:SearchTruthController",
    "ModelBasedController": "palsctl.controllers.model_based:ModelBasedController",
    "ModelBasedConfig": "palsctl.controllers.model_based:ModelBasedConfig",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = sorted(_LAZY)
