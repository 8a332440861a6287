"""Load benchmark on a GPU machine: `python tools/bench_load.py --shape 8b --json out.json` (same as `loadspec bench`)."""
import sys

from loadspec.bench import main

if __name__ == "__main__":
    sys.exit(main())
