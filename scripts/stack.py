"""Start and stop the whole service locally: Redis, model worker(s), the API and Flower.

    python scripts/stack.py run        # what `make run` does; Ctrl-C stops everything

Ports come from REDIS_PORT, API_PORT and FLOWER_PORT. A Redis server already answering
on REDIS_PORT is used as it is; otherwise one is started (no persistence, under var/).
The integration tests and benchmarks start the same `Stack` on free ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_answers(port: int, tls: Path | None = None) -> bool:
    """A Redis answers PING on `port` (over TLS with the files `make_tls_files` wrote in `tls`)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            s: socket.socket = raw
            if tls is not None:
                context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
                context.load_cert_chain(tls / "client.crt", tls / "client.key")
                s = context.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def make_tls_files(directory: Path, name: str = "llmq test CA") -> Path:
    """A certificate authority `name`, a server certificate it signed for 127.0.0.1 and
    localhost, and a client certificate, as PEM files in `directory` (ca.crt, server.crt,
    server.key, client.crt, client.key): for a Redis with TLS in tests and benchmarks."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write_key(path: Path) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return key

    def issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    ca_key = write_key(directory / "ca.key")
    ca = (
        issue(name, ca_key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = write_key(directory / f"{role}.key")
        cert = (
            issue(f"llmq {role}", key, ca.subject)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory


def group_pids(pgid: int) -> list[int]:
    """The processes of process group `pgid` (Linux: /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp
            pids.append(int(stat.parent.name))
    return sorted(pids)


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open (Linux: /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def tcp_ports_by_inode(remote_port: int) -> dict[int, int]:
    """Loopback TCP connections to `remote_port` on this machine: socket inode -> local port."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, remote, inode = cols[1], cols[2], int(cols[9])
                if int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    found[inode] = int(local.rsplit(":", 1)[1], 16)
    return found


def redis_clients_by_pid(client_list: list[dict], pids: list[int], redis_port: int) -> dict[int, list[dict]]:
    """Redis's CLIENT LIST entries (redis-py's `client_list()`) of each of `pids`, matched
    through the client's local port and the process's sockets."""
    ports = tcp_ports_by_inode(redis_port)
    by_port = {int(c["addr"].rsplit(":", 1)[1]): c for c in client_list}
    out: dict[int, list[dict]] = {}
    for pid in pids:
        out[pid] = [by_port[ports[i]] for i in socket_inodes(pid) if i in ports and ports[i] in by_port]
    return out


def subscriber(client: dict) -> bool:
    """A CLIENT LIST entry that is a pub/sub subscriber connection (channels or patterns)."""
    return int(client.get("sub", 0)) > 0 or int(client.get("psub", 0)) > 0 or int(client.get("ssub", 0)) > 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes] | None = None


@dataclass
class Stack:
    redis_port: int = 6379
    api_port: int = 8000
    flower_port: int | None = 5555
    workers: int = 1
    log_dir: Path | None = None  # None: processes write to this terminal
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    python: str = sys.executable
    # Redis with append-only persistence (fsync on every write), so a restarted Redis keeps
    # its jobs. Its data lives in `log_dir`/redis-data (or var/redis-<port>-aof).
    redis_persist: bool = False
    # A directory of `make_tls_files`: Redis then speaks TLS only (client certificates
    # required), REDIS_URL is rediss:// and REDIS_TLS_* name the files.
    redis_tls: Path | None = None
    # Every API process by name, on its own port; "api" is the one on `api_port`.
    api_ports: dict[str, int] = field(default_factory=dict)
    # How each worker was started (its extra environment), so `restart` can start it again.
    worker_envs: dict[str, dict[str, str]] = field(default_factory=dict)
    # The address API processes listen on: loopback unless the API requires keys.
    api_host: str = "127.0.0.1"
    # Processes behind each API port (uvicorn's supervisor, api.serve); None: API_PROCESSES
    # from the environment (1 unless set). `start_api(processes=)` overrides it per API.
    api_processes: int | None = None
    api_process_counts: dict[str, int | None] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        scheme = "rediss" if self.redis_tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.redis_port}/0"

    @property
    def redis_tls_env(self) -> dict[str, str]:
        if self.redis_tls is None:
            return {}
        return {
            "REDIS_TLS_CA_FILE": str(self.redis_tls / "ca.crt"),
            "REDIS_TLS_CERT_FILE": str(self.redis_tls / "client.crt"),
            "REDIS_TLS_KEY_FILE": str(self.redis_tls / "client.key"),
        }

    def redis_client(self) -> redis.Redis:
        """A (blocking) client of this stack's Redis, over TLS if it speaks TLS."""
        import redis

        tls: dict[str, object] = {}
        if self.redis_tls is not None:
            tls = {
                "ssl_ca_certs": str(self.redis_tls / "ca.crt"),
                "ssl_certfile": str(self.redis_tls / "client.crt"),
                "ssl_keyfile": str(self.redis_tls / "client.key"),
            }
        return redis.Redis.from_url(self.redis_url, **tls)  # type: ignore[arg-type]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def url_of(self, name: str = "api") -> str:
        """The base URL of the API process called `name` (`start_api(name)`)."""
        port = self.api_port if name == "api" else self.api_ports[name]
        return f"http://127.0.0.1:{port}"

    @property
    def redis_data_dir(self) -> Path:
        if not self.redis_persist:
            return ROOT / "var" / f"redis-{self.redis_port}"
        if self.log_dir is not None:
            return self.log_dir / "redis-data"
        return ROOT / "var" / f"redis-{self.redis_port}-aof"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Workers serve their metrics on loopback here, like Flower and Redis (issue 9).
        env.setdefault("WORKER_METRICS_HOST", "127.0.0.1")
        # Tool calls as `vllm serve --enable-auto-tool-choice --tool-call-parser hermes`
        # answers them: the default model's chat format is ChatML, which hermes reads.
        env.setdefault("TOOL_CALL_PARSER", "hermes")
        env.update(self.env)
        env["REDIS_URL"] = self.redis_url
        env.update(self.redis_tls_env)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        out: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        # Own session: each service (and its children, e.g. vLLM's engine core) is one
        # process group that we can end without touching anything else.
        popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=self._env() if env is None else env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        proc = Proc(name, popen, out)
        self.procs.append(proc)
        print(f"started {name} (pid {popen.pid})", flush=True)
        return proc

    def start_redis(self) -> None:
        if redis_answers(self.redis_port, self.redis_tls):
            print(f"using the Redis server already on port {self.redis_port}", flush=True)
            return
        data = self.redis_data_dir
        data.mkdir(parents=True, exist_ok=True)
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.redis_persist else ["--appendonly", "no"]
        )
        listen = ["--port", str(self.redis_port)]
        if self.redis_tls is not None:
            t = self.redis_tls
            listen = [
                *("--port", "0", "--tls-port", str(self.redis_port)),
                *("--tls-cert-file", str(t / "server.crt"), "--tls-key-file", str(t / "server.key")),
                *("--tls-ca-cert-file", str(t / "ca.crt"), "--tls-auth-clients", "yes"),
            ]
        self.spawn(
            "redis",
            [
                "redis-server",
                *listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(data),
            ],
        )
        self._wait(lambda: redis_answers(self.redis_port, self.redis_tls), 20, "redis")

    def start_worker(self, name: str = "worker1", extra_env: dict[str, str] | None = None) -> Proc:
        env_args = [f"{k}={v}" for k, v in (extra_env or {}).items()]
        args = [
            self.python,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-n",
            f"{name}@%h",
            # Mingle and gossip make every (re)connection to the broker wait for other
            # workers' replies; nothing here needs them (Flower works from task events).
            "--without-mingle",
            "--without-gossip",
        ]
        if env_args:
            args = ["env", *env_args, *args]
        self.worker_envs[name] = dict(extra_env or {})
        return self.spawn(name, args)

    def start_api(self, name: str = "api", port: int | None = None, processes: int | None = None) -> Proc:
        """An API (`python -m api.serve`: `processes` uvicorn processes on one port, default
        `api_processes`); "api" listens on `api_port`, any other name on `port` (a free one
        by default). Its port and processes are kept for its restarts."""
        if port is None:
            port = self.api_port if name == "api" else self.api_ports.get(name) or free_port()
        elif name == "api":
            self.api_port = port
        self.api_ports[name] = port
        if processes is None:
            processes = self.api_process_counts.get(name, self.api_processes)
        self.api_process_counts[name] = processes
        args = [self.python, "-m", "api.serve", "--host", self.api_host, "--port", str(port), "--log-level", "warning"]
        if processes is not None:
            args += ["--processes", str(processes)]
        return self.spawn(name, args)

    def api_pids(self, name: str = "api", serving: bool = True) -> list[int]:
        """The processes of the API `name` that serve requests (one process: the one
        started; several: the children uvicorn's supervisor spawned), or with
        `serving=False` all of its process group (supervisor, multiprocessing's resource
        tracker), the one started first. From /proc."""
        group = self.proc(name).popen.pid
        pids = [group, *(pid for pid in group_pids(group) if pid != group)]
        if not serving:
            return pids
        children = []
        for pid in pids[1:]:
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    children.append(pid)
        return children or pids[:1]

    def flower_basic_auth(self) -> str | None:
        """Flower's `user:password` list: FLOWER_BASIC_AUTH from this stack's `env`, else
        from the settings (environment, CONFIG_PATH, .env); None: no authentication."""
        if "FLOWER_BASIC_AUTH" in self.env:
            return self.env["FLOWER_BASIC_AUTH"].strip() or None
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from common.settings import get_settings

        secret = get_settings().flower_basic_auth
        return secret.get_secret_value() if secret is not None else None

    def start_flower(self) -> Proc | None:
        """Flower on loopback only, with basic auth when configured. The credentials go
        in its environment (FLOWER_BASIC_AUTH, which Flower reads), not on its command line.
        Its app, common.flower_app, makes its Broker page list every model's queue by priority."""
        if self.flower_port is None:
            return None
        env = self._env()
        env.pop("FLOWER_BASIC_AUTH", None)
        auth = self.flower_basic_auth()
        if auth:
            env["FLOWER_BASIC_AUTH"] = auth
        return self.spawn(
            "flower",
            [
                self.python,
                "-m",
                "celery",
                "-A",
                "common.flower_app",
                "flower",
                f"--port={self.flower_port}",
                "--address=127.0.0.1",
            ],
            env=env,
        )

    def health(self, api: str = "api") -> dict | None:
        try:
            with urllib.request.urlopen(self.url_of(api) + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None

    def worker_metrics_urls(self) -> dict[str, str]:
        """Each registered worker's metrics URL, by worker id, from its registration in Redis
        ({} when Redis does not answer)."""
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import redis

        from common import keys
        from common.jobs import WorkerInfo

        try:
            with self.redis_client() as r:
                ids = [keys.text(i) for i in r.zrange(keys.WORKERS, 0, -1)]
                raws = r.mget([keys.worker(i) for i in ids]) if ids else []
        except redis.RedisError:
            return {}
        infos = [WorkerInfo.model_validate_json(raw) for raw in raws if raw]
        return {w.id: w.metrics_url for w in infos if w.metrics_url}

    def wait_ready(self, model: str, workers: int = 1, timeout: float = 600, api: str = "api") -> None:
        """Until the API (`api`: its name) answers and `model` has a live worker."""

        def ready() -> bool:
            self.check_alive()
            h = self.health(api)
            return bool(h and model in h.get("ready_models", []))

        self._wait(ready, timeout, f"API {api} with a live worker for {model}")

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.popen.poll()
            if code is not None and not getattr(p, "expected_exit", False):
                raise RuntimeError(
                    f"{p.name} exited with {code}" + (f"; see {self.log_dir}/{p.name}.log" if self.log_dir else "")
                )

    def _wait(self, check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s")

    def stop_proc(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        proc.expected_exit = True  # type: ignore[attr-defined]
        # The service itself first, so it can shut down its children in order (a worker
        # finishes its jobs, then stops its engine core); the rest of its group after.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.popen.pid, sig)
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(10)
        # Children left behind in the group (e.g. an engine core) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        if proc.log:
            proc.log.close()

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name and p.popen.poll() is None)

    def kill(self, name: str) -> None:
        """SIGKILL a service and everything in its process group (a crash, for tests)."""
        proc = self.proc(name)
        proc.expected_exit = True  # type: ignore[attr-defined]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)
        if proc.log:
            proc.log.close()

    def restart(self, name: str, sig: int = signal.SIGTERM) -> Proc | None:
        """Stop a service and start it again: redis (same port, and its data when
        persistent), any API (same port) or any worker started here (same name and
        environment). `sig`: SIGTERM stops it in order, SIGKILL crashes it."""
        if name != "redis" and name not in self.api_ports and name not in self.worker_envs:
            raise ValueError(name)
        if sig == signal.SIGKILL:
            self.kill(name)
        else:
            self.stop_proc(self.proc(name), sig)
        if name == "redis":
            self.start_redis()
            return None
        if name in self.api_ports:
            return self.start_api(name, self.api_ports[name])
        return self.start_worker(name, self.worker_envs[name])

    def running(self, prefix: str = "") -> list[str]:
        """Names of the services started here that still run (those starting with `prefix`)."""
        return [p.name for p in self.procs if p.name.startswith(prefix) and p.popen.poll() is None]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self.stop_proc(proc)
        self.procs.clear()


# A service that exits on its own is started again after BACKOFF_FIRST_S, doubling up to
# BACKOFF_MAX_S for each further exit; back to BACKOFF_FIRST_S once it has stayed up
# BACKOFF_RESET_S.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_S = 60.0


@dataclass
class Service:
    name: str
    start: Callable[[], object]
    proc: Proc | None
    started_at: float
    delay: float = BACKOFF_FIRST_S
    restarts: int = 0
    restart_at: float | None = None  # set while it waits to be started again


class Supervisor:
    """Keeps a `Stack`'s services running: `poll()` notices a service that exited and,
    after its backoff delay, starts it again with the `start` it was watched with. The
    other services are left alone. What remains of a dead service's process group (e.g.
    a worker's vLLM engine core) is killed, and the dead process leaves `stack.procs`, so
    `Stack.stop()` never signals a pid that may have been reused."""

    def __init__(self, stack: Stack, clock: Callable[[], float] = time.monotonic):
        self.stack = stack
        self.clock = clock
        self.services: dict[str, Service] = {}

    def watch(self, name: str, start: Callable[[], object]) -> None:
        """Supervise the service `name` started last in the stack, if there is one."""
        proc = self._newest(name)
        if proc is not None:
            self.services[name] = Service(name, start, proc, self.clock())

    def poll(self) -> None:
        for svc in list(self.services.values()):
            now = self.clock()
            if svc.restart_at is None:
                code = svc.proc.popen.poll() if svc.proc is not None else None
                if code is not None:
                    self._forget(svc)
                    self._schedule(svc, f"{svc.name} exited with {code}", uptime=now - svc.started_at)
            elif now >= svc.restart_at:
                self._start(svc)

    def _schedule(self, svc: Service, why: str, uptime: float) -> None:
        if uptime >= BACKOFF_RESET_S:
            svc.delay = BACKOFF_FIRST_S
        svc.restarts += 1
        svc.restart_at = self.clock() + svc.delay
        print(f"{why}; restarting in {svc.delay:g} s (restart {svc.restarts})", flush=True)
        svc.delay = min(svc.delay * 2, BACKOFF_MAX_S)

    def _start(self, svc: Service) -> None:
        svc.restart_at = None
        svc.started_at = self.clock()
        error: Exception | None = None
        try:
            svc.start()
        except Exception as exc:  # a start that failed is retried like an exit
            error = exc
        svc.proc = self._newest(svc.name)
        if svc.proc is None:
            if error is None:  # start_redis found another Redis server answering on its port
                print(f"{svc.name} is no longer started here", flush=True)
                del self.services[svc.name]
                return
            self._schedule(svc, f"could not start {svc.name}: {error}", uptime=0)
        elif error is not None:
            print(f"{svc.name}: {error}", flush=True)  # its process runs, or its exit is seen next

    def _newest(self, name: str) -> Proc | None:
        procs = [p for p in self.stack.procs if p.name == name]
        return procs[-1] if procs else None

    def _forget(self, svc: Service) -> None:
        proc = svc.proc
        if proc is None:
            return
        svc.proc = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            self.stack.procs.remove(proc)
        if proc.log:
            proc.log.close()


def run() -> int:
    sys.path.insert(0, str(ROOT))
    from common.settings import get_settings

    settings = get_settings()
    # With API keys the API listens on every interface (API_HOST to choose one); without
    # them it is open to anyone who reaches it, so it listens on loopback only.
    protected = bool(settings.api_keys.strip() or settings.api_keys_file)
    # API_PROCESSES as set; unset, one per two cores (at most 8): the workers need the rest.
    processes = (
        settings.api_processes
        if "api_processes" in settings.model_fields_set
        else max(1, min((os.cpu_count() or 1) // 2, 8))
    )
    stack = Stack(
        redis_port=int(os.environ.get("REDIS_PORT", 6379)),
        api_port=int(os.environ.get("API_PORT", 8000)),
        flower_port=int(os.environ.get("FLOWER_PORT", 5555)),
        api_host=os.environ.get("API_HOST", "0.0.0.0") if protected else "127.0.0.1",
        api_processes=processes,
    )
    if not protected:
        print(
            "no API_KEYS set: the API is open (no key needed) and listens on 127.0.0.1 only. "
            "Set API_KEYS (or API_KEYS_FILE) to require keys and listen on all interfaces.",
            flush=True,
        )
    for port, what in ((stack.api_port, "API_PORT"), (stack.flower_port, "FLOWER_PORT")):
        if port is not None and port_open(port):
            print(f"port {port} ({what}) is already in use; set {what} to another port", file=sys.stderr)
            return 1
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        # Only noted here: the loop below stops at its next turn, never halfway through
        # starting a process (which could then be left running).
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    # Explicitly: a shell that starts us in the background may have left SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    supervisor = Supervisor(stack)
    starts: list[tuple[str, Callable[[], object]]] = [
        ("redis", stack.start_redis),
        ("worker1", lambda: stack.start_worker("worker1")),
        ("api", stack.start_api),
        ("flower", stack.start_flower),
    ]
    try:
        for name, start in starts:
            if stopping:
                break
            start()
            supervisor.watch(name, start)  # redis only when started here
        if not stopping:
            print("starting: the worker builds its engine first (about a minute on a CPU) ...", flush=True)
        ready = False
        while not stopping:
            supervisor.poll()
            if not ready and settings.model_name in (stack.health() or {}).get("ready_models", []):
                ready = True
                print(
                    f"\nready: API http://{stack.api_host}:{stack.api_port}/v1 "
                    f"({'API keys required' if protected else 'open, loopback only'}; model {settings.model_name}; "
                    f"{processes} API process{'es' if processes > 1 else ''}, API_PROCESSES), "
                    f"Flower http://127.0.0.1:{stack.flower_port} "
                    f"({'basic auth' if stack.flower_basic_auth() else 'unauthenticated, loopback only'}), "
                    f"Redis {stack.redis_url}.\n"
                    f"Metrics (Prometheus): API http://{stack.api_host}:{stack.api_port}/metrics, "
                    f"worker {' '.join(stack.worker_metrics_urls().values()) or '(none announced)'}, "
                    f"Flower http://127.0.0.1:{stack.flower_port}/metrics; a Prometheus and Grafana dashboard: "
                    "`docker compose --profile monitoring up` (see README).\n"
                    "A service that exits is restarted (after 1 s, doubling up to 30 s if it keeps "
                    "exiting). Ctrl-C stops everything.\n",
                    flush=True,
                )
            time.sleep(0.5)
        print("\nstopping ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["run"]:
        print(__doc__)
        sys.exit(2)
    sys.exit(run())
