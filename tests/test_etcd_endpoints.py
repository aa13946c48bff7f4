"""etcd endpoints may be host names (compose services, Kubernetes pods)."""

from __future__ import annotations

import socket

import pytest

from coordinator.etcd import resolve_endpoints
from edgefleet.client import FleetClient
from edgefleet.local.processes import free_port, start_coordinator


def test_names_resolve_to_addresses_and_the_first_name_is_kept_for_tls(monkeypatch):
    def fake_getaddrinfo(host, port, *args):
        if host != "etcd-1":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert resolve_endpoints(["etcd-1:2379", "10.0.0.2:2379"]) == (
        ["10.0.0.1:2379", "10.0.0.2:2379"],
        "etcd-1",
    )
    assert resolve_endpoints(["127.0.0.1:2379"]) == (["127.0.0.1:2379"], "")
    with pytest.raises(ValueError, match="not host:port"):
        resolve_endpoints(["etcd-1"])
    with pytest.raises(ValueError, match="cannot resolve"):
        resolve_endpoints(["no-such-host:2379"])


def _loopback_name() -> str | None:
    # Not "localhost": the etcd client library special-cases that one name.
    for name in (socket.gethostname(), "ip6-localhost"):
        try:
            if socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    return None


def test_a_coordinator_reaches_etcd_by_host_name(etcd_cluster, tmp_path):
    name = _loopback_name()
    if name is None:
        pytest.skip("this machine's host name does not resolve to 127.0.0.1")
    port = etcd_cluster.endpoints[0].rsplit(":", 1)[1]
    coordinator = start_coordinator(
        grpc_address=f"127.0.0.1:{free_port()}",
        etcd=[f"{name}:{port}"],
        log_path=tmp_path / "coordinator.log",
    )
    try:
        coordinator.wait_serving(60)
        with FleetClient([coordinator.address]) as client:
            assert client.status().coordinators
    finally:
        coordinator.terminate(15)


def test_a_mirror_of_records_follows_puts_deletes_and_missed_deletes():
    from coordinator.etcd import KeyedRecords, KeyValue

    heard = []
    records = KeyedRecords(
        lambda value: int(value), what="number", changed=lambda *c: heard.append(c)
    )

    def kv(name, value=b""):
        return KeyValue(f"/p/numbers/{name}", value, 1, 1, 0)

    records.apply(kv("a", b"1"), deleted=False)
    records.apply(kv("a", b"2"), deleted=False)
    records.apply(kv("b", b"not a number"), deleted=False)  # skipped, the mirror goes on
    records.apply(kv("c", b"3"), deleted=False)
    records.apply(kv("c"), deleted=True)
    records.apply(kv("never"), deleted=True)  # nothing to hear
    records.apply(kv("d", b"4"), deleted=False)
    records.forget({"/p/numbers/a"})  # "d" was deleted while the watch was down
    assert records.items == {"a": 2}
    assert heard == [
        ("a", None, 1),
        ("a", 1, 2),
        ("c", None, 3),
        ("c", 3, None),
        ("d", None, 4),
        ("d", 4, None),
    ]
    # Credentials fail closed: an unreadable write drops what was held.
    keys = KeyedRecords(lambda value: int(value), what="key", fail_closed=True)
    keys.apply(kv("a", b"1"), deleted=False)
    keys.apply(kv("a", b"revoked, but garbled"), deleted=False)
    assert keys.items == {}
