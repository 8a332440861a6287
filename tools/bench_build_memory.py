"""Peak host memory of a loadspec build, in a fresh process: `python tools/bench_build_memory.py ROOT --shape 8b`.

Writes a random Llama-shaped bf16 checkpoint (tensor by tensor), builds it in NF4 on this
machine, and reports the build process's peak RSS (VmHWM, reset after imports through
/proc/self/clear_refs) above its RSS after imports,
against the bound "2 GiB plus the largest tensor".
"""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.synthetic import parameter_shapes, write_checkpoint  # noqa: E402

PROBE = """
import json, time, torch, transformers, bitsandbytes, loadspec, loadspec.builder
from transformers import AutoModelForCausalLM, AutoTokenizer
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
baseline = status("VmRSS")
started = time.perf_counter()
loadspec.build({spec!r}, cache_dir={cache!r}, progress=False, force=True)
print("RESULT", json.dumps(dict(baseline=baseline, peak=status("VmHWM"), seconds=time.perf_counter() - started)))
"""


def measure(root: Path, shape: str, target: str = "cpu") -> dict:
    source = root / f"src-{shape}"
    if not (source / "config.json").exists():
        write_checkpoint(source, shape)
    spec = root / f"{shape}.toml"
    spec.write_text(f'name = "mem-{shape}"\n[model]\nsource = "{source}"\n[target]\ngpu = "{target}"\n')
    run = subprocess.run([sys.executable, "-c", PROBE.format(spec=str(spec), cache=str(root / "cache"))],
                         capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(run.stderr[-2000:])
    result = json.loads(lines[-1][7:])
    config = json.loads((source / "config.json").read_text())
    largest = max(math.prod(dims) for dims in parameter_shapes(config).values()) * 2
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    result.update(shape=shape, source_bytes=source_bytes, largest_tensor=largest, growth=result["peak"] - result["baseline"],
                  bound=2 * 1024**3 + largest)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    r = measure(args.root, args.shape)
    gib = 1024**3
    print(f"{r['shape']}: source {r['source_bytes'] / gib:.2f} GiB, build {r['seconds']:.1f} s, RSS after imports {r['baseline'] / gib:.2f} GiB, "
          f"peak {r['peak'] / gib:.2f} GiB, growth {r['growth'] / gib:.2f} GiB (bound 2 GiB + largest tensor "
          f"{r['largest_tensor'] / gib:.2f} GiB = {r['bound'] / gib:.2f} GiB): {'within' if r['growth'] <= r['bound'] else 'OVER'}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0 if r["growth"] <= r["bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
