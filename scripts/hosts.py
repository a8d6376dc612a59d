"""Simulated hosts on one machine: network namespaces that reach Redis over a link of their own.

    net = HostNet.create()                 # a bridge with the first address of a private /24
    stack = HostStack(..., net=net)
    stack.start_redis()                    # Redis on loopback and on the bridge's address
    a = net.add_host()                     # a namespace, a veth pair: one end in it, one on the bridge
    net.start_worker(stack, a, "a-w1")     # a Celery worker inside it (`ip netns exec`)
    net.cut(a); net.restore(a)             # a partition, and its end
    net.lose_host(stack, a)                # its link down, then its processes SIGKILLed
    net.close(stack)                       # its processes, namespaces, links and bridge gone

A worker in a namespace has no loopback path to Redis: it talks to the bridge's address
over its veth, as a worker on another machine talks over the network, and taking that
link down is what a host that loses power or its network looks like to everyone else
(no FIN, no RST: Redis keeps the dead connections until TCP gives up on them).

Needs root (CAP_NET_ADMIN) and iproute2. Every name carries a tag of its own, so runs
side by side never meet, and `close` removes everything this `HostNet` made, whatever
state the run ended in (a run killed outright leaves them: `ip netns list`, `ip link`,
names starting llmq- and lq). Integration tests (tests/integration/test_hosts.py) and the
scaling benchmark (bench/bench_hosts.py) use it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import subprocess
import uuid
from dataclasses import dataclass, field

from stack import Proc, Stack


class HostNetError(RuntimeError):
    """A namespace or link could not be made (the command and what it said)."""


def ip(*args: str, check: bool = True) -> str:
    """Run `ip args...`; on failure raise HostNetError with its output (unless `check` is off)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise HostNetError(f"ip {' '.join(args)}: {(done.stderr or done.stdout).strip()} (exit {done.returncode})")
    return done.stdout


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for entry in json.loads(ip("-j", "-4", "addr") or "[]"):
        for a in entry.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    return nets


