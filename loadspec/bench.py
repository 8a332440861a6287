"""Load benchmark: loadspec against the plain transformers/bitsandbytes path, in one run.

Makes a random-weight Llama-shaped checkpoint, builds it with loadspec, and times in fresh
processes (so no in-process cache helps anyone): transformers loading the same weights
pre-quantized, transformers quantize-on-load from bf16, `loadspec.load`, and a raw
safetensors read of the artifact's bytes. Reports the load call (imports and CUDA
initialised first), a fresh process running only what a user's script would, from its start to
the end of the first forward, peak GPU memory, and ratios.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 vocab_size=32000, tie_word_embeddings=False),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                 vocab_size=32000, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False),
}
NF4 = ("BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
       "bnb_4bit_compute_dtype=torch.bfloat16)")
FORWARD = "ids=torch.arange(1,33,device='cuda')[None]; m(ids); torch.cuda.synchronize()"
# name -> (what a user's script imports, the load). The fresh-process figure runs just that, then a forward.
CASES = {
    "transformers_prequantized": ("from transformers import AutoModelForCausalLM",
                                  "m=AutoModelForCausalLM.from_pretrained(R+'/nf4', device_map='cuda')"),
    "transformers_quantize_on_load": ("from transformers import AutoModelForCausalLM, BitsAndBytesConfig",
                                      f"m=AutoModelForCausalLM.from_pretrained(R+'/bf16', quantization_config={NF4}, dtype=torch.bfloat16, device_map='cuda')"),
    "loadspec": ("import loadspec", "m, tok = loadspec.load('bench', cache_dir=R+'/cache')"),
    "loadspec_embedding_on_gpu": ("import loadspec", "m, tok = loadspec.load('bench_gpu_embedding', cache_dir=R+'/cache')"),
    "safetensors_raw": ("import glob; from safetensors.torch import load_file",
                        "m=None; [load_file(f, device='cuda') for f in sorted(glob.glob(R+'/cache/artifacts/'+loadspec_fingerprint+'/*.safetensors'))]"),
}
# For the load-call figure, CUDA is initialised and each case's libraries are imported before the clock starts
# (loadspec's the way its load imports them), so it times loading alone.
LIBRARIES = "import transformers.modeling_utils, transformers.models.llama.modeling_llama"
PRE_IMPORTS = {
    "transformers_prequantized": f"{LIBRARIES}, bitsandbytes",
    "transformers_quantize_on_load": f"{LIBRARIES}, bitsandbytes",
    "loadspec": ("import loadspec.loader; from loadspec.deferred_imports import import_model_libraries; "
                 f"import_model_libraries(bitsandbytes=True); {LIBRARIES}"),
}
PRE_IMPORTS["loadspec_embedding_on_gpu"] = PRE_IMPORTS["loadspec"]


def make_checkpoint(shape: str, root: Path) -> None:
    """Random bf16 weights in a real Llama shape, plus a locally trained tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **SHAPES[shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "bf16", max_shard_size="5GB")
    _letter_tokenizer().save_pretrained(root / "bf16")
    del model


