"""`ternary-eval`: how good a GGUF model is, in numbers comparable with llama.cpp's.

Perplexity follows llama-perplexity exactly: the whole text is tokenized once (BOS first when the vocabulary
adds one, special-token text not parsed), cut into non-overlapping chunks of n_ctx tokens (a shorter tail is
dropped), each chunk is evaluated in a fresh context with its first token replaced by BOS (when the vocabulary
adds BOS), and only the second half of each chunk is scored: the logits at positions n_ctx/2 .. n_ctx-2
predicting the tokens after them, so every scored token has at least n_ctx/2 tokens of context.
PPL = exp(mean NLL); bits per byte = total NLL / ln 2 / the byte length of the scored tokens, which makes
models with different tokenizers comparable.

The code eval asks for greedy completions of held-out Python function headers (`def name(args):` plus the
docstring if any, dedented to column 0). A task must fit the model: only functions whose tokenized prompt
leaves at least `--code-min-room` tokens of context (default 256) are eligible, and the seeded sample of
`--code-n` is drawn from those, so the score measures the model rather than its context length; how many
held-out functions were left out for length is reported. Each completion runs until the function ends (the
first non-blank line back at column 0, two blank lines in a row, end of generation) or the token limit
(`--code-max-tokens`, default: all the room the context leaves); only complete lines are kept. The score is
the share of header + completion that `ast.parse`s and `compile`s; an empty body counts as a failure.
Decoding is greedy with llama.cpp's penalties (`--repeat-penalty`, the DRY sampler's `--dry-*` flags, off by
default); the report records every decoding setting.

    ternary-eval model.gguf --ppl heldout/ --ctx 256 -t 4
    ternary-eval model.gguf --code --code-src heldout/ --repeat-penalty 1.3
    ternary-eval --code --code-src heldout/ --dry-multiplier 0.8 --dry-sequence-breaker none
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np
from ternary.engine.sampling import DryParams, SamplingParams, breakers_from_flags

DEFAULT_CODE_SAMPLES = 100
DEFAULT_CODE_MAX_TOKENS = 0  # all the room the context leaves
DEFAULT_CODE_MIN_ROOM = 256  # tokens of context a task's prompt must leave for the completion
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


class EvalError(ValueError):
    """The evaluation cannot run on this input; the message says what is wrong."""


class EvalEngine(Protocol):
    """What the evaluation needs from `ternary.engine.engine.Engine`."""

    tokenizer: Any
    n_ctx: int

    def logits(self, ids: Sequence[int]) -> np.ndarray: ...

    def generate(self, prompt: str | list[int], **kwargs: Any) -> Any: ...


def open_engine(path: str | os.PathLike, threads: int | None = None, n_ctx: int | None = None) -> Any:
    from ternary.engine.engine import Engine

    return Engine(path, threads=threads, n_ctx=n_ctx)


# ------------------------------------------------------------------------------------------------ text


def text_files(path: str | os.PathLike) -> list[Path]:
    """The file itself, or the text files under a folder in sorted order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise EvalError(f"{p}: no text files ({', '.join(TEXT_SUFFIXES)}) under this folder")
        return files
    raise EvalError(f"{p}: no such file or folder")


def read_texts(path: str | os.PathLike) -> str:
    """One text: the file, or the folder's files joined with a blank line (as if concatenated for
    llama-perplexity -f)."""
    parts = []
    for f in text_files(path):
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise EvalError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    n_scored: int  # tokens whose NLL is counted
    nll: float  # total, nats
    n_bytes: int  # bytes of the scored tokens
    ppl: float
    bits_per_byte: float

    def line(self) -> str:
        return (
            f"PPL = {self.ppl:.4f}, bits per byte = {self.bits_per_byte:.4f} "
            f"({self.n_scored} tokens scored, {self.n_bytes} bytes, {self.n_chunks} chunks of {self.n_ctx})"
        )


