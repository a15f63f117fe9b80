"""QuantLinear: nn.Linear with its weight stored in 8 or 4 bits (llmkernels.quantize_weight)."""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from ..backends import explain
from ..ops.quant_matmul import quant_matmul
from ..quantized_weight import QuantizedWeight, quantize_weight
from ..reference.quant_matmul import INT4_GROUP_SIZES, SCHEMES, is_int4_group_size


_RECORD_BYTES = 128  # QuantLinear's format record (get_extra_state): far more than it needs


def scheme_fits(scheme: str, in_features: int, group_size: int,
                out_features: Optional[int] = None) -> Optional[str]:
    """None if `scheme` can store a weight of (out_features, in_features), else why not."""
    if scheme not in SCHEMES:
        return f"unknown scheme {scheme!r}"
    if in_features == 0 or out_features == 0:
        return f"the weight ({out_features} x {in_features}) is empty"
    if scheme == "int4":
        if not is_int4_group_size(group_size):
            return f"int4 group_size must be one of {INT4_GROUP_SIZES} (an int), got {group_size!r}"
        if in_features % group_size:
            return f"in_features={in_features} is not a multiple of group_size={group_size}"
    return None


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT, ImageGPT, Decision Transformer): a linear layer whose
    (in_features, out_features) weight its forward multiplies as x @ weight + bias."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
            and isinstance(getattr(module, "bias", None), torch.Tensor))


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W quantized ("int8", "int4" or "w8a8"); the float weight is never
    formed. Buffers qdata, scales (and zeros for int4) hold W; bias stays in float.
    Build from an existing layer with QuantLinear.from_linear(linear, scheme)."""

    transposed_from = None  # the Conv1D class of a layer made from one (from_linear)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 scheme: str = "int8", group_size: int = 128, dtype=None, device=None):
        super().__init__()
        why = scheme_fits(scheme, in_features, group_size, out_features)
        if why is not None:
            raise ValueError(f"QuantLinear: {why}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.group_size = int(group_size) if scheme == "int4" else 0
        self.weight_dtype = dtype or torch.get_default_dtype()
        N, K = out_features, in_features
        if scheme == "int4":
            g = self.group_size
            self.register_buffer("qdata", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // g, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.zeros(N, K // g, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("qdata", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, dtype=torch.float32, device=device))
            self.zeros = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(N, dtype=self.weight_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def qweight(self) -> QuantizedWeight:
        # One QuantizedWeight while the buffers stay the same tensors (its checks are then
        # remembered: see QuantizedWeight.validate); rebuilt when any is replaced.
        buffers = self._buffers
        qdata, scales = buffers["qdata"], buffers["scales"]
        zeros = buffers.get("zeros")
        qw = self.__dict__.get("_qweight")
        if (qw is None or qw.qdata is not qdata or qw.scales is not scales
                or qw.zeros is not zeros or qw.dtype != self.weight_dtype):
            qw = QuantizedWeight(self.scheme, (self.out_features, self.in_features),
                                 self.group_size, qdata, scales, zeros, self.weight_dtype)
            self.__dict__["_qweight"] = qw
        return qw

    def set_weight(self, qweight: QuantizedWeight) -> None:
        qweight.validate("QuantLinear.set_weight")
        if (qweight.scheme, qweight.shape) != (self.scheme, (self.out_features, self.in_features)):
            raise ValueError(f"QuantLinear.set_weight: expected a {self.scheme} weight of shape "
                             f"{(self.out_features, self.in_features)}, got {qweight.scheme} "
                             f"{qweight.shape}")
        if qweight.scheme == "int4" and qweight.group_size != self.group_size:
            raise ValueError(f"QuantLinear.set_weight: group_size {qweight.group_size} != "
                             f"{self.group_size}")
        self.qdata = qweight.qdata
        self.scales = qweight.scales
        if qweight.zeros is not None:
            self.zeros = qweight.zeros
        self.weight_dtype = qweight.dtype

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: str, group_size: int = 128) -> "QuantLinear":
        """linear: an nn.Linear, or transformers' Conv1D (GPT-2's projections: y = x W + b
        with W stored as (in_features, out_features))."""
        if isinstance(linear, nn.Linear):
            w = linear.weight
        elif is_transformers_conv1d(linear):
            w = linear.weight.t()
        else:
            raise TypeError("QuantLinear.from_linear: expected nn.Linear or transformers' "
                            f"Conv1D, got {type(linear).__name__}")
        out_features, in_features = w.shape
        layer = cls(in_features, out_features, linear.bias is not None, scheme,
                    group_size, dtype=w.dtype, device=w.device)
        if not w.is_meta:  # a meta layer (no values) stays an empty frame for load_state_dict
            layer.set_weight(quantize_weight(w.detach().contiguous(), scheme, group_size))
        if not isinstance(linear, nn.Linear):
            layer.transposed_from = type(linear)  # what llmkernels.unpatch rebuilds
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(),
                                      requires_grad=linear.bias.requires_grad)
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def __getattr__(self, name: str):
        # (only for names not found otherwise: parameters, buffers, and missing ones) Code
        # written for nn.Linear (resize_token_embeddings, peft's merge_and_unload) read .weight
        # and got a bare "no attribute 'weight'"; hasattr(layer, "weight") stays False.
        if name == "weight":
            raise AttributeError(
                f"QuantLinear has no float weight: it is stored quantized ({self.scheme}: "
                "qdata, scales); layer.dequantize() gives it as a float tensor, and "
                "llmkernels.unpatch (after patch) turns the layers back into float ones")
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() / .float() cast every floating tensor, scales
        # included; the format keeps float32 scales, so they only move (from the uncast
        # tensor: exact), and the float weight's dtype follows the cast as nn.Linear's weight
        # would. Whether fn casts, and to what, is read off two probes of different dtypes
        # (the scales alone cannot tell .float() from a plain move: they are float32 already).
        scales = self._buffers["scales"]
        probes = [fn(torch.empty(0, dtype=dt, device=scales.device))
                  for dt in (torch.float16, torch.bfloat16)]
        super()._apply(fn, recurse)
        moved = self._buffers["scales"]
        if probes[0].dtype == probes[1].dtype:  # a cast to one floating dtype
            self.weight_dtype = probes[0].dtype
        if moved.dtype != scales.dtype:
            self._buffers["scales"] = scales.to(device=moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.qweight, self._bias_for(x))

    def _bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # (the parameter itself skips a trip through __getattr__; a parametrized bias, moved
        # out of _parameters by torch.nn.utils.parametrize, is a property)
        params = self._parameters
        bias = params["bias"] if "bias" in params else self.bias
        return bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias

    def _llmk_explain(self, x: torch.Tensor):
        """explain(layer, x): the path quant_matmul takes for forward(x)."""
        return explain(quant_matmul, x, self.qweight, self._bias_for(x))

    def get_extra_state(self) -> torch.Tensor:
        """The layer's format as a uint8 CPU tensor of JSON text, padded with spaces to a fixed
        length: state_dict savers that take only tensors (safetensors, transformers'
        save_pretrained) keep it, and torch.distributed.checkpoint, which loads into tensors
        of the saved size, finds the same size in every layer."""
        text = json.dumps({"scheme": self.scheme, "group_size": self.group_size,
                           "weight_dtype": str(self.weight_dtype).replace("torch.", "")})
        return torch.tensor(list(text.ljust(_RECORD_BYTES).encode()), dtype=torch.uint8,
                            device="cpu")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # As nn.Linear's weight: a load copies values into the layer's tensors, whose dtype
        # stays (a bfloat16 checkpoint into a float32 model gives float32 layers, bias
        # included; taking the record's dtype left unpatch a bfloat16 layer in a float32
        # model); load_state_dict(assign=True) takes the checkpoint's tensors, and its dtype.
        dtype = self.weight_dtype
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if not local_metadata.get("assign_to_params_buffers", False):
            self.weight_dtype = dtype

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):  # get_extra_state's; a dict before that
            try:
                state = json.loads(bytes(state.detach().cpu().to(torch.uint8).tolist()))
            except ValueError as exc:
                raise ValueError(f"QuantLinear: the state_dict's _extra_state is not this "
                                 f"layer's format record: {exc}") from exc
        if not isinstance(state, dict):
            raise ValueError("QuantLinear: the state_dict's _extra_state is not this layer's "
                             f"format record (got {type(state).__name__})")
        if state.get("scheme") != self.scheme or state.get("group_size") != self.group_size:
            raise ValueError(f"QuantLinear: the state_dict holds a {state.get('scheme')} weight "
                             f"(group {state.get('group_size')}), this layer is {self.scheme} "
                             f"(group {self.group_size}); quantize the model the same way first")
        name = state.get("weight_dtype", "float32")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"QuantLinear: the state_dict's format record names weight_dtype "
                             f"{name!r}; expected a floating dtype such as 'bfloat16'")
        self.weight_dtype = dtype

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}{g}")