def _letter_tokenizer():
    """A minimal tokenizer (one token per letter): the benchmark times weights, not text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(ord("a") + i): 3 + i for i in range(26)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _python(code: str, env: dict | None = None, timeout: int = 600) -> dict:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"error": (run.stdout[-400:] + run.stderr[-1500:]).strip()}


def time_case(name: str, root: Path, fingerprint: str = "") -> dict:
    """One case, in two fresh processes. The first times the load call (CUDA and the libraries ready), GPU memory
    after it and at the peak of a forward, then the same load again in that process (`again_s`: nothing left to
    do the first time only). The second runs only what a user's script would, and `first_forward_s` is from
    starting that process to the end of its first forward. `fingerprint`: the artifact whose files the raw
    safetensors read takes."""
    imports, load = CASES[name]
    forward = "" if name == "safetensors_raw" else FORWARD + ";"
    setup = f"R={str(root)!r}; loadspec_fingerprint={fingerprint!r}"
    timed = _python(f"import time, torch; torch.zeros(1, device='cuda'); {imports}; {PRE_IMPORTS.get(name, 'pass')}; {setup}; "
                    f"t=time.perf_counter(); {load}; torch.cuda.synchronize(); load_s=time.perf_counter()-t; "
                    f"model_gib=torch.cuda.memory_allocated()/2**30; {forward} peak_gib=torch.cuda.max_memory_allocated()/2**30; "
                    f"del m; import gc; gc.collect(); torch.cuda.empty_cache(); t=time.perf_counter(); {load}; "
                    "torch.cuda.synchronize(); again_s=time.perf_counter()-t; import json; "
                    "print('RESULT', json.dumps(dict(load_s=load_s, again_s=again_s, model_gib=model_gib, peak_gib=peak_gib)))")
    started = time.time()
    fresh = _python(f"import torch; {imports}; {setup}; {load}; {forward or 'torch.cuda.synchronize();'} import json, time; "
                    "print('RESULT', json.dumps(dict(finished=time.time())))")
    if "finished" in fresh:
        timed["first_forward_s"] = fresh["finished"] - started
    elif "error" in fresh:
        timed.setdefault("error", fresh["error"])
    return timed


def build_artifact(root: Path, name: str = "bench", extra: str = "", fresh: bool = True) -> dict:
    """Build with loadspec in a fresh process; returns build seconds, peak host RSS (the process's own VmHWM:
    getrusage's maximum also counts the benchmark's memory, inherited through fork and exec) and the artifact
    folder. `fresh`: the artifact is built anew, into a cache without it (an earlier one is deleted, and the
    disk left to settle, before the clock starts: deleting 5 GB of files is not part of building); otherwise
    a cache hit is fine."""
    spec = root / f"{name}.toml"
    spec.write_text(f'name = "{name}"\n[model]\nsource = "{root / "bf16"}"\n[load]\nquant = "nf4"\n{extra}')
    cache = str(root / "cache")
    if fresh:  # in a process of its own, so that the timed one plans from nothing
        _python(f"import os; from loadspec.api import plan_spec; from loadspec.store import Store; store=Store({cache!r}); "
                f"store.delete_artifact(plan_spec({str(spec)!r}, store=store).plan.fingerprint); os.sync(); print('RESULT {{}}')")
    code = ("import time, json, torch, transformers, bitsandbytes, loadspec, loadspec.builder; "
            "torch.zeros(1, device='cuda'); from transformers import AutoModelForCausalLM, AutoTokenizer; t=time.perf_counter(); "
            f"b=loadspec.build({str(spec)!r}, cache_dir={cache!r}, progress=False); "
            "peak=[int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')][0]; "
            "print('RESULT', json.dumps(dict(build_s=time.perf_counter()-t, peak_rss_gib=peak/2**20, "
            "artifact=str(b.path))))")
    return _python(code)


def prequantize_with_transformers(root: Path) -> dict:
    """`root`/nf4: the bf16 checkpoint quantized and saved by transformers, with its tokenizer (as users get one)."""
    code = ("import time, json, torch; from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig; t=time.perf_counter(); "
            f"m=AutoModelForCausalLM.from_pretrained({str(root / 'bf16')!r}, quantization_config={NF4}, dtype=torch.bfloat16, device_map='cuda'); "
            f"m.save_pretrained({str(root / 'nf4')!r}); seconds=time.perf_counter()-t; "
            f"AutoTokenizer.from_pretrained({str(root / 'bf16')!r}).save_pretrained({str(root / 'nf4')!r}); "
            "print('RESULT', json.dumps(dict(seconds=seconds)))")
    return _python(code)


def compare_logits(root: Path) -> dict:
    """loadspec's model vs transformers loading the pre-quantized checkpoint: identical logits?"""
    code = ("import json, torch, loadspec; from transformers import AutoModelForCausalLM; "
            f"a,_=loadspec.load('bench', cache_dir={str(root / 'cache')!r}); ids=torch.arange(1,65,device='cuda')[None]; "
            "la=a(ids).logits.float(); del a; torch.cuda.empty_cache(); "
            f"b=AutoModelForCausalLM.from_pretrained({str(root / 'nf4')!r}, device_map='cuda'); lb=b(ids).logits.float(); "
            "print('RESULT', json.dumps(dict(equal=bool(torch.equal(la, lb)), max_abs_diff=float((la-lb).abs().max()))))")
    return _python(code)


