import datetime

from airlock.v1 import inference_pb2 as _inference_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvidenceRequest(_message.Message):
    __slots__ = ("nonce", "tenant")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    tenant: str
    def __init__(self, nonce: _Optional[bytes] = ..., tenant: _Optional[str] = ...) -> None: ...

class KeyRelease(_message.Message):
    __slots__ = ("tenant", "worker_id", "sealed_keys", "nonce")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_KEYS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    worker_id: str
    sealed_keys: bytes
    nonce: bytes
    def __init__(self, tenant: _Optional[str] = ..., worker_id: _Optional[str] = ..., sealed_keys: _Optional[bytes] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class TenantKeys(_message.Message):
    __slots__ = ("keys", "active_key_id")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.ScalarMap[str, bytes]
    active_key_id: str
    def __init__(self, keys: _Optional[_Mapping[str, bytes]] = ..., active_key_id: _Optional[str] = ...) -> None: ...

class KeyReleaseReply(_message.Message):
    __slots__ = ("key_ids",)
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkerRequest(_message.Message):
    __slots__ = ("tenant", "request")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    request: _inference_pb2.GenerateRequest
    def __init__(self, tenant: _Optional[str] = ..., request: _Optional[_Union[_inference_pb2.GenerateRequest, _Mapping]] = ...) -> None: ...

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("tenant", "model", "engine", "pid", "requests_started", "produced_tokens", "active", "tenants", "isolation")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_STARTED_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    engine: str
    pid: int
    requests_started: int
    produced_tokens: int
    active: int
    tenants: _containers.RepeatedScalarFieldContainer[str]
    isolation: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., pid: _Optional[int] = ..., requests_started: _Optional[int] = ..., produced_tokens: _Optional[int] = ..., active: _Optional[int] = ..., tenants: _Optional[_Iterable[str]] = ..., isolation: _Optional[str] = ...) -> None: ...

class GatewayFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[GatewayFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[GatewayFrame, _Mapping]]] = ...) -> None: ...

class GatewayFrame(_message.Message):
    __slots__ = ("id", "open", "cancel", "credit")
    ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    id: int
    open: ChannelOpen
    cancel: ChannelCancel
    credit: ChannelCredit
    def __init__(self, id: _Optional[int] = ..., open: _Optional[_Union[ChannelOpen, _Mapping]] = ..., cancel: _Optional[_Union[ChannelCancel, _Mapping]] = ..., credit: _Optional[_Union[ChannelCredit, _Mapping]] = ...) -> None: ...

class ChannelOpen(_message.Message):
    __slots__ = ("request", "stream", "timeout", "credit")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    stream: bool
    timeout: _duration_pb2.Duration
    credit: int
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., stream: _Optional[bool] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., credit: _Optional[int] = ...) -> None: ...

class ChannelCancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChannelCredit(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class WorkerFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[WorkerFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[WorkerFrame, _Mapping]]] = ...) -> None: ...

class WorkerFrame(_message.Message):
    __slots__ = ("id", "chunk", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    chunk: _inference_pb2.GenerateChunk
    response: _inference_pb2.GenerateResponse
    error: _status_pb2.Status
    def __init__(self, id: _Optional[int] = ..., chunk: _Optional[_Union[_inference_pb2.GenerateChunk, _Mapping]] = ..., response: _Optional[_Union[_inference_pb2.GenerateResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...
