"""`ternary-serve MODEL`: the OpenAI-compatible HTTP server, with llama-server's flag names.

ternary-serve model.gguf --host 127.0.0.1 --port 8080 -t 4 -np 4 -c 4096 [--api-key KEY]
"""

from __future__ import annotations

import logging
import sys

import click
from ternary.server.app import ServerSettings, create_app


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model_arg", metavar="MODEL", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-m", "--model", type=click.Path(exists=True, dir_okay=False), help="GGUF model (or give it first)."
)
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8080, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "-t", "--threads", type=click.IntRange(min=1), default=None, help="Compute threads [default: cores]."
)
@click.option(
    "-np", "--parallel", default=4, type=click.IntRange(min=1), help="Slots: requests generated at once."
)
@click.option(
    "-c", "--ctx-size", default=0, type=click.IntRange(min=0), help="Context per slot (0 = the model's own)."
)
@click.option(
    "-b", "--batch-size", default=256, type=click.IntRange(min=1), help="Most tokens per engine step."
)
@click.option(
    "--max-queue", default=64, type=click.IntRange(min=0), help="Requests that may wait for a slot."
)
@click.option(
    "--api-key", envvar="TERNARY_API_KEY", default=None, help="Require this bearer key (env TERNARY_API_KEY)."
)
@click.option("-a", "--alias", default=None, help="Model name to report [default: the file name].")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def main(
    model_arg: str | None,
    model: str | None,
    host: str,
    port: int,
    threads: int | None,
    parallel: int,
    ctx_size: int,
    batch_size: int,
    max_queue: int,
    api_key: str | None,
    alias: str | None,
    log_level: str,
) -> None:
    """Serve MODEL (a BitNet GGUF) over llama-server's and OpenAI's HTTP API."""
    import uvicorn

    path = model_arg or model
    if path is None:
        from ternary.models import default_model_path

        try:
            path = str(default_model_path())  # the bundled model (or $TERNARY_MODEL)
        except FileNotFoundError as e:
            raise click.ClickException(str(e)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        model=path,
        threads=threads,
        n_ctx=ctx_size or None,
        n_slots=parallel,
        batch_size=batch_size,
        max_waiting=max_queue,
        api_key=api_key,
        alias=alias,
    )
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_failure(error: BaseException) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)
    )
    server.run()
    if failed:
        click.echo(f"ternary-serve: could not load {path}: {failed[0]}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