def chunk_inputs(tokens: Sequence[int], n_ctx: int, bos_id: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(the n_ctx ids fed for chunk i, the chunk's start in `tokens`) for every whole chunk, the way
    llama-perplexity does it: the chunk's first token is replaced by BOS when `bos_id` is given."""
    toks = np.asarray(tokens, dtype=np.int64)
    for i in range(toks.size // n_ctx):
        start = i * n_ctx
        ids = toks[start : start + n_ctx].copy()
        if bos_id is not None:
            ids[0] = bos_id
        yield ids, start


def scored_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """−log softmax(logits)[target] per row, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(x.shape[0]), targets]


def perplexity_of_tokens(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    tokens: Sequence[int],
    n_ctx: int,
    bos_id: int | None,
    token_bytes: np.ndarray,
    max_chunks: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """llama-perplexity over a token sequence; `logits_fn(ids)` gives float[len(ids), n_vocab] for a fresh
    context and `token_bytes[id]` is each token's byte length."""
    if n_ctx < 4 or n_ctx % 2:
        raise EvalError(f"n_ctx: {n_ctx} must be an even number ≥ 4")
    if len(tokens) < 2 * n_ctx:
        raise EvalError(
            f"the text tokenizes to {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at "
            f"least {2 * n_ctx} (llama-perplexity's rule): give more text or a smaller --ctx"
        )
    first = n_ctx // 2
    toks = np.asarray(tokens, dtype=np.int64)
    nll = 0.0
    n_scored = n_bytes = n_chunks = 0
    for ids, start in chunk_inputs(toks, n_ctx, bos_id):
        if max_chunks is not None and n_chunks >= max_chunks:
            break
        logits = np.asarray(logits_fn(ids))
        if logits.shape[0] != n_ctx:
            raise EvalError(f"logits for {n_ctx} tokens came back with {logits.shape[0]} rows")
        targets = toks[start + first + 1 : start + n_ctx]
        nll += float(scored_nll(logits[first : n_ctx - 1], targets).sum())
        n_scored += targets.size
        n_bytes += int(token_bytes[targets].sum())
        n_chunks += 1
        if progress is not None:
            progress(n_chunks, math.exp(nll / n_scored))
    return PerplexityResult(
        n_ctx, n_chunks, n_scored, nll, n_bytes, math.exp(nll / n_scored), nll / math.log(2) / max(n_bytes, 1)
    )


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """Byte length of every token's text (control tokens such as BOS count as 0 bytes)."""
    return np.array([len(tokenizer.token_bytes(i, special=False)) for i in range(tokenizer.n_vocab)])


def perplexity(
    engine: EvalEngine,
    text: str,
    n_ctx: int | None = None,
    max_chunks: int | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """llama-perplexity's PPL and the bits per byte of `text` under `engine`'s model."""
    tok = engine.tokenizer
    n_ctx = int(n_ctx or engine.n_ctx)
    if n_ctx > engine.n_ctx:
        raise EvalError(f"--ctx {n_ctx} is larger than the engine's context {engine.n_ctx}")
    add_bos = bool(tok.add_bos) and tok.bos_id is not None and tok.bos_id >= 0
    tokens = tok.encode(text, add_bos=add_bos, parse_special=False)
    return perplexity_of_tokens(
        engine.logits,
        tokens,
        n_ctx,
        tok.bos_id if add_bos else None,
        token_byte_lengths(tok),
        max_chunks,
        progress,
    )


# --------------------------------------------------------------------------------------- code completion


@dataclass(frozen=True)
class FunctionPrompt:
    source: str  # "file:line"
    name: str
    prompt: str  # header (+ docstring), dedented, ending in a newline


def _header_end(lines: list[str], def_line: int, body_line: int) -> int | None:
    """The 1-based last line of a `def` header spanning `def_line`.. (before `body_line`), or None."""
    for end in range(def_line, body_line):
        chunk = "\n".join(lines[def_line - 1 : end]).strip()
        try:
            ast.parse(chunk + "\n    pass\n")
        except SyntaxError:
            continue
        return end
    return None


def extract_function_prompts(
    source: str, where: str = "<text>", *, methods: bool = False
) -> list[FunctionPrompt]:
    """Every function in `source` that makes a completion task: header on its own lines, at least one
    statement after the optional docstring, and all prompt lines indented at least as far as the `def`.

    Module-level functions only unless `methods`: a method or nested function cut out of its class and
    dedented to column 0 is a text the model never saw in training (HumanEval-style tasks are top-level too).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree) if methods else tree.body:
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = node.body
        doc = body[0] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else None
        if doc is not None and not isinstance(doc.value.value, str):
            doc = None
        rest = body[1:] if doc is not None else body
        if not rest or body[0].lineno <= node.lineno:
            continue
        end = _header_end(lines, node.lineno, body[0].lineno)
        if end is None:
            continue
        last = doc.end_lineno if doc is not None else end
        if doc is not None and doc.lineno != end + 1 or rest[0].lineno <= last:
            continue
        indent = lines[node.lineno - 1][: node.col_offset]
        chunk = lines[node.lineno - 1 : last]
        if any(line.strip() and not line.startswith(indent) for line in chunk):
            continue
        prompt = "\n".join(line[len(indent) :] if line.strip() else "" for line in chunk) + "\n"
        out.append(FunctionPrompt(f"{where}:{node.lineno}", node.name, prompt))
    return out


@dataclass(frozen=True)
class PromptSelection:
    """The completion tasks drawn, out of how many held-out functions, and how many did not fit."""

    prompts: list[FunctionPrompt]
    n_found: int  # functions with a body to complete
    n_too_long: int  # of those, left out by the `fits` rule


def select_function_prompts(
    path: str | os.PathLike,
    limit: int | None = DEFAULT_CODE_SAMPLES,
    seed: int = 0,
    methods: bool = False,
    fits: Callable[[FunctionPrompt], bool] | None = None,
) -> PromptSelection:
    """Completion tasks from the `.py` files at `path` that pass `fits` (None: all): all of them, or a seeded
    sample of `limit`."""
    found: list[FunctionPrompt] = []
    for f in text_files(path):
        if f.suffix == ".py":
            text = f.read_text(encoding="utf-8", errors="replace")
            found.extend(extract_function_prompts(text, str(f), methods=methods))
    if not found:
        raise EvalError(f"{path}: no Python functions with a body to complete")
    eligible = found if fits is None else [p for p in found if fits(p)]
    if not eligible:
        raise EvalError(f"{path}: none of the {len(found)} functions fits the context (see --code-min-room)")
    too_long = len(found) - len(eligible)
    if limit is not None and len(eligible) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(eligible), size=limit, replace=False))
        eligible = [eligible[i] for i in keep]
    return PromptSelection(eligible, len(found), too_long)


def function_prompts(
    path: str | os.PathLike,
    limit: int | None = DEFAULT_CODE_SAMPLES,
    seed: int = 0,
    methods: bool = False,
    fits: Callable[[FunctionPrompt], bool] | None = None,
) -> list[FunctionPrompt]:
    """The prompts of `select_function_prompts`."""
    return select_function_prompts(path, limit, seed, methods, fits).prompts


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's tokens as the completion sees them: BOS when the vocabulary adds one, no special tokens."""
    return tokenizer.encode(prompt, add_bos=bool(tokenizer.add_bos), parse_special=False)


def leaves_room(engine: EvalEngine, min_room: int) -> Callable[[FunctionPrompt], bool]:
    """The `fits` rule: the prompt leaves at least `min_room` tokens of the engine's context."""
    if min_room < 1:
        raise EvalError(f"--code-min-room must be at least 1 token, got {min_room}")
    if min_room >= engine.n_ctx:
        raise EvalError(
            f"--code-min-room {min_room} leaves no room for a prompt in a context of {engine.n_ctx}"
        )
    return lambda p: len(prompt_ids(engine.tokenizer, p.prompt)) + min_room <= engine.n_ctx


@dataclass
class CompletionCut:
    """Accumulates generated text and says when the function body is over.

    The body ends before the first non-blank line that starts at column 0 (the prompt is dedented, so that is
    code after the function) or at the second of two blank lines in a row outside a triple-quoted string.
    `text` is the kept completion.
    """

    pending: str = ""
    kept: list[str] = field(default_factory=list)
    done: bool = False
    blank_run: int = 0

    def feed(self, piece: str) -> bool:
        """Add generated text; True once the function has ended (further text is ignored)."""
        if self.done:
            return True
        self.pending += piece
        while "\n" in self.pending and not self.done:
            line, self.pending = self.pending.split("\n", 1)
            self._line(line)
        if not self.done and self.pending.strip() and not self.pending[0].isspace():
            self.done = True  # a line already started at column 0
        return self.done

    def _in_triple_quoted_string(self) -> bool:
        """Blank lines inside an open docstring are text, not the end of the function."""
        text = "\n".join(self.kept)
        return (text.count('"""') + text.count("'''")) % 2 == 1

    def _line(self, line: str) -> None:
        if not line.strip() and self._in_triple_quoted_string():
            self.kept.append(line)
            return
        if not line.strip():
            self.blank_run += 1
            if self.blank_run >= 2:
                self.done = True
            else:
                self.kept.append(line)
            return
        if not line[0].isspace():
            self.done = True
            return
        self.blank_run = 0
        self.kept.append(line)

    @property
    def text(self) -> str:
        """The complete lines kept: a last line without its newline (cut off by the token limit, or followed
        by end of generation, which a file's last line never is in training) is dropped."""
        return "".join(line + "\n" for line in self.kept)


def cut_completion(generated: str) -> str:
    """The function body part of a finished generation (see `CompletionCut`)."""
    cut = CompletionCut()
    cut.feed(generated)
    return cut.text


@dataclass(frozen=True)
class CompletionCheck:
    empty: bool  # no code line in the completion
    parses: bool
    compiles: bool
    error: str = ""


def check_completion(prompt: str, completion: str) -> CompletionCheck:
    """Whether prompt + completion is a valid function: `ast.parse` and `compile`; an empty body fails."""
    code_lines = [s for s in completion.splitlines() if s.strip() and not s.strip().startswith("#")]
    if not code_lines:
        return CompletionCheck(True, False, False, "empty completion")
    src = prompt + completion
    try:
        ast.parse(src)
    except SyntaxError as exc:
        return CompletionCheck(False, False, False, f"SyntaxError: {exc.msg} (line {exc.lineno})")
    try:
        compile(src, "<completion>", "exec")
    except (SyntaxError, ValueError) as exc:
        return CompletionCheck(False, True, False, f"{type(exc).__name__}: {exc}")
    return CompletionCheck(False, True, True)


@dataclass(frozen=True)
class CodeDecoding:
    """How the code eval decodes: greedy, with llama.cpp's repetition penalty and DRY (off by default)."""

    max_tokens: int = DEFAULT_CODE_MAX_TOKENS  # 0: all the room the context leaves
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    dry: DryParams = field(default_factory=DryParams)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0: all the room), got {self.max_tokens}")
        SamplingParams(temperature=0.0, repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n)

    def settings(self) -> dict[str, Any]:
        """Every setting, named as `Engine.generate`'s arguments (and llama.cpp's)."""
        d = self.dry
        return {
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
            "repeat_penalty": self.repeat_penalty,
            "repeat_last_n": self.repeat_last_n,
            "dry_multiplier": d.multiplier,
            "dry_base": d.base,
            "dry_allowed_length": d.allowed_length,
            "dry_penalty_last_n": d.penalty_last_n,
            "dry_sequence_breakers": list(d.sequence_breakers),
        }

    def describe(self) -> str:
        """The settings that act, as ternary-eval flags."""
        parts = ["greedy", f"--code-max-tokens {self.max_tokens}" if self.max_tokens else "all the room"]
        if self.repeat_penalty != 1.0:
            parts.append(f"--repeat-penalty {self.repeat_penalty:g} --repeat-last-n {self.repeat_last_n}")
        d = self.dry
        if d.enabled:
            breakers = " ".join(f"--dry-sequence-breaker {b!r}" for b in d.sequence_breakers)
            parts.append(
                f"--dry-multiplier {d.multiplier:g} --dry-base {d.base:g} --dry-allowed-length "
                f"{d.allowed_length} --dry-penalty-last-n {d.penalty_last_n} "
                + (breakers or "--dry-sequence-breaker none")
            )
        return ", ".join(parts)


@dataclass
class CodeEvalResult:
    samples: list[dict[str, Any]] = field(default_factory=list)
    decoding: CodeDecoding = field(default_factory=CodeDecoding)
    selection: PromptSelection | None = None  # how the tasks were drawn, when known
    min_room: int | None = None  # the rule that left functions out for length

    def summary(self) -> dict[str, Any]:
        n = len(self.samples)
        count = {k: sum(bool(s[k]) for s in self.samples) for k in ("parses", "compiles", "empty")}
        out = {
            "n": n,
            "parses": count["parses"],
            "compiles": count["compiles"],
            "empty": count["empty"],
            "parse_share": count["parses"] / n if n else 0.0,
            "compile_share": count["compiles"] / n if n else 0.0,
            "decoding": self.decoding.settings(),
        }
        if self.selection is not None:
            out["held_out_functions"] = self.selection.n_found
            out["left_out_for_length"] = self.selection.n_too_long
            out["min_room"] = self.min_room
        return out

    def line(self) -> str:
        s = self.summary()
        text = (
            f"code completion: {s['parses']}/{s['n']} parse ({100 * s['parse_share']:.1f}%), "
            f"{s['compiles']}/{s['n']} compile ({100 * s['compile_share']:.1f}%), {s['empty']} empty"
        )
        if self.selection is not None:
            text += (
                f"; {self.selection.n_too_long} of {self.selection.n_found} held-out functions left out for "
                f"length (< {self.min_room} tokens of room)"
            )
        return f"{text}; {self.decoding.describe()}"


def complete(engine: EvalEngine, prompt: str, decoding: CodeDecoding | None = None) -> str:
    """The greedy completion of `prompt`, cut where the function ends ("" when the prompt fills the
    context)."""
    decoding = decoding or CodeDecoding()
    ids = prompt_ids(engine.tokenizer, prompt)
    cut = CompletionCut()
    room = engine.n_ctx - len(ids)
    if room <= 0:
        return ""
    budget = min(decoding.max_tokens, room) if decoding.max_tokens > 0 else room
    for piece in engine.generate(ids, **{**decoding.settings(), "max_tokens": budget}, stream=True):
        if cut.feed(piece):
            break
    return cut.text


def code_completion(
    engine: EvalEngine,
    prompts: Iterable[FunctionPrompt],
    decoding: CodeDecoding | None = None,
    progress: Callable[[int, CompletionCheck], None] | None = None,
) -> CodeEvalResult:
    result = CodeEvalResult(decoding=decoding or CodeDecoding())
    for i, p in enumerate(prompts):
        completion = complete(engine, p.prompt, result.decoding)
        check = check_completion(p.prompt, completion)
        result.samples.append({"source": p.source, "name": p.name, "completion": completion, **vars(check)})
        if progress is not None:
            progress(i + 1, check)
    return result


# ------------------------------------------------------------------------------------------------- CLI


@click.command(help=__doc__.split("\n\n")[0])
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-m", "--model", "model_opt", type=click.Path(dir_okay=False), help="same as MODEL")
@click.option("--ppl", "ppl_path", type=click.Path(), help="text file or folder to measure perplexity on")
@click.option("--code", is_flag=True, help="complete function headers from the --code-src (or --ppl) files")
@click.option("--code-src", type=click.Path(), help="Python file or folder for --code (default: --ppl)")
@click.option("--code-n", default=DEFAULT_CODE_SAMPLES, show_default=True, help="functions to complete")
@click.option(
    "--code-max-tokens", default=DEFAULT_CODE_MAX_TOKENS, show_default=True, help="0: all the room left"
)
@click.option(
    "--code-min-room", default=DEFAULT_CODE_MIN_ROOM, show_default=True,
    help="tasks must leave this many tokens of context",
)  # fmt: skip
@click.option("--code-methods", is_flag=True, help="also methods and nested functions (dedented)")
@click.option("--repeat-penalty", default=1.0, show_default=True, help="for --code's greedy decoding")
@click.option("--repeat-last-n", default=64, show_default=True, help="tokens the repeat penalty looks at")
@click.option("--dry-multiplier", default=0.0, show_default=True, help="DRY sampler strength (0: off)")
@click.option("--dry-base", default=1.75, show_default=True)
@click.option("--dry-allowed-length", default=2, show_default=True)
@click.option("--dry-penalty-last-n", default=-1, show_default=True, help="-1: the whole context")
@click.option(
    "--dry-sequence-breaker", "dry_breakers", multiple=True, metavar="STRING",
    help="replaces the defaults (\\n : \" *) as llama.cpp; 'none': no breakers",
)  # fmt: skip
@click.option("-c", "--ctx", "--ctx-size", "n_ctx", default=0, help="chunk length (0: the model's context)")
@click.option("--chunks", default=-1, help="at most this many chunks (-1: all), as llama-perplexity")
@click.option("-t", "--threads", type=int, help="CPU threads (default: physical cores)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the numbers here")
def main(model, model_opt, ppl_path, code, code_src, code_n, code_max_tokens, code_min_room, code_methods,
         repeat_penalty, repeat_last_n, dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n,
         dry_breakers, n_ctx, chunks, threads, json_out) -> None:  # fmt: skip
    """MODEL defaults to the bundled model (ternary.models.default_model_path())."""
    from ternary.formats.errors import GGUFError

    def say(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        if not ppl_path and not code:
            raise EvalError("nothing to do: give --ppl FILE|DIR and/or --code")
        src = code_src or ppl_path
        if code and not src:
            raise EvalError("--code needs Python files: give --code-src FILE|DIR (or --ppl)")
        if model and model_opt and model != model_opt:
            raise EvalError(f"two models given: {model} and -m {model_opt}")
        path = model or model_opt
        if path is None:
            from ternary.models import default_model_path

            path = default_model_path()
        if not Path(path).is_file():
            raise EvalError(f"{path}: no such model file")
        text = read_texts(ppl_path) if ppl_path else None
        if code:
            text_files(src)  # a wrong path fails before the model loads
            try:
                dry = DryParams(dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n,
                                breakers_from_flags(dry_breakers))  # fmt: skip
                decoding = CodeDecoding(code_max_tokens, repeat_penalty, repeat_last_n, dry)
            except ValueError as exc:
                raise EvalError(str(exc)) from None
        t0 = time.perf_counter()
        engine = open_engine(path, threads=threads, n_ctx=n_ctx or None)
        say(f"loaded {path} in {time.perf_counter() - t0:.1f} s (n_ctx {engine.n_ctx})")
        report: dict[str, Any] = {"model": str(path)}
        if text is not None:
            res = perplexity(
                engine, text, n_ctx or None, None if chunks < 0 else chunks, lambda i, p: say(f"[{i}]{p:.4f}")
            )
            click.echo(res.line())
            report["perplexity"] = dataclasses.asdict(res)
        if code:
            fits = leaves_room(engine, code_min_room)
            selection = select_function_prompts(src, code_n, methods=code_methods, fits=fits)
            n = len(selection.prompts)
            cres = code_completion(
                engine,
                selection.prompts,
                decoding,
                lambda i, c: say(f"[{i}/{n}] {'ok' if c.compiles else c.error}"),
            )
            cres.selection, cres.min_room = selection, code_min_room
            click.echo(cres.line())
            report["code_completion"] = {**cres.summary(), "samples": cres.samples}
        if json_out:
            Path(json_out).write_text(json.dumps(report, indent=1))
    except (EvalError, GGUFError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc


if __name__ == "__main__":
    main()
