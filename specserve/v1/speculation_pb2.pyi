from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TargetMessage(_message.Message):
    __slots__ = ("start", "outcome", "stop", "batch", "forget")
    START_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    start: Start
    outcome: Outcome
    stop: Stop
    batch: Batch
    forget: Forget
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., outcome: _Optional[_Union[Outcome, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., forget: _Optional[_Union[Forget, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("starts", "outcomes", "stops")
    STARTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    STOPS_FIELD_NUMBER: _ClassVar[int]
    starts: _containers.RepeatedCompositeFieldContainer[Start]
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    stops: _containers.RepeatedCompositeFieldContainer[Stop]
    def __init__(self, starts: _Optional[_Iterable[_Union[Start, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ..., stops: _Optional[_Iterable[_Union[Stop, _Mapping]]] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("seq", "prompt_ids", "params", "plan", "cache_key")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    seq: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SpecParams
    plan: KPlan
    cache_key: str
    def __init__(self, seq: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SpecParams, _Mapping]] = ..., plan: _Optional[_Union[KPlan, _Mapping]] = ..., cache_key: _Optional[str] = ...) -> None: ...

class KPlan(_message.Message):
    __slots__ = ("k", "if_accepted", "if_rejected", "miss_k")
    K_FIELD_NUMBER: _ClassVar[int]
    IF_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    IF_REJECTED_FIELD_NUMBER: _ClassVar[int]
    MISS_K_FIELD_NUMBER: _ClassVar[int]
    k: int
    if_accepted: int
    if_rejected: int
    miss_k: int
    def __init__(self, k: _Optional[int] = ..., if_accepted: _Optional[int] = ..., if_rejected: _Optional[int] = ..., miss_k: _Optional[int] = ...) -> None: ...

class SpecParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "k", "fanout", "speculate", "seed", "q_top", "stop_prob", "max_new_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FANOUT_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    Q_TOP_FIELD_NUMBER: _ClassVar[int]
    STOP_PROB_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    k: int
    fanout: _containers.RepeatedScalarFieldContainer[int]
    speculate: bool
    seed: int
    q_top: int
    stop_prob: float
    max_new_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., k: _Optional[int] = ..., fanout: _Optional[_Iterable[int]] = ..., speculate: _Optional[bool] = ..., seed: _Optional[int] = ..., q_top: _Optional[int] = ..., stop_prob: _Optional[float] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class Outcome(_message.Message):
    __slots__ = ("seq", "round", "accepted", "token", "plan", "speculate")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    seq: str
    round: int
    accepted: int
    token: int
    plan: KPlan
    speculate: bool
    def __init__(self, seq: _Optional[str] = ..., round: _Optional[int] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., plan: _Optional[_Union[KPlan, _Mapping]] = ..., speculate: _Optional[bool] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: str
    def __init__(self, seq: _Optional[str] = ...) -> None: ...

class Forget(_message.Message):
    __slots__ = ("cache_key",)
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    cache_key: str
    def __init__(self, cache_key: _Optional[str] = ...) -> None: ...

class DraftMessage(_message.Message):
    __slots__ = ("proposal", "error", "replies")
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    proposal: Proposal
    error: Error
    replies: Replies
    def __init__(self, proposal: _Optional[_Union[Proposal, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., replies: _Optional[_Union[Replies, _Mapping]] = ...) -> None: ...

class Replies(_message.Message):
    __slots__ = ("proposals", "errors")
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    proposals: _containers.RepeatedCompositeFieldContainer[Proposal]
    errors: _containers.RepeatedCompositeFieldContainer[Error]
    def __init__(self, proposals: _Optional[_Iterable[_Union[Proposal, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[Error, _Mapping]]] = ...) -> None: ...

class Proposal(_message.Message):
    __slots__ = ("seq", "round", "token_ids", "q", "cache_hit", "draft_s", "late")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_S_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    seq: str
    round: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    q: _containers.RepeatedCompositeFieldContainer[SparseDist]
    cache_hit: bool
    draft_s: float
    late: bool
    def __init__(self, seq: _Optional[str] = ..., round: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., q: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ..., cache_hit: _Optional[bool] = ..., draft_s: _Optional[float] = ..., late: _Optional[bool] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("seq", "code", "message")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Error.Code]
        INVALID_ARGUMENT: _ClassVar[Error.Code]
        STALE_ROUND: _ClassVar[Error.Code]
        UNKNOWN_SEQUENCE: _ClassVar[Error.Code]
        INTERNAL: _ClassVar[Error.Code]
    CODE_UNSPECIFIED: Error.Code
    INVALID_ARGUMENT: Error.Code
    STALE_ROUND: Error.Code
    UNKNOWN_SEQUENCE: Error.Code
    INTERNAL: Error.Code
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: str
    code: Error.Code
    message: str
    def __init__(self, seq: _Optional[str] = ..., code: _Optional[_Union[Error.Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model", "vocab_size", "version", "dtype", "quantization", "eos_ids", "protocol")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    EOS_IDS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    version: str
    dtype: str
    quantization: str
    eos_ids: _containers.RepeatedScalarFieldContainer[int]
    protocol: int
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., version: _Optional[str] = ..., dtype: _Optional[str] = ..., quantization: _Optional[str] = ..., eos_ids: _Optional[_Iterable[int]] = ..., protocol: _Optional[int] = ...) -> None: ...
