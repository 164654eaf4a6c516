from airlock.v1 import inference_pb2 as _inference_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("tenant", "model", "engine", "pid", "requests_started", "produced_tokens", "active")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_STARTED_FIELD_NUMBER: _ClassVar[int]
    PRODUCED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    engine: str
    pid: int
    requests_started: int
    produced_tokens: int
    active: int
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., pid: _Optional[int] = ..., requests_started: _Optional[int] = ..., produced_tokens: _Optional[int] = ..., active: _Optional[int] = ...) -> None: ...
