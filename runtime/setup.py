"""Builds the kdiff-runtime wheel from ../exporters, keeping only the modules the device commands import.

The build-side modules (``exporters.onnx``, ``exporters.openvino``, ``exporters.equivalence``) import torch or the
converters and stay out; ``tests/test_runtime_wheel.py`` checks that MODULES is exactly what ``python -m exporters``
imports (its subcommands' imports, then everything they import at module level).
"""
from __future__ import annotations

from setuptools import setup
from setuptools.command.build_py import build_py

MODULES = ("__init__", "__main__", "bench", "errors", "files", "formats", "gate_stats", "latency", "machine",
           "metadata", "preprocess", "quantize", "reference", "runtime", "sessions", "telemetry", "verify")


class RuntimeModulesOnly(build_py):
    def find_package_modules(self, package, package_dir):  # noqa: ANN001 (setuptools' signature)
        return [entry for entry in super().find_package_modules(package, package_dir) if entry[1] in MODULES]


setup(packages=["exporters"], package_dir={"exporters": "../exporters"}, cmdclass={"build_py": RuntimeModulesOnly})
