from edgefleet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Deployment(_message.Message):
    __slots__ = ("alias", "replicas", "selector", "keep_alive_s", "created_at")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_S_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    alias: str
    replicas: int
    selector: _containers.ScalarMap[str, str]
    keep_alive_s: float
    created_at: float
    def __init__(self, alias: _Optional[str] = ..., replicas: _Optional[int] = ..., selector: _Optional[_Mapping[str, str]] = ..., keep_alive_s: _Optional[float] = ..., created_at: _Optional[float] = ...) -> None: ...

class UndeployRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    def __init__(self, alias: _Optional[str] = ...) -> None: ...

class UndeployResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelPlacement(_message.Message):
    __slots__ = ("alias", "deployment", "wanted", "loaded_on", "fetching", "cached_on", "problem")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    LOADED_ON_FIELD_NUMBER: _ClassVar[int]
    FETCHING_FIELD_NUMBER: _ClassVar[int]
    CACHED_ON_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    alias: str
    deployment: Deployment
    wanted: int
    loaded_on: _containers.RepeatedScalarFieldContainer[str]
    fetching: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelFetch]
    cached_on: _containers.RepeatedScalarFieldContainer[str]
    problem: str
    def __init__(self, alias: _Optional[str] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ..., wanted: _Optional[int] = ..., loaded_on: _Optional[_Iterable[str]] = ..., fetching: _Optional[_Iterable[_Union[_common_pb2.ModelFetch, _Mapping]]] = ..., cached_on: _Optional[_Iterable[str]] = ..., problem: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelPlacement]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelPlacement, _Mapping]]] = ...) -> None: ...

class RegisteredModel(_message.Message):
    __slots__ = ("alias", "description", "tasks", "variants", "builtin", "added_at")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    ADDED_AT_FIELD_NUMBER: _ClassVar[int]
    alias: str
    description: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    variants: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelFile]
    builtin: bool
    added_at: float
    def __init__(self, alias: _Optional[str] = ..., description: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., variants: _Optional[_Iterable[_Union[_common_pb2.ModelFile, _Mapping]]] = ..., builtin: _Optional[bool] = ..., added_at: _Optional[float] = ...) -> None: ...

class AddModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: AddModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[AddModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class AddModelHeader(_message.Message):
    __slots__ = ("alias", "variant", "tasks", "description", "size_bytes", "sha256", "file_name")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    alias: str
    variant: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    description: str
    size_bytes: int
    sha256: str
    file_name: str
    def __init__(self, alias: _Optional[str] = ..., variant: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., file_name: _Optional[str] = ...) -> None: ...

class ListRegistryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRegistryResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[RegisteredModel]
    def __init__(self, models: _Optional[_Iterable[_Union[RegisteredModel, _Mapping]]] = ...) -> None: ...

class RemoveModelRequest(_message.Message):
    __slots__ = ("alias", "variant")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    alias: str
    variant: str
    def __init__(self, alias: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class RemoveModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("alias", "sha256", "offset")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    alias: str
    sha256: str
    offset: int
    def __init__(self, alias: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FetchModelChunk(_message.Message):
    __slots__ = ("data", "size_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    size_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., size_bytes: _Optional[int] = ...) -> None: ...
