"""The text models' optimised inference artifacts and the runner that serves them on a CPU.

A fine-tuned `TextClassifier` is exported to ONNX, its graph fused by ONNX Runtime's transformer
optimiser (one Attention op per layer, embedding and skip layer norms, bias+GELU), and a copy is
dynamically quantised to int8 (weights int8 per output channel, activations quantised at run time);
the small heads stay fp32. A 3-layer student of the model (`TextDomain.distill`) goes the same way.
The files live in the version's registry folder beside model.pt, so the registry's checksums cover
them. `TextDomain.optimize` makes them and measures each on the test split; the registry's
`load_predictor` picks one by device and the serving backend (`choose_backend`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import CityServeError, ConfigError

# Serving backends a config may ask for; `auto` picks by device (`choose_backend`).
BACKEND_CHOICES = ("auto", "torch", "student-int8", "onnx-int8", "onnx-fp32")
# The optimised artifacts, by the backend that serves them, fastest first: a smaller student of the
# model in int8, the model in int8, the model in fp32 (`TextDomain.optimize` makes them).
ARTIFACTS = {"student-int8": "student.int8.onnx", "onnx-int8": "model.int8.onnx", "onnx-fp32": "model.onnx"}
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
# How far below the PyTorch fp32 model's test metric an artifact may score (1 point of macro-F1),
# and how many test texts its fp32 export must label as PyTorch does: fewer means the export or the
# tokeniser differs, a bug to fix, not a rounding to accept.
GATE = 0.01
AGREEMENT = 0.999


class ExportError(CityServeError):
    """The ONNX export or its optimisation did not produce what serving needs (a missing fusion,
    answers that differ from PyTorch's): no artifact is kept."""

    code = "export_failed"


def choose_backend(wanted: str, device: str, stored: Sequence[str], what: str) -> str:
    """The backend a predictor loads: `torch`, or an `ARTIFACTS` key.

    `auto` is PyTorch on a GPU (bf16 there) and on the CPU the fastest artifact the version has
    (`ARTIFACTS`' order), else PyTorch fp32; `torch` forces PyTorch; an artifact's name forces it.

    Args:
        wanted: one of `BACKEND_CHOICES`.
        device: where the predictor runs ("cpu", "cuda", "cuda:1").
        stored: the artifacts the version has.
        what: the version, for messages ("events v3").
    """
    on_cpu = torch.device(device).type == "cpu"
    if wanted == "auto":
        return next((b for b in ARTIFACTS if b in stored), "torch") if on_cpu else "torch"
    if wanted == "torch":
        return wanted
    if wanted not in ARTIFACTS:
        raise ConfigError(f"unknown backend {wanted!r}; use one of {', '.join(BACKEND_CHOICES)}", field="backend")
    if not on_cpu:
        raise ConfigError(f"backend {wanted} runs on the CPU, not on {device}; use auto or torch there",
                          field="backend")
    if wanted not in stored:
        raise ConfigError(f"{what} has no {wanted} artifact; make it with `cityserve models optimize "
                          f"{what}`", field="backend")
    return wanted


def gate_failures(inference: dict[str, Any], stored: Sequence[str]) -> list[str]:
    """Why each stored artifact may not serve: its test metric more than `GATE` below PyTorch fp32's
    (as `TextDomain.optimize` measured it), or no measurement of it at all."""
    backends = inference.get("backends", {})
    reference = backends.get("torch-fp32", {}).get("value")
    failures = []
    for name in stored:
        value = backends.get(name, {}).get("value")
        if value is None or reference is None:
            failures.append(f"{name} has no recorded test {inference.get('metric', 'metric')}")
        elif value < reference - GATE:
            failures.append(f"{name} scores {inference['metric']} {value:.4f} on the test split, "
                            f"{100 * (reference - value):.1f} points below PyTorch fp32's {reference:.4f} "
                            f"(at most {100 * GATE:g} allowed)")
    return failures


class _Outputs(nn.Module):
    """The classifier with a tuple of outputs in `names` order (ONNX outputs are positional)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids, attention_mask)
        return tuple(out[name] for name in self.names)


def export(model: Any, sample: dict[str, torch.Tensor], path: Path) -> None:
    """Writes `model` (a `TextClassifier` in fp32 on the CPU) as ONNX, batch and length dynamic.

    The encoder is traced with eager attention: the optimiser recognises that subgraph and fuses it
    into one Attention op per layer, where the default SDPA path exports to a pattern it leaves
    unfused (`fuse` would refuse it). Both compute the same attention."""
    names = [*model.head_sizes, *(["score"] if model.has_score else [])]
    wrapped = _Outputs(model, names).eval()
    before = model.encoder.config._attn_implementation
    model.encoder.set_attn_implementation("eager")
    try:
        # The tracer's warnings (a mask built with Python booleans, negative-index caveats) print on
        # every registration; what they warn of is checked instead: `TextDomain.optimize` compares the exported
        # graph's labels with PyTorch's on the whole test split and refuses a disagreeing artifact.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index", category=UserWarning)
            torch.onnx.export(
                wrapped, tuple(sample[k] for k in INPUTS), str(path), dynamo=False, opset_version=OPSET,
                input_names=list(INPUTS), output_names=names,
                dynamic_axes={**{k: {0: "batch", 1: "length"} for k in INPUTS},
                              **{n: {0: "batch"} for n in names}},
            )
    finally:
        model.encoder.set_attn_implementation(before)


def fuse(src: Path, dst: Path, encoder: dict[str, Any]) -> dict[str, int]:
    """ONNX Runtime's BERT graph optimisations from `src` to `dst`; returns the fused operator
    counts, refusing a graph where a layer's attention or layer norms were left unfused (the export
    changed shape and the artifact would be no faster than PyTorch)."""
    from onnxruntime.transformers.optimizer import optimize_model

    layers = int(encoder["num_hidden_layers"])
    optimized = optimize_model(str(src), model_type="bert", num_heads=int(encoder["num_attention_heads"]),
                               hidden_size=int(encoder["hidden_size"]), opt_level=1)
    counts = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    wanted = {"Attention": layers, "SkipLayerNormalization": 2 * layers, "EmbedLayerNormalization": 1}
    missing = {op: f"{counts.get(op, 0)} of {n}" for op, n in wanted.items() if counts.get(op, 0) < n}
    if missing:
        raise ExportError(f"the ONNX graph optimiser left ops unfused: {missing}")
    optimized.save_model_to_file(str(dst))
    return counts


def quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the fused graph's matrix products, except the heads (few
    weights, and their rounding would move every answer's probabilities).

    Per-channel weight scales keep each output's precision, and `reduce_range` (7-bit weights)
    keeps u8×s8 products from saturating their 16-bit intermediate sums on a CPU without VNNI
    (AVX2 only); both agreed with fp32 more often than per-tensor, full-range weights, at equal
    speed (docs/benchmarks.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The encoder's projections are MatMul and fused Attention ops. The heads are the graph's only
    # Gemm ops, which dynamic quantisation first rewrites to a MatMul named NAME_MatMul (plus an Add):
    # they are excluded under that name.
    heads = [f"{node.name}_MatMul" for node in onnx.load(str(src), load_external_data=False).graph.node
             if node.op_type == "Gemm"]
    # The quantiser advises its own pre-processing (shape inference and graph optimisation) on the
    # root logger at every call; the graph was optimised already, by `fuse`, for this model type.
    def advice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=heads,
                         # the fused ops carry no type information the quantiser can infer
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        logging.getLogger().removeFilter(advice)


class OnnxClassifier:
    """An ONNX artifact called like a `TextClassifier`: token ids and mask in, a dict of outputs out.

    Args:
        path: the .onnx file.
        threads: intra-op threads (the replica's share of CPUs, as torch's). They do not spin
            after a run: spinning threads took the cores from the rest of a batch's work (more
            than it gained at batch 1; docs/benchmarks.md), and from the gateway beside them.
    """

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs = self.session.get_outputs()
        self.names = [o.name for o in outputs]
        self.head_sizes = {o.name: int(o.shape[1]) for o in outputs if o.name != "score"}
        self.has_score = "score" in self.names

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                "attention_mask": attention_mask.numpy().astype(np.int64, copy=False)}
        answers = self.session.run(None, feed)
        return {name: torch.from_numpy(value) for name, value in zip(self.names, answers, strict=True)}
