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
    __slots__ = ("messages", "facts", "approx_tokens", "visit", "used_global_model", "missing", "refined_by_policy", "policy", "checklist")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    APPROX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISIT_FIELD_NUMBER: _ClassVar[int]
    USED_GLOBAL_MODEL_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    REFINED_BY_POLICY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CHECKLIST_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    facts: _containers.RepeatedCompositeFieldContainer[Fact]
    approx_tokens: int
    visit: str
    used_global_model: bool
    missing: _containers.RepeatedScalarFieldContainer[str]
    refined_by_policy: bool
    policy: str
    checklist: CareChecklist
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., facts: _Optional[_Iterable[_Union[Fact, _Mapping]]] = ..., approx_tokens: _Optional[int] = ..., visit: _Optional[str] = ..., used_global_model: _Optional[bool] = ..., missing: _Optional[_Iterable[str]] = ..., refined_by_policy: _Optional[bool] = ..., policy: _Optional[str] = ..., checklist: _Optional[_Union[CareChecklist, _Mapping]] = ...) -> None: ...

class CareChecklist(_message.Message):
    __slots__ = ("stage", "horizon_weeks", "items", "peer_group", "left_out")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    HORIZON_WEEKS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PEER_GROUP_FIELD_NUMBER: _ClassVar[int]
    LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    stage: str
    horizon_weeks: int
    items: _containers.RepeatedCompositeFieldContainer[ChecklistItem]
    peer_group: str
    left_out: _containers.RepeatedCompositeFieldContainer[LeftOutItem]
    def __init__(self, stage: _Optional[str] = ..., horizon_weeks: _Optional[int] = ..., items: _Optional[_Iterable[_Union[ChecklistItem, _Mapping]]] = ..., peer_group: _Optional[str] = ..., left_out: _Optional[_Iterable[_Union[LeftOutItem, _Mapping]]] = ...) -> None: ...

class ChecklistItem(_message.Message):
    __slots__ = ("section", "text", "source", "probability")
    SECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    section: str
    text: str
    source: str
    probability: float
    def __init__(self, section: _Optional[str] = ..., text: _Optional[str] = ..., source: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class LeftOutItem(_message.Message):
    __slots__ = ("text", "source", "reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    source: str
    reason: str
    def __init__(self, text: _Optional[str] = ..., source: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("model", "prompt_tokens", "completion_tokens", "elapsed_s", "check", "notice")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float
    check: AnswerCheck
    notice: str
    def __init__(self, model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., check: _Optional[_Union[AnswerCheck, _Mapping]] = ..., notice: _Optional[str] = ...) -> None: ...

class AnswerCheck(_message.Message):
    __slots__ = ("items", "allowed_items")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CheckedItem]
    allowed_items: int
    def __init__(self, items: _Optional[_Iterable[_Union[CheckedItem, _Mapping]]] = ..., allowed_items: _Optional[int] = ...) -> None: ...

class CheckedItem(_message.Message):
    __slots__ = ("text", "reasons", "removed")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    text: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    removed: bool
    def __init__(self, text: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., removed: _Optional[bool] = ...) -> None: ...

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
