"""PEFT's own test suite as the measure of fastpeft's drop-in parity (issue 23).

`python -m compat.peft_suite` downloads the pinned PEFT's test files, runs them against real PEFT
(the baseline) and against fastpeft through the shim in `compat.peft_shim`, and writes
docs/PEFT_COMPAT.md. Not part of the installed package: a tool of the source tree.
"""
