import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class JobSpec(_message.Message):
    __slots__ = ("dataset", "tokenization", "preprocess", "model", "hidden_size", "num_layers", "batch_size", "num_steps", "partition", "max_steps", "optimizer", "lr", "clip_norm", "seed", "device", "log_every", "checkpoint_every", "min_freq", "nonlinearity", "truncation", "tbptt_k1", "tbptt_k2", "truncation_keep", "dropout", "embedding_size", "val_fraction", "eval_every", "weight_decay", "schedule", "lr_step_every", "lr_gamma", "probe_every", "seq_len", "on_nonfinite", "eos", "init", "init_range", "max_dependency", "embedding_dropout", "tie_weights", "min_lr", "truncation_tolerance", "min_num_steps", "max_num_steps")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TOKENIZATION_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOG_EVERY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    MIN_FREQ_FIELD_NUMBER: _ClassVar[int]
    NONLINEARITY_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TBPTT_K1_FIELD_NUMBER: _ClassVar[int]
    TBPTT_K2_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_KEEP_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_STEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    LR_GAMMA_FIELD_NUMBER: _ClassVar[int]
    PROBE_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    ON_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    EOS_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_RANGE_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPENDENCY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TIE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MIN_NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    tokenization: str
    preprocess: str
    model: str
    hidden_size: int
    num_layers: int
    batch_size: int
    num_steps: int
    partition: str
    max_steps: int
    optimizer: str
    lr: float
    clip_norm: float
    seed: int
    device: str
    log_every: int
    checkpoint_every: int
    min_freq: int
    nonlinearity: str
    truncation: str
    tbptt_k1: int
    tbptt_k2: int
    truncation_keep: float
    dropout: float
    embedding_size: int
    val_fraction: float
    eval_every: int
    weight_decay: float
    schedule: str
    lr_step_every: int
    lr_gamma: float
    probe_every: int
    seq_len: int
    on_nonfinite: str
    eos: bool
    init: str
    init_range: float
    max_dependency: int
    embedding_dropout: float
    tie_weights: bool
    min_lr: float
    truncation_tolerance: float
    min_num_steps: int
    max_num_steps: int
    def __init__(self, dataset: _Optional[str] = ..., tokenization: _Optional[str] = ..., preprocess: _Optional[str] = ..., model: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., batch_size: _Optional[int] = ..., num_steps: _Optional[int] = ..., partition: _Optional[str] = ..., max_steps: _Optional[int] = ..., optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., clip_norm: _Optional[float] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., log_every: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., min_freq: _Optional[int] = ..., nonlinearity: _Optional[str] = ..., truncation: _Optional[str] = ..., tbptt_k1: _Optional[int] = ..., tbptt_k2: _Optional[int] = ..., truncation_keep: _Optional[float] = ..., dropout: _Optional[float] = ..., embedding_size: _Optional[int] = ..., val_fraction: _Optional[float] = ..., eval_every: _Optional[int] = ..., weight_decay: _Optional[float] = ..., schedule: _Optional[str] = ..., lr_step_every: _Optional[int] = ..., lr_gamma: _Optional[float] = ..., probe_every: _Optional[int] = ..., seq_len: _Optional[int] = ..., on_nonfinite: _Optional[str] = ..., eos: _Optional[bool] = ..., init: _Optional[str] = ..., init_range: _Optional[float] = ..., max_dependency: _Optional[int] = ..., embedding_dropout: _Optional[float] = ..., tie_weights: _Optional[bool] = ..., min_lr: _Optional[float] = ..., truncation_tolerance: _Optional[float] = ..., min_num_steps: _Optional[int] = ..., max_num_steps: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "state", "created_at", "started_at", "finished_at", "reason", "worker", "last_step", "queue", "checkpoint_step", "attempt", "tenant", "waiting", "summary", "name", "tags", "note", "best_checkpoint_step", "init_from", "sweep")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    BEST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    state: JobState
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    reason: str
    worker: str
    last_step: int
    queue: str
    checkpoint_step: int
    attempt: int
    tenant: str
    waiting: str
    summary: JobSummary
    name: str
    tags: _containers.ScalarMap[str, str]
    note: str
    best_checkpoint_step: int
    init_from: InitFrom
    sweep: str
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., worker: _Optional[str] = ..., last_step: _Optional[int] = ..., queue: _Optional[str] = ..., checkpoint_step: _Optional[int] = ..., attempt: _Optional[int] = ..., tenant: _Optional[str] = ..., waiting: _Optional[str] = ..., summary: _Optional[_Union[JobSummary, _Mapping]] = ..., name: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., note: _Optional[str] = ..., best_checkpoint_step: _Optional[int] = ..., init_from: _Optional[_Union[InitFrom, _Mapping]] = ..., sweep: _Optional[str] = ...) -> None: ...

