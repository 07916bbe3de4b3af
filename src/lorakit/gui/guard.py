"""What the GUI server lets a request do: which folders it may touch, which hosts may talk to it,
how many wrong passwords a client may try.

A request carries text the client chose; a path or extension in it is never used as it is. Folders
must lie inside roots chosen when the server started (`lorakit gui --data_dir/--config_dir`), config
names are bare names the server turns into `<config_dir>/<name>.toml`, and a page served from
another host (DNS rebinding, a malicious site) gets 403 before any handler runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
LOGIN_PATHS = ("/login", "/login/")
_CONFIG_NAME = re.compile(r"[\w][\w .+-]{0,99}")
_OUTPUT_NAME = re.compile(r"[\w][\w.-]{0,99}")
_EXTENSION = re.compile(r"\.[^\W\d_]\w*$")  # '.ckpt', '.pt': a name that ends like a file type
_WINDOWS_DEVICES = re.compile(r"(con|prn|aux|nul|com\d|lpt\d)(\..*)?", re.IGNORECASE)


def inside(path: str | Path, roots: Iterable[Path], what: str, hint: str) -> Path:
    """`path` resolved (symlinks followed), if it lies in one of `roots`; else a ConfigError."""
    if not str(path).strip():
        raise ConfigError(f"{what}: give a folder")
    resolved = Path(path).expanduser().resolve()
    roots = [Path(r).resolve() for r in roots]
    if any(resolved == r or resolved.is_relative_to(r) for r in roots):
        return resolved
    shown = ", ".join(str(r) for r in roots)
    raise ConfigError(f"{what} {path} is outside the folders this GUI may use ({shown}); {hint}")


def config_file(config_dir: Path, name: str) -> Path:
    """`<config_dir>/<name>.toml` for a bare name ('my-lora' or 'my-lora.toml'); nothing else."""
    name = (name or "").strip()
    if name.lower().endswith(".toml"):
        name = name[: -len(".toml")]
    if not _CONFIG_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"config name {name!r}: use a plain name of letters, digits, '-', '_' or '.', "
            f"without a folder; it is saved as {Path(config_dir).absolute() / 'NAME.toml'}"
        )
    return Path(config_dir) / f"{name}.toml"


def output_file(folder: Path, name: str, suffix: str = ".safetensors") -> Path:
    """`<folder>/<name><suffix>` for a bare name ('my-lora' or 'my-lora.safetensors'): letters, digits,
    '-', '_' and '.', no folder, no other extension ('v1.5' is fine, 'x.ckpt' is not)."""
    name = (name or "").strip()
    if name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    bad = not _OUTPUT_NAME.fullmatch(name) or ".." in name or _WINDOWS_DEVICES.fullmatch(name)
    if bad or _EXTENSION.search(name):
        raise ConfigError(
            f"output name {name!r}: use a plain name of letters, digits, '-', '_' or '.', without a "
            f"folder or extension; it is saved as {Path(folder).absolute() / ('NAME' + suffix)}"
        )
    return Path(folder) / f"{name}{suffix}"


class LoginLimiter:
    """Refuses logins from a client that failed `max_failures` times within `window_s` seconds,
    for `lockout_s` seconds (a password cannot be guessed at network speed)."""

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 60.0,
        lockout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures, self.window_s, self.lockout_s, self.clock = (
            max_failures,
            window_s,
            lockout_s,
            clock,
        )
        self._failures: dict[str, list[float]] = {}
        self._locked_until: dict[str, float] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        return max(0.0, self._locked_until.get(client, 0.0) - self.clock())

    def failed(self, client: str) -> None:
        now = self.clock()
        recent = [t for t in self._failures.get(client, []) if now - t < self.window_s] + [now]
        self._failures[client] = recent
        if len(recent) >= self.max_failures:
            self._locked_until[client] = now + self.lockout_s
            self._failures[client] = []

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
        self._locked_until.pop(client, None)


def host_allowed(host: str | None, origin: str | None, port: int) -> bool:
    """Whether Host (and Origin, when sent) name this server on the loopback address and its port."""
    names = {f"{h}:{port}" for h in LOOPBACK_HOSTS}
    if port == 80:
        names |= set(LOOPBACK_HOSTS)
    if (host or "").lower() not in names:
        return False
    if origin is None:
        return True
    return origin.lower() in {f"{scheme}://{n}" for scheme in ("http", "https") for n in names}


class RequestGuard:
    """ASGI middleware: 403 for a foreign Host/Origin (unless `check_host` is off, as under --listen),
    429 for a client that failed too many logins."""

    def __init__(self, app, check_host: bool = True, limiter: LoginLimiter | None = None) -> None:
        self.app, self.check_host, self.limiter = app, check_host, limiter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        port = (scope.get("server") or ("", 0))[1]
        if self.check_host and not host_allowed(headers.get("host"), headers.get("origin"), port):
            return await self._refuse(
                scope,
                receive,
                send,
                403,
                f"foreign Host or Origin: open the GUI at its own address, http://127.0.0.1:{port}/ "
                "(an SSH tunnel must keep the port), or start it with --listen --auth",
            )
        is_login = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in LOGIN_PATHS
        if self.limiter is None or not is_login:
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?", 0))[0]
        wait = self.limiter.retry_after(client)
        if wait > 0:
            return await self._refuse(
                scope, receive, send, 429, f"too many failed logins: try again in {int(wait) + 1} s"
            )
        # Counted as failed until it succeeds, so that guesses sent in parallel cannot all slip through.
        self.limiter.failed(client)
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.limiter.succeeded(client)

    @staticmethod
    async def _refuse(scope, receive, send, code: int, text: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import PlainTextResponse

        await PlainTextResponse(text, status_code=code)(scope, receive, send)
