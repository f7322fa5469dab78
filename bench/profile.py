"""Where a server spends its time under load: py-spy samples, summarised.

`python -m bench --profile` records the service once more per HTTP
benchmark, outside the measured rounds (sampling slows it a little), and
adds the top functions to the results. py-spy is not a dependency of the
project: `pip install py-spy` first.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

SAMPLES_PER_S = 200
LINE_NUMBER = re.compile(r":\d+\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


@contextlib.contextmanager
def sampling(pid: int, output: Path, duration_s: float) -> Iterator[None]:
    """py-spy samples `pid` for `duration_s` while the block runs the load."""
    command = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--output", str(output)]
    command += ["--rate", str(SAMPLES_PER_S), "--duration", str(math.ceil(duration_s))]
    # Blocking mode (the default) pauses the server for each sample: slower,
    # but --nonblocking reads half-updated frames on 3.11 and cuts stacks.
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        _, errors = recorder.communicate(timeout=duration_s + 60)
        if recorder.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors.decode(errors='replace')[-1000:]}")


def summarise(collapsed: Path, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """The functions with most samples: on top of the stack (self) and anywhere in it."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    return {
        "self": _shares(own, total, top),
        "inclusive": _shares(anywhere, total, top * 3),
    }


def _shares(counter: collections.Counter[str], total: int, top: int) -> list[tuple[str, float]]:
    return [(frame, round(count / total, 4)) for frame, count in counter.most_common(top)]
