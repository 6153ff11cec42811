"""The bundled Python-code model, end to end in one command: Python sources → ~8k BPE tokenizer → token corpus
→ time-budgeted training → GGUF → held-out evaluation.

    python -m ternary.training.build_code_model --preset code-ternary --device cuda --max-minutes 10 \
        --work runs/code --reference
    python -m ternary.training.build_code_model --preset code-cpu --no-site-packages --max-minutes 25 \
        --work runs/code-cpu --install        # the CPU fallback shipped in ternary/models/

Sources are the `.py` files of the CPython standard library (`sysconfig.get_paths()["stdlib"]`; every machine
has it) plus, unless `--no-site-packages`, the installed site-packages. Test directories (`test`, `tests`,
`idle_test`) are left out unless `--include-tests`: CPython's own test suite is about 60% of the stdlib's
bytes, mostly assertion boilerplate, and it carries deliberately broken fixtures (`badsyntax_*.py`, bad
encodings) that would teach the model syntax errors. Files over `--max-file-kb` (generated tables such as
`pydoc_data/topics.py`) are left out too. The chosen files are copied into WORK/sources so the corpus is a
snapshot; `corpus.build_corpus` dedups them by hash and splits train/held-out by file hash; the held-out
files are also copied to WORK/heldout for `ternary-eval --ppl/--code`. The tokenizer is learned from train
files only.

Training runs to a wall-clock budget (`--max-minutes`): after a short calibration the schedule's length is set
to the steps that fit (so warmup-stable-decay still decays), re-planned (only ever shortened) after each
checkpoint, and when the time is up the run checkpoints and exports whatever it has. Every stage is skipped
when its output exists, so re-running the same command resumes. `--reference` also trains the same recipe with
`model.ternary = false` for the same number of steps (a float model cannot be written as a ternary GGUF; it is
evaluated with the trainer's own forward pass). The numbers land in WORK/eval.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np

TEST_DIRS = frozenset({"test", "tests", "idle_test"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
HELDOUT_FRACTION = 0.05
CALIBRATION_STEPS = 10
WARM_STEPS = 3
CHUNK_SECONDS = 60.0
# The model card's code-completion settings (eval.json keys): greedy with llama.cpp's repetition penalty 1.3
# (small models loop under plain greedy), and plain greedy for comparison.
CODE_REPEAT_PENALTIES = {"code_completion": 1.3, "code_completion_plain_greedy": 1.0}
SAFETY = 0.95  # plan for this share of the remaining time (checkpoint writes and logging take the rest)

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- sources


def source_roots(site_packages: bool) -> list[tuple[str, Path]]:
    """(label, folder) of the Python sources this interpreter has: the stdlib, then site-packages."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    if site_packages:
        seen = {roots[0][1].resolve()}
        for key in ("purelib", "platlib"):
            p = Path(paths[key])
            if p.is_dir() and p.resolve() not in seen:
                seen.add(p.resolve())
                roots.append((f"site-packages-{len(roots)}" if len(roots) > 1 else "site-packages", p))
    return roots


def iter_python_files(root: Path, include_tests: bool, max_file_bytes: int) -> Iterator[Path]:
    """`.py` files under `root` in sorted order, skipping nested site-packages, caches, (test dirs) and big
    generated files."""
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(".py") and path.is_file() and path.stat().st_size <= max_file_bytes:
                yield path


