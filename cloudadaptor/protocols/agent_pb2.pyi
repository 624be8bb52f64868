from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Process(_message.Message):
    __slots__ = ("Terminal", "Args", "Env", "Cwd")
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    Terminal: bool
    Args: _containers.RepeatedScalarFieldContainer[str]
    Env: _containers.RepeatedScalarFieldContainer[str]
    Cwd: str
    def __init__(self, Terminal: _Optional[bool] = ..., Args: _Optional[_Iterable[str]] = ..., Env: _Optional[_Iterable[str]] = ..., Cwd: _Optional[str] = ...) -> None: ...

class Root(_message.Message):
    __slots__ = ("Path", "Readonly")
    PATH_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    Path: str
    Readonly: bool
    def __init__(self, Path: _Optional[str] = ..., Readonly: _Optional[bool] = ...) -> None: ...

class LinuxNamespace(_message.Message):
    __slots__ = ("Type", "Path")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    Type: str
    Path: str
    def __init__(self, Type: _Optional[str] = ..., Path: _Optional[str] = ...) -> None: ...

class Linux(_message.Message):
    __slots__ = ("CgroupsPath", "Namespaces")
    CGROUPSPATH_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    CgroupsPath: str
    Namespaces: _containers.RepeatedCompositeFieldContainer[LinuxNamespace]
    def __init__(self, CgroupsPath: _Optional[str] = ..., Namespaces: _Optional[_Iterable[_Union[LinuxNamespace, _Mapping]]] = ...) -> None: ...

class Spec(_message.Message):
    __slots__ = ("Version", "Process", "Root", "Hostname", "Annotations", "Linux")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    LINUX_FIELD_NUMBER: _ClassVar[int]
    Version: str
    Process: Process
    Root: Root
    Hostname: str
    Annotations: _containers.ScalarMap[str, str]
    Linux: Linux
    def __init__(self, Version: _Optional[str] = ..., Process: _Optional[_Union[Process, _Mapping]] = ..., Root: _Optional[_Union[Root, _Mapping]] = ..., Hostname: _Optional[str] = ..., Annotations: _Optional[_Mapping[str, str]] = ..., Linux: _Optional[_Union[Linux, _Mapping]] = ...) -> None: ...

class StringUser(_message.Message):
    __slots__ = ("uid", "gid", "additionalGids")
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    ADDITIONALGIDS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    gid: str
    additionalGids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, uid: _Optional[str] = ..., gid: _Optional[str] = ..., additionalGids: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateContainerRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "string_user", "OCI", "sandbox_pidns")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    STRING_USER_FIELD_NUMBER: _ClassVar[int]
    OCI_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_PIDNS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    string_user: StringUser
    OCI: Spec
    sandbox_pidns: bool
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., string_user: _Optional[_Union[StringUser, _Mapping]] = ..., OCI: _Optional[_Union[Spec, _Mapping]] = ..., sandbox_pidns: _Optional[bool] = ...) -> None: ...

class StartContainerRequest(_message.Message):
    __slots__ = ("container_id",)
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    def __init__(self, container_id: _Optional[str] = ...) -> None: ...

class RemoveContainerRequest(_message.Message):
    __slots__ = ("container_id", "timeout")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    timeout: int
    def __init__(self, container_id: _Optional[str] = ..., timeout: _Optional[int] = ...) -> None: ...

class ExecProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "string_user", "process")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    STRING_USER_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    string_user: StringUser
    process: Process
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., string_user: _Optional[_Union[StringUser, _Mapping]] = ..., process: _Optional[_Union[Process, _Mapping]] = ...) -> None: ...

class SignalProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "signal")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    signal: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ...) -> None: ...

class WaitProcessRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class WaitProcessResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: int
    def __init__(self, status: _Optional[int] = ...) -> None: ...

class WriteStreamRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "data")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    data: bytes
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteStreamResponse(_message.Message):
    __slots__ = ("len",)
    LEN_FIELD_NUMBER: _ClassVar[int]
    len: int
    def __init__(self, len: _Optional[int] = ...) -> None: ...

class ReadStreamRequest(_message.Message):
    __slots__ = ("container_id", "exec_id", "len")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    LEN_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    len: int
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., len: _Optional[int] = ...) -> None: ...

class ReadStreamResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CloseStdinRequest(_message.Message):
    __slots__ = ("container_id", "exec_id")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("hostname", "dns", "sandbox_pidns", "sandbox_id", "guest_hook_path")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DNS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_PIDNS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    GUEST_HOOK_PATH_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    dns: _containers.RepeatedScalarFieldContainer[str]
    sandbox_pidns: bool
    sandbox_id: str
    guest_hook_path: str
    def __init__(self, hostname: _Optional[str] = ..., dns: _Optional[_Iterable[str]] = ..., sandbox_pidns: _Optional[bool] = ..., sandbox_id: _Optional[str] = ..., guest_hook_path: _Optional[str] = ...) -> None: ...

class DestroySandboxRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentDetails(_message.Message):
    __slots__ = ("version", "init_daemon", "device_handlers", "storage_handlers", "supports_seccomp", "extra_features")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INIT_DAEMON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_HANDLERS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_HANDLERS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_SECCOMP_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FEATURES_FIELD_NUMBER: _ClassVar[int]
    version: str
    init_daemon: bool
    device_handlers: _containers.RepeatedScalarFieldContainer[str]
    storage_handlers: _containers.RepeatedScalarFieldContainer[str]
    supports_seccomp: bool
    extra_features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., init_daemon: _Optional[bool] = ..., device_handlers: _Optional[_Iterable[str]] = ..., storage_handlers: _Optional[_Iterable[str]] = ..., supports_seccomp: _Optional[bool] = ..., extra_features: _Optional[_Iterable[str]] = ...) -> None: ...

class GuestDetailsRequest(_message.Message):
    __slots__ = ("mem_block_size", "mem_hotplug_probe")
    MEM_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEM_HOTPLUG_PROBE_FIELD_NUMBER: _ClassVar[int]
    mem_block_size: bool
    mem_hotplug_probe: bool
    def __init__(self, mem_block_size: _Optional[bool] = ..., mem_hotplug_probe: _Optional[bool] = ...) -> None: ...

class GuestDetailsResponse(_message.Message):
    __slots__ = ("mem_block_size_bytes", "agent_details", "support_mem_hotplug_probe")
    MEM_BLOCK_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_DETAILS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_MEM_HOTPLUG_PROBE_FIELD_NUMBER: _ClassVar[int]
    mem_block_size_bytes: int
    agent_details: AgentDetails
    support_mem_hotplug_probe: bool
    def __init__(self, mem_block_size_bytes: _Optional[int] = ..., agent_details: _Optional[_Union[AgentDetails, _Mapping]] = ..., support_mem_hotplug_probe: _Optional[bool] = ...) -> None: ...
