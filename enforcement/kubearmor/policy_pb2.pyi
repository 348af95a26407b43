from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PolicyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    Failure: _ClassVar[PolicyStatus]
    Applied: _ClassVar[PolicyStatus]
    Deleted: _ClassVar[PolicyStatus]
    Modified: _ClassVar[PolicyStatus]
    NotExist: _ClassVar[PolicyStatus]
    Invalid: _ClassVar[PolicyStatus]
    NotEnabled: _ClassVar[PolicyStatus]
Failure: PolicyStatus
Applied: PolicyStatus
Deleted: PolicyStatus
Modified: PolicyStatus
NotExist: PolicyStatus
Invalid: PolicyStatus
NotEnabled: PolicyStatus

class response(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: PolicyStatus
    def __init__(self, status: _Optional[_Union[PolicyStatus, str]] = ...) -> None: ...

class policy(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: bytes
    def __init__(self, policy: _Optional[bytes] = ...) -> None: ...

class ContainerData(_message.Message):
    __slots__ = ("policyList", "policyEnabled", "policyDataList")
    POLICYLIST_FIELD_NUMBER: _ClassVar[int]
    POLICYENABLED_FIELD_NUMBER: _ClassVar[int]
    POLICYDATALIST_FIELD_NUMBER: _ClassVar[int]
    policyList: _containers.RepeatedScalarFieldContainer[str]
    policyEnabled: int
    policyDataList: _containers.RepeatedCompositeFieldContainer[policy]
    def __init__(self, policyList: _Optional[_Iterable[str]] = ..., policyEnabled: _Optional[int] = ..., policyDataList: _Optional[_Iterable[_Union[policy, _Mapping]]] = ...) -> None: ...

class HostSecurityPolicies(_message.Message):
    __slots__ = ("policyList", "policyDataList")
    POLICYLIST_FIELD_NUMBER: _ClassVar[int]
    POLICYDATALIST_FIELD_NUMBER: _ClassVar[int]
    policyList: _containers.RepeatedScalarFieldContainer[str]
    policyDataList: _containers.RepeatedCompositeFieldContainer[policy]
    def __init__(self, policyList: _Optional[_Iterable[str]] = ..., policyDataList: _Optional[_Iterable[_Union[policy, _Mapping]]] = ...) -> None: ...

class NetworkSecurityPolicies(_message.Message):
    __slots__ = ("policyList", "policyDataList")
    POLICYLIST_FIELD_NUMBER: _ClassVar[int]
    POLICYDATALIST_FIELD_NUMBER: _ClassVar[int]
    policyList: _containers.RepeatedScalarFieldContainer[str]
    policyDataList: _containers.RepeatedCompositeFieldContainer[policy]
    def __init__(self, policyList: _Optional[_Iterable[str]] = ..., policyDataList: _Optional[_Iterable[_Union[policy, _Mapping]]] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("containerList", "containerMap", "hostMap", "networkMap")
    class ContainerMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ContainerData
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ContainerData, _Mapping]] = ...) -> None: ...
    class HostMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HostSecurityPolicies
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HostSecurityPolicies, _Mapping]] = ...) -> None: ...
    class NetworkMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: NetworkSecurityPolicies
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[NetworkSecurityPolicies, _Mapping]] = ...) -> None: ...
    CONTAINERLIST_FIELD_NUMBER: _ClassVar[int]
    CONTAINERMAP_FIELD_NUMBER: _ClassVar[int]
    HOSTMAP_FIELD_NUMBER: _ClassVar[int]
    NETWORKMAP_FIELD_NUMBER: _ClassVar[int]
    containerList: _containers.RepeatedScalarFieldContainer[str]
    containerMap: _containers.MessageMap[str, ContainerData]
    hostMap: _containers.MessageMap[str, HostSecurityPolicies]
    networkMap: _containers.MessageMap[str, NetworkSecurityPolicies]
    def __init__(self, containerList: _Optional[_Iterable[str]] = ..., containerMap: _Optional[_Mapping[str, ContainerData]] = ..., hostMap: _Optional[_Mapping[str, HostSecurityPolicies]] = ..., networkMap: _Optional[_Mapping[str, NetworkSecurityPolicies]] = ...) -> None: ...
