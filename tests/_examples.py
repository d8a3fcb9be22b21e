"""Sample calls of every op, per family, for the registry-driven tests (tests/test_op_registry.py).

Each family module `tests/_examples_<family>.py` defines
  REGISTERED: {op name in fastcore_ai.ops._define.REGISTRY: function returning a list of argument tuples
               (without the trailing backend) for opcheck and the direct-path parity check}
  PUBLIC: {public name in fastcore_ai.ops.__all__: function returning (fn, args), where fn(*args) calls the
           public op with its default backend and returns a tensor or a tuple of tensors; the compile test
           runs fn under torch.compile(fullgraph=True) and compares with eager}
  NOT_COMPILABLE: {public name: (why it cannot run under fullgraph, a PUBLIC-style case)} (the test asserts
           that compiling the case still fails with a graph break, so the list cannot go stale)
A registered op or public op that no family lists fails the coverage tests.
"""

import importlib

FAMILIES = ("moe", "s4", "nerf", "pq", "mux")

REGISTERED, PUBLIC, NOT_COMPILABLE = {}, {}, {}
for _family in FAMILIES:
    _module = importlib.import_module(f"_examples_{_family}")
    REGISTERED.update(getattr(_module, "REGISTERED", {}))
    PUBLIC.update(getattr(_module, "PUBLIC", {}))
    NOT_COMPILABLE.update(getattr(_module, "NOT_COMPILABLE", {}))
