"""The `loadspec` command. Parses arguments, calls the API, prints; no business logic."""
from __future__ import annotations

import errno
import functools
import sys
import time

import click

from .errors import LoadspecError

CACHE_HELP = "cache directory (default: $LOADSPEC_CACHE, else ~/.cache/loadspec)"
TARGET_HELP = "plan for this GPU instead of the spec's [target]: auto, cpu, h200, h100, a100, a10g, l40s, l4, t4, v100, …"


def friendly(command):
    """Turn user-facing errors into a message and an exit code, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LoadspecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # a full or read-only disk the store did not already explain
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"error: {exc.strerror}{where}. Free space or fix permissions there, or pick another cache "
                       "with --cache-dir.", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was published; 'loadspec gc' clears leftovers.", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="loadspec")
def main():
    """Compile how a model is loaded for fine-tuning into a cached, pre-quantized artifact.

    \b
    Typical use:
      loadspec plan  specs/smollm2-135m-nf4.toml          # what would be decided, and why
      loadspec build specs/smollm2-135m-nf4.toml          # build once (later: a cache hit)
      loadspec load  smollm2-135m-nf4 --prompt "Hi"       # load by name and generate
    In Python:  model, tokenizer = loadspec.load("smollm2-135m-nf4")
    """


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--target", help=TARGET_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the plan as canonical JSON")
@friendly
def plan(spec, target, as_json):
    """Show every decision the SPEC leads to, and why; reads no weights."""
    from .api import plan_spec

    planned = plan_spec(spec, target=target).plan
    click.echo(planned.to_json() if as_json else planned.explain())


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--target", help=TARGET_HELP)
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--force", is_flag=True, help="rebuild even if the artifact is already cached")
@click.option("-q", "--quiet", is_flag=True, help="no decisions, no progress bar")
@friendly
def build(spec, target, cache_dir, force, quiet):
    """Plan SPEC and build its artifact once; a second build is a cache hit."""
    from .api import build as build_spec

    result = build_spec(spec, cache_dir=cache_dir, target=target, force=force, progress=not quiet)
    if not quiet:
        click.echo(result.plan.explain())
    size = sum(p.stat().st_size for p in result.path.iterdir() if p.is_file())
    verb = "cache hit: already built, no weights read" if result.cached else "built"
    click.echo(f"{verb}: {result.plan.name} -> {result.path} ({size / 2**20:.1f} MiB, {result.seconds:.1f} s)")


@main.command()
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--prompt", help="generate a reply to this prompt (chat template applied when the model has one)")
@click.option("--max-new-tokens", default=64, show_default=True, help="length limit of the reply")
@click.option("--device", help="load onto this device instead of the plan's (e.g. cpu, cuda:0)")
@click.option("--verify", is_flag=True, help="re-hash every file first (default: only files changed since last hashed)")
@friendly
def load(name, cache_dir, prompt, max_new_tokens, device, verify):
    """Load NAME (or a spec file) from the cache; run one forward pass, or answer --prompt."""
    import torch

    from .api import load as load_model

    started = time.perf_counter()
    model, tokenizer = load_model(name, cache_dir=cache_dir, device=device, verify=verify or None)
    click.echo(f"loaded {name} in {time.perf_counter() - started:.2f} s", err=True)
    device_of = next(model.parameters()).device
    if prompt is None:
        ids = tokenizer("Hello", return_tensors="pt").input_ids.to(device_of)
        with torch.no_grad():
            logits = model(ids).logits
        click.echo(f"forward ok: logits {tuple(logits.shape)}, finite={bool(torch.isfinite(logits).all())}")
        return
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    ids = ids.to(device_of)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    click.echo(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())


@main.command(name="ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@friendly
def list_artifacts(cache_dir):
    """List named artifacts: size, target, when built and last used."""
    from .store import Store

    entries = Store(cache_dir).entries()
    if not entries:
        click.echo("no artifacts yet: build one with 'loadspec build SPEC.toml'")
        return
    click.echo(f"{'NAME':32} {'ARTIFACT':24} {'SIZE':>10} {'TARGET':8} {'BUILT':20} LAST USED")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "never"
        size = f"{e.size / 2**20:.1f} MiB" if e.present else "MISSING"
        click.echo(f"{e.name:32} {e.fingerprint:24} {size:>10} {e.target:8} {e.created:20} {used}")


@main.command()
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@friendly
def inspect(name, cache_dir):
    """Show the plan an artifact was built from and its files."""
    from .api import name_settings
    from .plan import LoadPlan
    from .store import Store

    store = Store(cache_dir)
    fingerprint = store.resolve_name(name)
    manifest = store.manifest(fingerprint)
    folder = store.artifact_path(fingerprint)
    plan = LoadPlan.from_json((folder / "plan.json").read_text())
    click.echo(plan.explain())
    placement = name_settings(store, name, plan)["device_map"]
    if placement != plan.device_map:  # the artifact is shared with a name built for another placement
        click.echo(f"\n{name} loads with its own device map: {placement}")
    click.echo(f"\nartifact {folder}\n  built {manifest['created']} with " +
               ", ".join(f"{k} {v}" for k, v in sorted(manifest["versions"].items())))
    for file, entry in sorted(manifest["files"].items()):
        click.echo(f"  {file:45} {entry['size']:>14,} bytes  sha256 {entry['sha256'][:16]}…")


@main.command()
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@friendly
def verify(name, cache_dir):
    """Re-hash every file of NAME's artifact against its manifest (exit 1 if anything is wrong)."""
    from .store import Store

    store = Store(cache_dir)
    problems = store.verify(store.resolve_name(name))
    if problems:
        click.echo(f"{name}: {len(problems)} problem(s):\n  " + "\n  ".join(problems), err=True)
        click.echo("Recover with 'loadspec build SPEC --force' or 'loadspec pull NAME'.", err=True)
        sys.exit(1)
    click.echo(f"{name}: every file matches its manifest")


