"""No telemetry from the runtimes we load: nothing sent, no identifiers written into HOME or TMPDIR.

Left alone, importing ONNX Runtime (1.32, Linux) writes a device id and an event database to
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/`` and ``$TMPDIR/.ses``, and OpenVINO's converter and NNCF
write a client id and usage counts to ``~/intel/`` and send them (their telemetry is on unless a consent file in
HOME says otherwise). ``off()`` runs when the ``exporters`` package is imported, before either runtime is: every
command of the pipeline and of the shipped runtime opens its sessions through this package.
"""
from __future__ import annotations

import os
import sys

# ONNX Runtime reads this when it starts (its one documented switch; set before `import onnxruntime`).
ORT_SWITCH = "ORT_DISABLE_TELEMETRY"
# OpenVINO's converter and NNCF fall back to their no-op stubs when this package cannot be imported.
OPENVINO_TELEMETRY = "openvino_telemetry"


def off() -> None:
    """Turn the runtimes' telemetry off for this process (and the processes it starts); idempotent."""
    os.environ.setdefault(ORT_SWITCH, "1")
    if OPENVINO_TELEMETRY not in sys.modules:
        sys.modules[OPENVINO_TELEMETRY] = None  # type: ignore[assignment]  # `import` then raises ImportError
    if "onnxruntime" in sys.modules:  # imported before us: at least no events from now on
        sys.modules["onnxruntime"].disable_telemetry_events()
