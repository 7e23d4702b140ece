"""A training step without its arithmetic: torch's `FakeTensorMode`, with the real values of the
small integer tensors the step branches on.

Under `FakeTensorMode` every tensor has its shape, dtype, device and storage size but no data,
so a step that needs hundreds of GiB and hours of CPU runs in seconds and megabytes, and
`TensorMemory` (benchmarks/memory.py) counts the same storages it counts in a real run. Fake
mode alone stops at the step's few data-dependent operations: the placeholder count check
(`int(mask.sum())`), boolean indexing of the supervised positions (`nonzero`), `attention_mask`
checks. Those only ever read integer / boolean tensors derived from the batch's token ids,
labels and attention mask, which are small, so `KnownValues` keeps a real copy of each such
tensor next to its fake one and answers those operations from it. Floating-point work (the
model) is never computed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
_REAL_LIMIT = 2**26  # elements: integer/boolean results larger than this are not mirrored
_REAL_FLOAT_LIMIT = 2**10  # floating results: only scalars and the like (e.g. `tensor.new_tensor(0.5).item()`)
_BOOL_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                  aten._index_put_impl_.default, aten._unsafe_index_put.default)


def fake_mode() -> FakeTensorMode:
    """A `FakeTensorMode` whose op outputs can be swapped by `Module.to` / `_apply`.

    torch 2.14 memoizes every fake op output in a weak-value dictionary (the comment there calls
    it "a bit abusive": the meta tensor is fresh, so the memo is never hit), and
    `torch.utils.swap_tensors`, which `Module._apply` always uses for fake parameters, refuses
    tensors with weak references: `module.to(dtype)` on a fake module failed (PEFT moves each new
    adapter to its base layer's dtype that way). This mode builds the outputs without the memo.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def from_meta_and_device(fake_mode, t, device, pytype=None, dispatch_keys=None):
        return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)

    mode.fake_tensor_converter.from_meta_and_device = from_meta_and_device
    return mode


class _Mirror:
    """A fake tensor's real value, kept as its attribute; `copy.deepcopy` of the tensor (PEFT
    copies the projector it trains) copies the value outside fake mode."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __deepcopy__(self, memo):
        with unset_fake_temporarily():
            return _Mirror(self.value.clone())


class KnownValues(TorchDispatchMode):
    """Enter inside a `FakeTensorMode`: mirrors every integer/boolean result (and tiny floating
    one) whose inputs are all known with a real tensor, and answers `.item()`, `nonzero` and boolean-mask indexing from
    the mirrors. A data-dependent operation on an unknown value raises, naming the operation."""

    def __init__(self, fake_mode: FakeTensorMode):
        super().__init__()
        self.fake_mode = fake_mode

    def fake(self, real: torch.Tensor) -> FakeTensor:
        """A fake tensor standing for `real`, whose value stays known."""
        with unset_fake_temporarily():
            real = real.clone()
        fake = self.fake_mode.from_tensor(real)
        fake._known_value = _Mirror(real)
        return fake

    def _real(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if not isinstance(t, FakeTensor):
            return t
        return t._known_value.value

    @staticmethod
    def _known(t) -> bool:
        # the mirror is an attribute (a weak reference would stop `Module.to` from swapping the tensor)
        return not isinstance(t, FakeTensor) or hasattr(t, "_known_value")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        known = all(self._known(t) for t in tensors)
        if func is aten._local_scalar_dense.default or func is aten.nonzero.default:
            if not known:
                raise RuntimeError(f"fake step: {func} needs the value of a tensor computed from floating-point data")
            with unset_fake_temporarily():
                result = func(*tree_map(self._real, args), **tree_map(self._real, kwargs))
            return result if func is aten._local_scalar_dense.default else self.fake(result)
        if func in _BOOL_INDEXING:
            args = (args[0], [j for i in args[1] for j in self._long_indices(i)], *args[2:])
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if known and outputs and all(t.numel() <= (_REAL_FLOAT_LIMIT if t.is_floating_point() or t.is_complex()
                                                    else _REAL_LIMIT) for t in outputs):
            with unset_fake_temporarily():
                real_out = func(*tree_map(self._real, args), **tree_map(self._real, kwargs))
            for fake, real in zip(outputs, [t for t in tree_flatten(real_out)[0] if isinstance(t, torch.Tensor)]):
                fake._known_value = _Mirror(real)
        else:  # an in-place result computed from unknown values is unknown now
            for fake in outputs:
                if isinstance(fake, FakeTensor) and hasattr(fake, "_known_value"):
                    del fake._known_value
        return out

    def _long_indices(self, index) -> list:
        """A boolean mask index as the integer positions it selects, one index per mask dimension
        (what the real kernel does inside; the positions are its temporaries there, so they are
        not op outputs here either)."""
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.bool, torch.uint8):
            return [index]
        if not self._known(index):
            raise RuntimeError("fake step: boolean indexing by a mask computed from floating-point data")
        with unset_fake_temporarily():
            positions = self._real(index).nonzero()
        return [self.fake(positions[:, d]) for d in range(index.ndim)]


def renew_copied_parameters(model: torch.nn.Module) -> int:
    """Replace every fake parameter whose views do not share its storage by a fresh one.

    In torch 2.14 a fake tensor made by `copy.deepcopy` (PEFT copies the projector it trains,
    `modules_to_save`) answers `untyped_storage()` with a storage its own views do not share, so
    each view (`weight.t()` in every linear layer) would count as a new storage. A fresh fake
    parameter of the same shape, dtype and `requires_grad` has the storage a real copy has.
    Returns how many were replaced."""
    renewed = 0
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if not isinstance(p, FakeTensor) or p.numel() == 0 or p.view(-1).untyped_storage() is p.untyped_storage():
                continue
            module._parameters[name] = torch.nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
            renewed += 1
    return renewed


@contextmanager
def eager_masks():
    """transformers builds attention masks another way when it sees fake tensors (its `torch.compile`
    path materialises the causal mask); under fake mode, let it take the path a real run takes."""
    from unittest import mock

    from transformers import masking_utils

    with mock.patch.object(masking_utils, "is_tracing", lambda tensor=None: False):
        yield
