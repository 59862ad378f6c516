from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTRY_KIND_MAPPING: _ClassVar[EntryKind]
    ENTRY_KIND_NOOP: _ClassVar[EntryKind]
    ENTRY_KIND_COMMAND: _ClassVar[EntryKind]
    ENTRY_KIND_CONFIG: _ClassVar[EntryKind]

class WatchEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_EVENT_PUT: _ClassVar[WatchEventType]
    WATCH_EVENT_DELETE: _ClassVar[WatchEventType]
ENTRY_KIND_MAPPING: EntryKind
ENTRY_KIND_NOOP: EntryKind
ENTRY_KIND_COMMAND: EntryKind
ENTRY_KIND_CONFIG: EntryKind
WATCH_EVENT_PUT: WatchEventType
WATCH_EVENT_DELETE: WatchEventType

class VoteRequest(_message.Message):
    __slots__ = ("term", "requester_id", "last_log_index", "last_log_term", "pre_vote", "leadership_transfer")
    TERM_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    PRE_VOTE_FIELD_NUMBER: _ClassVar[int]
    LEADERSHIP_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    term: int
    requester_id: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool
    leadership_transfer: bool
    def __init__(self, term: _Optional[int] = ..., requester_id: _Optional[int] = ..., last_log_index: _Optional[int] = ..., last_log_term: _Optional[int] = ..., pre_vote: _Optional[bool] = ..., leadership_transfer: _Optional[bool] = ...) -> None: ...

