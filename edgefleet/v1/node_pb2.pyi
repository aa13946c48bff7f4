from edgefleet.v1 import common_pb2 as _common_pb2
from edgefleet.v1 import models_pb2 as _models_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "messages", "sampling", "assistant_prefix", "constraint", "tools", "session_id", "continuation", "origin")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    sampling: _common_pb2.SamplingParams
    assistant_prefix: str
    constraint: _common_pb2.OutputConstraint
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolDefinition]
    session_id: str
    continuation: bool
    origin: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., assistant_prefix: _Optional[str] = ..., constraint: _Optional[_Union[_common_pb2.OutputConstraint, _Mapping]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.ToolDefinition, _Mapping]]] = ..., session_id: _Optional[str] = ..., continuation: _Optional[bool] = ..., origin: _Optional[str] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("seq", "text", "token_count", "finish_reason", "usage", "timings", "node_id")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    seq: int
    text: str
    token_count: int
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    timings: _common_pb2.Timings
    node_id: str
    def __init__(self, seq: _Optional[int] = ..., text: _Optional[str] = ..., token_count: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., node_id: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "slots", "context_length", "source", "keep_alive_s", "peers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_S_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    slots: int
    context_length: int
    source: _common_pb2.ModelFile
    keep_alive_s: float
    peers: _containers.RepeatedCompositeFieldContainer[ModelPeer]
    def __init__(self, model: _Optional[str] = ..., slots: _Optional[int] = ..., context_length: _Optional[int] = ..., source: _Optional[_Union[_common_pb2.ModelFile, _Mapping]] = ..., keep_alive_s: _Optional[float] = ..., peers: _Optional[_Iterable[_Union[ModelPeer, _Mapping]]] = ...) -> None: ...

class ModelPeer(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CatalogModel(_message.Message):
    __slots__ = ("alias", "description", "quantization", "size_bytes", "cached", "loaded")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    alias: str
    description: str
    quantization: str
    size_bytes: int
    cached: bool
    loaded: bool
    def __init__(self, alias: _Optional[str] = ..., description: _Optional[str] = ..., quantization: _Optional[str] = ..., size_bytes: _Optional[int] = ..., cached: _Optional[bool] = ..., loaded: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("loaded", "catalog")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    CATALOG_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoadedModel]
    catalog: _containers.RepeatedCompositeFieldContainer[CatalogModel]
    def __init__(self, loaded: _Optional[_Iterable[_Union[_common_pb2.LoadedModel, _Mapping]]] = ..., catalog: _Optional[_Iterable[_Union[CatalogModel, _Mapping]]] = ...) -> None: ...

class GetCapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("drain",)
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    drain: bool
    def __init__(self, drain: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("draining", "active_generations")
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    active_generations: int
    def __init__(self, draining: _Optional[bool] = ..., active_generations: _Optional[int] = ...) -> None: ...
