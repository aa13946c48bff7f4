"""The pure parts of the trust model: policies, tokens, capacity checks, posture.

Fast (no processes); the end-to-end cases are in tests/test_security.py.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import pytest

from coordinator import security
from coordinator.access import parse_api_key
from coordinator.membership import checked_capacity
from coordinator.pki import FleetCA
from edgefleet import auth, tls
from edgefleet.auth import ADMIN, ANONYMOUS, INFERENCE, INSECURE, Principal, permitted
from edgefleet.errors import EdgefleetError, Reason
from edgefleet.v1 import access_pb2, common_pb2, coordinator_pb2, models_pb2, node_pb2
from node_agent.daemon import NODE_POLICIES

admin_key = Principal("key", "k1", "ops", frozenset({ADMIN, INFERENCE}))
user_key = Principal("key", "k2", "app", frozenset({INFERENCE}))
node = Principal("node", "n1", "n1")
coordinator = Principal("coordinator", "c1", "c1")


@pytest.mark.parametrize(
    ("policy", "caller", "expected"),
    [
        (auth.PUBLIC, None, None),
        (auth.NOT_HERE, admin_key, Reason.NOT_PERMITTED),
        (INFERENCE, None, Reason.NOT_AUTHENTICATED),
        (INFERENCE, user_key, None),
        (INFERENCE, ANONYMOUS, None),
        (ADMIN, user_key, Reason.NOT_PERMITTED),
        (ADMIN, ANONYMOUS, Reason.NOT_PERMITTED),
        (ADMIN, admin_key, None),
        (INFERENCE, node, Reason.NOT_PERMITTED),  # a node's certificate is not an API key
        (auth.NODE, node, None),
        (auth.NODE, admin_key, Reason.NOT_PERMITTED),
        (auth.NODE, coordinator, Reason.NOT_PERMITTED),
        (auth.COORDINATOR, coordinator, None),
        (auth.COORDINATOR, node, Reason.NOT_PERMITTED),
        (auth.COORDINATOR, None, Reason.NOT_AUTHENTICATED),
        (auth.FLEET, node, None),
        (auth.FLEET, coordinator, None),
        (auth.FLEET, admin_key, Reason.NOT_PERMITTED),
        (auth.FLEET, None, Reason.NOT_AUTHENTICATED),
        (ADMIN, INSECURE, None),
    ],
)
def test_who_may_call_under_which_policy(policy, caller, expected):
    assert permitted(policy, caller) is expected


def test_every_rpc_of_every_listener_has_a_policy():
    services = {
        "edgefleet.v1.CoordinatorService": coordinator_pb2,
        "edgefleet.v1.AccessService": access_pb2,
        "edgefleet.v1.ModelService": models_pb2,
    }
    for table in (security.CLIENT_POLICIES, security.NODE_POLICIES):
        for service, module in services.items():
            short = service.rsplit(".", 1)[1]
            methods = set(module.DESCRIPTOR.services_by_name[short].methods_by_name)
            assert set(table[service]) == methods
            assert set(table[service].values()) <= set(auth.POLICIES)
    node_methods = node_pb2.DESCRIPTOR.services_by_name["NodeService"].methods_by_name
    # Coordinators call nodes; other nodes only fetch model files from them.
    assert NODE_POLICIES == {
        name: auth.NODE if name == "FetchModel" else auth.COORDINATOR for name in node_methods
    }
    # Model files: operators add them, nodes fetch them (node listener only).
    models = security.CLIENT_POLICIES["edgefleet.v1.ModelService"]
    assert (models["AddModel"], models["FetchModel"]) == (auth.ADMIN, auth.NOT_HERE)
    # ...and other coordinator replicas (a file added through one of them).
    assert security.NODE_POLICIES["edgefleet.v1.ModelService"]["FetchModel"] == auth.FLEET
    # Nodes may do on the client port nothing but join.
    client = security.CLIENT_POLICIES
    assert client["edgefleet.v1.CoordinatorService"]["Register"] == auth.NOT_HERE
    assert {m for m, p in client["edgefleet.v1.AccessService"].items() if p == auth.PUBLIC} == {
        "Join",
        "NodeEndpoints",
    }


def test_a_guard_refuses_a_service_with_an_rpc_left_out():
    from coordinator.access_service import AccessServicer

    table = dict(security.CLIENT_POLICIES["edgefleet.v1.AccessService"])
    del table["ListAudit"]
    with pytest.raises(ValueError, match="ListAudit"):
        auth.guard(AccessServicer(None), "edgefleet.v1.AccessService", table, None)


def test_sessions_are_visible_to_their_key_only():
    assert auth.owner_may_see(user_key.owner, user_key)
    assert not auth.owner_may_see(user_key.owner, admin_key)
    assert not auth.owner_may_see(user_key.owner, ANONYMOUS)
    assert auth.owner_may_see("anything", INSECURE)


def test_join_tokens_parse_and_pin():
    ca = FleetCA.generate()
    token = tls.format_token(ca.fingerprint, "abc123", "s3cret-_x")
    parsed = tls.parse_token(token)
    assert (parsed.token_id, parsed.secret) == ("abc123", "s3cret-_x")
    assert tls.pin_matches(parsed.pin, ca.fingerprint)
    assert not tls.pin_matches(parsed.pin, FleetCA.generate().fingerprint)
    for bad in ("", "K10abc::x", "EF1.zz.abc.x", f"EF1.{'0' * 32}.a-b.x", f"EF1.{'0' * 32}.ab."):
        with pytest.raises(EdgefleetError) as caught:
            tls.parse_token(bad)
        assert caught.value.reason is Reason.TOKEN_MALFORMED
    assert parse_api_key("efk_abc_def") == ("abc", "def")
    assert parse_api_key("sk-abc") is None


def test_certificates_name_one_principal_and_check_the_csr():
    ca = FleetCA.generate()
    key = tls.new_key()
    cert = ca.issue(tls.csr_for(key, tls.NODE, "n-1"), role=tls.NODE, principal_id="n-1", ttl_s=60)
    identity = tls.identity_of(cert)
    assert (identity.role, identity.principal_id) == ("node", "n-1")
    assert 60 <= identity.lifetime_s <= 60 + 301  # backdated five minutes for clock drift
    # Renewed two thirds into the life it was issued for, not into the backdated one.
    assert 35 <= tls.renew_at(cert) - time.time() <= 41
    assert tls.is_ca(ca.cert_pem) and not tls.is_ca(cert)
    with pytest.raises(EdgefleetError) as caught:
        ca.issue(b"not a csr", role=tls.NODE, principal_id="n-1", ttl_s=60)
    assert caught.value.reason is Reason.BAD_CSR
    # The sealed CA opens with its fleet secret only.
    sealed = ca.sealed("secret-1")
    assert FleetCA.unsealed(sealed, "secret-1").fingerprint == ca.fingerprint
    with pytest.raises(ValueError, match="fleet secret"):
        FleetCA.unsealed(sealed, "secret-2")


def _capacity(*models) -> common_pb2.Capacity:
    return common_pb2.Capacity(
        models=[
            common_pb2.LoadedModel(
                alias=a, slots_total=t, slots_free=f, queue_depth=d, queue_limit=q
            )
            for a, t, f, d, q in models
        ]
    )


def test_a_nodes_reported_capacity_is_held_to_its_registration():
    declared = _capacity(("m", 2, 2, 0, 8))
    honest = checked_capacity(declared, _capacity(("m", 2, 1, 3, 8)))
    assert (honest.models[0].slots_free, honest.models[0].queue_depth) == (1, 3)
    inflated = checked_capacity(declared, _capacity(("m", 64, 64, 0, 4096)))
    model = inflated.models[0]
    assert (model.slots_total, model.slots_free, model.queue_limit) == (2, 2, 8)
    # A model loaded later gets at most the largest declared size.
    late = checked_capacity(declared, _capacity(("other", 99, 99, 500, 500)))
    assert (late.models[0].slots_total, late.models[0].queue_limit) == (2, 8)
    assert late.models[0].queue_depth == 8


def _config(**overrides):
    base = {
        "insecure": False,
        "http": "127.0.0.1:8080",
        "tls_auto": False,
        "tls_cert": "",
        "tls_key": "",
        "tls_ca": "",
        "tls_ca_key": "",
    }
    return SimpleNamespace(**{**base, **overrides})


def test_posture_refuses_plaintext_http_off_loopback():
    assert security.posture_problems(_config()) == []
    assert security.posture_problems(_config(http="off")) == []
    assert "not loopback" in security.posture_problems(_config(http="0.0.0.0:8080"))[0]
    assert security.posture_problems(_config(http="0.0.0.0:8080", tls_auto=True)) == []
    assert security.posture_problems(_config(http="0.0.0.0:8080", insecure=True)) == []
    assert security.posture_problems(_config(tls_cert="c.pem"))  # without its key
    assert tls.is_loopback("[::1]:1") and tls.is_loopback("localhost:1")
    assert not tls.is_loopback("10.0.0.5:1")


def test_a_node_that_breaks_the_protocol_stays_out_whatever_it_reports():
    from coordinator.fleet import FleetView
    from coordinator.keys import Keys
    from coordinator.router import PROTOCOL_BREAKS, Verdict, verdict

    fleet = FleetView(None, Keys("/test/"))
    fleet.quarantine("rogue", "UNIMPLEMENTED", seconds=0.2)
    fleet.suspect("flaky", "stall")
    assert fleet.is_suspect("rogue") and fleet.is_suspect("flaky")
    time.sleep(0.25)
    assert not fleet.is_suspect("rogue")
    # A reasonless UNIMPLEMENTED is a node fault (failed over), never the caller's.
    assert grpc.StatusCode.UNIMPLEMENTED in PROTOCOL_BREAKS
    assert verdict(grpc.StatusCode.UNIMPLEMENTED, None) is Verdict.NODE_FAULT


def test_a_relisted_mirror_forgets_keys_and_identities_deleted_while_it_was_away():
    from coordinator.access import Access
    from coordinator.keys import Keys

    keys = Keys("/test/")
    access = Access(None, keys, FleetCA.generate())
    access._api_keys.update({"kept": {}, "revoked": {}})
    access.identities["n1"] = access_pb2.NodeIdentity(node_id="n1")
    _, forget_keys = access._keys_mirror.handlers
    _, forget_identities = access._identities.handlers
    forget_keys({keys.api_key("kept")})
    forget_identities(set())
    assert list(access._api_keys) == ["kept"] and access.identities == {}