def cache_hit(root: Path) -> dict:
    """Seconds for a cache hit: by name (lookup + open) and by spec (plan + lookup), in process after warm-up."""
    code = f"""
import json, time, loadspec
from loadspec.loader import check_files
from loadspec.store import Store
R = {str(root)!r}
def by_name():
    store = Store(R + "/cache")
    fingerprint = store.resolve_name("bench")
    check_files(store.artifact_path(fingerprint), store.manifest(fingerprint))
def by_spec():
    loadspec.build(R + "/bench.toml", cache_dir=R + "/cache", progress=False)
out = {{}}
for probe in (by_name, by_spec):
    probe()
    t = time.perf_counter(); probe(); out[probe.__name__ + "_s"] = time.perf_counter() - t
print("RESULT", json.dumps(out))
"""
    return _python(code)


def unsloth_load(anchor: Path, root: Path) -> dict:
    """Unsloth's `FastLanguageModel.from_pretrained` on the same pre-quantized checkpoint (`root`/nf4), run by the
    anchor script's own case (`../shared/anchors/unsloth_load.py`) in a fresh process: `load_s` after its imports,
    `total_s` from the process's start to loaded (no forward), `peak_gib`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("unsloth_load_anchor", anchor)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_case("unsloth_prequantized", str(root))


def run(shape: str, root: Path, reps: int = 2, unsloth_anchor: Path | None = None) -> dict:
    """The whole benchmark; returns every figure (also printed as a table by `report`). `unsloth_anchor`: also
    time Unsloth's load of the same checkpoint through that anchor script, `reps` times."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    result: dict = {"shape": shape, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    started = time.perf_counter()
    if not (root / "bf16" / "config.json").exists():
        make_checkpoint(shape, root)
    result["make_s"] = time.perf_counter() - started
    result["transformers_quantize_and_save"] = prequantize_with_transformers(root)
    builds = []  # best of reps, as every load case
    for _ in range(reps):
        # a build fsyncs its artifact: first let the disk take what the benchmark wrote before (the bf16 and
        # transformers' checkpoints, 20 GB for 8B), or the build waits behind their write-back (build_artifact
        # syncs again after deleting the previous rep's artifact)
        os.sync()
        builds.append(build_artifact(root))
    result["loadspec_build"] = min(builds, key=lambda b: b.get("build_s", float("inf")))
    result["loadspec_builds_s"] = [b.get("build_s") for b in builds]
    if "loadspec_embedding_on_gpu" in CASES:  # another name on the same artifact (placement is not fingerprinted)
        result["loadspec_build_embedding_on_gpu"] = build_artifact(root, "bench_gpu_embedding", "offload_embedding = false\n", fresh=False)
    fingerprint = Path(result["loadspec_build"].get("artifact", "")).name
    result["cases"] = {name: [time_case(name, root, fingerprint) for _ in range(reps)] for name in CASES}
    if unsloth_anchor:
        result["unsloth"] = [unsloth_load(unsloth_anchor, root) for _ in range(reps)]
    result["cache_hit"] = cache_hit(root)
    result["logits"] = compare_logits(root)
    for tag in ("bf16", "nf4"):
        result[f"{tag}_gib"] = sum(f.stat().st_size for f in (root / tag).glob("*.safetensors")) / 2**30
    return result