class InitFrom(_message.Message):
    __slots__ = ("job_id", "checkpoint", "optimizer", "state", "step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    checkpoint: str
    optimizer: bool
    state: bool
    step: int
    def __init__(self, job_id: _Optional[str] = ..., checkpoint: _Optional[str] = ..., optimizer: _Optional[bool] = ..., state: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class JobSummary(_message.Message):
    __slots__ = ("step", "train_loss", "train_perplexity", "best_step", "best_val_loss", "best_val_perplexity", "metric", "metric_value", "tokens", "train_seconds", "tokens_per_sec", "clipped_steps", "clip_fraction")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    BEST_STEP_FIELD_NUMBER: _ClassVar[int]
    BEST_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_VAL_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    METRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    step: int
    train_loss: float
    train_perplexity: float
    best_step: int
    best_val_loss: float
    best_val_perplexity: float
    metric: str
    metric_value: float
    tokens: int
    train_seconds: float
    tokens_per_sec: float
    clipped_steps: int
    clip_fraction: float
    def __init__(self, step: _Optional[int] = ..., train_loss: _Optional[float] = ..., train_perplexity: _Optional[float] = ..., best_step: _Optional[int] = ..., best_val_loss: _Optional[float] = ..., best_val_perplexity: _Optional[float] = ..., metric: _Optional[str] = ..., metric_value: _Optional[float] = ..., tokens: _Optional[int] = ..., train_seconds: _Optional[float] = ..., tokens_per_sec: _Optional[float] = ..., clipped_steps: _Optional[int] = ..., clip_fraction: _Optional[float] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "name", "tags", "note", "init_from")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    name: str
    tags: _containers.ScalarMap[str, str]
    note: str
    init_from: InitFrom
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., name: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., note: _Optional[str] = ..., init_from: _Optional[_Union[InitFrom, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "state", "name_contains", "tags", "model", "dataset", "created_after", "created_before", "order_by", "reverse", "page_token", "sweep")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NAME_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    REVERSE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SWEEP_FIELD_NUMBER: _ClassVar[int]
    limit: int
    state: JobState
    name_contains: str
    tags: _containers.ScalarMap[str, str]
    model: str
    dataset: str
    created_after: _timestamp_pb2.Timestamp
    created_before: _timestamp_pb2.Timestamp
    order_by: str
    reverse: bool
    page_token: str
    sweep: str
    def __init__(self, limit: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ..., name_contains: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., model: _Optional[str] = ..., dataset: _Optional[str] = ..., created_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., order_by: _Optional[str] = ..., reverse: _Optional[bool] = ..., page_token: _Optional[str] = ..., sweep: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("job_id", "cursor", "history_only")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ONLY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    cursor: str
    history_only: bool
    def __init__(self, job_id: _Optional[str] = ..., cursor: _Optional[str] = ..., history_only: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("cursor", "job_id", "time", "metrics", "status", "checkpoint", "evaluation", "probe", "notice", "window_change")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_CHANGE_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    job_id: str
    time: _timestamp_pb2.Timestamp
    metrics: Metrics
    status: StatusChange
    checkpoint: CheckpointSaved
    evaluation: Evaluation
    probe: Probe
    notice: Notice
    window_change: WindowChange
    def __init__(self, cursor: _Optional[str] = ..., job_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ..., status: _Optional[_Union[StatusChange, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointSaved, _Mapping]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., probe: _Optional[_Union[Probe, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., window_change: _Optional[_Union[WindowChange, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ParamGradNorm(_message.Message):
    __slots__ = ("name", "norm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    name: str
    norm: float
    def __init__(self, name: _Optional[str] = ..., norm: _Optional[float] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("step", "epoch", "loss", "perplexity", "tokens_per_sec", "lr", "grad_norm", "clipped", "clip_fraction", "param_grad_norms", "nonfinite_grads", "skipped_steps", "tokens", "seconds", "step_path", "step_path_reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SEC_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PARAM_GRAD_NORMS_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_GRADS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_PATH_REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    epoch: int
    loss: float
    perplexity: float
    tokens_per_sec: float
    lr: float
    grad_norm: float
    clipped: bool
    clip_fraction: float
    param_grad_norms: _containers.RepeatedCompositeFieldContainer[ParamGradNorm]
    nonfinite_grads: int
    skipped_steps: int
    tokens: int
    seconds: float
    step_path: str
    step_path_reason: str
    def __init__(self, step: _Optional[int] = ..., epoch: _Optional[int] = ..., loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., tokens_per_sec: _Optional[float] = ..., lr: _Optional[float] = ..., grad_norm: _Optional[float] = ..., clipped: _Optional[bool] = ..., clip_fraction: _Optional[float] = ..., param_grad_norms: _Optional[_Iterable[_Union[ParamGradNorm, _Mapping]]] = ..., nonfinite_grads: _Optional[int] = ..., skipped_steps: _Optional[int] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., step_path: _Optional[str] = ..., step_path_reason: _Optional[str] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("step", "loss", "perplexity", "metric", "value", "baseline")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    perplexity: float
    metric: str
    value: float
    baseline: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., metric: _Optional[str] = ..., value: _Optional[float] = ..., baseline: _Optional[float] = ...) -> None: ...

class GradProfile(_message.Message):
    __slots__ = ("layer", "norms")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NORMS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    norms: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., norms: _Optional[_Iterable[float]] = ...) -> None: ...

class SpectralNorm(_message.Message):
    __slots__ = ("name", "gate", "sigma")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    name: str
    gate: str
    sigma: float
    def __init__(self, name: _Optional[str] = ..., gate: _Optional[str] = ..., sigma: _Optional[float] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("step", "grad_through_time", "spectral_norms", "decay_rate", "half_life", "suggested_window", "start_fraction", "warning")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_THROUGH_TIME_FIELD_NUMBER: _ClassVar[int]
    SPECTRAL_NORMS_FIELD_NUMBER: _ClassVar[int]
    DECAY_RATE_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_WINDOW_FIELD_NUMBER: _ClassVar[int]
    START_FRACTION_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad_through_time: _containers.RepeatedCompositeFieldContainer[GradProfile]
    spectral_norms: _containers.RepeatedCompositeFieldContainer[SpectralNorm]
    decay_rate: float
    half_life: float
    suggested_window: int
    start_fraction: float
    warning: str
    def __init__(self, step: _Optional[int] = ..., grad_through_time: _Optional[_Iterable[_Union[GradProfile, _Mapping]]] = ..., spectral_norms: _Optional[_Iterable[_Union[SpectralNorm, _Mapping]]] = ..., decay_rate: _Optional[float] = ..., half_life: _Optional[float] = ..., suggested_window: _Optional[int] = ..., start_fraction: _Optional[float] = ..., warning: _Optional[str] = ...) -> None: ...

class WindowChange(_message.Message):
    __slots__ = ("step", "from_window", "to_window", "suggested")
    STEP_FIELD_NUMBER: _ClassVar[int]
    FROM_WINDOW_FIELD_NUMBER: _ClassVar[int]
    TO_WINDOW_FIELD_NUMBER: _ClassVar[int]
    SUGGESTED_FIELD_NUMBER: _ClassVar[int]
    step: int
    from_window: int
    to_window: int
    suggested: int
    def __init__(self, step: _Optional[int] = ..., from_window: _Optional[int] = ..., to_window: _Optional[int] = ..., suggested: _Optional[int] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StatusChange(_message.Message):
    __slots__ = ("state", "reason", "worker", "step", "attempt", "resumed_from_step")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    worker: str
    step: int
    attempt: int
    resumed_from_step: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., worker: _Optional[str] = ..., step: _Optional[int] = ..., attempt: _Optional[int] = ..., resumed_from_step: _Optional[int] = ...) -> None: ...

class CheckpointSaved(_message.Message):
    __slots__ = ("step", "size_bytes", "best", "also_latest")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    ALSO_LATEST_FIELD_NUMBER: _ClassVar[int]
    step: int
    size_bytes: int
    best: bool
    also_latest: bool
    def __init__(self, step: _Optional[int] = ..., size_bytes: _Optional[int] = ..., best: _Optional[bool] = ..., also_latest: _Optional[bool] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: DatasetInfo
    chunk: bytes
    def __init__(self, info: _Optional[_Union[DatasetInfo, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("id", "name", "size_bytes", "num_chars", "num_words", "uploaded_at", "tenant")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHARS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORDS_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size_bytes: int
    num_chars: int
    num_words: int
    uploaded_at: _timestamp_pb2.Timestamp
    tenant: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., num_chars: _Optional[int] = ..., num_words: _Optional[int] = ..., uploaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class StreamLogsRequest(_message.Message):
    __slots__ = ("job_id", "cursor", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    cursor: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., cursor: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("cursor", "time", "level", "logger", "attempt", "message")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LOGGER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    time: _timestamp_pb2.Timestamp
    level: str
    logger: str
    attempt: int
    message: str
    def __init__(self, cursor: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., level: _Optional[str] = ..., logger: _Optional[str] = ..., attempt: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class DownloadCheckpointRequest(_message.Message):
    __slots__ = ("job_id", "checkpoint")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    checkpoint: str
    def __init__(self, job_id: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class CheckpointChunk(_message.Message):
    __slots__ = ("data", "step", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    step: int
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., step: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Worker(_message.Message):
    __slots__ = ("name", "queues", "device", "hostname", "pid", "started_at", "last_seen", "job_id", "memory_budget_bytes", "heartbeat_interval_s", "job_ids", "concurrency", "memory_reserved_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    device: str
    hostname: str
    pid: int
    started_at: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    job_id: str
    memory_budget_bytes: int
    heartbeat_interval_s: float
    job_ids: _containers.RepeatedScalarFieldContainer[str]
    concurrency: int
    memory_reserved_bytes: int
    def __init__(self, name: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., job_id: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., job_ids: _Optional[_Iterable[str]] = ..., concurrency: _Optional[int] = ..., memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("job_id", "prefix", "num_tokens", "temperature", "seed", "checkpoint")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    prefix: str
    num_tokens: int
    temperature: float
    seed: int
    checkpoint: str
    def __init__(self, job_id: _Optional[str] = ..., prefix: _Optional[str] = ..., num_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "step")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    text: str
    step: int
    def __init__(self, text: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class SweepAxis(_message.Message):
    __slots__ = ("field", "values")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    field: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, field: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class SweepMember(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class EarlyStop(_message.Message):
    __slots__ = ("rule", "min_steps", "min_peers", "eta")
    RULE_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_PEERS_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    rule: str
    min_steps: int
    min_peers: int
    eta: int
    def __init__(self, rule: _Optional[str] = ..., min_steps: _Optional[int] = ..., min_peers: _Optional[int] = ..., eta: _Optional[int] = ...) -> None: ...

class SweepSpec(_message.Message):
    __slots__ = ("base", "axes", "members", "early_stop")
    BASE_FIELD_NUMBER: _ClassVar[int]
    AXES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOP_FIELD_NUMBER: _ClassVar[int]
    base: JobSpec
    axes: _containers.RepeatedCompositeFieldContainer[SweepAxis]
    members: _containers.RepeatedCompositeFieldContainer[SweepMember]
    early_stop: EarlyStop
    def __init__(self, base: _Optional[_Union[JobSpec, _Mapping]] = ..., axes: _Optional[_Iterable[_Union[SweepAxis, _Mapping]]] = ..., members: _Optional[_Iterable[_Union[SweepMember, _Mapping]]] = ..., early_stop: _Optional[_Union[EarlyStop, _Mapping]] = ...) -> None: ...

class SubmitSweepRequest(_message.Message):
    __slots__ = ("spec", "name", "tags", "note")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    spec: SweepSpec
    name: str
    tags: _containers.ScalarMap[str, str]
    note: str
    def __init__(self, spec: _Optional[_Union[SweepSpec, _Mapping]] = ..., name: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., note: _Optional[str] = ...) -> None: ...

class Sweep(_message.Message):
    __slots__ = ("id", "spec", "name", "tags", "note", "created_at", "members", "queued", "running", "succeeded", "failed", "cancelled", "best_job_id", "best_val_loss")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class Member(_message.Message):
        __slots__ = ("job_id", "values", "job")
        class ValuesEntry(_message.Message):
            __slots__ = ("key", "value")
            KEY_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            key: str
            value: str
            def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
        JOB_ID_FIELD_NUMBER: _ClassVar[int]
        VALUES_FIELD_NUMBER: _ClassVar[int]
        JOB_FIELD_NUMBER: _ClassVar[int]
        job_id: str
        values: _containers.ScalarMap[str, str]
        job: Job
        def __init__(self, job_id: _Optional[str] = ..., values: _Optional[_Mapping[str, str]] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    BEST_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BEST_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: SweepSpec
    name: str
    tags: _containers.ScalarMap[str, str]
    note: str
    created_at: _timestamp_pb2.Timestamp
    members: _containers.RepeatedCompositeFieldContainer[Sweep.Member]
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    best_job_id: str
    best_val_loss: float
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[SweepSpec, _Mapping]] = ..., name: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., note: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Sweep.Member, _Mapping]]] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., best_job_id: _Optional[str] = ..., best_val_loss: _Optional[float] = ...) -> None: ...

class GetSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class ListSweepsRequest(_message.Message):
    __slots__ = ("limit", "page_token")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_token: str
    def __init__(self, limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSweepsResponse(_message.Message):
    __slots__ = ("sweeps", "next_page_token")
    SWEEPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sweeps: _containers.RepeatedCompositeFieldContainer[Sweep]
    next_page_token: str
    def __init__(self, sweeps: _Optional[_Iterable[_Union[Sweep, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class DeleteSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...
