"""Hosts on one machine: Linux network namespaces joined by a bridge, for multi-node tests and
`foundry bench scaling` (root only).

Each host is a network namespace with one veth interface and its own address in a private /24;
the other ends of the veths sit on a bridge inside a switch namespace of their own, so nothing is
added to the machine's own network and only the hosts' addresses are ever reached. A process
runs on a host through ``ip netns exec``; killing every process of a namespace is a machine
dying. Everything is created under names that start with a per-network prefix and deleted by
those names.
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

SUBNET = "10.213.7"  # hosts are SUBNET.1, SUBNET.2, ... /24 (private; namespaced, so never routed)
INTERFACE = "eth0"  # every host's interface, inside its namespace


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def can_make_namespaces() -> str | None:
    """None when this process can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if subprocess.run(["ip", "-V"], capture_output=True).returncode:
        return "iproute2's `ip` command is missing"
    return None


@dataclass(frozen=True)
class NamespaceHost:
    namespace: str
    address: str
    interface: str = INTERFACE

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def pids(self) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.namespace).split()]

    def kill(self) -> list[int]:
        """SIGKILL every process of this host at once (the machine dies); returns their pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


class NamespaceNetwork:
    """``hosts`` namespace hosts on one bridge; a context manager that deletes them on exit."""

    def __init__(self, hosts: int, prefix: str | None = None):
        if not 1 <= hosts <= 250:
            raise ValueError(f"hosts must be in [1, 250], got {hosts}")
        self.prefix = prefix or f"fdy{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [NamespaceHost(f"{self.prefix}-h{i}", f"{SUBNET}.{i + 1}") for i in range(hosts)]

    def __enter__(self) -> NamespaceNetwork:
        try:
            self._create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            port = f"port{i}"
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "add", host.interface, "type", "veth", "peer", "name", port,
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")

    def delete(self) -> None:
        """Kill what still runs on the hosts, then delete every namespace of this network by name."""
        existing = set(_ip("netns", "list").split())
        for namespace in [h.namespace for h in self.hosts] + [self.switch]:
            if namespace not in existing:
                continue
            if namespace != self.switch:
                NamespaceHost(namespace, "").kill()
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
