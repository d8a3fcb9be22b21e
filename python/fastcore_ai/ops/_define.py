"""`define_op`: the one way an op becomes a registered torch op (DESIGN rules 5 and 6).

An op is declared once, as data:

    @define_op("s4_cauchy", impls={"cpu": native("s4_cauchy"), "cuda": native("s4_cauchy"),
                                   "triton": triton("s4", "cauchy"), "reference": _ref.cauchy},
               autograd=(_cauchy_setup, _cauchy_backward))
    def _cauchy_op(v: Tensor, z: Tensor, w: Tensor, conj_symmetric: bool) -> Tensor:
        return v.new_empty((v.shape[0], z.shape[0]))          # the body is the fake (meta) implementation

The prototype's annotations are the schema; `define_op` appends `str backend`, registers
`torch.ops.fastcore_ai.<name>` with one dispatcher over `impls`, the body as its fake, and the autograd
pair (setup_context, backward) when given — their `inputs` end with the backend name, so a backward op is
called with `backend=ctx.backend`. Every defined op lands in `REGISTRY`, which the generated opcheck,
compile and property tests walk, so a new op is covered without writing them.

Calling `op(*args, backend=chosen)` takes the registered op, except on the direct path: when the chosen
backend is native (cpu/cuda), no input needs autograd, and nothing intercepts the call (not compiling or
jit-tracing, no functorch transform, no torch-function or dispatch mode, only plain tensors), the
registered op would run the very same native function, so it is called directly. That saves the
torch.library dispatch (~11 µs a call, RESULTS.md "per-call overhead") which a decode step pays per layer
per token; the result is bitwise the registered op's (tests/test_op_registry.py). A mutating op's direct
call bumps the mutated tensors' version counters, as the dispatcher does.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .. import _native

NATIVE_BACKENDS = ("cpu", "cuda")
# nn.Parameter adds no __torch_function__ / __torch_dispatch__ behaviour
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

REGISTRY: Dict[str, "DefinedOp"] = {}


def native(name: str) -> Callable:
    """The function `fastcore_ai._C.<name>`, resolved at its first call (the build hint if _C is missing)."""
    function = None

    def call(*args):
        nonlocal function
        if function is None:
            function = getattr(_native.native(), name)
        return function(*args)

    call.__name__ = call.__qualname__ = f"_C.{name}"
    call.native_name = name
    return call


def triton(module: str, name: str) -> Callable:
    """The launcher `fastcore_ai.triton_kernels.<module>.<name>`, imported at its first call (triton is
    imported only by code that runs a Triton kernel)."""
    function = None

    def call(*args):
        nonlocal function
        if function is None:
            function = getattr(importlib.import_module(f"fastcore_ai.triton_kernels.{module}"), name)
        return function(*args)

    call.__name__ = call.__qualname__ = f"triton_kernels.{module}.{name}"
    return call


def _as_output(value):
    return tuple(value) if isinstance(value, list) else value


def _nothing_intercepts() -> bool:
    if torch.compiler.is_compiling():
        return False
    _C = torch._C
    return not (
        _C._get_tracing_state() is not None
        or _C._are_functorch_transforms_active()
        or _C._is_torch_function_mode_enabled()
        or _C._len_torch_dispatch_stack() > 0
    )


def _allocation_error(name: str, backend: str, error: RuntimeError) -> RuntimeError:
    """torch's bare "can't allocate memory" (or OutOfMemoryError) raised inside a backend, renamed: which op
    and backend could not get memory for these sizes (an expanded input can ask for far more than it holds)."""
    if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
        return error
    return RuntimeError(
        f"fastcore_ai.ops.{_public_name(name)}: the {backend} backend could not allocate its outputs or "
        f"workspace for these input sizes ({error})"
    )


def _public_name(name: str) -> str:
    """The public function a registered op serves: its name, or its name without the family prefix
    (s4_fft_conv -> fft_conv) when that is what fastcore_ai.ops exports. Error path only."""
    public = getattr(sys.modules.get(__package__), "__all__", ())
    if name in public:
        return name
    family, _, rest = name.partition("_")
    return rest if rest in public else name


def call_naming_allocation_errors(name: str, backend: str, fn: Callable, *args):
    """fn(*args) with an allocation failure renamed as `_allocation_error` does (for a public function's
    own direct native call, outside the registered op)."""
    try:
        return fn(*args)
    except RuntimeError as error:
        renamed = _allocation_error(name, backend, error)
        if renamed is error:
            raise
        raise renamed from error


def _runner(
    name: str,
    impls: Dict[str, Callable],
    check: Optional[Callable],
    contiguous_positions: Tuple[int, ...],
    contiguous_outputs: bool,
) -> Callable:
    """run(backend, args): the impl, with what every backend of the op shares done once around it: the
    op's data check (inside the op, so the public function stays traceable and the direct path runs it too),
    dense copies of the arguments the kernels index densely (autograd may hand expanded gradients), dense
    outputs (the fake promises them), an allocation failure named after the op."""

    def call(backend, args):  # the try costs nothing until something raises (the hot path stays one frame)
        try:
            return _as_output(impls[backend](*args))
        except RuntimeError as error:
            renamed = _allocation_error(name, backend, error)
            if renamed is error:
                raise
            raise renamed from error

    if check is None and not contiguous_positions and not contiguous_outputs:
        return call

    def run(backend, args):
        if check is not None:
            check(*args)
        if contiguous_positions:
            args = list(args)
            for position in contiguous_positions:
                if args[position] is not None:
                    args[position] = args[position].contiguous()
        out = call(backend, args)
        if contiguous_outputs:
            out = tuple(t if t is None else t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()
        return out

    return run


class DefinedOp:
    """A registered torch op with its backend implementations (see the module docstring)."""

    def __init__(
        self,
        name: str,
        prototype: Callable,
        impls: Mapping[str, Callable],
        mutates_args: Sequence[str] = (),
        autograd: Optional[Tuple[Callable, Callable]] = None,
        check: Optional[Callable] = None,
        contiguous_args: Sequence[str] = (),
        contiguous_outputs: bool = False,
    ):
        self.name = name
        self.qualname = f"fastcore_ai::{name}"
        self.module = prototype.__module__  # the family module that declares it (the naming-rule test reads it)
        self.impls: Dict[str, Callable] = dict(impls)
        self.differentiable = autograd is not None
        schema = torch.library.infer_schema(prototype, mutates_args=tuple(mutates_args))
        arguments, returns = schema.rsplit(") ->", 1)
        schema = f"{arguments}{', ' if arguments != '(' else ''}str backend) ->{returns}"
        parameters = list(prototype.__code__.co_varnames[: prototype.__code__.co_argcount])
        self._mutated = tuple(parameters.index(a) for a in mutates_args)
        kinds = [str(a.type) for a in torch._C.parse_schema(f"{name}{schema}").arguments][:-1]  # no backend
        self._tensor_positions = tuple(i for i, kind in enumerate(kinds) if kind in ("Tensor", "Optional[Tensor]"))
        self._tensor_list_positions = tuple(
            i for i, kind in enumerate(kinds) if kind in ("List[Tensor]", "List[Optional[Tensor]]")
        )
        unknown = [
            kind
            for kind in kinds
            if "Tensor" in kind and kind not in ("Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]")
        ]
        if unknown:
            raise TypeError(f"define_op({name!r}): argument types {unknown} are not understood by the direct path")
        self._run = _runner(
            name, self.impls, check, tuple(parameters.index(a) for a in contiguous_args), contiguous_outputs
        )
        run = self._run

        def dispatch(*args):
            *call, backend = args
            return run(backend, call)

        dispatch.__name__ = name
        self.op = torch.library.custom_op(self.qualname, dispatch, mutates_args=tuple(mutates_args), schema=schema)
        self.op.register_fake(lambda *args: prototype(*args[:-1]))
        if autograd is not None:
            setup_context, backward = autograd
            self.op.register_autograd(backward, setup_context=setup_context)
        REGISTRY[name] = self

    def direct_call_allowed(self, args) -> bool:
        """True when the registered op would only run impls[backend](*args): see the module docstring.
        Only the schema's tensor arguments are looked at (the others are ints, floats, bools, strings)."""
        needs_grad = self.differentiable and torch.is_grad_enabled()
        plain = _PLAIN_TENSORS
        for position in self._tensor_positions:
            value = args[position]
            if value is None:
                continue
            if type(value) not in plain or (needs_grad and value.requires_grad):
                return False
        for position in self._tensor_list_positions:
            for value in args[position]:
                if value is not None and (type(value) not in plain or (needs_grad and value.requires_grad)):
                    return False
        return _nothing_intercepts()

    def __call__(self, *args, backend: str):
        if backend in NATIVE_BACKENDS and self.direct_call_allowed(args):
            out = self._run(backend, args)
            if self._mutated:
                torch._C._increment_version([args[i] for i in self._mutated])
            return out
        return self.op(*args, backend)


