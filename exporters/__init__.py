"""Export formats, runtime sessions and the torch-free runtime that ships to devices.

Importing the package turns the runtimes' telemetry off (:mod:`exporters.telemetry`).
"""
from exporters import telemetry as _telemetry

_telemetry.off()
