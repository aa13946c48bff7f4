"""The etcd key layout, in one place (see shared/DESIGN.md).

<prefix>nodes/<node_id>                NodeStatus          lease: the node's
<prefix>drain/<node_id>                "1"                 no lease (operator intent)
<prefix>sessions/<session_id>          Session             lease: session idle TTL
<prefix>session-node/<node>/<session>  ""                  lease: session idle TTL
<prefix>turns/<session_id>             turn id             lease: the replica's
<prefix>responses/<response_id>        Session             lease: session idle TTL
<prefix>usage/<owner>/<kind>/<class>/<id>  ""            lease: the record's (storage quota)
<prefix>models/<alias>                 RegisteredModel     no lease (operator intent)
<prefix>deployments/<alias>            Deployment          no lease (operator intent)
<prefix>coordinators/<coordinator_id>  CoordinatorRecord   lease: the replica's
<prefix>leader/<task>                  coordinator id      lease: the replica's
<prefix>ca                             fleet CA (key sealed with the fleet secret)
<prefix>tokens/<token_id>              JoinToken (secret hashed)   lease: token TTL
<prefix>identities/<node_id>           NodeIdentity (approved, revoked, serial)
<prefix>apikeys/<key_id>               ApiKey (secret hashed, scopes)
<prefix>audit/<time>-<id>              one admin action, JSON      lease: audit retention
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

DEFAULT_PREFIX = "/edgefleet/v1/"


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"etcd prefix must start and end with '/': {self.prefix!r}")

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes/"

    def node(self, node_id: str) -> str:
        return f"{self.nodes}{node_id}"

    @property
    def drains(self) -> str:
        return f"{self.prefix}drain/"

    def drain(self, node_id: str) -> str:
        return f"{self.drains}{node_id}"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}sessions/"

    def session(self, session_id: str) -> str:
        return f"{self.sessions}{session_id}"

    @property
    def sessions_by_node(self) -> str:
        return f"{self.prefix}session-node/"

    def session_node(self, node_id: str, session_id: str) -> str:
        return f"{self.sessions_by_node}{node_id}/{session_id}"

    def response(self, response_id: str) -> str:
        return f"{self.prefix}responses/{response_id}"

    def turn(self, session_id: str) -> str:
        return f"{self.prefix}turns/{session_id}"

    # --- storage quota: one usage key per stored record, under the record's lease ----
    def usage(self, owner: str) -> str:
        """Everything that ``owner`` (an API key, "anonymous") stores, by kind and class."""
        return f"{self.prefix}usage/{quote(owner, safe=':')}/"

    def usage_class(self, owner: str, kind: str, charge_class: int) -> str:
        return f"{self.usage(owner)}{kind}/{charge_class:02d}/"

    def usage_record(self, owner: str, kind: str, charge_class: int, record_id: str) -> str:
        return f"{self.usage_class(owner, kind, charge_class)}{record_id}"

    @property
    def models(self) -> str:
        return f"{self.prefix}models/"

    def model(self, alias: str) -> str:
        return f"{self.models}{alias}"

    @property
    def deployments(self) -> str:
        return f"{self.prefix}deployments/"

    def deployment(self, alias: str) -> str:
        return f"{self.deployments}{alias}"

    @property
    def coordinators(self) -> str:
        return f"{self.prefix}coordinators/"

    def coordinator(self, coordinator_id: str) -> str:
        return f"{self.coordinators}{coordinator_id}"

    def leader(self, task: str) -> str:
        return f"{self.prefix}leader/{task}"

    # --- security: the CA, join tokens, node identities, API keys, audit -------------
    @property
    def ca(self) -> str:
        return f"{self.prefix}ca"

    @property
    def tokens(self) -> str:
        return f"{self.prefix}tokens/"

    def token(self, token_id: str) -> str:
        return f"{self.tokens}{token_id}"

    @property
    def identities(self) -> str:
        return f"{self.prefix}identities/"

    def identity(self, node_id: str) -> str:
        return f"{self.identities}{node_id}"

    @property
    def api_keys(self) -> str:
        return f"{self.prefix}apikeys/"

    def api_key(self, key_id: str) -> str:
        return f"{self.api_keys}{key_id}"

    @property
    def audit(self) -> str:
        return f"{self.prefix}audit/"

    @staticmethod
    def last_segment(key: str) -> str:
        return key.rsplit("/", 1)[-1]
