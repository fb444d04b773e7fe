"""Peak memory of pipeline steps, each run in a fresh child process.

`python -m bench.child KIND ARGS...` runs one step and prints one JSON line with its own peak
RSS (VmHWM from /proc/self/status). `run_child` also returns wait4's ru_maxrss, which is not
the child's alone: Linux keeps the parent's RSS at fork in it across exec.

Kinds: `baseline` (imports only), `tiling SLIDE` (open + plan_slide),
`filter TASKS_FILE TILES_ROOT SLIDE_ROOT` (one BatchFilter over pickled tile tasks).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARK = "BENCH-CHILD "


def vmhwm_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _run(kind: str, args: list[str]) -> dict[str, Any]:
    from prolifscore.core.runtime.settings import PreprocessSettings, load
    from prolifscore.core.wsi.preprocess import plan_slide
    from prolifscore.core.wsi.slide import open_slide
    from prolifscore.filtering.worker import BatchFilter
    from prolifscore.v1 import pipeline_pb2 as pb

    start = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "tiling":
        with open_slide(args[0]) as slide:
            plan = plan_slide(slide, "rss", pb.TilingSpec(), load(PreprocessSettings, environ={}))
        out["candidates"] = len(plan.candidates)
        out["coverage_map_shape"] = list(plan.coverage.fraction.shape)
    elif kind == "filter":
        tasks: list[bytes] = pickle.loads(Path(args[0]).read_bytes())
        worker = BatchFilter(args[1], (args[2],))
        kept = candidates = 0
        for task in tasks:
            result = worker.process(task)
            if "error" in result:
                raise RuntimeError(result["error"])
            kept += result["tile_count"]
            candidates += result["candidates"]
        out.update(tasks=len(tasks), candidates=candidates, kept=kept)
    elif kind != "baseline":
        raise SystemExit(f"unknown kind {kind!r}")
    out["seconds"] = time.perf_counter() - start
    out["vmhwm_mb"] = vmhwm_mb()
    return out


def run_child(*args: str) -> dict[str, Any]:
    """Run `python -m bench.child ARGS` and return its JSON (with `vmhwm_mb`) plus
    `ru_maxrss_mb` from wait4."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.child", *args],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench.child {args} failed ({proc.returncode}):\n{output[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    result["ru_maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: kB
    return result


def main() -> None:
    print(MARK + json.dumps(_run(sys.argv[1], sys.argv[2:])), flush=True)


if __name__ == "__main__":
    main()