class RequestVoteResponse(_message.Message):
    __slots__ = ("term", "vote_granted")
    TERM_FIELD_NUMBER: _ClassVar[int]
    VOTE_GRANTED_FIELD_NUMBER: _ClassVar[int]
    term: int
    vote_granted: bool
    def __init__(self, term: _Optional[int] = ..., vote_granted: _Optional[bool] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("term", "index", "key", "value", "kind", "command", "leader_time_ms", "config")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    LEADER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    key: str
    value: str
    kind: EntryKind
    command: Command
    leader_time_ms: int
    config: Configuration
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ..., key: _Optional[str] = ..., value: _Optional[str] = ..., kind: _Optional[_Union[EntryKind, str]] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., leader_time_ms: _Optional[int] = ..., config: _Optional[_Union[Configuration, _Mapping]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("id", "raft_address", "client_address", "voter")
    ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    id: int
    raft_address: str
    client_address: str
    voter: bool
    def __init__(self, id: _Optional[int] = ..., raft_address: _Optional[str] = ..., client_address: _Optional[str] = ..., voter: _Optional[bool] = ...) -> None: ...

class Configuration(_message.Message):
    __slots__ = ("members", "removed_ids")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_IDS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    removed_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., removed_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ListMembersRequest(_message.Message):
    __slots__ = ("allow_stale",)
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    allow_stale: bool
    def __init__(self, allow_stale: _Optional[bool] = ...) -> None: ...

class AddMemberRequest(_message.Message):
    __slots__ = ("id", "raft_address", "client_address", "wait_until_voter")
    ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_VOTER_FIELD_NUMBER: _ClassVar[int]
    id: int
    raft_address: str
    client_address: str
    wait_until_voter: bool
    def __init__(self, id: _Optional[int] = ..., raft_address: _Optional[str] = ..., client_address: _Optional[str] = ..., wait_until_voter: _Optional[bool] = ...) -> None: ...

class RemoveMemberRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class MembershipResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "config", "config_index", "committed")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONFIG_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    config: Configuration
    config_index: int
    committed: bool
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., config: _Optional[_Union[Configuration, _Mapping]] = ..., config_index: _Optional[int] = ..., committed: _Optional[bool] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("put", "delete", "compare_and_swap", "register_client", "delete_range", "lease_grant", "lease_revoke", "lease_expire")
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_AND_SWAP_FIELD_NUMBER: _ClassVar[int]
    REGISTER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    DELETE_RANGE_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRANT_FIELD_NUMBER: _ClassVar[int]
    LEASE_REVOKE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRE_FIELD_NUMBER: _ClassVar[int]
    put: MappingBatch
    delete: DeleteRequest
    compare_and_swap: CompareAndSwapRequest
    register_client: RegisterClientRequest
    delete_range: DeleteRangeRequest
    lease_grant: LeaseGrantRequest
    lease_revoke: LeaseRevokeRequest
    lease_expire: LeaseExpire
    def __init__(self, put: _Optional[_Union[MappingBatch, _Mapping]] = ..., delete: _Optional[_Union[DeleteRequest, _Mapping]] = ..., compare_and_swap: _Optional[_Union[CompareAndSwapRequest, _Mapping]] = ..., register_client: _Optional[_Union[RegisterClientRequest, _Mapping]] = ..., delete_range: _Optional[_Union[DeleteRangeRequest, _Mapping]] = ..., lease_grant: _Optional[_Union[LeaseGrantRequest, _Mapping]] = ..., lease_revoke: _Optional[_Union[LeaseRevokeRequest, _Mapping]] = ..., lease_expire: _Optional[_Union[LeaseExpire, _Mapping]] = ...) -> None: ...

class AppendEntriesRequest(_message.Message):
    __slots__ = ("term", "requester_id", "prev_log_index", "prev_log_term", "leader_commit", "log_entries")
    TERM_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREV_LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_COMMIT_FIELD_NUMBER: _ClassVar[int]
    LOG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    term: int
    requester_id: int
    prev_log_index: int
    prev_log_term: int
    leader_commit: int
    log_entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, term: _Optional[int] = ..., requester_id: _Optional[int] = ..., prev_log_index: _Optional[int] = ..., prev_log_term: _Optional[int] = ..., leader_commit: _Optional[int] = ..., log_entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...

class AppendEntriesResponse(_message.Message):
    __slots__ = ("term", "success", "match_index", "conflict_term", "conflict_index")
    TERM_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_TERM_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_INDEX_FIELD_NUMBER: _ClassVar[int]
    term: int
    success: bool
    match_index: int
    conflict_term: int
    conflict_index: int
    def __init__(self, term: _Optional[int] = ..., success: _Optional[bool] = ..., match_index: _Optional[int] = ..., conflict_term: _Optional[int] = ..., conflict_index: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("client_id", "sequence", "first_outstanding")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    sequence: int
    first_outstanding: int
    def __init__(self, client_id: _Optional[int] = ..., sequence: _Optional[int] = ..., first_outstanding: _Optional[int] = ...) -> None: ...

class Mapping(_message.Message):
    __slots__ = ("key", "value", "session", "lease")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    session: Session
    lease: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., lease: _Optional[int] = ...) -> None: ...

class MappingBatch(_message.Message):
    __slots__ = ("mappings", "session")
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    mappings: _containers.RepeatedCompositeFieldContainer[Mapping]
    session: Session
    def __init__(self, mappings: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "session")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    session: Session
    def __init__(self, key: _Optional[str] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "existed", "revision")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    existed: bool
    revision: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., existed: _Optional[bool] = ..., revision: _Optional[int] = ...) -> None: ...

class CompareAndSwapRequest(_message.Message):
    __slots__ = ("key", "expected_value", "new_value", "session", "expected_mod_revision", "lease")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    key: str
    expected_value: str
    new_value: str
    session: Session
    expected_mod_revision: int
    lease: int
    def __init__(self, key: _Optional[str] = ..., expected_value: _Optional[str] = ..., new_value: _Optional[str] = ..., session: _Optional[_Union[Session, _Mapping]] = ..., expected_mod_revision: _Optional[int] = ..., lease: _Optional[int] = ...) -> None: ...

class CompareAndSwapResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "swapped", "current_value", "revision", "mod_revision")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    swapped: bool
    current_value: str
    revision: int
    mod_revision: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., swapped: _Optional[bool] = ..., current_value: _Optional[str] = ..., revision: _Optional[int] = ..., mod_revision: _Optional[int] = ...) -> None: ...

class RegisterClientRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterClientResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "client_id")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    client_id: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., client_id: _Optional[int] = ...) -> None: ...

class TransferLeadershipRequest(_message.Message):
    __slots__ = ("target_id",)
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    target_id: int
    def __init__(self, target_id: _Optional[int] = ...) -> None: ...

class TransferLeadershipResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ...) -> None: ...

class ReadIndexRequest(_message.Message):
    __slots__ = ("term", "requester_id")
    TERM_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    term: int
    requester_id: int
    def __init__(self, term: _Optional[int] = ..., requester_id: _Optional[int] = ...) -> None: ...

class ReadIndexResponse(_message.Message):
    __slots__ = ("term", "success", "read_index")
    TERM_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    READ_INDEX_FIELD_NUMBER: _ClassVar[int]
    term: int
    success: bool
    read_index: int
    def __init__(self, term: _Optional[int] = ..., success: _Optional[bool] = ..., read_index: _Optional[int] = ...) -> None: ...

class TimeoutNowRequest(_message.Message):
    __slots__ = ("term", "requester_id")
    TERM_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    term: int
    requester_id: int
    def __init__(self, term: _Optional[int] = ..., requester_id: _Optional[int] = ...) -> None: ...

class TimeoutNowResponse(_message.Message):
    __slots__ = ("term",)
    TERM_FIELD_NUMBER: _ClassVar[int]
    term: int
    def __init__(self, term: _Optional[int] = ...) -> None: ...

class ProposeMappingResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "revision")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    revision: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("key", "allow_stale")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    key: str
    allow_stale: bool
    def __init__(self, key: _Optional[str] = ..., allow_stale: _Optional[bool] = ...) -> None: ...

class GetValueResponse(_message.Message):
    __slots__ = ("key", "value", "create_revision", "mod_revision", "version", "revision")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    revision: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., version: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class RangeRequest(_message.Message):
    __slots__ = ("key", "range_end", "prefix", "limit", "resume_key", "allow_stale", "keys_only", "count_only")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESUME_KEY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    KEYS_ONLY_FIELD_NUMBER: _ClassVar[int]
    COUNT_ONLY_FIELD_NUMBER: _ClassVar[int]
    key: str
    range_end: str
    prefix: bool
    limit: int
    resume_key: str
    allow_stale: bool
    keys_only: bool
    count_only: bool
    def __init__(self, key: _Optional[str] = ..., range_end: _Optional[str] = ..., prefix: _Optional[bool] = ..., limit: _Optional[int] = ..., resume_key: _Optional[str] = ..., allow_stale: _Optional[bool] = ..., keys_only: _Optional[bool] = ..., count_only: _Optional[bool] = ...) -> None: ...