def define_op(
    name: str,
    *,
    impls: Mapping[str, Callable],
    mutates_args: Sequence[str] = (),
    autograd: Optional[Tuple[Callable, Callable]] = None,
    check: Optional[Callable] = None,
    contiguous_args: Sequence[str] = (),
    contiguous_outputs: bool = False,
) -> Callable[[Callable], DefinedOp]:
    """Decorator over the op's prototype (annotations = schema, body = fake): see the module docstring.
    `check(*args)` runs before every backend; `contiguous_args` names arguments every backend gets dense;
    `contiguous_outputs` makes every backend's outputs dense."""

    def wrap(prototype: Callable) -> DefinedOp:
        return DefinedOp(name, prototype, impls, mutates_args, autograd, check, contiguous_args, contiguous_outputs)

    return wrap


def native_impls(
    name: str,
    *,
    triton_launcher: Optional[Tuple[str, str]] = None,
    reference: Optional[Callable] = None,
    cuda: bool = True,
) -> Dict[str, Callable]:
    """The common impl table: `_C.<name>` on cpu (and cuda), a Triton launcher, the reference."""
    impls: Dict[str, Callable] = {}
    function = native(name)
    impls["cpu"] = function
    if cuda:
        impls["cuda"] = function
    if triton_launcher is not None:
        impls["triton"] = triton(*triton_launcher)
    if reference is not None:
        impls["reference"] = reference
    return impls
