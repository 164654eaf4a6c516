from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListLockoutsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Lockout(_message.Message):
    __slots__ = ("key", "kind", "seconds_left", "failures")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SECONDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    key: str
    kind: str
    seconds_left: float
    failures: int
    def __init__(self, key: _Optional[str] = ..., kind: _Optional[str] = ..., seconds_left: _Optional[float] = ..., failures: _Optional[int] = ...) -> None: ...

class ListLockoutsResponse(_message.Message):
    __slots__ = ("lockouts",)
    LOCKOUTS_FIELD_NUMBER: _ClassVar[int]
    lockouts: _containers.RepeatedCompositeFieldContainer[Lockout]
    def __init__(self, lockouts: _Optional[_Iterable[_Union[Lockout, _Mapping]]] = ...) -> None: ...

class ClearLockoutsRequest(_message.Message):
    __slots__ = ("key", "subject", "peer", "all")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    key: str
    subject: str
    peer: str
    all: bool
    def __init__(self, key: _Optional[str] = ..., subject: _Optional[str] = ..., peer: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class ClearLockoutsResponse(_message.Message):
    __slots__ = ("cleared",)
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    cleared: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cleared: _Optional[_Iterable[str]] = ...) -> None: ...