def _report(removals, dry_run):
    verb = "would remove" if dry_run else "removed"
    for r in removals:
        click.echo(f"{verb} {r.path} ({r.size / 2**20:.1f} MiB): {r.why}")
    total = sum(r.size for r in removals)
    click.echo(f"{verb} {len(removals)} item(s), {total / 2**20:.1f} MiB" if removals else "nothing to remove")


@main.command()
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
@friendly
def rm(name, cache_dir, dry_run):
    """Remove NAME (and its artifact, unless another name shares it)."""
    from .store import Store

    _report(Store(cache_dir).remove_name(name, dry_run=dry_run), dry_run)


@main.command()
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--dry-run", is_flag=True, help="only say what would be removed")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="DAYS", help="also evict artifacts not used for DAYS days")
@click.option("--max-size", metavar="SIZE", help="then evict least recently used artifacts until they fit in SIZE (e.g. 50GiB)")
@friendly
def gc(cache_dir, dry_run, older_than, max_size):
    """Remove leftovers of interrupted builds and artifacts no name points to; evict by age or size budget."""
    import re

    from .errors import UsageError
    from .store import Store

    budget = None
    if max_size is not None:
        units = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30, "tb": 10**12, "tib": 2**40}
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", max_size)
        if not match or match[2].lower() not in units:
            raise UsageError(f"--max-size must look like 50GiB, 500MB or a number of bytes, got {max_size!r}")
        budget = int(float(match[1]) * units[match[2].lower()])
    _report(Store(cache_dir).gc(dry_run=dry_run, older_than=older_than, max_size=budget), dry_run)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args):
    """Time loadspec against transformers on this GPU (--shape 1b|8b, --json OUT; see loadspec.bench)."""
    from .bench import main as bench_main

    sys.exit(bench_main(list(args)))


REMOTE_HELP = "shared storage: a folder, file:///path, s3://bucket/prefix or hf://org/repo (default: $LOADSPEC_REMOTE)"


def transfer_command(function):
    """The arguments `push` and `pull` share: NAME, --remote, --cache-dir, --workers, --quiet."""
    for option in reversed((
        click.argument("name"),
        click.option("--remote", help=REMOTE_HELP),
        click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP),
        click.option("--workers", default=8, show_default=True, type=click.IntRange(min=1), help="parallel transfers"),
        click.option("-q", "--quiet", is_flag=True, help="no progress bar"),
    )):
        function = option(function)
    return main.command()(friendly(function))


def _transfer_line(verb, t):
    if t.cached:
        return f"{t.name}: {t.url} already has artifact {t.fingerprint}; nothing {verb}"
    kept = f", {t.kept} already there" if t.kept else ""
    return f"{verb} {t.name} ({t.fingerprint}): {t.copied} file(s), {t.bytes / 2**20:.1f} MiB{kept}, {t.seconds:.1f} s"


@transfer_command
def push(name, remote, cache_dir, workers, quiet):
    """Upload NAME's artifact to a remote (files, then manifest, then the name)."""
    from .api import push as push_artifact

    click.echo(_transfer_line("pushed", push_artifact(name, remote=remote, cache_dir=cache_dir, workers=workers, progress=not quiet)))


@transfer_command
def pull(name, remote, cache_dir, workers, quiet):
    """Fetch NAME's artifact from a remote, checking every file's sha256; an interrupted pull resumes."""
    from .api import pull as pull_artifact

    result = pull_artifact(name, remote=remote, cache_dir=cache_dir, workers=workers, progress=not quiet)
    click.echo(f"{name}: already in the cache ({result.fingerprint})" if result.cached else _transfer_line("pulled", result))


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--target", help=TARGET_HELP)
@click.option("--remote", help=REMOTE_HELP)
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=1), help="parallel transfers")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
@friendly
def prewarm(specs, target, remote, cache_dir, workers, quiet):
    """Build each SPEC for --target here, then push it, so offline nodes can 'loadspec.load(NAME)'."""
    from .api import prewarm as prewarm_specs

    for built, sent in prewarm_specs(specs, remote=remote, target=target, cache_dir=cache_dir, workers=workers, progress=not quiet):
        click.echo(f"{'cache hit' if built.cached else 'built'}: {built.plan.name} -> {built.plan.fingerprint}; "
                   + _transfer_line("pushed", sent))


if __name__ == "__main__":
    main()
