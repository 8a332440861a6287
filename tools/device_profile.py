"""Profile loadspec on the GPU machine, on the benchmark's checkpoint (made by `loadspec bench`).

    python tools/device_profile.py build ROOT OUT   # cProfile of a forced rebuild
    python tools/device_profile.py load ROOT OUT    # wall time of each load phase, then cProfile of a whole load
"""
import cProfile
import json
import pstats
import sys
import time

import torch

import loadspec
import loadspec.builder
import loadspec.loader as loader
from loadspec.plan import LoadPlan
from loadspec.store import Store


def timed(label, fn, lines):
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    lines.append(f"{label:28} {time.perf_counter() - started:8.3f} s")
    return result


def main(mode, root, out):
    torch.zeros(1, device="cuda")
    lines, profile = [], cProfile.Profile()
    if mode == "build":
        profile.enable()
        timed("build (forced)", lambda: loadspec.build(f"{root}/bench.toml", cache_dir=f"{root}/cache", progress=False, force=True), lines)
        profile.disable()
    else:
        store = Store(f"{root}/cache")
        folder = store.artifact_path(store.resolve_name("bench"))
        plan = LoadPlan.from_json((folder / "plan.json").read_text())
        timed("read weights (cold ring)", lambda: loader._read(folder, plan, plan.device_map), lines)
        timed("read weights (warm ring)", lambda: loader._read(folder, plan, plan.device_map), lines)
        timed("skeleton (first)", lambda: loader._skeleton(folder, plan), lines)
        timed("skeleton (again)", lambda: loader._skeleton(folder, plan), lines)
        timed("tokenizer", lambda: loader._tokenizer(folder), lines)
        timed("loadspec.load (1st)", lambda: loadspec.load("bench", cache_dir=f"{root}/cache"), lines)
        profile.enable()
        timed("loadspec.load (2nd)", lambda: loadspec.load("bench", cache_dir=f"{root}/cache"), lines)
        profile.disable()
        lines.append(json.dumps({"artifact_gib": sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30}))
    with open(out, "w") as handle:
        handle.write("\n".join(lines) + "\n\n")
        pstats.Stats(profile, stream=handle).sort_stats("cumulative").print_stats(30)
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:4])
