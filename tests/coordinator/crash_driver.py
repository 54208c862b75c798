"""Run as a process: open a coordinator and enter the given phases, in a loop if asked.

Usage: python crash_driver.py CONFIG [--loop N] PHASE [PHASE ...]
With GPUSM_CRASH_AT set it dies at that crash point; the kill test SIGKILLs it.
"""

from __future__ import annotations

import sys

from gpusm import Coordinator


def main(argv: list[str]) -> int:
    config, *phases = argv
    loops = 1
    if phases[:1] == ["--loop"]:
        loops = int(phases[1])
        phases = phases[2:]
    coordinator = Coordinator.from_config(config, monitor=False)
    try:
        for _ in range(loops):
            for phase in phases:
                coordinator.enter_phase(phase, client="driver", timeout=30)
    finally:
        coordinator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
