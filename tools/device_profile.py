"""Profile a loadspec build of the benchmark checkpoint (used on the GPU machine): `python tools/device_profile.py ROOT OUT`."""
import cProfile
import pstats
import sys
import time

import torch

import loadspec

root, out = sys.argv[1], sys.argv[2]
torch.zeros(1, device="cuda")
import loadspec.builder  # noqa: E402,F401  (imports outside the profile)

profile = cProfile.Profile()
started = time.perf_counter()
profile.enable()
loadspec.build(f"{root}/bench.toml", cache_dir=f"{root}/cache", progress=False, force=True)
profile.disable()
with open(out, "w") as handle:
    handle.write(f"build {time.perf_counter() - started:.2f} s\n")
    pstats.Stats(profile, stream=handle).sort_stats("cumulative").print_stats(35)
