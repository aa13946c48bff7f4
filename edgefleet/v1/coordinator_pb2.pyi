from edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "address", "models", "capacity", "labels", "version", "pid")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    models: _containers.RepeatedScalarFieldContainer[str]
    capacity: _common_pb2.Capacity
    labels: _containers.ScalarMap[str, str]
    version: str
    pid: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., capacity: _Optional[_Union[_common_pb2.Capacity, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "lease_ttl_seconds", "heartbeat_interval_seconds", "epoch", "node_endpoints")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NODE_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    lease_ttl_seconds: float
    heartbeat_interval_seconds: float
    epoch: int
    node_endpoints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., lease_ttl_seconds: _Optional[float] = ..., heartbeat_interval_seconds: _Optional[float] = ..., epoch: _Optional[int] = ..., node_endpoints: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "epoch", "capacity", "state")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    capacity: _common_pb2.Capacity
    state: _common_pb2.NodeState
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ..., capacity: _Optional[_Union[_common_pb2.Capacity, _Mapping]] = ..., state: _Optional[_Union[_common_pb2.NodeState, str]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("command", "lease_ttl_seconds")
    class Command(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        COMMAND_NONE: _ClassVar[HeartbeatResponse.Command]
        COMMAND_REREGISTER: _ClassVar[HeartbeatResponse.Command]
        COMMAND_DRAIN: _ClassVar[HeartbeatResponse.Command]
        COMMAND_RESUME: _ClassVar[HeartbeatResponse.Command]
    COMMAND_NONE: HeartbeatResponse.Command
    COMMAND_REREGISTER: HeartbeatResponse.Command
    COMMAND_DRAIN: HeartbeatResponse.Command
    COMMAND_RESUME: HeartbeatResponse.Command
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    command: HeartbeatResponse.Command
    lease_ttl_seconds: float
    def __init__(self, command: _Optional[_Union[HeartbeatResponse.Command, str]] = ..., lease_ttl_seconds: _Optional[float] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("node_id", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("model", "system_prompt", "metadata", "idle_ttl_seconds")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    system_prompt: str
    metadata: _containers.ScalarMap[str, str]
    idle_ttl_seconds: float
    def __init__(self, model: _Optional[str] = ..., system_prompt: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., idle_ttl_seconds: _Optional[float] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "model", "messages", "metadata", "node_id", "created_at", "updated_at", "turns", "idle_ttl_seconds", "last_turn_id", "owner")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    metadata: _containers.ScalarMap[str, str]
    node_id: str
    created_at: float
    updated_at: float
    turns: int
    idle_ttl_seconds: float
    last_turn_id: str
    owner: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., node_id: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., turns: _Optional[int] = ..., idle_ttl_seconds: _Optional[float] = ..., last_turn_id: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("session_id", "content", "sampling", "resume_turn_id", "assistant_prefix")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUME_TURN_ID_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    content: str
    sampling: _common_pb2.SamplingParams
    resume_turn_id: str
    assistant_prefix: str
    def __init__(self, session_id: _Optional[str] = ..., content: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., resume_turn_id: _Optional[str] = ..., assistant_prefix: _Optional[str] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("model", "messages", "sampling", "constraint", "tools", "affinity_key", "assistant_prefix")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_KEY_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    constraint: _common_pb2.OutputConstraint
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolDefinition]
    affinity_key: str
    assistant_prefix: str
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., constraint: _Optional[_Union[_common_pb2.OutputConstraint, _Mapping]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolDefinition, _Mapping]]] = ..., affinity_key: _Optional[str] = ..., assistant_prefix: _Optional[str] = ...) -> None: ...

class ChatChunk(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "node_id", "session_id", "model", "tool_calls", "turn_id", "failovers", "token_count")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    node_id: str
    session_id: str
    model: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    turn_id: str
    failovers: int
    token_count: int
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., node_id: _Optional[str] = ..., session_id: _Optional[str] = ..., model: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., turn_id: _Optional[str] = ..., failovers: _Optional[int] = ..., token_count: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "state", "capacity", "models", "pid", "last_heartbeat_age_seconds", "sessions", "labels", "epoch", "heartbeat_at", "coordinator_id", "version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: _common_pb2.NodeState
    capacity: _common_pb2.Capacity
    models: _containers.RepeatedScalarFieldContainer[str]
    pid: int
    last_heartbeat_age_seconds: float
    sessions: int
    labels: _containers.ScalarMap[str, str]
    epoch: int
    heartbeat_at: float
    coordinator_id: str
    version: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., capacity: _Optional[_Union[_common_pb2.Capacity, _Mapping]] = ..., models: _Optional[_Iterable[str]] = ..., pid: _Optional[int] = ..., last_heartbeat_age_seconds: _Optional[float] = ..., sessions: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., epoch: _Optional[int] = ..., heartbeat_at: _Optional[float] = ..., coordinator_id: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class CoordinatorRecord(_message.Message):
    __slots__ = ("coordinator_id", "grpc_address", "http_address", "started_at", "pid", "node_address")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    grpc_address: str
    http_address: str
    started_at: float
    pid: int
    node_address: str
    def __init__(self, coordinator_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., http_address: _Optional[str] = ..., started_at: _Optional[float] = ..., pid: _Optional[int] = ..., node_address: _Optional[str] = ...) -> None: ...

class FleetStatusResponse(_message.Message):
    __slots__ = ("nodes", "coordinator_id", "placement_policy", "coordinators", "leader_id")
    NODES_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_POLICY_FIELD_NUMBER: _ClassVar[int]
    COORDINATORS_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    coordinator_id: str
    placement_policy: str
    coordinators: _containers.RepeatedCompositeFieldContainer[CoordinatorRecord]
    leader_id: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., coordinator_id: _Optional[str] = ..., placement_policy: _Optional[str] = ..., coordinators: _Optional[_Iterable[_Union[CoordinatorRecord, _Mapping]]] = ..., leader_id: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "drain")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    drain: bool
    def __init__(self, node_id: _Optional[str] = ..., drain: _Optional[bool] = ...) -> None: ...

class DrainNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: NodeStatus
    def __init__(self, node: _Optional[_Union[NodeStatus, _Mapping]] = ...) -> None: ...

class ListFleetModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FleetModel(_message.Message):
    __slots__ = ("alias", "ready_nodes")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    READY_NODES_FIELD_NUMBER: _ClassVar[int]
    alias: str
    ready_nodes: int
    def __init__(self, alias: _Optional[str] = ..., ready_nodes: _Optional[int] = ...) -> None: ...

class ListFleetModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[FleetModel]
    def __init__(self, models: _Optional[_Iterable[_Union[FleetModel, _Mapping]]] = ...) -> None: ...
