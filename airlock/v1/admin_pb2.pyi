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

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyStatus(_message.Message):
    __slots__ = ("generation", "directory", "last_reload", "last_reload_unix", "last_reload_reason", "rules", "links", "lint_warnings")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_REASON_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    LINT_WARNINGS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    directory: str
    last_reload: str
    last_reload_unix: float
    last_reload_reason: str
    rules: int
    links: int
    lint_warnings: int
    def __init__(self, generation: _Optional[int] = ..., directory: _Optional[str] = ..., last_reload: _Optional[str] = ..., last_reload_unix: _Optional[float] = ..., last_reload_reason: _Optional[str] = ..., rules: _Optional[int] = ..., links: _Optional[int] = ..., lint_warnings: _Optional[int] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("tenant", "model", "engine", "address", "shared")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    engine: str
    address: str
    shared: bool
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., address: _Optional[str] = ..., shared: _Optional[bool] = ...) -> None: ...

class RouteStatus(_message.Message):
    __slots__ = ("route", "ready", "is_default")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    route: Route
    ready: bool
    is_default: bool
    def __init__(self, route: _Optional[_Union[Route, _Mapping]] = ..., ready: _Optional[bool] = ..., is_default: _Optional[bool] = ...) -> None: ...

class KeyStatus(_message.Message):
    __slots__ = ("key_id", "state")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    state: str
    def __init__(self, key_id: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class TenantStatus(_message.Message):
    __slots__ = ("name", "keys", "requests_per_second", "tokens_per_minute", "concurrent_streams", "in_flight", "requests_ok", "requests_failed", "quota_refusals", "prompt_tokens", "completion_tokens", "in_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_OK_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    QUOTA_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IN_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    keys: _containers.RepeatedCompositeFieldContainer[KeyStatus]
    requests_per_second: float
    tokens_per_minute: int
    concurrent_streams: int
    in_flight: int
    requests_ok: int
    requests_failed: int
    quota_refusals: int
    prompt_tokens: int
    completion_tokens: int
    in_policy: bool
    def __init__(self, name: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[KeyStatus, _Mapping]]] = ..., requests_per_second: _Optional[float] = ..., tokens_per_minute: _Optional[int] = ..., concurrent_streams: _Optional[int] = ..., in_flight: _Optional[int] = ..., requests_ok: _Optional[int] = ..., requests_failed: _Optional[int] = ..., quota_refusals: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., in_policy: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("pid", "uptime_seconds", "policy", "routes", "tenants", "lockouts", "lockout_failures", "port", "mtls_port", "metrics_port", "serving", "processes")
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    LOCKOUTS_FIELD_NUMBER: _ClassVar[int]
    LOCKOUT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    MTLS_PORT_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    uptime_seconds: float
    policy: PolicyStatus
    routes: _containers.RepeatedCompositeFieldContainer[RouteStatus]
    tenants: _containers.RepeatedCompositeFieldContainer[TenantStatus]
    lockouts: int
    lockout_failures: int
    port: int
    mtls_port: int
    metrics_port: int
    serving: bool
    processes: _containers.RepeatedCompositeFieldContainer[GatewayProcess]
    def __init__(self, pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., policy: _Optional[_Union[PolicyStatus, _Mapping]] = ..., routes: _Optional[_Iterable[_Union[RouteStatus, _Mapping]]] = ..., tenants: _Optional[_Iterable[_Union[TenantStatus, _Mapping]]] = ..., lockouts: _Optional[int] = ..., lockout_failures: _Optional[int] = ..., port: _Optional[int] = ..., mtls_port: _Optional[int] = ..., metrics_port: _Optional[int] = ..., serving: _Optional[bool] = ..., processes: _Optional[_Iterable[_Union[GatewayProcess, _Mapping]]] = ...) -> None: ...

class GatewayProcess(_message.Message):
    __slots__ = ("index", "pid", "uptime_seconds", "serving", "metrics_port", "restarts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    uptime_seconds: float
    serving: bool
    metrics_port: int
    restarts: int
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., uptime_seconds: _Optional[float] = ..., serving: _Optional[bool] = ..., metrics_port: _Optional[int] = ..., restarts: _Optional[int] = ...) -> None: ...

class SetRoutesRequest(_message.Message):
    __slots__ = ("routes", "drain_seconds", "ready_seconds")
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    drain_seconds: float
    ready_seconds: float
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., drain_seconds: _Optional[float] = ..., ready_seconds: _Optional[float] = ...) -> None: ...

class SetRoutesResponse(_message.Message):
    __slots__ = ("added", "removed", "routes")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    added: _containers.RepeatedCompositeFieldContainer[Route]
    removed: _containers.RepeatedCompositeFieldContainer[Route]
    routes: _containers.RepeatedCompositeFieldContainer[RouteStatus]
    def __init__(self, added: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., removed: _Optional[_Iterable[_Union[Route, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[RouteStatus, _Mapping]]] = ...) -> None: ...
