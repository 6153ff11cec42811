"""``ternary-run``: complete a prompt with a BitNet GGUF, with llama.cpp's flags and timing lines.

    ternary-run model.gguf -p "def fibonacci(n):" -n 64 --temp 0
    ternary-run -m model.gguf -f prompt.txt -t 2 -c 2048 -s 42

The completion streams to stdout; load / prompt eval / eval / total times go to stderr at the end. Any error
(missing or broken model file, bad argument) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click
from ternary.engine.activations import normalize_mode
from ternary.engine.sampling import DryParams, breakers_from_flags
from ternary.formats.errors import GGUFError

RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp: -1 (or LLAMA_DEFAULT_SEED) means a random seed


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def _timing_lines(stats: object, total_ms: float) -> list[str]:
    def rate(ms: float, n: int, unit: str) -> str:
        per = ms / n if n else 0.0
        tps = 1000.0 * n / ms if ms > 0 else 0.0
        return f"{ms:10.2f} ms / {n:5d} {unit} ({per:8.2f} ms per token, {tps:8.2f} tokens per second)"

    lines = [
        f"       load time = {stats.load_seconds * 1000.0:10.2f} ms",  # type: ignore[attr-defined]
        f"jit warm-up time = {stats.jit_seconds * 1000.0:10.2f} ms",  # type: ignore[attr-defined]
    ]
    p_ms = stats.prompt_seconds * 1000.0  # type: ignore[attr-defined]
    g_ms = stats.generation_seconds * 1000.0  # type: ignore[attr-defined]
    n_prompt, n_gen = stats.prompt_tokens, stats.generated_tokens  # type: ignore[attr-defined]
    return lines + [
        f"prompt eval time = {rate(p_ms, n_prompt, 'tokens')}",
        f"       eval time = {rate(g_ms, n_gen, 'runs  ')}",
        f"      total time = {total_ms:10.2f} ms / {n_prompt + n_gen:5d} tokens",
    ]


def _model_path(model_arg: str | None, model_opt: str | None) -> str:
    if model_arg and model_opt and model_arg != model_opt:
        raise CliError(f"two models given ({model_arg!r} and -m {model_opt!r}): give one")
    path = model_arg or model_opt
    if not path:
        from ternary.models import default_model_path

        try:
            return str(default_model_path())  # the bundled model (or $TERNARY_MODEL)
        except FileNotFoundError as e:
            raise CliError(str(e)) from None
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: no such file")
    if p.is_dir():
        raise CliError(f"{path}: is a directory, expected a .gguf file")
    return path


def _prompt_text(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise CliError("give either -p/--prompt or -f/--file, not both")
    if prompt_file is None:
        return prompt or ""
    try:
        return Path(prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{prompt_file}: cannot read the prompt file ({e.__class__.__name__}: {e})") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_arg", metavar="MODEL", required=False)
@click.option("-m", "--model", "model_opt", metavar="PATH", help="Model GGUF (same as MODEL).")
@click.option("-p", "--prompt", help="Prompt text.")
@click.option("-f", "--file", "prompt_file", metavar="PATH", help="Read the prompt from a file.")
@click.option(
    "-n", "--n-predict", type=int, default=-1, show_default=True, help="Tokens to generate, -1 = until EOS."
)
@click.option("-t", "--threads", type=int, default=None, help="Threads (default: physical cores).")
@click.option(
    "-c", "--ctx-size", type=int, default=0, show_default=True, help="Context size, 0 = the model's."
)
@click.option("-s", "--seed", type=int, default=-1, show_default=True, help="Sampling seed, -1 = random.")
@click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature (0 = greedy).")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--min-p", type=float, default=0.05, show_default=True)
@click.option("--repeat-penalty", type=float, default=1.0, show_default=True)
@click.option("--repeat-last-n", type=int, default=64, show_default=True)
@click.option("--dry-multiplier", type=float, default=0.0, show_default=True, help="DRY strength (0 = off).")
@click.option("--dry-base", type=float, default=1.75, show_default=True, help="DRY growth per extra token.")
@click.option(
    "--dry-allowed-length", type=int, default=2, show_default=True, help="Repeats up to N tokens are free."
)
@click.option(
    "--dry-penalty-last-n", type=int, default=-1, show_default=True, help="DRY window (-1 = all, 0 = off)."
)
@click.option(
    "--dry-sequence-breaker",
    "dry_sequence_breakers",
    multiple=True,
    metavar="STRING",
    help="Add a DRY sequence breaker, replacing the defaults (\\n : \" *); 'none' for no breakers.",
)
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option(
    "--act-quant", default="q8k", show_default=True, help="Activation quantization: q8k | per-token."
)
@click.option("--ffn-act", default=None, help="Override the FFN activation: silu | relu2.")
@click.option(
    "--numa",
    type=click.Choice(["off", "distribute", "numactl"]),
    default=None,
    help="Several memory nodes: each node's share of the weights in its memory, read by threads pinned there "
    "(default: $TERNARY_NUMA, else distribute; numactl: within the CPU mask you gave numactl).",
)
@click.option("--display-prompt/--no-display-prompt", default=True, show_default=True)
def run(
    model_arg: str | None,
    model_opt: str | None,
    prompt: str | None,
    prompt_file: str | None,
    n_predict: int,
    threads: int | None,
    ctx_size: int,
    seed: int,
    temp: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    repeat_last_n: int,
    dry_multiplier: float,
    dry_base: float,
    dry_allowed_length: int,
    dry_penalty_last_n: int,
    dry_sequence_breakers: tuple[str, ...],
    ignore_eos: bool,
    act_quant: str,
    ffn_act: str | None,
    numa: str | None,
    display_prompt: bool,
) -> None:
    """Complete a prompt with MODEL (a BitNet b1.58 GGUF)."""
    from ternary.engine.engine import Engine  # after argument checks: importing Numba takes a moment

    path = _model_path(model_arg, model_opt)
    text = _prompt_text(prompt, prompt_file)
    try:
        act_quant = normalize_mode(act_quant)
    except ValueError as e:
        raise CliError(str(e)) from None
    if ffn_act is not None and ffn_act not in ("silu", "relu2"):
        raise CliError(f"unknown --ffn-act {ffn_act!r}: expected silu or relu2")
    if ctx_size < 0:
        raise CliError(f"--ctx-size must be 0 (the model's) or positive, got {ctx_size}")
    breakers = breakers_from_flags(dry_sequence_breakers)
    try:
        DryParams(dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n, breakers)
    except ValueError as e:
        raise CliError(str(e)) from None

    start = time.perf_counter()
    engine = Engine(
        path, threads=threads, n_ctx=ctx_size or None, act_quant=act_quant, ffn_act=ffn_act, numa=numa
    )
    out = sys.stdout
    if display_prompt:
        out.write(text)
        out.flush()
    pieces = engine.generate(
        text,
        max_tokens=n_predict,
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        repeat_last_n=repeat_last_n,
        dry_multiplier=dry_multiplier,
        dry_base=dry_base,
        dry_allowed_length=dry_allowed_length,
        dry_penalty_last_n=dry_penalty_last_n,
        dry_sequence_breakers=breakers,
        seed=None if seed in RANDOM_SEEDS else seed,
        stream=True,
        ignore_eos=ignore_eos,
    )
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pass
    out.write("\n")
    out.flush()
    total_ms = (time.perf_counter() - start) * 1000.0
    for line in _timing_lines(engine.stats, total_ms):
        click.echo(line, err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run, turning every expected failure into one line on stderr and exit status 1."""
    try:
        run.main(
            args=list(argv) if argv is not None else None, prog_name="ternary-run", standalone_mode=False
        )
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        _fail(e.format_message())
    except (CliError, GGUFError, ValueError, OSError) as e:
        _fail(str(e))


def _fail(message: str) -> None:
    first_line = " ".join(message.split())
    click.echo(f"ternary-run: error: {first_line}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
