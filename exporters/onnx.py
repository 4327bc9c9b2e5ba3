"""Export a fused student to one self-contained ONNX file with a dynamic batch axis.

The default exporter is torch's ``torch.export``-based one (``dynamo=True``): it
is the exporter torch develops and defaults to since 2.9, and it writes opset 18
(the legacy TorchScript exporter is deprecated and kept here only as
``exporter="torchscript"`` for runtimes that need an older opset). The file is
written with the weights inside (no external ``.data`` file) so that it can be
copied on its own; ``onnx.checker`` runs with ``full_check`` (shape inference
included) before the file is moved into place.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import onnx
import torch
from torch import nn

from exporters import metadata as md
from exporters.errors import ExportError

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
MAX_SINGLE_FILE = 2 * 1024**3 - 1  # protobuf's limit; larger models need external data


def export_onnx(model: nn.Module, path: Path, input_size: tuple[int, int, int], meta: Mapping[str, object],
                opset: int | None = None, exporter: str = "dynamo") -> Path:
    """Export ``model`` (eval mode, float32) to ``path``; returns the path. Raises ExportError."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter '{exporter}'; valid: {', '.join(EXPORTERS)}")
    opset = opset or DEFAULT_OPSET[exporter]
    if exporter == "dynamo" and opset < 18:
        raise ExportError(f"the dynamo exporter writes opset >= 18 (asked for {opset}); "
                          "use --exporter torchscript for older opsets")
    model = model.float().eval()
    example = torch.zeros(1, *input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            _run_exporter(model, example, raw, opset, exporter)
            proto = onnx.load(str(raw), load_external_data=True)
        except OSError as exc:
            if exc.errno is None:  # not about the disk: a failed export like any other
                raise ExportError(f"ONNX export ({exporter}, opset {opset}) failed: {exc}") from exc
            raise  # disk full, file too large, read-only: the caller reports a storage failure
        except Exception as exc:  # the exporters raise many types; all mean "could not export"
            raise ExportError(f"ONNX export ({exporter}, opset {opset}) failed: {str(exc).splitlines()[0]}") from exc
        strip_exporter_metadata(proto)
        md.write_onnx(proto, meta)
        proto.producer_name = "kdiff-pipeline"
        proto.doc_string = f"{meta.get('architecture')} classifier; see metadata_props kdiff.* for preprocessing"
        final = Path(tmp) / "final.onnx"
        if proto.ByteSize() > MAX_SINGLE_FILE:
            onnx.save_model(proto, str(final), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(proto, str(final))
        try:
            onnx.checker.check_model(str(final), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the exported model: {str(exc).splitlines()[0]}") from exc
        for extra in Path(tmp).glob("final.onnx.data"):
            os.replace(extra, path.with_name(path.name + ".data"))
        os.replace(final, path)
    log.info("export: ONNX opset %d (%s exporter) -> %s (%.1f MB)", opset, exporter, path, path.stat().st_size / 1e6)
    return path


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter's graph passes log every rewrite at INFO; keep only their warnings."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run_exporter(model: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    with warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore")  # the exporters warn about their own deprecations
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: batch},), **names)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **names)


def strip_exporter_metadata(proto: onnx.ModelProto) -> None:
    """Remove what the exporter records about the build: stack traces with the build machine's paths, FX node
    names, module hierarchies, rewrite rules (node, graph and value metadata, node doc strings). The shipped file
    carries the model and the ``kdiff.*`` metadata only."""

    def graphs(graph: onnx.GraphProto):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.g.ByteSize():
                    yield from graphs(attr.g)
                for sub in attr.graphs:
                    yield from graphs(sub)

    nodes = [n for g in graphs(proto.graph) for n in g.node] + [n for f in proto.functions for n in f.node]
    for node in nodes:
        del node.metadata_props[:]
        node.doc_string = ""
    for graph in graphs(proto.graph):
        del graph.metadata_props[:]
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            del value.metadata_props[:]
    for function in proto.functions:
        del function.metadata_props[:]