def free_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A private /24 (in 10.0.0.0/8) no address or route on this machine overlaps."""
    rng = rng or random.Random()
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{rng.randint(100, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise HostNetError("no free private /24 found in 10.100.0.0-10.254.255.0")


@dataclass
class SimHost:
    """One simulated host: a namespace whose only link is a veth to the bridge."""

    name: str  # short, for process names ("h1")
    netns: str
    outside: str  # the veth end on the bridge (in the root namespace)
    inside: str  # the veth end in the namespace
    address: str  # its address on the /24
    procs: list[Proc] = field(default_factory=list)


@dataclass
class HostNet:
    tag: str
    subnet: ipaddress.IPv4Network
    bridge: str
    hosts: list[SimHost] = field(default_factory=list)
    _bridge_made: bool = False

    @classmethod
    def create(cls) -> HostNet:
        """A bridge holding the first address of a free /24: where simulated hosts reach
        this machine (Redis listens there)."""
        tag = uuid.uuid4().hex[:5]
        net = cls(tag=tag, subnet=free_subnet(), bridge=f"lq{tag}br")
        try:
            ip("link", "add", net.bridge, "type", "bridge")
            net._bridge_made = True
            ip("addr", "add", f"{net.gateway}/{net.subnet.prefixlen}", "dev", net.bridge)
            ip("link", "set", net.bridge, "up")
        except BaseException:
            net.close()
            raise
        return net

    @property
    def gateway(self) -> str:
        """The bridge's address: this machine, as the simulated hosts see it."""
        return str(self.subnet.network_address + 1)

    def redis_url(self, stack: Stack) -> str:
        """The stack's Redis as a simulated host reaches it."""
        password = getattr(stack, "redis_password", None)
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self.gateway}:{stack.redis_port}/0"

    def add_host(self) -> SimHost:
        i = len(self.hosts) + 1
        if i > 250:
            raise HostNetError("a /24 holds 250 simulated hosts here")
        host = SimHost(
            name=f"h{i}",
            netns=f"llmq-{self.tag}-h{i}",
            outside=f"lq{self.tag}h{i}",
            inside=f"lq{self.tag}n{i}",
            address=str(self.subnet.network_address + 1 + i),
        )
        self.hosts.append(host)  # before anything is made: `close` removes whatever was
        ip("netns", "add", host.netns)
        ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside, "netns", host.netns)
        ip("link", "set", host.outside, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", host.inside)
        ip("-n", host.netns, "link", "set", host.inside, "up")
        # Its own loopback, for what a worker serves to itself (its metrics, by default).
        ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def start_worker(self, stack: Stack, host: SimHost, name: str, extra_env: dict[str, str] | None = None) -> Proc:
        """A Celery worker in `host`'s namespace, started as `Stack.start_worker` starts one
        (same command line and environment) but with REDIS_URL over the host's link. Its
        own process group, in `stack.procs` (so `stack.stop()` ends it too)."""
        env = stack._env()
        # Its metrics on its own address, as a worker on another machine serves them (and
        # announces them in its registration: where the API's /metrics/targets finds them).
        env["WORKER_METRICS_HOST"] = host.address
        env.update(extra_env or {})
        env["REDIS_URL"] = self.redis_url(stack)
        args = [
            "ip",
            "netns",
            "exec",
            host.netns,  # execs the command: the process group is the worker's own
            stack.python,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-n",
            f"{name}@{host.netns}",
            "--without-mingle",
            "--without-gossip",
        ]
        proc = stack.spawn(name, args, env=env)
        host.procs.append(proc)
        return proc

    def cut(self, host: SimHost) -> None:
        """Take `host`'s link down: from now on nothing it sends arrives, not even a FIN."""
        ip("link", "set", host.outside, "down")

    def restore(self, host: SimHost) -> None:
        """Bring `host`'s link up again (a partition that heals): its open connections
        carry on where TCP left them."""
        ip("link", "set", host.outside, "up")

    def lose_host(self, stack: Stack, host: SimHost) -> None:
        """The host is gone at once: its link down first (so nobody hears its sockets
        close), then every process group started on it SIGKILLed."""
        self.cut(host)
        for proc in host.procs:
            if proc.popen.poll() is None:
                stack.kill(proc.name)

    def stop_host(self, stack: Stack, host: SimHost) -> None:
        """The host's processes stopped in order (SIGTERM: a worker leaves cleanly)."""
        for proc in host.procs:
            if proc.popen.poll() is None:
                stack.stop_proc(proc)

    def close(self, stack: Stack | None = None) -> None:
        """Remove everything made here: the processes started in the namespaces (by their
        process groups), then the links, the namespaces and the bridge. Safe to call on a
        half-made net and more than once."""
        for host in self.hosts:
            for proc in host.procs:
                if stack is not None and proc.popen.poll() is None:
                    stack.stop_proc(proc, timeout=10)
            # Deleting one end of a veth deletes both; a namespace is gone once its name
            # is removed and nothing runs in it.
            ip("link", "del", host.outside, check=False)
            ip("netns", "del", host.netns, check=False)
        self.hosts.clear()
        if self._bridge_made:
            ip("link", "del", self.bridge, check=False)
            self._bridge_made = False

    def leftovers(self) -> list[str]:
        """Anything of this net's that still exists (namespaces, links): [] after `close`."""
        names = [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]
        links = [entry["ifname"] for entry in json.loads(ip("-j", "link") or "[]")]
        return [n for n in names + links if self.tag in n]


@dataclass
class HostStack(Stack):
    """A `Stack` whose Redis also listens on `net`'s bridge, for workers on simulated hosts,
    with a password, as a Redis reachable from other machines has (compose's
    `--requirepass`; Redis 7 refuses non-loopback clients of a password-less server).
    Every process started here gets the password in its REDIS_URL."""

    net: HostNet | None = None
    redis_password: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"

    def redis_answers(self) -> bool:
        import redis

        try:
            with redis.Redis.from_url(self.redis_url, socket_timeout=1) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def start_redis(self) -> None:
        """Redis (no persistence) on loopback, for the API, and on the bridge's address."""
        assert self.net is not None, "HostStack needs its HostNet before Redis starts"
        data = self.redis_data_dir
        data.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", self.net.gateway]
        args += ["--requirepass", self.redis_password, "--save", "", "--appendonly", "no", "--dir", str(data)]
        self.spawn("redis", args)
        self._wait(self.redis_answers, 20, "redis")


def namespaces_supported() -> str | None:
    """None when this process may make network namespaces, else why not (what failed)."""
    if os.geteuid() != 0:
        return "not root: network namespaces need CAP_NET_ADMIN"
    probe = f"llmq-probe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", probe)
    except (HostNetError, OSError) as exc:
        return str(exc)
    ip("netns", "del", probe, check=False)
    return None