class KeyValue(_message.Message):
    __slots__ = ("key", "value", "create_revision", "mod_revision", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class RangeResponse(_message.Message):
    __slots__ = ("kvs", "more", "next_key", "count", "revision")
    KVS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    NEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    kvs: _containers.RepeatedCompositeFieldContainer[KeyValue]
    more: bool
    next_key: str
    count: int
    revision: int
    def __init__(self, kvs: _Optional[_Iterable[_Union[KeyValue, _Mapping]]] = ..., more: _Optional[bool] = ..., next_key: _Optional[str] = ..., count: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class DeleteRangeRequest(_message.Message):
    __slots__ = ("key", "range_end", "prefix", "session")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    range_end: str
    prefix: bool
    session: Session
    def __init__(self, key: _Optional[str] = ..., range_end: _Optional[str] = ..., prefix: _Optional[bool] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class DeleteRangeResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "deleted", "revision")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    deleted: int
    revision: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., deleted: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("key", "range_end", "prefix", "start_revision", "prev_value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    PREV_VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    range_end: str
    prefix: bool
    start_revision: int
    prev_value: bool
    def __init__(self, key: _Optional[str] = ..., range_end: _Optional[str] = ..., prefix: _Optional[bool] = ..., start_revision: _Optional[int] = ..., prev_value: _Optional[bool] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "key", "value", "revision", "create_revision", "version", "prev_value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREV_VALUE_FIELD_NUMBER: _ClassVar[int]
    type: WatchEventType
    key: str
    value: str
    revision: int
    create_revision: int
    version: int
    prev_value: str
    def __init__(self, type: _Optional[_Union[WatchEventType, str]] = ..., key: _Optional[str] = ..., value: _Optional[str] = ..., revision: _Optional[int] = ..., create_revision: _Optional[int] = ..., version: _Optional[int] = ..., prev_value: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events", "revision", "created", "compact_revision")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    COMPACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[WatchEvent]
    revision: int
    created: bool
    compact_revision: int
    def __init__(self, events: _Optional[_Iterable[_Union[WatchEvent, _Mapping]]] = ..., revision: _Optional[int] = ..., created: _Optional[bool] = ..., compact_revision: _Optional[int] = ...) -> None: ...

class LeaderRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaderResponse(_message.Message):
    __slots__ = ("node_id", "role", "term", "leader_id", "leader_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    role: str
    term: int
    leader_id: int
    leader_address: str
    def __init__(self, node_id: _Optional[int] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader_id: _Optional[int] = ..., leader_address: _Optional[str] = ...) -> None: ...

class InstallSnapshotRequest(_message.Message):
    __slots__ = ("term", "requester_id", "last_included_index", "last_included_term", "offset", "total_size", "data", "done", "checksum")
    TERM_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_INCLUDED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_INCLUDED_TERM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    term: int
    requester_id: int
    last_included_index: int
    last_included_term: int
    offset: int
    total_size: int
    data: bytes
    done: bool
    checksum: int
    def __init__(self, term: _Optional[int] = ..., requester_id: _Optional[int] = ..., last_included_index: _Optional[int] = ..., last_included_term: _Optional[int] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., checksum: _Optional[int] = ...) -> None: ...

class InstallSnapshotResponse(_message.Message):
    __slots__ = ("term", "next_offset", "installed")
    TERM_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    term: int
    next_offset: int
    installed: bool
    def __init__(self, term: _Optional[int] = ..., next_offset: _Optional[int] = ..., installed: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("id", "voter", "match_index", "lag", "last_contact_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    MATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTACT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: int
    voter: bool
    match_index: int
    lag: int
    last_contact_seconds: float
    def __init__(self, id: _Optional[int] = ..., voter: _Optional[bool] = ..., match_index: _Optional[int] = ..., lag: _Optional[int] = ..., last_contact_seconds: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "raft_address", "client_address", "role", "term", "leader_id", "commit_index", "applied_index", "last_log_index", "snapshot_index", "voter", "learner", "leader_contact_seconds", "config", "config_index", "serving", "peers", "time_scale")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_LOG_INDEX_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    LEADER_CONTACT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONFIG_INDEX_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    TIME_SCALE_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    raft_address: str
    client_address: str
    role: str
    term: int
    leader_id: int
    commit_index: int
    applied_index: int
    last_log_index: int
    snapshot_index: int
    voter: bool
    learner: bool
    leader_contact_seconds: float
    config: Configuration
    config_index: int
    serving: bool
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    time_scale: float
    def __init__(self, node_id: _Optional[int] = ..., raft_address: _Optional[str] = ..., client_address: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader_id: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., last_log_index: _Optional[int] = ..., snapshot_index: _Optional[int] = ..., voter: _Optional[bool] = ..., learner: _Optional[bool] = ..., leader_contact_seconds: _Optional[float] = ..., config: _Optional[_Union[Configuration, _Mapping]] = ..., config_index: _Optional[int] = ..., serving: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ..., time_scale: _Optional[float] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[NodeEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[NodeEvent, _Mapping]]] = ...) -> None: ...

class NodeEvent(_message.Message):
    __slots__ = ("seq", "node_id", "time", "kind", "text", "role", "term", "leader_id", "voted_for", "last_index", "last_term", "commit_index", "applied_index", "snapshot_index", "peer", "index", "count", "ok", "detail", "deadline", "entry_terms", "time_scale", "members", "action")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    VOTED_FOR_FIELD_NUMBER: _ClassVar[int]
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAST_TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_TERMS_FIELD_NUMBER: _ClassVar[int]
    TIME_SCALE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    node_id: int
    time: float
    kind: str
    text: str
    role: str
    term: int
    leader_id: int
    voted_for: int
    last_index: int
    last_term: int
    commit_index: int
    applied_index: int
    snapshot_index: int
    peer: int
    index: int
    count: int
    ok: bool
    detail: str
    deadline: float
    entry_terms: _containers.RepeatedScalarFieldContainer[int]
    time_scale: float
    members: _containers.RepeatedScalarFieldContainer[int]
    action: str
    def __init__(self, seq: _Optional[int] = ..., node_id: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., text: _Optional[str] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader_id: _Optional[int] = ..., voted_for: _Optional[int] = ..., last_index: _Optional[int] = ..., last_term: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., snapshot_index: _Optional[int] = ..., peer: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ..., deadline: _Optional[float] = ..., entry_terms: _Optional[_Iterable[int]] = ..., time_scale: _Optional[float] = ..., members: _Optional[_Iterable[int]] = ..., action: _Optional[str] = ...) -> None: ...

class BatchOp(_message.Message):
    __slots__ = ("put", "delete", "put_many", "get")
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    PUT_MANY_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    put: Mapping
    delete: DeleteRequest
    put_many: MappingBatch
    get: Key
    def __init__(self, put: _Optional[_Union[Mapping, _Mapping]] = ..., delete: _Optional[_Union[DeleteRequest, _Mapping]] = ..., put_many: _Optional[_Union[MappingBatch, _Mapping]] = ..., get: _Optional[_Union[Key, _Mapping]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[BatchOp]
    def __init__(self, ops: _Optional[_Iterable[_Union[BatchOp, _Mapping]]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("code", "details", "put", "delete", "put_many", "get", "resend_alone")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    PUT_MANY_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    RESEND_ALONE_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    put: ProposeMappingResponse
    delete: DeleteResponse
    put_many: ProposeMappingResponse
    get: GetValueResponse
    resend_alone: bool
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., put: _Optional[_Union[ProposeMappingResponse, _Mapping]] = ..., delete: _Optional[_Union[DeleteResponse, _Mapping]] = ..., put_many: _Optional[_Union[ProposeMappingResponse, _Mapping]] = ..., get: _Optional[_Union[GetValueResponse, _Mapping]] = ..., resend_alone: _Optional[bool] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ...) -> None: ...

class SaveSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "index", "term", "cluster_id", "data")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    index: int
    term: int
    cluster_id: str
    data: bytes
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., index: _Optional[int] = ..., term: _Optional[int] = ..., cluster_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class LeaseGrantRequest(_message.Message):
    __slots__ = ("ttl", "id", "session")
    TTL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ttl: int
    id: int
    session: Session
    def __init__(self, ttl: _Optional[int] = ..., id: _Optional[int] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class LeaseGrantResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "id", "ttl", "revision")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    id: int
    ttl: int
    revision: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., id: _Optional[int] = ..., ttl: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class LeaseRevokeRequest(_message.Message):
    __slots__ = ("id", "session")
    ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    id: int
    session: Session
    def __init__(self, id: _Optional[int] = ..., session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class LeaseRevokeResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "deleted", "revision")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    deleted: int
    revision: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., deleted: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class LeaseExpire(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LeaseKeepAliveRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class LeaseKeepAliveResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "id", "ttl")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    id: int
    ttl: int
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., id: _Optional[int] = ..., ttl: _Optional[int] = ...) -> None: ...

class LeaseTimeToLiveRequest(_message.Message):
    __slots__ = ("id", "keys")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    id: int
    keys: bool
    def __init__(self, id: _Optional[int] = ..., keys: _Optional[bool] = ...) -> None: ...

class LeaseTimeToLiveResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "id", "remaining", "granted_ttl", "keys")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    GRANTED_TTL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    id: int
    remaining: float
    granted_ttl: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., id: _Optional[int] = ..., remaining: _Optional[float] = ..., granted_ttl: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class LeaseLeasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseLeasesResponse(_message.Message):
    __slots__ = ("success", "current_leader", "leader_address", "ids")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_LEADER_FIELD_NUMBER: _ClassVar[int]
    LEADER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    current_leader: int
    leader_address: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, success: _Optional[bool] = ..., current_leader: _Optional[int] = ..., leader_address: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...
