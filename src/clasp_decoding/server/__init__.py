"""``clasp serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an :class:`~..engine.Engine`.

- :mod:`.protocol`: request and error bodies, and every bound on what a client may set;
- :mod:`.security`: the API key, the Host check and the body size limit;
- :mod:`.serving`: jobs, waiting with deadlines, server-sent events, metrics;
- :mod:`.app`: the routes.
"""

from __future__ import annotations

from ..errors import ClaspError
from .app import ServerSettings, create_app
from .protocol import Limits
from .security import is_loopback

__all__ = ["Limits", "ServerSettings", "create_app", "serve"]


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond loopback without authentication, unless the operator says so."""
    if not is_loopback(host) and not api_key and not insecure_no_auth:
        raise ClaspError(
            f"Refusing to serve on {host} without an API key: anyone who can reach that address could use the "
            "model. Set --api-key (or CLASP_API_KEY), or pass --insecure-no-auth to accept the risk."
        )


def serve(
    model_name: str,
    *,
    host: str,
    port: int,
    dtype: str,
    device: str,
    settings: ServerSettings,
    insecure_no_auth: bool = False,
    log_level: str = "info",
) -> None:
    """Load the model and run uvicorn until SIGTERM or SIGINT, then drain: new requests get 503
    ``shutting_down``, those in flight get ``settings.drain_timeout`` seconds to finish, the rest an
    OpenAI error (in a stream: an error event, then ``[DONE]``). A second signal stops at once."""
    import uvicorn

    from ..models import load

    check_bind(host, settings.api_key, insecure_no_auth)
    settings.check_host = is_loopback(host)
    model, tokenizer = load(model_name, dtype=dtype, device=device)
    app = create_app(model, tokenizer, model_name, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5))
    install_drain(server, app)
    server.run()


def install_drain(server, app) -> None:
    """Make ``server`` (a ``uvicorn.Server``) drain ``app`` on its first exit signal and exit when that is
    done; a second signal exits at once."""
    import threading

    exit_now = server.handle_exit
    started: list = []

    def handle_exit(sig, frame) -> None:
        if started:
            return exit_now(sig, frame)
        started.append(sig)
        watcher = app.state.drain()

        def exit_when_drained() -> None:
            watcher.join()
            exit_now(sig, frame)

        threading.Thread(target=exit_when_drained, name="clasp-exit", daemon=True).start()

    server.handle_exit = handle_exit
