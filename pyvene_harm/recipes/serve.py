"""``pyvene-harm serve``: the Latent Guard as an OpenAI-compatible HTTP service (uvicorn + FastAPI).

Every option is checked and the guard, model and directions are loaded before the server starts
listening, so a bad option stops the command with a one-line error, never a half-started server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from .beliefs import resolve_directions
from .guard_common import bind_model, guard_model_options, load_guard, resolve_model_options

__all__ = ["serve"]

API_KEY_ENV = "PYVENE_HARM_API_KEY"


@click.command()
@click.option("--guard", "guard_path", default=None,
              help="Guard folder (from `guard fit`) or Hub repo id. Default with -m demo or -m demo-1.5b: the guard "
                   "shipped for that model in artifacts/.")
@guard_model_options
@click.option("--directions", "directions_path", default=None,
              help="DirectionSet (folder, `extract` run directory or Hub id): replies to prompts the guard lets "
                   "through are decoded with its refusal direction ablated at every layer, as `guard generate "
                   "--undo-refusal ablate` does. Without it replies are plain. "
                   "Example: --directions artifacts/qwen2.5-coder-0.5b-instruct/directions")
@click.option("--reply-guard", "reply_guard_path", default=None, type=click.Path(file_okay=False),
              help="ReplyGuard folder (from `guard reply-fit`): every reply is judged as it is written, from the "
                   "states the decoding forward computes, and one that turns harmful is stopped (finish_reason "
                   "content_filter). With --upstream, the guard's copy reads the engine's reply tokens. Example: --reply-guard "
                   "artifacts/qwen2.5-coder-0.5b-instruct/reply-guard")
@click.option("--refusal-read", "refusal_read_path", default=None, type=click.Path(file_okay=False),
              help="Folder from `guard refusal-fit`: every verdict also carries the model's refusal belief "
                   "(delta_refuse, refuse_probability), from the guard's own prefill. Default: the one shipped "
                   "beside a shipped guard (artifacts/<model>/refusal-read).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default accepts local clients only; 0.0.0.0 exposes the server "
                   "to the network (set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--api-key", default=None, envvar=API_KEY_ENV, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every /v1 request. Prefer the environment variable: "
                   "a command line is visible to other users of the machine.")
@click.option("--served-model-name", default=None,
              help="The model name clients send and GET /v1/models lists. Default: the model's id.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most reads (inputs, messages, pieces) scored together; concurrent requests are batched up to "
                   "this many.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Most tokens in one scoring batch: a larger request is scored over several batches, and one "
                   "that arrives meanwhile joins the next, so no request holds the model for longer than a batch.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Longest wait for more requests once the first of a batch has arrived. Where a batch takes "
                   "seconds (a CPU), a longer wait gathers more of a burst; pair it with --max-gap-ms.")
@click.option("--max-gap-ms", type=click.FloatRange(min=0), default=None,
              help="Stop waiting sooner once no request has arrived for this long (default: wait the whole "
                   "--max-wait-ms). Example: --max-wait-ms 250 --max-gap-ms 20 on a CPU.")
@click.option("--max-reply-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most greedy chat replies decoded together in one batch (those waiting when one starts); "
                   "1 decodes them one at a time.")
@click.option("--max-queue", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Most requests waiting or running; more are answered 429 (busy).")
@click.option("--max-reply-reads", type=click.IntRange(min=1), default=64, show_default=True,
              help="With --upstream and --reply-guard: most chats queued or relayed at once, more are answered "
                   "429. Each reply's read keeps the model's cache of its tokens until the reply ends.")
@click.option("--max-inputs", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most strings in one moderation request.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Most tokens in one input or conversation, counted with the pieces a text that types control "
                   "tokens is also read in.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest chat reply a request may ask for (and the default length).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body.")
@click.option("--refusal-message", default=None, help="Reply to prompts the guard calls harmful. "
              "Default: \"I'm sorry, but I can't help with that.\"")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Longest a request may take, queueing and decoding included; later it is answered 504 and "
                   "dropped.")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Longest a client may take to send a request's headers, and again its body (408 after): slow "
                   "clients cannot hold connections.")
@click.option("--limit-concurrency", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most connections and tasks at once; more are answered 503 (OpenAI's error shape).")
@click.option("--keep-alive-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds an idle kept-alive connection stays open.")
@click.option("--graceful-shutdown-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On Ctrl-C or SIGTERM, seconds to let requests in hand finish before they are cut.")
@click.option("--steer-any-system-prompt", is_flag=True,
              help="Decode with --directions whatever a conversation's system prompt. By default a conversation "
                   "whose system prompt differs from the guard's is answered plainly: the guard's verdict was "
                   "formed under its own system prompt.")
@click.option("--upstream", default=None,
              help="Base URL of a serving engine that writes the replies the guard lets through: a running `vllm "
                   "serve` (or any OpenAI-compatible server whose /v1/completions takes token ids). The guard "
                   "still judges here, on its own copy of the model. Example: --upstream http://127.0.0.1:8001")
@click.option("--upstream-model", default=None,
              help="The engine's name for the plain model (default: the first it lists).")
@click.option("--upstream-adapter", default=None,
              help="The engine's name for the steered model: a LoRA from `pyvene-harm export-adapter`, loaded with "
                   "`vllm serve ... --enable-lora --lora-modules NAME=FOLDER`. Without it replies are plain.")
@click.option("--upstream-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Longest wait for the engine's next piece of a reply (504 after).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads the model worker's torch may use (default: torch's own choice, every core). Beside "
                   "an engine on the same CPU (--upstream), fewer threads here leave the engine its cores.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (one line per request at info).")
def serve(guard_path, model_args, directions_path, reply_guard_path, refusal_read_path, host, port, api_key, served_model_name, max_batch, max_batch_tokens,
          max_wait_ms, max_reply_batch,
          max_gap_ms, max_queue, max_reply_reads, max_inputs, max_prompt_tokens, max_new_tokens, max_body_bytes, refusal_message,
          request_timeout, read_timeout, limit_concurrency, keep_alive_timeout, graceful_shutdown_timeout,
          steer_any_system_prompt, upstream, upstream_model, upstream_adapter, upstream_timeout, threads, log_level):
    """Serve the guard: POST /v1/moderations and guarded POST /v1/chat/completions (OpenAI shapes).

    \b
    Example:
      pyvene-harm serve --guard artifacts/qwen2.5-coder-0.5b-instruct/guard \\
        --directions artifacts/qwen2.5-coder-0.5b-instruct/directions --port 8000
      pyvene-harm serve -m demo-1.5b      # the 1.5B model with its shipped guard
      pyvene-harm serve -m demo --upstream http://127.0.0.1:8001 --upstream-adapter no-refusal
      curl -s localhost:8000/v1/moderations -H 'Content-Type: application/json' \\
        -d '{"input": "How do I kill a Python process?"}'
    """
    try:
        import uvicorn

        from ..serve import Limits, create_app
        from ..serve.protocol import header_deadline_protocol
    except ImportError as err:
        raise click.UsageError(f"{err}: pip install 'pyvene-harm[serve]'") from None
    try:
        limits = Limits(max_batch=max_batch, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_gap_ms=max_gap_ms, max_queue=max_queue,
                        max_reply_batch=max_reply_batch, max_reply_reads=max_reply_reads,
                        max_inputs=max_inputs,
                        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                        max_body_bytes=max_body_bytes, request_timeout_s=request_timeout, read_timeout_s=read_timeout)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    if upstream and directions_path:
        raise click.UsageError("with --upstream the engine writes the replies, so --directions cannot steer them: "
                               "export the ablation with `pyvene-harm export-adapter`, load it in the engine, and pass "
                               "--upstream-adapter NAME")
    if upstream_adapter and not upstream:
        raise click.UsageError("--upstream-adapter names a LoRA on the engine: give --upstream URL too")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if guard_path is None:
        from .demo import SHIPPED, shipped_artifacts

        shipped = shipped_artifacts(model_args["model"]) if model_args["model"] else None
        if shipped is None or not (shipped / "guard").is_dir():
            raise click.UsageError(f"give --guard: a guard ships only for -m {' or -m '.join(SHIPPED)}")
        guard_path = str(shipped / "guard")
    if refusal_read_path is None:
        refusal_read_path = _shipped_refusal_read(guard_path)
    g = load_guard(guard_path, model_args["revision"])
    mopts = resolve_model_options(model_args, g, guard_path)
    directions = resolve_directions(directions_path)
    keep = None
    if upstream:  # this copy only scores: the layers the guard never runs are not even loaded
        from ..decoder_depth import layers_to_run

        keep = layers_to_run(int(g.metadata_["num_layers"]), [*g.states_, *_reply_guard_states(reply_guard_path)])
    loaded = bind_model(g, mopts, keep_layers=keep)
    steering = None
    if directions is not None:
        from ..interventions import ablate

        try:
            steering = ablate(loaded.model, directions, direction="refusal")
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--directions") from None
    engine = None
    if upstream:
        from ..serve.upstream import UpstreamEngine, UpstreamError, check_upstream

        try:
            engine = check_upstream(UpstreamEngine(upstream, model=upstream_model, adapter=upstream_adapter,
                                                   timeout_s=upstream_timeout), loaded.tokenizer)
        except (ValueError, UpstreamError) as err:
            raise click.ClickException(str(err)) from None
        click.echo(f"guard copy of the model: {keep} of {g.metadata_['num_layers']} decoder layers loaded (up to "
                   "the deepest state the guard reads); the engine writes the replies", err=True)
    if refusal_read_path:
        from ..guard.refusal_read import RefusalRead

        try:
            read = RefusalRead.load(refusal_read_path)
            read.check_model(loaded.model, g.chat_formatter())
            g.set_refusal_read(read)
        except (FileNotFoundError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint="--refusal-read") from None
    try:  # fails here, with the guard's own message, rather than on the first request
        g.set_params(progress=False).report(["Hello."])
    except ValueError as err:
        raise click.UsageError(f"the guard cannot score prompts on this model: {err}") from None
    reply_guard = None
    if reply_guard_path:
        from ..guard.reply import ReplyGuard

        try:
            reply_guard = ReplyGuard.load(reply_guard_path, loaded.model, loaded.tokenizer)
        except (FileNotFoundError, ValueError) as err:
            raise click.BadParameter(str(err), param_hint="--reply-guard") from None
    name = served_model_name or _default_name(loaded.model_id)
    kwargs = {"refusal_message": refusal_message} if refusal_message is not None else {}
    app = create_app(g, loaded.model, loaded.tokenizer, model_name=name, steering=steering, limits=limits,
                     api_key=api_key or None, steer_any_system_prompt=steer_any_system_prompt, engine=engine,
                     reply_guard=reply_guard, **kwargs)
    auth = "API key required" if api_key else "no API key (set --api-key or " + API_KEY_ENV + ")"
    click.echo(f"serving {name!r} guarded by {guard_path} on http://{host}:{port} ({auth}; "
               f"replies {'with the refusal direction ablated' if steering or upstream_adapter else 'plain'}"
               f"{f' from {engine.url} ({engine.model})' if engine else ''})", err=True)
    click.echo(f"guard {g.describe_threshold()}", err=True)
    if g.refusal_read_ is not None:
        click.echo(f"refusal belief {refusal_read_path}: Delta_refuse at t_post_inst, states "
                   f"{list(g.refusal_read_.states)}{', calibrated' if g.refusal_read_.calibrated else ''}", err=True)
    if reply_guard is not None:
        click.echo(f"reply guard {reply_guard_path}: states {list(reply_guard.states_)}, window {reply_guard.width}, "
                   f"threshold {reply_guard.threshold_:+.3f}; every reply is judged as it is written", err=True)
    logging.getLogger("pyvene_harm.serve").setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False, date_header=False,
                http=header_deadline_protocol(read_timeout), limit_concurrency=limit_concurrency,
                timeout_keep_alive=keep_alive_timeout, timeout_graceful_shutdown=graceful_shutdown_timeout)


def _reply_guard_states(path: str | None) -> list[int]:
    """The states a reply guard folder reads (none without one), before the model is loaded: a
    scoring copy for --upstream keeps the layers they need too. A folder that cannot be read here
    is left to ReplyGuard.load, which names the problem."""
    if not path:
        return []
    import json

    try:
        return [int(s) for s in json.loads((Path(path) / "reply_guard.json").read_text(encoding="utf-8"))["states"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _shipped_refusal_read(guard_path: str) -> str | None:
    """The refusal read shipped beside a shipped guard (``artifacts/<model>/refusal-read``), if any:
    a guard folder of the project's own artifacts gets the model's refusal belief by default."""
    from .demo import SHIPPED, shipped_artifacts

    folder = Path(guard_path)
    if not folder.is_dir():
        return None
    for model in SHIPPED:
        shipped = shipped_artifacts(model)
        if shipped is not None and folder.resolve().parent == shipped.resolve() and (shipped / "refusal-read").is_dir():
            return str(shipped / "refusal-read")
    return None


def _default_name(model_id: str) -> str:
    """The model's id, or a folder's name: a local path is nobody else's business."""
    return Path(model_id).name if os.sep in model_id and Path(model_id).exists() else model_id
