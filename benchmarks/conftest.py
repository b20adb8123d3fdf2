"""Benchmarks run with every plugin the environment has (not hermetic): time what users would run."""

from __future__ import annotations

import pytest
import torch


def devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=devices())
def device(request) -> str:
    return request.param


def pytest_terminal_summary(terminalreporter, config) -> None:
    """After the step benchmarks: each implementation's mean step as pairs/s and as a ratio to the plain step
    measured in the same run."""
    session = getattr(config, "_benchmarksession", None)
    everything = getattr(session, "benchmarks", [])
    write = terminalreporter.write_line
    variants = {b.extra_info["variant_step"]: b.stats.median for b in everything if "variant_step" in b.extra_info}
    if "dpo" in variants:
        write("")
        write("dpobench's step per variant (small size, CPU, 32 pairs; median), as a ratio to dpo's in the same run:")
        for name, median in sorted(variants.items(), key=lambda kv: kv[1]):
            write(f"  {name:<18}{median * 1e3:>9.1f} ms{median / variants['dpo']:>8.2f}")
    rows = [b for b in everything if "implementation" in b.extra_info]
    if not rows:
        return
    write("")
    write("training step, side by side (mean step: pairs over time; ratio to the plain step of the same case):")
    write(f"{'case':<28}{'implementation':<16}{'step ms':>10}{'pairs/s':>10}{'× plain':>10}{'peak GB':>10}")
    cases: dict[tuple, dict[str, object]] = {}
    for b in rows:
        info = b.extra_info
        cases.setdefault((info["size"], info["device"], info["pairs_per_step"]), {})[info["implementation"]] = b
    for (size, device, batch), found in cases.items():
        plain = found.get("plain")
        for name, b in found.items():
            median = b.stats.mean  # bucketed batches vary in length: throughput is pairs over the mean step
            ratio = plain.stats.mean / median if plain else float("nan")
            memory = b.extra_info.get("peak_memory_gb")
            write(f"{f'{size}, {device}, {batch} pairs':<28}{name:<16}{median * 1e3:>10.2f}{batch / median:>10.1f}"
                  f"{ratio:>10.2f}{'–' if memory is None else f'{memory:.2f}':>10}")  # fmt: skip
