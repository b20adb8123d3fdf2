"""Broken on purpose: fails when imported."""

import dpobench_no_such_module  # noqa: F401
