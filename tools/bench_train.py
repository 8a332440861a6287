"""One QLoRA training step of the 1B Llama shape on the model `loadspec.load` returns, beside the anchors.

  python tools/bench_train.py prep ROOT                 specs + artifact for ROOT/bf16 (made by train_step.py prep)
  python tools/bench_train.py measure ROOT SEQ [CASE]   fresh process per case: median step, peak GPU memory
  python tools/bench_train.py first-step ROOT           fresh process to the end of the first step, with and
                                                        without the compiled kernels shipped in the artifact
  python tools/bench_train.py profile ROOT SEQ CASE     where one step's GPU time goes (torch.profiler, top ops)
  python tools/bench_train.py pyprofile ROOT SEQ CASE   which Python functions take one step's CPU time (cProfile)
The step is the anchor's own loop (`train_step.py`'s LOOP: batch 1, AdamW on the LoRA parameters, median of
steps 3-12, peak after step 2), imported from $ANCHORS (default ../shared/anchors), so both sides run the
same code. LoRA as the anchor's: r=16, alpha=16, dropout 0, q/k/v/o/gate/up/down; NF4 with double quant.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadspec.bench import _python as run_python  # one fresh process, its RESULT line

ANCHORS = os.environ.get("ANCHORS", str(Path(__file__).resolve().parents[1].parent / "shared" / "anchors"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # name -> (gradient_checkpointing, fused kernels)
    "loadspec_gc_false": (False, False),
    "loadspec_gc_true": (True, False),
    "loadspec_gc_offload": ("offload", False),
    "loadspec_gc_false_kernels": (False, True),
    "loadspec_gc_true_kernels": (True, True),
    "loadspec_gc_offload_kernels": ("offload", True),
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _spec(root: Path, name: str, checkpointing, kernels: bool) -> Path:
    gc = f'"{checkpointing}"' if isinstance(checkpointing, str) else str(checkpointing).lower()
    native = json.loads((root / "bf16" / "config.json").read_text())["max_position_embeddings"]  # no RoPE change
    text = (f'name = "{name}"\n[model]\nsource = "{root / "bf16"}"\n[target]\ngpu = "auto"\n'
            f'[load]\nquant = "nf4"\nmax_seq_length = {native}\n'
            f'[lora]\nr = 16\nalpha = 16\ndropout = 0.0\nbias = "none"\ntarget_modules = {json.dumps(TARGETS)}\nrandom_state = 3407\n'
            f'[train]\ngradient_checkpointing = {gc}\nkernels = {str(kernels).lower()}\n')
    path = root / "specs" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def prep(root: Path) -> None:
    """Build once (the kernels spec first, so the artifact ships compiled kernels); every case shares the artifact."""
    import loadspec

    ordered = sorted(CASES, key=lambda case: not CASES[case][1])
    for case in ordered:
        start = time.perf_counter()
        built = loadspec.build(_spec(root, case, *CASES[case]), cache_dir=root / "cache", progress=False)
        print(json.dumps({"case": case, "build_s": round(time.perf_counter() - start, 2), "fingerprint": built.plan.fingerprint,
                          "cached": built.cached}), flush=True)


def _loop() -> str:
    sys.path.insert(0, ANCHORS)
    from train_step import LOOP  # the anchor's measurement loop, verbatim

    return LOOP


def measure(root: Path, seq: int, cases: list[str]) -> None:
    loop = _loop()
    for case in cases or list(CASES):
        code = (f"import loadspec\nm, tok = loadspec.load({case!r}, cache_dir={str(root / 'cache')!r})\nSEQ = {seq}\n"
                + loop)
        start = time.perf_counter()
        result = run_python(code, env=ENV, timeout=500)
        print(json.dumps({"case": case, "seq": seq, **result, "process_s": round(time.perf_counter() - start, 2)}), flush=True)


FIRST_STEP = """
import time; started = time.time(); marks = [time.perf_counter()]
import json, logging, loadspec, torch
load_phases = []  # loadspec's own phase timings (its logger at DEBUG)
handler = logging.Handler(); handler.emit = lambda record: load_phases.append(record.getMessage())
logging.getLogger("loadspec").addHandler(handler); logging.getLogger("loadspec").setLevel(logging.DEBUG)
marks.append(time.perf_counter())
m, tok = loadspec.load({name!r}, cache_dir={cache!r})
m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (1, {seq}), device='cuda')
torch.cuda.synchronize(); marks.append(time.perf_counter())
loss = m(input_ids=ids, labels=ids).loss; torch.cuda.synchronize(); marks.append(time.perf_counter())
loss.backward(); torch.cuda.synchronize(); marks.append(time.perf_counter())
opt.step(); torch.cuda.synchronize(); marks.append(time.perf_counter()); finished = time.time()
steps = dict(zip(("import", "load", "forward", "backward", "optimizer"), [round(b - a, 2) for a, b in zip(marks, marks[1:])]))
print("PHASES", json.dumps(dict(steps, load_phases=load_phases, started=started, finished=finished)))
"""


def first_step(root: Path, seq: int = 4096, case: str = "loadspec_gc_offload_kernels") -> None:
    """Wall time from starting a fresh process to the end of its first optimizer step, against an empty Triton
    cache: once restoring the artifact's compiled kernels, once compiling them. Also how much of it the
    interpreter's own start took (`python_start_s`) and, outside it, the process's exit after the step (`exit_s`)."""
    code = FIRST_STEP.format(name=case, cache=str(root / "cache"), seq=seq)
    for label, restore in (("warm_pycache", "1"), ("with_shipped_kernels", "1"), ("without_shipped_kernels", "0")):
        with tempfile.TemporaryDirectory() as triton_dir:
            env = {**os.environ, **ENV, "TRITON_CACHE_DIR": triton_dir, "LOADSPEC_KERNEL_CACHE": restore}
            start = time.time()
            run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=500, env=env)
            exited = time.time()
        out = {"case": label, "seq": seq}
        phases = [line for line in run.stdout.splitlines() if line.startswith("PHASES ")]
        if phases:
            out["phases_s"] = json.loads(phases[0][len("PHASES "):])
            started, finished = out["phases_s"].pop("started"), out["phases_s"].pop("finished")
            out.update(process_to_first_step_s=round(finished - start, 2), python_start_s=round(started - start, 2),
                       exit_s=round(exited - finished, 2))
        if run.returncode:
            out["error"] = run.stderr[-1500:]
        print(json.dumps(out), flush=True)


PROFILE = """
import loadspec, torch, time
from torch.profiler import ProfilerActivity, profile
m, tok = loadspec.load({name!r}, cache_dir={cache!r})
m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (1, {seq}), device='cuda')
def step():
    m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize(); wall = time.perf_counter() - t
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step(); torch.cuda.synchronize()
events = prof.key_averages()
gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
print(f"step wall {{wall:.3f}} s, GPU kernels {{gpu:.3f}} s ({{gpu / wall:.0%}} busy), {{sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)}} kernels")
print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
"""


PYPROFILE = PROFILE.split("with profile(")[0] + """import cProfile, pstats
prof = cProfile.Profile(); prof.enable(); step(); torch.cuda.synchronize(); prof.disable()
print(f"step wall {{wall:.3f}} s (Python functions of one step below)")
pstats.Stats(prof).sort_stats("tottime").print_stats(30)
pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
"""


def profile_step(root: Path, seq: int, case: str, python: bool = False) -> None:
    """One step of `case` under torch.profiler (wall vs GPU kernel time, the ops that take GPU and CPU time),
    or with `python` under cProfile (the Python functions that take the CPU time)."""
    code = (PYPROFILE if python else PROFILE).format(name=case, cache=str(root / "cache"), seq=seq)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=500, env={**os.environ, **ENV})
    print(run.stdout if not run.returncode else run.stderr[-3000:], flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    phase, root = sys.argv[1], Path(sys.argv[2])
    if phase == "prep":
        prep(root)
    elif phase == "measure":
        measure(root, int(sys.argv[3]), sys.argv[4:])
    elif phase == "first-step":
        first_step(root)
    elif phase in ("profile", "pyprofile"):
        profile_step(root, int(sys.argv[3]), sys.argv[4], python=phase == "pyprofile")
    else:
        sys.exit(__doc__)
