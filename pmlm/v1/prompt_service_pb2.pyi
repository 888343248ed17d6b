from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptParams(_message.Message):
    __slots__ = ("summary", "self_items", "show_probs", "trajectory", "peer_items", "reasoning", "phrasing", "format", "order", "notes", "placement")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SELF_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SHOW_PROBS_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORY_FIELD_NUMBER: _ClassVar[int]
    PEER_ITEMS_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    PHRASING_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    summary: bool
    self_items: int
    show_probs: bool
    trajectory: bool
    peer_items: int
    reasoning: bool
    phrasing: int
    format: int
    order: str
    notes: bool
    placement: str
    def __init__(self, summary: _Optional[bool] = ..., self_items: _Optional[int] = ..., show_probs: _Optional[bool] = ..., trajectory: _Optional[bool] = ..., peer_items: _Optional[int] = ..., reasoning: _Optional[bool] = ..., phrasing: _Optional[int] = ..., format: _Optional[int] = ..., order: _Optional[str] = ..., notes: _Optional[bool] = ..., placement: _Optional[str] = ...) -> None: ...

class AssemblePromptRequest(_message.Message):
    __slots__ = ("patient_id", "question", "params")
    PATIENT_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    patient_id: str
    question: str
    params: PromptParams
    def __init__(self, patient_id: _Optional[str] = ..., question: _Optional[str] = ..., params: _Optional[_Union[PromptParams, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Fact(_message.Message):
    __slots__ = ("text", "source")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    source: str
    def __init__(self, text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AssemblePromptResponse(_message.Message):
    __slots__ = ("messages", "facts", "approx_tokens", "visit", "used_global_model", "missing", "refined_by_policy", "policy")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    APPROX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISIT_FIELD_NUMBER: _ClassVar[int]
    USED_GLOBAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REFINED_BY_POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    approx_tokens: int
    visit: str
    used_global_model: bool
    missing: _containers.RepeatedScalarFieldContainer[str]
    refined_by_policy: bool
    policy: str
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., approx_tokens: _Optional[int] = ..., visit: _Optional[str] = ..., used_global_model: _Optional[bool] = ..., missing: _Optional[_Iterable[str]] = ..., refined_by_policy: _Optional[bool] = ..., policy: _Optional[str] = ...) -> None: ...

class AdviseRequest(_message.Message):
    __slots__ = ("patient_id", "question", "params")
    PATIENT_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    patient_id: str
    question: str
    params: PromptParams
    def __init__(self, patient_id: _Optional[str] = ..., question: _Optional[str] = ..., params: _Optional[_Union[PromptParams, _Mapping]] = ...) -> None: ...

class AdviseEvent(_message.Message):
    __slots__ = ("prompt", "text", "done")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    prompt: AssemblePromptResponse
    text: str
    done: AdviseDone
    def __init__(self, prompt: _Optional[_Union[AssemblePromptResponse, _Mapping]] = ..., text: _Optional[str] = ..., done: _Optional[_Union[AdviseDone, _Mapping]] = ...) -> None: ...

class AdviseDone(_message.Message):
    __slots__ = ("model", "prompt_tokens", "completion_tokens", "elapsed_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class GetSiteStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("phase", "path", "run_id", "round")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    phase: str
    path: str
    run_id: str
    round: int
    def __init__(self, phase: _Optional[str] = ..., path: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class PhaseBudget(_message.Message):
    __slots__ = ("phase", "epsilon_spent", "epsilon_cap")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_CAP_FIELD_NUMBER: _ClassVar[int]
    phase: str
    epsilon_spent: float
    epsilon_cap: float
    def __init__(self, phase: _Optional[str] = ..., epsilon_spent: _Optional[float] = ..., epsilon_cap: _Optional[float] = ...) -> None: ...

class SiteStatus(_message.Message):
    __slots__ = ("site_id", "artifacts", "ledger_present", "epsilon_spent", "epsilon_remaining", "epsilon_total", "delta", "phases", "releases")
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_PRESENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_REMAINING_FIELD_NUMBER: _ClassVar[int]
    EPSILON_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    site_id: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    ledger_present: bool
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_total: float
    delta: float
    phases: _containers.RepeatedCompositeFieldContainer[PhaseBudget]
    releases: int
    def __init__(self, site_id: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., ledger_present: _Optional[bool] = ..., epsilon_spent: _Optional[float] = ..., epsilon_remaining: _Optional[float] = ..., epsilon_total: _Optional[float] = ..., delta: _Optional[float] = ..., phases: _Optional[_Iterable[_Union[PhaseBudget, _Mapping]]] = ..., releases: _Optional[int] = ...) -> None: ...
