"""Tests of kernel.messages: the segment model, its serialised form and its degrading."""

from __future__ import annotations

from typing import Any

import pytest

import kernel.messages as messages
import kernel.models as models
from kernel.messages import (
    SEGMENT_TYPES,
    Audio,
    File,
    Forward,
    ForwardNode,
    Image,
    Mention,
    MentionAll,
    MessageEvent,
    Quote,
    Raw,
    Reply,
    Segment,
    Sender,
    Target,
    Text,
    Video,
    as_reply,
    degrade,
)
from kernel.models import make_converter

EVERY_SEGMENT: tuple[Segment, ...] = (
    Text("hi "),
    Mention("42", "Neko"),
    MentionAll(),
    Quote("m-7", extra={"seq": 3}),
    Image("https://example.invalid/cat.png", name="cat.png", mime="image/png", size=10),
    File("file:///srv/report.pdf", name="report.pdf", file_id="f-1"),
    Audio("https://example.invalid/meow.ogg", duration=1.5),
    Video(file_id="v-9", extra={"cover": "c.jpg"}),
    Forward(
        (
            ForwardNode(Sender("1", "Tama"), (Text("first"), Image("https://example.invalid/a"))),
            ForwardNode(message_id="m-1"),
        )
    ),
    Raw("face", {"id": "14"}, fallback="[smile]"),
)


def event(*segments: Segment, **kwargs: Any) -> MessageEvent:
    return MessageEvent("mock", "mock-1", "group", "room", Sender("u1"), segments, **kwargs)


def test_every_segment_type_has_a_tag_of_its_own() -> None:
    assert set(SEGMENT_TYPES) == {s.type for s in EVERY_SEGMENT}
    assert all(SEGMENT_TYPES[s.type] is type(s) for s in EVERY_SEGMENT)


def test_the_models_module_still_exports_the_message_model() -> None:
    for name in ("MessageEvent", "Reply", "Segment", "Target", "Sender", "ChatType", "Text"):
        assert getattr(models, name) is getattr(messages, name)


def test_event_text_target_and_conversation() -> None:
    e = event(Text("/echo "), Mention("42"), Text("hi"), self_id="bot-2")
    assert e.text == "/echo hi"
    assert e.target == Target("mock-1", "group", "room", "bot-2")
    assert e.conversation == ("mock-1", "group", "room")
    # The platform's payload is for the adapter: it does not make two events differ.
    assert event(Text("x"), id="1", time=1.0, raw={"a": 1}) == event(Text("x"), id="1", time=1.0)


def test_reply_text_plain_text_and_as_reply() -> None:
    assert Reply.text("meow") == Reply((Text("meow"),)) == Reply([Text("meow")])
    assert Reply((Text("a"), Image("https://example.invalid/x"), Text("b"))).plain_text == "ab"
    assert as_reply("hi") == Reply.text("hi")
    assert as_reply("") is None and as_reply(None) is None
    with pytest.raises(TypeError, match="not int"):
        as_reply(3)  # type: ignore[arg-type]


def test_image_from_bytes_is_a_data_uri() -> None:
    image = Image.from_bytes(b"\x89PNG", name="dot.png")
    assert image.url == "data:image/png;base64,iVBORw=="
    assert (image.mime, image.size, image.name) == ("image/png", 4, "dot.png")


# ------------------------------------------------------------------ serialising


def test_segments_round_trip_through_the_kernel_converter() -> None:
    conv = make_converter()
    reply = Reply(EVERY_SEGMENT)
    data = conv.unstructure(reply)
    assert conv.structure(data, Reply) == reply
    e = event(*EVERY_SEGMENT, id="9", to_me=True)
    assert conv.structure(conv.unstructure(e), MessageEvent) == e


def test_a_segment_serialises_with_its_type_and_without_defaults() -> None:
    conv = make_converter()
    assert conv.unstructure(Text("hi")) == {"type": "text", "text": "hi"}
    assert conv.unstructure(Mention("42")) == {"type": "mention", "user_id": "42"}
    assert conv.unstructure(MentionAll()) == {"type": "mention_all"}
    assert conv.unstructure(Raw("face", {"id": "14"})) == {
        "type": "raw",
        "kind": "face",
        "data": {"id": "14"},
    }
    forward = conv.unstructure(Forward((ForwardNode(segments=(Text("x"),)),)))
    assert forward["nodes"][0]["segments"] == [{"type": "text", "text": "x"}]
    # As an element of a list typed as the union, too.
    assert conv.unstructure([Image("u")], list[Segment]) == [{"type": "image", "url": "u"}]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"type": "sticker", "id": "1"}, "unknown segment type 'sticker'"),
        ({"text": "no type"}, "unknown segment type None"),
        ("just text", "a segment must be an object, not str"),
    ],
)
def test_a_malformed_segment_is_refused_with_a_clear_error(data: Any, error: str) -> None:
    conv = make_converter()
    with pytest.raises(ValueError, match=error):
        conv.structure(data, Segment)  # type: ignore[arg-type]


# ------------------------------------------------------------------ degrading


def test_unsupported_segments_become_text_and_adjacent_texts_merge() -> None:
    segments = (
        Quote("m-1"),
        Text("look "),
        Mention("42", "Neko"),
        Text(" at "),
        Image("https://example.invalid/cat.png"),
        Text(", "),
        Image("data:image/png;base64,AAAA"),
        Text(" and "),
        File("file:///secret/path.pdf", name="notes.pdf"),
        Audio(),
        Video("file:///x.mp4"),
        MentionAll(),
    )
    assert degrade(segments, {"text"}) == (
        Text(
            "look @Neko at [image: https://example.invalid/cat.png], [image] and "
            "[file: notes.pdf][audio][video]@all"
        ),
    )
    # What is supported stays a segment of its own.
    assert degrade(segments[:5], {"text", "image", "quote"}) == (
        Quote("m-1"),
        Text("look @Neko at "),
        Image("https://example.invalid/cat.png"),
    )


def test_a_raw_segment_is_sent_only_where_its_kind_is_known() -> None:
    face = Raw("face", {"id": "14"}, fallback="[smile]")
    card = Raw("json", {"data": "{}"})
    assert degrade((face, card), {"text", "raw"}, {"face"}) == (face,)
    assert degrade((Text("a"), face, card, Text("b")), {"text"}) == (Text("a[smile]b"),)


def test_a_forward_is_flattened_or_degraded_inside() -> None:
    forward = Forward(
        (
            ForwardNode(Sender("1", "Tama"), (Text("meow "), Image("https://example.invalid/a"))),
            ForwardNode(Sender("2"), (Mention("1", "Tama"), Text(" hi"))),
            ForwardNode(message_id="m-3"),
        )
    )
    assert degrade((forward,), {"text"}) == (
        Text("Tama: meow [image: https://example.invalid/a]\n2: @Tama hi"),
    )
    inside = degrade((forward,), {"text", "forward", "mention"})
    assert inside == (
        Forward(
            (
                ForwardNode(
                    Sender("1", "Tama"), (Text("meow [image: https://example.invalid/a]"),)
                ),
                ForwardNode(Sender("2"), (Mention("1", "Tama"), Text(" hi"))),
                ForwardNode(message_id="m-3"),
            )
        ),
    )
    assert degrade((Forward(id="fw-1"),), {"text"}) == (Text("[forwarded messages]"),)


def test_degrading_drops_what_has_no_text() -> None:
    assert degrade((Quote("m-1"), Text(""), Raw("poke")), {"text"}) == ()
