"""Pure-PyTorch references: readable, any dtype including float64, the oracle every backend is
tested against. They are also the `reference` backend."""

from .moe import moe_topk_route, moe_topk_route_backward
from .moe_permute import dispatch_plan, moe_combine, moe_combine_backward, moe_dispatch

__all__ = [
    "moe_topk_route",
    "moe_topk_route_backward",
    "moe_dispatch",
    "moe_combine",
    "moe_combine_backward",
    "dispatch_plan",
]

from . import s4 as _s4
from .s4 import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import nerf as _nerf
from .nerf import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import pq as _pq
from .pq import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import mux as _mux
from .mux import *  # noqa: F401,F403  (each family module lists its public names in __all__)

__all__ += _s4.__all__ + _nerf.__all__ + _pq.__all__ + _mux.__all__
