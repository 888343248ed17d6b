from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListReleasesRequest(_message.Message):
    __slots__ = ("phase", "include_refusals")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REFUSALS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    include_refusals: bool
    def __init__(self, phase: _Optional[str] = ..., include_refusals: _Optional[bool] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("seq", "kind", "time", "run_id", "phase", "round", "privacy_unit", "epsilon", "epsilon_rdp", "phase_epsilon", "mechanism_json", "entry_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_UNIT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    PHASE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    MECHANISM_JSON_FIELD_NUMBER: _ClassVar[int]
    ENTRY_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: str
    time: str
    run_id: str
    phase: str
    round: int
    privacy_unit: str
    epsilon: float
    epsilon_rdp: float
    phase_epsilon: float
    mechanism_json: str
    entry_json: str
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[str] = ..., time: _Optional[str] = ..., run_id: _Optional[str] = ..., phase: _Optional[str] = ..., round: _Optional[int] = ..., privacy_unit: _Optional[str] = ..., epsilon: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., phase_epsilon: _Optional[float] = ..., mechanism_json: _Optional[str] = ..., entry_json: _Optional[str] = ...) -> None: ...

class ListReleasesResponse(_message.Message):
    __slots__ = ("site_id", "entries")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    def __init__(self, site_id: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("trusted_public_key",)
    TRUSTED_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    trusted_public_key: bytes
    def __init__(self, trusted_public_key: _Optional[bytes] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("ok", "entries", "problems", "key_fingerprint", "epsilon")
    OK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    entries: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    key_fingerprint: str
    epsilon: float
    def __init__(self, ok: _Optional[bool] = ..., entries: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., key_fingerprint: _Optional[str] = ..., epsilon: _Optional[float] = ...) -> None: ...