def collect_sources(
    dest: Path, site_packages: bool, include_tests: bool, max_file_bytes: int, log: Log = _stderr
) -> dict[str, Any]:
    """Copy the chosen source files into dest/<label>/<relative path>; returns (and writes) a manifest."""
    manifest_path = dest / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    roots = []
    for label, root in source_roots(site_packages):
        n_files = n_bytes = 0
        for path in iter_python_files(root, include_tests, max_file_bytes):
            target = tmp / label / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(path, target)
            except OSError as exc:
                log(f"sources: skipping {path}: {exc.strerror}")
                continue
            n_files += 1
            n_bytes += target.stat().st_size
        roots.append({"label": label, "path": str(root), "files": n_files, "bytes": n_bytes})
        log(f"sources: {label} {root}: {n_files} files, {n_bytes / 1e6:.1f} MB")
    manifest = {
        "roots": roots,
        "include_tests": include_tests,
        "max_file_bytes": max_file_bytes,
        "python": sys.version.split()[0],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return manifest


def split_files(src: Path, heldout_fraction: float) -> dict[str, list[Path]]:
    """The distinct files of `src` by split, as `corpus.build_corpus` assigns them (by content hash)."""
    from ternary.training.corpus import scan_sources, split_of

    out: dict[str, list[Path]] = {"train": [], "heldout": []}
    for doc in scan_sources([src]).docs:
        out[split_of(doc.digest, heldout_fraction)].append(doc.path)
    return out


def copy_heldout(files: list[Path], src: Path, dest: Path) -> None:
    """Held-out files into `dest` (same relative paths) for `ternary-eval --ppl DIR --code`."""
    if (dest / ".complete").is_file():
        return
    shutil.rmtree(dest, ignore_errors=True)
    for f in files:
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    (dest / ".complete").write_text(f"{len(files)} files\n")


def learn_tokenizer(files: list[Path], vocab_size: int, sample_bytes: int, out: Path, log: Log) -> None:
    """A byte-level BPE (llama-bpe pre-tokenizer, BOS added) learned from up to `sample_bytes` of train files
    (they come in hash order, a fixed pseudo-random sample)."""
    from ternary.training.bpe_trainer import learn_bpe, save_tokenizer

    if out.is_file():
        return

    def texts() -> Iterator[str]:
        used = 0
        for f in files:
            if used >= sample_bytes:
                return
            raw = f.read_bytes()
            used += len(raw)
            yield raw.decode("utf-8")

    md = learn_bpe(texts(), vocab_size, pre="llama-bpe", progress=log)
    save_tokenizer(md, out)


# ---------------------------------------------------------------------------------------------- training


def _set_steps(trainer: Any, steps: int) -> None:
    s = trainer.cfg.schedule
    steps = max(steps, trainer.step, 1)
    sched = dataclasses.replace(s, steps=steps, warmup_steps=min(s.warmup_steps, steps))
    trainer.cfg = dataclasses.replace(trainer.cfg, schedule=sched)


def train_to_budget(trainer: Any, max_seconds: float | None, fixed_steps: bool, log: Log) -> dict[str, Any]:
    """Run `trainer` until its schedule ends or `max_seconds` pass, checkpointing at least once a minute.

    Unless `fixed_steps`, the schedule's length is planned from the measured step time so that it ends (and
    its learning rate decays) inside the budget, and re-planned after every chunk from the latest step time:
    longer or shorter while the schedule is still before its decay stage (warmup-stable-decay makes that
    harmless), only shorter once the decay has begun.
    """
    from ternary.training.schedule import decay_start

    t0 = time.perf_counter()
    start_step = trainer.step

    def elapsed() -> float:
        return time.perf_counter() - t0

    def plan(sec_per_step: float) -> None:
        if max_seconds is None or fixed_steps:
            return
        fits = trainer.step + int(SAFETY * (max_seconds - elapsed()) / sec_per_step)
        current = trainer.cfg.schedule.steps
        if fits < current or (fits > current and trainer.step < decay_start(trainer.cfg.schedule)):
            log(f"budget: {sec_per_step:.3f} s/step: schedule.steps {current} -> {fits}")
            _set_steps(trainer, fits)

    sec_per_step = None
    if max_seconds is not None and trainer.step < trainer.cfg.schedule.steps:
        trainer.fit(steps=min(trainer.step + WARM_STEPS, trainer.cfg.schedule.steps))  # JIT/compile warm-up
        t1, s1 = time.perf_counter(), trainer.step
        trainer.fit(steps=min(trainer.step + CALIBRATION_STEPS, trainer.cfg.schedule.steps))
        sec_per_step = (time.perf_counter() - t1) / max(trainer.step - s1, 1)
        plan(sec_per_step)
    stopped_early = False
    while trainer.step < trainer.cfg.schedule.steps:
        if max_seconds is not None and elapsed() >= max_seconds:
            stopped_early = True
            break
        chunk = trainer.cfg.run.ckpt_every
        if sec_per_step:
            chunk = max(1, min(chunk, int(CHUNK_SECONDS / sec_per_step)))
        t1, s1 = time.perf_counter(), trainer.step
        trainer.fit(steps=min(trainer.step + chunk, trainer.cfg.schedule.steps))
        sec_per_step = (time.perf_counter() - t1) / max(trainer.step - s1, 1)
        plan(sec_per_step)
    if stopped_early:
        log(f"budget: {max_seconds / 60:.1f} min used up at step {trainer.step}; saving what there is")
        trainer.save()
    stopped_early = stopped_early or (max_seconds is not None and elapsed() >= max_seconds)
    return {
        "steps": trainer.step,
        "steps_this_run": trainer.step - start_step,
        "planned_steps": trainer.cfg.schedule.steps,
        "tokens_seen": trainer.tokens_seen,
        "seconds": round(elapsed(), 1),
        "stopped_early": stopped_early,
    }


def heldout_bits_per_byte(trainer: Any, corpus_dir: Path, max_tokens: int, batch_size: int) -> dict[str, Any]:
    """Mean NLL over every position of the held-out split's seq_len windows, with the trainer's own forward
    pass (so a float model is measured the same way as a ternary one), as nats/token and bits per byte."""
    from ternary.engine.evaluate import token_byte_lengths
    from ternary.formats.tokenizer import Tokenizer
    from ternary.training.corpus import DataLoader

    seq_len = trainer.cfg.data.seq_len
    n_windows = max(1, max_tokens // seq_len)
    loader = DataLoader(corpus_dir, min(batch_size, n_windows), seq_len, split="heldout", shuffle=False)
    byte_len = token_byte_lengths(Tokenizer.from_metadata(trainer.tokenizer_metadata))
    xp = trainer.xp
    nll = 0.0
    n_tok = n_bytes = 0
    for _ in range(min(len(loader), max(1, n_windows // loader.batch_size))):
        batch = next(loader)
        ids, targets = batch[:, :-1], batch[:, 1:].reshape(-1)
        logits, _ = trainer.model.forward(trainer.params, ids)
        ce, _, _ = xp.cross_entropy(logits, xp.asarray(targets, np.int64), 0.0, 0.0)
        nll += ce
        n_tok += targets.size
        n_bytes += int(byte_len[targets].sum())
    return {
        "tokens": n_tok,
        "bytes": n_bytes,
        "nll_per_token": nll / n_tok,
        "ppl": math.exp(nll / n_tok),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
    }


def make_trainer(cfg: Any, device: str, log: Log, keep_plan: bool = True) -> Any:
    """A Trainer resumed from the newest checkpoint in run.out_dir, if any, with (`keep_plan`) that
    checkpoint's schedule length: the plan made by the run that wrote it."""
    from ternary.training.checkpoint import load_checkpoint
    from ternary.training.trainer import Trainer

    trainer = Trainer(cfg, device=device, log=log)
    path = trainer.resume()
    if path is not None and keep_plan:
        _, state = load_checkpoint(path)
        _set_steps(trainer, int(state["config"]["schedule"]["steps"]))
    return trainer


# -------------------------------------------------------------------------------------------------- main


def build(
    preset: str,
    work: Path,
    device: str = "cpu",
    max_minutes: float | None = None,
    steps: int | None = None,
    site_packages: bool = True,
    include_tests: bool = False,
    max_file_kb: int = 256,
    vocab_size: int = 8192,
    bpe_sample_mb: float = 40.0,
    reference: bool = False,
    overrides: dict[str, Any] | None = None,
    embed_type: str = "Q8_0",
    eval_max_tokens: int = 1 << 20,
    engine_eval_tokens: int = 1 << 17,
    code_samples: int = 100,
    threads: int | None = None,
    install: bool = False,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Every stage in order (each skipped when its output exists); returns what WORK/eval.json holds."""
    from ternary.training import corpus
    from ternary.training.checkpoint import list_checkpoints
    from ternary.training.config import load_config, load_preset
    from ternary.training.export import export_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    manifest = collect_sources(work / "sources", site_packages, include_tests, max_file_kb * 1024, log)
    splits = split_files(work / "sources", HELDOUT_FRACTION)
    copy_heldout(splits["heldout"], work / "sources", work / "heldout")
    log(f"split: {len(splits['train'])} train files, {len(splits['heldout'])} held-out files")
    tok_path = work / "tokenizer.json"
    learn_tokenizer(splits["train"], vocab_size, int(bpe_sample_mb * 1e6), tok_path, log)
    corpus_dir = work / "corpus"
    if not (corpus_dir / corpus.INDEX_NAME).is_file():
        corpus.build_corpus(
            [work / "sources"], corpus_dir, tok_path, HELDOUT_FRACTION, workers=os.cpu_count() or 1
        )

    cfg = load_config(preset) if preset.endswith((".toml", ".json")) else load_preset(preset)
    name = Path(preset).stem
    extra = {"data.path": str(corpus_dir), "run.out_dir": str(work / f"train-{name}")}
    if steps:
        extra["schedule.steps"] = steps
        extra["schedule.warmup_steps"] = min(cfg.schedule.warmup_steps, steps)
    cfg = cfg.replace({**extra, **(overrides or {})})
    budget = None if max_minutes is None else max_minutes * 60.0
    results: dict[str, Any] = {"preset": name, "device": device, "sources": manifest}

    eval_path = work / "eval.json"

    def record(key: str, value: Any) -> None:
        results[key] = value
        eval_path.write_text(json.dumps(results, indent=1))

    trainer = make_trainer(cfg, device, log, keep_plan=not steps)
    record("train", train_to_budget(trainer, budget, fixed_steps=bool(steps), log=log))
    record("model", dataclasses.asdict(trainer.cfg.model))
    record("n_params", int(sum(int(np.prod(p.shape)) for p in trainer.params.values())))
    record("heldout_trainer", heldout_bits_per_byte(trainer, corpus_dir, eval_max_tokens, 8))
    log(f"held-out (trainer forward): {results['heldout_trainer']}")
    gguf = work / f"{name}.gguf"
    export_checkpoint(list_checkpoints(trainer.out_dir)[-1][1], gguf, "TQ2_0", embed_type)
    record("gguf", {"path": str(gguf), "bytes": gguf.stat().st_size})
    if install:
        dest = default_install_path()
        shutil.copyfile(gguf, dest)
        log(f"installed {gguf} -> {dest}")
    del trainer

    if reference:
        ref_cfg = cfg.replace({"model.ternary": False, "run.out_dir": str(work / f"train-{name}-float"),
                               "schedule.steps": results["train"]["steps"]})  # fmt: skip
        ref = make_trainer(ref_cfg, device, log, keep_plan=False)
        record("reference_train", train_to_budget(ref, budget, fixed_steps=True, log=log))
        record("reference_heldout_trainer", heldout_bits_per_byte(ref, corpus_dir, eval_max_tokens, 8))
        log(f"held-out float reference (trainer forward): {results['reference_heldout_trainer']}")
        del ref

    for key, value in evaluate_gguf(
        gguf, work / "heldout", engine_eval_tokens, code_samples, threads, log
    ).items():
        record(key, value)
    record("total_seconds", round(time.perf_counter() - t_start, 1))
    log(f"wrote {eval_path}")
    return results


def evaluate_gguf(
    gguf: Path, heldout: Path, max_tokens: int, code_samples: int, threads: int | None, log: Log
) -> dict[str, Any]:
    """`ternary-eval`'s numbers for the exported file on the CPU engine: llama-perplexity-style PPL and bits
    per byte over up to `max_tokens` held-out tokens, and the share of `code_samples` held-out function
    headers whose greedy completion parses."""
    from ternary.engine import evaluate

    engine = evaluate.open_engine(gguf, threads=threads)
    out: dict[str, Any] = {}
    if max_tokens > 0:
        text = evaluate.read_texts(heldout)
        ppl = evaluate.perplexity(engine, text, max_chunks=max(2, max_tokens // engine.n_ctx))
        log(f"engine perplexity: {ppl.line()}")
        out["engine_perplexity"] = dataclasses.asdict(ppl)
    if code_samples > 0:
        selection = evaluate.select_function_prompts(
            heldout, limit=code_samples, fits=evaluate.leaves_room(engine, evaluate.DEFAULT_CODE_MIN_ROOM)
        )
        for key, penalty in CODE_REPEAT_PENALTIES.items():
            decoding = evaluate.CodeDecoding(max_tokens=0, repeat_penalty=penalty)
            code = evaluate.code_completion(engine, selection.prompts, decoding)
            code.selection, code.min_room = selection, evaluate.DEFAULT_CODE_MIN_ROOM
            log(code.line())
            out[key] = {**code.summary(), "samples": code.samples}
    return out


def default_install_path() -> Path:
    from ternary.models import BUNDLED_NAME, models_dir

    return models_dir() / BUNDLED_NAME


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--preset", default="code-ternary", show_default=True, help="preset name or .toml/.json")
@click.option("--work", type=click.Path(file_okay=False), default="runs/code", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-minutes", type=float, help="wall-clock training budget per model (the schedule fits it)")
@click.option("--steps", type=int, help="a fixed schedule length instead of planning it from the budget")
@click.option("--site-packages/--no-site-packages", default=True, show_default=True)
@click.option("--include-tests", is_flag=True, help="keep test/, tests/, idle_test/ folders")
@click.option("--max-file-kb", default=256, show_default=True, help="skip larger (generated) files")
@click.option("--vocab-size", default=8192, show_default=True)
@click.option("--bpe-sample-mb", default=40.0, show_default=True, help="train text the BPE learner reads")
@click.option("--reference", is_flag=True, help="also train the float (model.ternary=false) twin")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a config key")
@click.option("--embed-type", type=click.Choice(["F16", "Q8_0", "Q6_K"]), default="Q8_0", show_default=True)
@click.option("--eval-max-tokens", default=1 << 20, show_default=True, help="held-out tokens, trainer")
@click.option("--engine-eval-tokens", default=1 << 17, show_default=True, help="held-out tokens, engine")
@click.option("--code-samples", default=100, show_default=True, help="held-out functions to complete")
@click.option("-t", "--threads", type=int, help="CPU threads for the engine evaluation")
@click.option("--install", is_flag=True, help="copy the GGUF to ternary/models/ (the bundled default)")
def main(preset: str, work: str, overrides: tuple[str, ...], **options: Any) -> None:
    from ternary.engine.evaluate import EvalError
    from ternary.training.checkpoint import CheckpointError
    from ternary.training.cli import _parse_overrides
    from ternary.training.config import ConfigError
    from ternary.training.export import ExportError
    from ternary.training.trainer import TrainingError

    try:
        build(preset, Path(work), overrides=_parse_overrides(overrides), **options)
    except (ConfigError, TrainingError, CheckpointError, ExportError, EvalError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
