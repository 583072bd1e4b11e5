"""`chorus api`: serve the OpenAI-compatible HTTP API (the `api` package) with uvicorn, in a child process.

The orchestrator never imports a front end, so the app is started by name (`python -m uvicorn
api.app:create_app --factory`) in a child process that gets its own process group; SIGTERM, SIGINT and
SIGHUP are passed on to it (uvicorn then finishes open answers briefly and stops the llama-servers), and
it dies with us even on kill -9. Settings go to the child in its environment, the API key included (not
on its command line, where `ps` would show it). The key itself comes from `--api-key-file`, `$CHORUS_API_KEY`
or a prompt: `--api-key KEY` is refused, since `ps -ef` would show it for the server's life.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from cli.secret_input import SecretOnCommandLine, read_secret
from cli.ui import supervise
from orchestrator.config.hosts import allowed_host_entry, is_loopback
from orchestrator.errors import ChorusError, ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8642
DEFAULT_MAX_RUNS = 4
DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_BODY_KIB = 4096

# what the child reads (api/settings.py): one name per setting
ENV_HOST = "CHORUS_API_HOST"
ENV_KEY = "CHORUS_API_KEY"
ENV_MAX_RUNS = "CHORUS_API_MAX_RUNS"
ENV_MAX_QUEUE = "CHORUS_API_MAX_QUEUE"
ENV_MAX_BODY = "CHORUS_API_MAX_BODY_BYTES"
ENV_ALLOWED_HOSTS = "CHORUS_API_ALLOWED_HOSTS"  # comma-separated; unset: app.yaml's api.allowed_hosts
GRACEFUL_SHUTDOWN_S = 5


class ApiKeyRequired(ChorusError):
    """The API would listen beyond this machine without a key."""

    def __init__(self, host: str) -> None:
        super().__init__(f"an API key is required to listen on {host}: other machines could run your models",
                         hint=f"Pass --api-key-file FILE (a file only you can read), or set ${ENV_KEY}; on a "
                              "terminal chorus asks for one. Or listen on 127.0.0.1 (the default).")
        self.host = host


class ApiNotInstalled(ChorusError):
    def __init__(self) -> None:
        super().__init__("the chorus 'api' package is not installed",
                         hint="Reinstall chorus (pip install gguf-chorus), or run from a chorus checkout.")


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise ApiKeyRequired(host)


def app_dir() -> Path:
    """The folder holding the `api` package (found, not imported), for uvicorn's --app-dir."""
    spec = importlib.util.find_spec("api")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "app.py").is_file():
        raise ApiNotInstalled()
    return Path(spec.origin).parent.parent


def uvicorn_command(host: str, port: int, *, verbose: bool = False) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--app-dir", str(app_dir()),
               "--host", host, "--port", str(port), "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S),
               "--log-level", "info" if verbose else "warning"]
    return command if verbose else [*command, "--no-access-log"]


def allowed_hosts_arg(values: list[str] | None) -> list[str] | None:
    """`--allowed-host` values as compared, or one error naming the flag and the bad value."""
    if values is None:
        return None
    try:
        return [allowed_host_entry(v) for v in values]
    except ValueError as exc:
        raise ConfigError("chorus api", str(exc), field="--allowed-host",
                          hint="A host name or address without scheme or port, e.g. --allowed-host chorus.lan; "
                               "'*' allows any name.") from None


def api_key_for(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, $CHORUS_API_KEY, or (needed and on a terminal) a prompt; never argv."""
    if args.api_key is not None:
        raise SecretOnCommandLine("--api-key", "--api-key-file", ENV_KEY)
    needed = not is_loopback(args.host)
    secret = read_secret(file=args.api_key_file, file_flag="--api-key-file", env=ENV_KEY,
                         prompt=f"API key for chorus api on {args.host}: " if needed else None)
    return secret.value if secret else None


def cmd_api(args: argparse.Namespace) -> int:
    # here, not at the top: `chorus --help` reads this module's defaults (cli/commands.py) and loads no pydantic.
    # No orchestrator.app either: uvicorn's child imports the engine itself
    from orchestrator.children import own_group_dying_with_parent
    from orchestrator.config.schema import default_config_dir, load_config

    api_key = api_key_for(args)
    check_bind(args.host, api_key)
    allowed_hosts = allowed_hosts_arg(args.allowed_host)
    config_dir = Path(args.config_dir or default_config_dir()).expanduser().resolve()
    load_config(config_dir)  # a broken config fails here, as one paragraph, before anything starts
    env = {**os.environ, "CHORUS_CONFIG_DIR": str(config_dir), ENV_HOST: args.host,
           ENV_MAX_RUNS: str(args.max_runs), ENV_MAX_QUEUE: str(args.max_queue),
           ENV_MAX_BODY: str(args.max_body_kib * 1024)}
    env.pop(ENV_KEY, None)
    env.pop(ENV_ALLOWED_HOSTS, None)
    if api_key:
        env[ENV_KEY] = api_key
    if allowed_hosts is not None:
        env[ENV_ALLOWED_HOSTS] = ",".join(allowed_hosts)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"chorus API on http://{host}:{args.port}/v1 (config: {config_dir}"
          f"{', API key required' if api_key else ''}); Ctrl-C stops it.", file=sys.stderr, flush=True)
    child = subprocess.Popen(uvicorn_command(args.host, args.port, verbose=args.verbose), env=env,
                             preexec_fn=lambda: own_group_dying_with_parent(signal.SIGTERM))
    return supervise(child, grace_s=GRACEFUL_SHUTDOWN_S + 10.0)