def report(result: dict) -> str:
    """A table of the best rep of each case, with ratios against transformers."""
    def fastest(reps, key):
        return min((r[key] for r in reps if key in r), default=float("nan"))

    def best(name, key):
        return fastest(result["cases"].get(name, []), key)

    lines = [f"shape {result['shape']} on {result['gpu']} (torch {result['torch']}); bf16 {result['bf16_gib']:.2f} GiB, nf4 {result['nf4_gib']:.2f} GiB",
             f"{'case':32} {'load call s':>11} {'again s':>8} {'fresh→forward s':>16} {'model GiB':>9} {'of bf16':>8} {'peak GiB':>9} "
             f"{'vs transformers':>16} {'again vs':>9}"]
    base, base_again = best("transformers_prequantized", "load_s"), best("transformers_prequantized", "again_s")
    for name in result["cases"]:
        load_s, again_s = best(name, "load_s"), best(name, "again_s")
        model_gib = best(name, "model_gib")
        lines.append(f"{name:32} {load_s:11.3f} {again_s:8.3f} {best(name, 'first_forward_s'):16.2f} {model_gib:9.2f} "
                     f"{model_gib / result['bf16_gib']:8.1%} {best(name, 'peak_gib'):9.2f} {base / load_s:15.1f}x {base_again / again_s:8.1f}x")
    if "unsloth" in result:
        unsloth = {key: fastest(result["unsloth"], key) for key in ("load_s", "total_s", "peak_gib")}
        lines.append(f"{'unsloth_prequantized (anchor)':32} {unsloth['load_s']:11.3f} {'':8} {unsloth['total_s']:15.2f}* {'':9} {'':8} "
                     f"{unsloth['peak_gib']:9.2f} {base / unsloth['load_s']:15.1f}x")
        ours, ours_fresh = best("loadspec", "load_s"), best("loadspec", "first_forward_s")
        lines.append(f"  * Unsloth's fresh figure stops when the model is loaded, before any forward. loadspec is "
                     f"{unsloth['load_s'] / ours:.1f}x faster in process, {unsloth['total_s'] / ours_fresh:.1f}x fresh")
        lines += [f"ERROR unsloth_prequantized: {r['error']}" for r in result["unsloth"] if "error" in r]
    build = result["loadspec_build"]
    hf_q = best("transformers_quantize_on_load", "load_s")
    lines.append(f"loadspec build (quantize + write), best of {len(result.get('loadspec_builds_s', [1]))}: {build.get('build_s', float('nan')):.2f} s = "
                 f"{build.get('build_s', float('nan')) / hf_q:.2f}x transformers quantize-on-load; peak host RSS {build.get('peak_rss_gib', float('nan')):.2f} GiB")
    hit = result["cache_hit"]
    lines.append(f"cache hit: by name {hit.get('by_name_s', float('nan')) * 1000:.1f} ms, by spec {hit.get('by_spec_s', float('nan')) * 1000:.1f} ms")
    lines.append(f"logits equal to transformers pre-quantized: {result['logits']}")
    errors = {name: r['error'] for name, rs in result["cases"].items() for r in rs if "error" in r}
    lines += [f"ERROR {name}: {text}" for name, text in errors.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--root", default="/tmp/loadspec-bench", type=Path)
    parser.add_argument("--reps", default=2, type=int)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="only these load cases (default: all)")
    parser.add_argument("--unsloth-anchor", type=Path, metavar="unsloth_load.py",
                        help="also time Unsloth's load of the same checkpoint with this anchor script (needs unsloth installed)")
    args = parser.parse_args(argv)
    if args.unsloth_anchor:
        import importlib.util

        if not args.unsloth_anchor.is_file():
            parser.error(f"--unsloth-anchor {args.unsloth_anchor}: no such file (the anchors are in ../shared/anchors/)")
        if importlib.util.find_spec("unsloth") is None:
            parser.error("--unsloth-anchor needs unsloth installed in this Python (pip install unsloth)")
    for name in set(CASES) - set(args.cases or CASES):
        del CASES[name]
    result = run(args.shape, args.root / args.shape, args.reps, args.unsloth_anchor)
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
