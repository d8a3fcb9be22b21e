"""Drop-in torch.nn layers built on fastcore_ai.ops."""

from .moe import MoE, MoEExperts, TopKRouter
from .moe_parallel import ExpertParallelMoE

__all__ = ["TopKRouter", "MoEExperts", "MoE", "ExpertParallelMoE"]

from . import s4 as _s4
from .s4 import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import nerf as _nerf
from .nerf import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import pq as _pq
from .pq import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import mux as _mux
from .mux import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import multihead as _multihead
from .multihead import *  # noqa: F401,F403  (each family module lists its public names in __all__)

__all__ += _s4.__all__ + _nerf.__all__ + _pq.__all__ + _mux.__all__ + _multihead.__all__
