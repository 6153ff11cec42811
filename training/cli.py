"""`ternary-train`: train a BitNet b1.58 model from a config or preset, and export checkpoints to GGUF.

ternary-train train --preset tiny-bytes --set data.path=src/ --set run.out_dir=runs/tiny
ternary-train train --config my.toml --resume          # continue from the newest good checkpoint
ternary-train export runs/tiny/ckpt-00001000.tck tiny.gguf --linear-type TQ2_0 --embed-type Q8_0
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from ternary.training.backend import DEVICES, BackendError
from ternary.training.checkpoint import CheckpointError, list_checkpoints
from ternary.training.config import ConfigError, load_config, load_preset, preset_names

EXPORT_LINEAR_TYPES = ("TQ2_0", "TQ1_0")
EXPORT_EMBED_TYPES = ("F16", "Q8_0", "Q6_K", "F32")


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, object]:
    """`section.key=value` pairs; values are read as JSON when they parse (numbers, true/false), else text."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected section.key=value", param_hint="--set")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@click.group(help=__doc__.split("\n\n")[0])
def main() -> None:
    pass


@main.command(help="Train (or, with --resume, continue training) a model.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="a .toml or .json config")
@click.option("--preset", help="a named preset (see `ternary-train presets`)")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--resume", is_flag=True, help="continue from the newest undamaged checkpoint in run.out_dir")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a config key")
@click.option("--out-dir", help="shorthand for --set run.out_dir=DIR")
@click.option("--steps", type=int, help="shorthand for --set schedule.steps=N")
def train(config_path, preset, device, resume, overrides, out_dir, steps) -> None:
    from ternary.training.distill import TeacherError
    from ternary.training.trainer import Trainer, TrainingError

    try:
        if (config_path is None) == (preset is None):
            raise click.UsageError("give exactly one of --config FILE or --preset NAME")
        cfg = load_config(config_path) if config_path else load_preset(preset)
        extra = _parse_overrides(overrides)
        if out_dir:
            extra["run.out_dir"] = out_dir
        if steps:
            extra["schedule.steps"] = steps
        cfg = cfg.replace(extra) if extra else cfg
        existing = list_checkpoints(cfg.run.out_dir)
        if existing and not resume:
            raise click.ClickException(
                f"{cfg.run.out_dir} already holds checkpoints up to step {existing[-1][0]}: pass --resume to "
                "continue that run, or choose another run.out_dir"
            )
        trainer = Trainer(cfg, device=device)
        if resume and trainer.resume() is None:
            trainer.log(f"no checkpoint in {cfg.run.out_dir}: starting from scratch")
        m = trainer.cfg.model
        trainer.log(
            f"training {m.n_layer} layers x {m.n_embd} wide, vocab {m.n_vocab}, "
            f"{'ternary' if m.ternary else 'float'} weights, ffn {m.ffn_act}, optimizer {cfg.optim.name}, "
            f"device {device}, step {trainer.step} -> {cfg.schedule.steps}, out {cfg.run.out_dir}"
        )
        trainer.fit()
    except (ConfigError, TrainingError, CheckpointError, BackendError, TeacherError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command(help="Write a checkpoint as a `bitnet` GGUF that llama.cpp and ternary-run load.")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--linear-type", type=click.Choice(EXPORT_LINEAR_TYPES), default="TQ2_0", show_default=True)
@click.option("--embed-type", type=click.Choice(EXPORT_EMBED_TYPES), default="F16", show_default=True)
def export(checkpoint, out, linear_type, embed_type) -> None:
    from ternary.training.export import ExportError, export_checkpoint

    try:
        export_checkpoint(checkpoint, out, linear_type=linear_type, embed_type=embed_type)
    except (CheckpointError, ExportError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {out} ({Path(out).stat().st_size:,} bytes)", err=True)


@main.command(help="List the built-in presets.")
def presets() -> None:
    for name in preset_names():
        cfg = load_preset(name)
        m = cfg.model
        click.echo(f"{name}: {m.n_layer} x {m.n_embd}, ffn {m.n_ff} {m.ffn_act}, {cfg.schedule.steps} steps")


if __name__ == "__main__":
    main()
