"""Server-side Motion Server schema (protobuf package ``driveningress.v2``), built at runtime.

Why at runtime: no protoc is available, and the SDK's ``message_pb2`` cannot be reused because
it omits the animation payload (``ServerResponseAnimation.animation = 4``) the simulator emits.
Field numbers and types follow the production contract, so every message here is wire-compatible
with the SDK's package ``message``: the SDK parses what we send and keeps field 4 as unknown bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "driveningress.v2"

_Field = descriptor_pb2.FieldDescriptorProto
_STRING = _Field.TYPE_STRING
_BYTES = _Field.TYPE_BYTES
_BOOL = _Field.TYPE_BOOL
_INT32 = _Field.TYPE_INT32
_FLOAT = _Field.TYPE_FLOAT
_ENUM = _Field.TYPE_ENUM
_MESSAGE = _Field.TYPE_MESSAGE


class MessageType(IntEnum):
    UNSPECIFIED = 0
    CLIENT_CONFIGURE_SESSION = 1
    SERVER_CONFIRM_SESSION = 2
    CLIENT_AUDIO_INPUT = 3
    SERVER_ERROR = 4
    SERVER_RESPONSE_ANIMATION = 5
    CLIENT_INTERRUPT = 7


class AudioFormat(IntEnum):
    PCM_S16LE = 0
    OGG_OPUS = 1


class TransportCompression(IntEnum):
    NONE = 0


class EgressType(IntEnum):
    UNSPECIFIED = 0
    LIVEKIT = 1
    AGORA = 2


class CloseCode(IntEnum):
    """WebSocket close codes the server ends a session with; also carried in ``ServerError.code``.

    40xx means retrying changes nothing, 45xx means the client should retry.
    """

    UNSPECIFIED = 0
    CREDITS_EXHAUSTED = 4001
    SESSION_TIMEOUT = 4002
    CONCURRENCY_LIMIT = 4003
    AUTH_FAILED = 4010
    UPSTREAM_UNAVAILABLE = 4503


# Flame message fields in field-number order (1..7); every one is a packed repeated float.
FLAME_FIELDS: tuple[str, ...] = (
    "translation",
    "rotation",
    "neck_pose",
    "jaw_pose",
    "eye_pose",
    "eye_lid",
    "expression",
)


def _ref(name: str) -> str:
    return f".{PACKAGE}.{name}"


def _field(
    name: str,
    number: int,
    kind: int,
    *,
    type_name: str = "",
    repeated: bool = False,
    oneof: int | None = None,
) -> descriptor_pb2.FieldDescriptorProto:
    field = _Field(name=name, number=number, type=kind)
    field.label = _Field.LABEL_REPEATED if repeated else _Field.LABEL_OPTIONAL
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    if repeated and kind == _FLOAT:
        field.options.packed = True
    return field


def _message(
    name: str,
    fields: Iterable[descriptor_pb2.FieldDescriptorProto],
    *,
    nested: Iterable[descriptor_pb2.DescriptorProto] = (),
    oneofs: Iterable[str] = (),
) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name=name)
    message.field.extend(fields)
    message.nested_type.extend(nested)
    for oneof in oneofs:
        message.oneof_decl.add(name=oneof)
    return message


def _enum(name: str, prefix: str, values: type[IntEnum]) -> descriptor_pb2.EnumDescriptorProto:
    # Proto3 enum values share the package scope, hence the per-enum prefix (as in the SDK).
    enum = descriptor_pb2.EnumDescriptorProto(name=name)
    for member in values:
        enum.value.add(name=f"{prefix}_{member.name}", number=member.value)
    return enum


def _string_map_entry(name: str) -> descriptor_pb2.DescriptorProto:
    entry = _message(name, [_field("key", 1, _STRING), _field("value", 2, _STRING)])
    entry.options.map_entry = True
    return entry


def _configure_session() -> descriptor_pb2.DescriptorProto:
    entry = "ExtraParamsEntry"
    return _message(
        "ClientConfigureSession",
        [
            _field("sample_rate", 1, _INT32),
            _field("bitrate", 2, _INT32),
            _field("audio_format", 3, _ENUM, type_name=_ref("AudioFormat")),
            _field("transport_compression", 4, _ENUM, type_name=_ref("TransportCompression")),
            _field("egress_type", 5, _ENUM, type_name=_ref("EgressType")),
            # Egress configs are opaque here: the simulator only serves WebSocket mode.
            _field("livekit_egress", 6, _BYTES),
            _field("agora_egress", 7, _BYTES),
            _field(
                "extra_params",
                8,
                _MESSAGE,
                type_name=_ref(f"ClientConfigureSession.{entry}"),
                repeated=True,
            ),
        ],
        nested=[_string_map_entry(entry)],
    )


def _envelope() -> descriptor_pb2.DescriptorProto:
    payloads = [
        ("client_configure_session", 2, "ClientConfigureSession"),
        ("server_confirm_session", 3, "ServerConfirmSession"),
        ("client_audio_input", 4, "ClientAudioInput"),
        ("server_error", 5, "ServerError"),
        ("server_response_animation", 6, "ServerResponseAnimation"),
        ("client_interrupt", 8, "ClientInterrupt"),
    ]
    fields = [_field("type", 1, _ENUM, type_name=_ref("MessageType"))]
    fields += [
        _field(name, number, _MESSAGE, type_name=_ref(kind), oneof=0)
        for name, number, kind in payloads
    ]
    return _message("Message", fields, oneofs=["data"])


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="driveningress/v2/driveningress.proto", package=PACKAGE, syntax="proto3"
    )
    file.enum_type.extend(
        [
            _enum("MessageType", "MESSAGE", MessageType),
            _enum("AudioFormat", "AUDIO_FORMAT", AudioFormat),
            _enum("TransportCompression", "TRANSPORT_COMPRESSION", TransportCompression),
            _enum("EgressType", "EGRESS_TYPE", EgressType),
            _enum("CloseCode", "CLOSE_CODE", CloseCode),
        ]
    )
    flame_fields = [
        _field(name, number, _FLOAT, repeated=True)
        for number, name in enumerate(FLAME_FIELDS, start=1)
    ]
    file.message_type.extend(
        [
            _configure_session(),
            _message(
                "ServerConfirmSession",
                [
                    _field("connection_id", 1, _STRING),
                    _field("capabilities", 2, _STRING, repeated=True),
                ],
            ),
            _message(
                "TraceContext",
                [_field("traceparent", 1, _STRING), _field("tracestate", 2, _STRING)],
            ),
            _message(
                "ClientAudioInput",
                [
                    _field("req_id", 1, _STRING),
                    _field("end", 2, _BOOL),
                    _field("audio", 3, _BYTES),
                    _field("trace_context", 4, _MESSAGE, type_name=_ref("TraceContext")),
                ],
            ),
            _message(
                "ServerError",
                [
                    _field("connection_id", 1, _STRING),
                    _field("req_id", 2, _STRING),
                    _field("code", 3, _INT32),
                    _field("message", 4, _STRING),
                ],
            ),
            _message("Flame", flame_fields),
            _message(
                "FlameAnimation",
                [_field("keyframes", 1, _MESSAGE, type_name=_ref("Flame"), repeated=True)],
            ),
            _message(
                "ServerResponseAnimation",
                [
                    _field("connection_id", 1, _STRING),
                    _field("req_id", 2, _STRING),
                    _field("end", 3, _BOOL),
                    _field("animation", 4, _MESSAGE, type_name=_ref("FlameAnimation")),
                    _field("avatar_id", 5, _STRING),
                ],
            ),
            _message("ClientInterrupt", [_field("req_id", 1, _STRING)]),
            _envelope(),
        ]
    )
    return file


# A private pool keeps this schema from colliding with anything in the default pool.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def _cls(name: str) -> Any:
    # Generated classes have no static attribute types, so callers get Any, as with protoc output.
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


Message: Any = _cls("Message")
ClientConfigureSession: Any = _cls("ClientConfigureSession")
ServerConfirmSession: Any = _cls("ServerConfirmSession")
TraceContext: Any = _cls("TraceContext")
ClientAudioInput: Any = _cls("ClientAudioInput")
ServerError: Any = _cls("ServerError")
Flame: Any = _cls("Flame")
FlameAnimation: Any = _cls("FlameAnimation")
ServerResponseAnimation: Any = _cls("ServerResponseAnimation")
ClientInterrupt: Any = _cls("ClientInterrupt")
