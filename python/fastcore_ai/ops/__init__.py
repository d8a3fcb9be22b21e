"""Public functional API: `import fastcore_ai.ops`. Every op validates its input, picks a backend
(argument `backend=`, `fastcore_ai.use_backend`, FASTCORE_AI_BACKEND, else the op's priority list)
and runs as a registered torch op (`torch.ops.fastcore_ai.*`) with a fake implementation and
autograd, so it works under torch.compile(fullgraph=True)."""

# torch._dynamo now, not at the first op call (torch imports it lazily there): it imports modules whose
# functions take `group=group.WORLD` as a default argument, and imported while a process group is live they
# keep that group referenced, so destroy_process_group cannot stop gloo's threads and one can abort the
# interpreter's exit. Imported with fastcore_ai (normally before init_process_group) the defaults are None.
# ~1.1 s, the same import the first op call would do. docs/moe.md "Process-group teardown"; tests/_gloo.py.
import torch._dynamo  # noqa: E402,F401

from .moe import MAX_EXPERTS, MAX_TOP_K, RouterOutput, moe_topk_route, switch_load_balancing_loss
from .moe_experts import moe_experts
from .moe_grouped_mlp import moe_grouped_mlp
from .moe_permute import MAX_DISPATCH_EXPERTS, DispatchPlan, moe_combine, moe_dispatch

__all__ = [
    "moe_topk_route",
    "RouterOutput",
    "switch_load_balancing_loss",
    "MAX_EXPERTS",
    "MAX_TOP_K",
    "moe_dispatch",
    "moe_combine",
    "DispatchPlan",
    "MAX_DISPATCH_EXPERTS",
    "moe_grouped_mlp",
    "moe_experts",
]

from . import s4 as _s4
from .s4 import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import nerf as _nerf
from .nerf import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import pq as _pq
from .pq import *  # noqa: F401,F403  (each family module lists its public names in __all__)
from . import pq_fastscan as _pq_fastscan
from .pq_fastscan import *  # noqa: F401,F403
from . import pq_ivf as _pq_ivf
from .pq_ivf import *  # noqa: F401,F403
from . import mux as _mux
from .mux import *  # noqa: F401,F403  (each family module lists its public names in __all__)

__all__ += _s4.__all__ + _nerf.__all__ + _pq.__all__ + _pq_fastscan.__all__ + _pq_ivf.__all__ + _mux.__all__
