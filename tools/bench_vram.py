"""GPU memory of one checkpoint loaded by loadspec as NF4, int8 and bf16 (one fresh process, one load after another).

  python tools/bench_vram.py SOURCE_FOLDER CACHE_DIR [--json OUT.json]

Reports the bytes allocated on the GPU once `loadspec.load` returns (the model's weights and buffers)
and the peak during the load, and each format's share of the bf16 figure.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

QUANTS = ("none", "nf4", "int8")
MEASURE = """
import gc, json, torch, loadspec
torch.zeros(1, device='cuda'); base = torch.cuda.memory_allocated(); out = {{}}
for name in {names!r}:
    torch.cuda.reset_peak_memory_stats()
    m, tok = loadspec.load(name, cache_dir={cache!r})
    torch.cuda.synchronize()
    out[name] = dict(allocated=torch.cuda.memory_allocated() - base, peak=torch.cuda.max_memory_allocated() - base)
    del m, tok; gc.collect(); torch.cuda.empty_cache()
print('RESULT', json.dumps(out))
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("cache")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import loadspec
    from loadspec.bench import _python as run_python  # one fresh process, its RESULT line

    native = json.loads((Path(args.source) / "config.json").read_text()).get("max_position_embeddings", 2048)
    for quant in QUANTS:
        spec = Path(args.cache) / f"vram_{quant}.toml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(f'name = "vram_{quant}"\n[model]\nsource = "{args.source}"\n[target]\ngpu = "auto"\n'
                        f'[load]\nquant = "{quant}"\nmax_seq_length = {native}\n')
        loadspec.build(spec, cache_dir=args.cache, progress=False)
    measured = run_python(MEASURE.format(names=[f"vram_{quant}" for quant in QUANTS], cache=args.cache), timeout=300)
    results = {quant: measured.get(f"vram_{quant}", measured) for quant in QUANTS}  # the error for each if it failed
    bf16 = results["none"].get("allocated")
    print(f"{'format':8} {'weights GiB':>12} {'peak GiB':>9} {'of bf16':>8}")
    for quant, row in results.items():
        if "error" in row:
            print(f"{quant:8} error: {row['error'][-300:]}")
            continue
        share = f"{row['allocated'] / bf16:7.1%}" if bf16 else "-"
        print(f"{'bf16' if quant == 'none' else quant:8} {row['allocated'] / 2**30:12.3f} {row['peak'] / 2**30:9.3f} {share:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
