"""Personal data masking (`core.pii`): what a user would see in a stored text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.pii import SETS, STRUCTURED, TARGET_RECALL, load_eval, score
from core import pii

ROOT = Path(__file__).resolve().parents[2]

# Valid by ISO 7064 MOD 11-2, with a real province code and birth date (computed by hand, not by pii).
VALID_IDS = ("11010519491231002X", "440306199003071232", "310115198506123454", "110101200002291010")


def found(text: str) -> list[tuple[str, str]]:
    return [(span.type, text[span.start:span.end]) for span in pii.find(text)]


@pytest.mark.parametrize("number", VALID_IDS)
def test_valid_resident_id_is_masked_and_a_wrong_check_digit_is_not(number: str) -> None:
    wrong = number[:17] + ("0" if number[17] != "0" else "1")
    assert pii.mask(f"身份证号{number}，谢谢") == "身份证号<ID>，谢谢"
    assert pii.mask(f"身份证号{wrong}，谢谢") == f"身份证号{wrong}，谢谢"
    assert pii.cn_id_valid(number) and not pii.cn_id_valid(wrong)


def test_resident_id_check_digit_x_in_either_case_and_grouped() -> None:
    assert found("证件 11010519491231002x") == [("ID", "11010519491231002x")]
    assert found("ID: 110105 19491231 002X") == [("ID", "110105 19491231 002X")]


@pytest.mark.parametrize("number", [
    "320501199802291233",  # right check digit, but 29 February 1998 never was
    "99030619900307123X",  # right check digit, but no province 99
])
def test_resident_id_with_impossible_birth_date_or_province_is_not_masked(number: str) -> None:
    assert pii.find(f"身份证{number}") == []


@pytest.mark.parametrize(("text", "expected"), [
    # English
    ("Please call me at 646-555-0132 after 5 pm.", [("PHONE", "646-555-0132")]),
    ("My cell is +1 (917) 555 0199.", [("PHONE", "+1 (917) 555 0199")]),
    ("Reach me on 718.555.0144 or text 555-0178.", [("PHONE", "718.555.0144"), ("PHONE", "555-0178")]),
    ("Send the form to maria.gonzalez@example.org please.", [("EMAIL", "maria.gonzalez@example.org")]),
    ("My SSN is 219-09-9999 and hers is 078-05-1120.", [("ID", "219-09-9999"), ("ID", "078-05-1120")]),
    ("SSN: 219099999", [("ID", "219099999")]),
    ("A grey sedan with plate KDR-4471 blocks the hydrant.", [("PLATE", "KDR-4471")]),
    ("The white van 8XYZ123 has been parked here for a week.", [("PLATE", "8XYZ123")]),
    ("Rats everywhere behind 455 Grand Concourse near the school.", [("ADDRESS", "455 Grand Concourse")]),
    ("Water leak at 88 N Maple Ave Apt 5C since Monday.", [("ADDRESS", "88 N Maple Ave Apt 5C")]),
    ("No heat at 601 W 131st St.", [("ADDRESS", "601 W 131st St")]),
    ("This is Jennifer Walsh from the tenants association.", [("PERSON", "Jennifer Walsh")]),
    ("Dr. Okafor said the clinic is closed.", [("PERSON", "Okafor")]),
    ("The trash was not picked up.\nThanks,\nRobert Chen", [("PERSON", "Robert Chen")]),
    ("Our landlord Samuel Adeyemi refuses to fix the heat.", [("PERSON", "Samuel Adeyemi")]),
    ("Noise complaint: Brian Murphy keeps playing drums at night.", [("PERSON", "Brian Murphy")]),
    # Chinese
    ("我的手机号是139 1234 5678，有事联系。", [("PHONE", "139 1234 5678")]),
    ("请拨打0571-8765 4321咨询。", [("PHONE", "0571-8765 4321")]),
    ("邮箱是liu.yang88@163.com", [("EMAIL", "liu.yang88@163.com")]),
    ("身份证号码：11010519491231002X", [("ID", "11010519491231002X")]),
    ("车牌号沪B·12345的车堵在门口", [("PLATE", "沪B·12345")]),
    ("新能源车浙A D56789乱停", [("PLATE", "浙A D56789")]),
    ("地址：广州市天河区体育西路103号", [("ADDRESS", "广州市天河区体育西路103号")]),
    ("我住在阳光小区3栋1单元502，楼上漏水。", [("ADDRESS", "阳光小区3栋1单元502")]),
    ("我叫王小明，电话13912345678", [("PERSON", "王小明"), ("PHONE", "13912345678")]),
    ("联系人：陈丽华", [("PERSON", "陈丽华")]),
    ("李先生反映楼道灯坏了", [("PERSON", "李先生")]),
])
def test_each_type_by_hand(text: str, expected: list[tuple[str, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize("text", [
    "The bill was $1,234.56 on 2024-03-15.",
    "订单号202403150001234567已发货",  # 18 digits, no province 20
    "Order ABC-1234 shipped on 03/15/2024.",  # a plate's shape, but nothing says vehicle
    "快递单号 7312 4456 8890 123 还没到",
    "价格¥12800，面积89.5平方米",
    "会议在3月15日下午2点，编号2024-0315-07。",
    "Tracking number 1Z999AA10123456784 shows delivered.",
    "The number 12345678901234567 is seventeen digits.",
    "My SSN is 000-12-3456.",  # area 000 is never issued
    "Call 311 about the 2 potholes on Main Street.",
    "Invoice 2024-118734 total 4,500.00 due 12/01.",
    "Park Slope residents want more bike lanes on 7th Ave.",
    "Leaf bags have been sitting on Cherry Hill Rd since October.",  # a street named like a person
    "房间温度只有15度，已经3天了。",
    "高峰期地铁太挤了，谢谢关注。",  # common words jieba also tags as names
    "园林师傅辛苦了，金沙路的花开了。",
])
def test_near_misses_are_left_alone(text: str) -> None:
    assert pii.find(text) == []
    assert pii.mask(text) == text


def test_mask_keeps_the_type_and_every_other_character() -> None:
    text = ("Hi,\tmy name is Anthony Russo — call (212) 555-0147 or mail a.russo@example.com  ✓\n"
            "京A12345 停在 12 Oak Ave Apt 3")
    result = pii.masked(text)
    assert result.text == "Hi,\tmy name is <PERSON> — call <PHONE> or mail <EMAIL>  ✓\n<PLATE> 停在 <ADDRESS>"
    assert result.counts == {"PERSON": 1, "PHONE": 1, "EMAIL": 1, "PLATE": 1, "ADDRESS": 1}
    assert pii.mask(text) == result.text


def test_a_phone_number_inside_an_email_address_is_the_email() -> None:
    assert found("邮箱13912345678@139.com") == [("EMAIL", "13912345678@139.com")]


@pytest.mark.parametrize(("candidates", "kept"), [
    # The longest wins, whatever its type.
    ([pii.Span(2, 13, "PHONE"), pii.Span(2, 21, "EMAIL")], [pii.Span(2, 21, "EMAIL")]),
    ([pii.Span(4, 6, "PERSON"), pii.Span(0, 12, "ADDRESS")], [pii.Span(0, 12, "ADDRESS")]),
    # Of two as long, the more specific type.
    ([pii.Span(0, 11, "PHONE"), pii.Span(0, 11, "ID")], [pii.Span(0, 11, "ID")]),
    # Of two as long and of one type, the leftmost; a span clear of the kept ones stays.
    ([pii.Span(3, 8, "PLATE"), pii.Span(0, 5, "PLATE"), pii.Span(8, 9, "PERSON")],
     [pii.Span(0, 5, "PLATE"), pii.Span(8, 9, "PERSON")]),
])
def test_overlapping_spans_resolve_deterministically(candidates: list[pii.Span], kept: list[pii.Span]) -> None:
    assert pii.resolve(candidates) == kept
    assert pii.resolve(candidates[::-1]) == kept


def test_empty_and_plain_text() -> None:
    assert pii.find("") == []
    assert pii.mask("") == ""
    assert pii.masked("") == pii.Masked("", {})
    assert pii.masked("Streetlights on the whole block are out.").counts == {}


def test_importing_the_module_loads_no_heavy_library() -> None:
    code = "import sys, core.pii; print(sorted({'jieba', 'phonenumbers', 'names'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", SETS)
def test_structured_recall_meets_the_target_on_both_sets(name: str) -> None:
    figures = score(load_eval(SETS[name]))
    recalls = {kind: figures["by_type"][kind]["recall"] for kind in STRUCTURED}
    assert all(recall >= TARGET_RECALL for recall in recalls.values()), recalls
    assert figures["passed"]


def test_served_figures_say_when_no_model_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.pii import served
    from core.settings import get_settings

    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(tmp_path / "registry"))
    get_settings.cache_clear()
    try:
        figures = served("events")
    finally:
        get_settings.cache_clear()
    assert figures["measured"] is False and "events" in figures["why"]
