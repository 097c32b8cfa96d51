"""The language check in front of the text models (`domains.language`): what it refuses and how the
gateway says so, measured on the hand-written sets in English, Chinese and twelve other languages."""

from __future__ import annotations

import importlib.resources
import json

import pytest
from pydantic import ValidationError

from domains import get_domain, language
from services.errors import Unprocessable
from services.gateway import parse_items


def other_languages() -> list[dict[str, str]]:
    text = importlib.resources.files("domains").joinpath("other_languages.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(("text", "expected"), [
    ("小区门口的路灯坏了三天了", "zh"),
    ("停电", "zh"),  # two characters: the script decides, not the identifier
    ("ゴミが一週間回収されていません", "ja"),  # kanji with kana is Japanese
    ("온수가 안 나와요", "ko"),
    ("нет горячей воды уже неделю", "ru"),
    ("Hay un bache enorme en la calle 14, ya se rompió una llanta", "es"),
    ("les poubelles n'ont pas été ramassées cette semaine", "fr"),
    ("Water main break on Fulton St, water gushing into the street", "en"),
    ("Noise from the 金龙 restaurant on Main St every night", "en"),  # a foreign name in an English report
])
def test_the_language_of_a_text(text: str, expected: str) -> None:
    assert language.language_of(text) == expected


@pytest.mark.parametrize("text", ["no power", "ok", "???", "12345", "🙂🙂", "gas smell"])
def test_too_little_latin_text_is_not_judged(text: str) -> None:
    assert language.language_of(text) is None and language.unsupported(text) is None


@pytest.mark.parametrize(("name", "hand"), [("events", "handwritten"), ("sentiment", "city_comments")])
def test_every_english_hand_written_text_passes_and_every_chinese_one_is_refused(name: str, hand: str) -> None:
    domain = get_domain(name)
    english = domain.written_by_hand(hand)["text"]  # type: ignore[attr-defined]
    chinese = domain.written_by_hand(f"{hand}_zh")["text"]  # type: ignore[attr-defined]
    assert [t for t in english if language.unsupported(t)] == []
    assert {language.unsupported(t) for t in chinese} == {"zh"}


def test_reports_in_twelve_other_languages_are_refused() -> None:
    rows = other_languages()
    assert len({r["lang"] for r in rows}) == 12
    passed = [r["text"] for r in rows if language.unsupported(r["text"]) is None]
    assert len(passed) <= len(rows) // 20, passed  # at least 95% refused (119 of 120 when written)


@pytest.mark.parametrize("name", ["events", "sentiment"])
def test_the_request_model_refuses_an_unread_language_with_its_own_error_type(name: str) -> None:
    model = get_domain(name).request_model
    with pytest.raises(ValidationError) as err:
        model.model_validate({"text": "小区门口的路灯坏了三天了"})
    first = err.value.errors()[0]
    assert first["type"] == language.CODE and "zh" in first["msg"] and "en" in first["msg"]


def test_the_gateway_names_the_code_and_the_item() -> None:
    body = json.dumps([{"text": "pothole on 5th ave"}, {"text": "mất điện cả khu phố từ tối qua"}]).encode()
    with pytest.raises(Unprocessable) as err:
        parse_items(get_domain("events").request_model, body, 64)
    assert err.value.as_json() == {"code": "unsupported_language", "field": "[1].text",
                                   "message": "the text reads as language vi; the model reads en only"}
