"""Personal data found and masked in text before it is stored anywhere (脱敏, desensitisation).

`find(text)` returns the spans of phone numbers, e-mail addresses, identity numbers, licence
plates, street addresses and person names; `mask(text)` replaces each with its type (`<PHONE>`,
`<EMAIL>`, `<ID>`, `<PLATE>`, `<ADDRESS>`, `<PERSON>`) and keeps every other character as it was;
`masked(text)` also counts the spans per type, for metering what was masked. Where recognisers
overlap, the longest span wins, then the more specific type (`TYPES` order), so the result does
not depend on which recogniser ran first.

How each type is found, and why:
- PHONE: `phonenumbers` (Google's libphonenumber metadata) matches numbers valid in the US or
  China and grouped as those countries write them (a case number 2024-118734 is a valid US number,
  but not one written 4-6). A number it can only call possible, such as a 7-digit US local number,
  counts only after a phone word, since dates and amounts are possible numbers too.
- EMAIL: one regex over ASCII (the local part stops at a Chinese character, as mail systems do).
- ID: 18-digit Chinese resident IDs whose ISO 7064 MOD 11-2 check digit, province code and birth
  date hold; 15-digit old IDs (no check digit) only after an ID word; US SSNs as 3-2-4 groups
  outside the numbers the SSA never issues, or 9 bare digits after "SSN".
- PLATE: Chinese plates by their format (province character, issuing letter, 5 or 6 characters of
  which at least 3 are digits, as regulations require). A US plate has no format of its own (an
  order number looks alike), so one counts only near a vehicle word.
- ADDRESS: an English house number, street name and suffix (plus an apartment or unit); a Chinese
  road or estate name followed by 号/栋/单元/室 numbers, extended to the left over the place-name
  words that jieba tags (区, 市, the estate's name) but not over verbs or prepositions.
- PERSON: English names are a capitalised first name and surname from the 1990 US census lists
  that the `names` package ships (MIT; unchanged since 2013, as is the census); or capitalised
  words after "my name is", "Mr.", "Dr.", a sign-off, a role ("my landlord", "contact"); or two
  capitalised words listed just before a phone number, e-mail or ID. Chinese names are the words
  jieba tags `nr` (or a surname it tags alone and the given name after it), led by one of the
  commonest surnames, neither a word its dictionary counts as common (明白, 高峰) nor the start of
  a place name (金沙路); or a surname and given name after 姓名, 联系人, 我叫 or listed before a
  phone number or ID; or a surname and a title (王先生).
  The word lists here (street suffixes, surnames, cue words) are short and read with the rules.

presidio-analyzer is not used: importing it imports spaCy and thinc even for its regex
recognisers (about 2 s and 1,300 modules here, from a 390 MB install), too heavy for the gateway.

Each library loads once per process on first use, and only when a text needs it (jieba's
dictionary on the first text with a Chinese character): what that costs, and a text after it, is in
docs/privacy.md (`python -m bench.pii` measures it).
"""

from __future__ import annotations

import bisect
import datetime
import functools
import importlib.resources
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from jieba.posseg import POSTokenizer

PiiType = Literal["EMAIL", "ID", "PHONE", "PLATE", "ADDRESS", "PERSON"]
# Most specific first: it breaks ties between overlapping spans of the same length.
TYPES: tuple[PiiType, ...] = ("EMAIL", "ID", "PHONE", "PLATE", "ADDRESS", "PERSON")
_RANK = {kind: rank for rank, kind in enumerate(TYPES)}


@dataclass(frozen=True, order=True)
class Span:
    """`text[start:end]` is personal data of `type`."""

    start: int
    end: int
    type: PiiType


@dataclass(frozen=True)
class Masked:
    """A text with its personal data masked, and how many spans of each type were masked."""

    text: str
    counts: dict[PiiType, int]


def find(text: str) -> list[Span]:
    """The personal data in `text`, in order, none overlapping."""
    candidates = [*_phones(text), *_emails(text), *_ids(text), *_plates(text)]
    # Where a name is listed before its owner's phone, e-mail or ID, those tell it is a name.
    contacts = sorted(span.start for span in candidates if span.type in _CONTACT_TYPES)
    candidates += [*_en_addresses(text), *_en_persons(text, contacts)]
    if _CJK.search(text):
        tokens = _tokens(text)
        candidates += [*_zh_addresses(text, tokens), *_zh_persons(text, tokens, contacts)]
    return resolve(candidates)


def masked(text: str) -> Masked:
    """`text` with each span of `find` replaced by `<TYPE>`, and the count of spans per type."""
    spans = find(text)
    parts, cursor = [], 0
    for span in spans:
        parts += [text[cursor:span.start], f"<{span.type}>"]
        cursor = span.end
    parts.append(text[cursor:])
    return Masked("".join(parts), dict(Counter(span.type for span in spans)))


def mask(text: str) -> str:
    """`text` with its personal data replaced by `<PHONE>`, `<EMAIL>`, `<ID>`, ... (see `masked`)."""
    return masked(text).text


def mask_all(texts: Iterable[str]) -> tuple[list[str], dict[PiiType, int]]:
    """Each of `texts` masked (`mask`), and the spans masked per type over all of them."""
    out, counts = [], Counter[PiiType]()
    for text in texts:
        done = masked(text)
        out.append(done.text)
        counts.update(done.counts)
    return out, dict(counts)


def resolve(candidates: list[Span]) -> list[Span]:
    """Overlapping spans made disjoint: the longest wins, then the most specific type (`TYPES`
    order), then the leftmost; the result is in text order and does not depend on the input's."""
    kept: list[Span] = []  # in text order, disjoint: a candidate can overlap only its two neighbours
    for span in sorted(set(candidates), key=lambda s: (s.start - s.end, _RANK[s.type], s.start)):
        at = bisect.bisect_left(kept, span)
        if (at == 0 or kept[at - 1].end <= span.start) and (at == len(kept) or span.end <= kept[at].start):
            kept.insert(at, span)
    return kept


def _near(text: str, start: int, end: int, words: re.Pattern[str], before: int, after: int = 0) -> bool:
    """Whether `words` occurs within `before` characters before `start` or `after` after `end`."""
    return bool(words.search(text[max(0, start - before):start]) or words.search(text[end:end + after]))


_CJK = re.compile(r"[\u4e00-\u9fff]")

# --- PHONE ---------------------------------------------------------------------------------------
_REGIONS = ("US", "CN")
# Not "number": case, permit and order numbers are possible phone numbers too.
_PHONE_WORDS = re.compile(r"(?i)\b(?:call|phone|tel|cell|mobile|text|reach|contact|fax)\b|电话|手机|联系|致电")
_ENOUGH_DIGITS = re.compile(r"(?:\d\D{0,3}){7}")  # no phone number has fewer than 7 digits


def _phones(text: str) -> Iterator[Span]:
    if not _ENOUGH_DIGITS.search(text):
        return
    import phonenumbers

    context = bool(_PHONE_WORDS.search(text))
    for region in _REGIONS:
        # Valid and grouped as the country writes its numbers: "2024-118734" is a valid US number
        # to libphonenumber, but no one writes a phone number 4-6.
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING):
            yield Span(match.start, match.end, "PHONE")
        if not context:
            continue
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE):
            if _near(text, match.start, match.end, _PHONE_WORDS, before=30):
                yield Span(match.start, match.end, "PHONE")


# --- EMAIL ---------------------------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"
                    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9-])")


def _emails(text: str) -> Iterator[Span]:
    for match in _EMAIL.finditer(text):
        yield Span(match.start(), match.end(), "EMAIL")


# --- ID ------------------------------------------------------------------------------------------
# The province-level codes of GB/T 2260 that open a resident ID.
_PROVINCES = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45,
                        46, 50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83})
_WEIGHTS = [pow(2, 17 - i, 11) for i in range(17)]  # ISO 7064 MOD 11-2
# People write an 18-digit ID whole or grouped 6-8-4 (region, birth date, sequence and check).
_CN_ID = re.compile(r"(?<![0-9A-Za-z])(\d{6})([ -]?)(\d{8})\2(\d{3}[\dXx])(?![0-9A-Za-z])")
_CN_OLD_ID = re.compile(r"(?<![0-9A-Za-z])\d{15}(?![0-9A-Za-z])")
_ID_WORDS = re.compile(r"(?i)身份证|证件|\bID\b|identity")
_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
_SSN_BARE = re.compile(r"(?<![\d-])(\d{3})(\d{2})(\d{4})(?![\d-])")
_SSN_WORDS = re.compile(r"(?i)\bSSN\b|social security")


def cn_id_valid(number: str) -> bool:
    """Whether an 18-character Chinese resident ID number can be real: its MOD 11-2 check digit,
    its province code and its birth date (1900 to today) all hold."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(digit) * weight for digit, weight in zip(number[:17], _WEIGHTS, strict=True))
    if "10X98765432"[total % 11] != number[17].upper():
        return False
    return int(number[:2]) in _PROVINCES and _birth_date_plausible(number[6:14])


def _birth_date_plausible(yyyymmdd: str) -> bool:
    try:
        born = datetime.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:]))
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= born <= datetime.date.today()


def _ssn_valid(area: str, group: str, serial: str) -> bool:
    """The SSA never issues area 000, 666 or 900-999, group 00 or serial 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ids(text: str) -> Iterator[Span]:
    for match in _CN_ID.finditer(text):
        if cn_id_valid(match[1] + match[3] + match[4]):
            yield Span(match.start(), match.end(), "ID")
    for match in _CN_OLD_ID.finditer(text):
        number = match[0]
        if (int(number[:2]) in _PROVINCES and _birth_date_plausible("19" + number[6:12])
                and _near(text, match.start(), match.end(), _ID_WORDS, before=12)):
            yield Span(match.start(), match.end(), "ID")
    for match in _SSN.finditer(text):
        if _ssn_valid(match[1], match[3], match[4]):
            yield Span(match.start(), match.end(), "ID")
    for match in _SSN_BARE.finditer(text):
        if _ssn_valid(match[1], match[2], match[3]) and _near(text, match.start(), match.end(), _SSN_WORDS, 30):
            yield Span(match.start(), match.end(), "ID")


# --- PLATE ---------------------------------------------------------------------------------------
# Province abbreviation, issuing-office letter (no I or O), a separator people type or not, then
# 5 characters (6 on a new-energy plate) or 4 and a use character (学 driving school, 警 police...).
_CN_PLATE = re.compile(r"[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼]"
                       r"[A-HJ-NP-Z][·•・ -]?((?:[A-HJ-NP-Z0-9]{5,6}|[A-HJ-NP-Z0-9]{4}[挂学警港澳]))"
                       r"(?![A-Za-z0-9])", re.IGNORECASE)
# US plates: 5 to 8 capitals and digits, whole or in two groups, at least one letter and two digits.
_US_PLATE = re.compile(r"(?<![\w#-])[A-Z0-9]{1,8}(?:[- ][A-Z0-9]{1,5})?(?![\w-])")
_VEHICLE_WORDS = re.compile(r"(?i)\b(?:plates?|licen[cs]e|tags?|registration|cars?|trucks?|vans?|suvs?|"
                            r"sedans?|vehicles?|bus|taxis?|cabs?|drivers?|drove|driving|parked|parking|"
                            r"motorcycles?|pickups?|jeeps?|minivans?|uber|lyft|rideshare|limo)\b|车牌|车辆|牌照|车")


def _plates(text: str) -> Iterator[Span]:
    for match in _CN_PLATE.finditer(text):
        if sum(ch.isdigit() for ch in match[1]) >= 3:
            yield Span(match.start(), match.end(), "PLATE")
    for match in _US_PLATE.finditer(text):
        chars = match[0].replace("-", "").replace(" ", "")
        if (5 <= len(chars) <= 8 and sum(ch.isdigit() for ch in chars) >= 2 and any(ch.isalpha() for ch in chars)
                and _near(text, match.start(), match.end(), _VEHICLE_WORDS, before=40, after=30)):
            yield Span(match.start(), match.end(), "PLATE")


# --- ADDRESS -------------------------------------------------------------------------------------
_EN_SUFFIXES = ("Street|St|Avenue|Ave|Av|Boulevard|Blvd|Road|Rd|Drive|Dr|Lane|Ln|Court|Ct|Place|Pl|Parkway|Pkwy|"
                "Terrace|Ter|Way|Highway|Hwy|Square|Sq|Circle|Cir|Plaza|Plz|Loop|Trail|Trl|Row|Expressway|Expy|"
                "Turnpike|Tpke|Crescent|Alley|Walk|Pike|Concourse")
_EN_ADDRESS = re.compile(
    r"(?<![\w$#.,/-])\d{1,6}(?:-\d{1,5})?[A-Za-z]?\s+"                    # house number: 601, 41-20, 12B
    r"(?:(?:(?:[NSEW]|NE|NW|SE|SW|North|South|East|West)\.?\s+)?"         # direction
    r"(?:(?:[A-Z][A-Za-z'’.-]*|\d+(?:st|nd|rd|th))\s+){1,4}?"            # street name: words or an ordinal
    rf"(?:(?:{_EN_SUFFIXES})\b|Park\s+(?:[NSEW]|North|South|East|West)\b)"  # suffix: St, Prospect Park W
    r"|Broadway\b|Avenue\s+[A-Z]\b)"                                    # streets with no suffix
    r"(?:\s+(?:[NSEW]|NE|NW|SE|SW)\b(?![.'’]?\w))?"                       # Park Ave S
    r"(?:,?\s+(?i:apt|apartment|unit|suite|ste|fl|floor|rm|room)\.?\s*#?\s*[A-Za-z0-9-]*\d[A-Za-z0-9-]*"
    r"|,?\s*#\s*[A-Za-z0-9-]+)?")                                       # unit: Apt 3, apt. 4B, #5
_ZH_NUMBER = r"[0-9０-９]+(?:-[0-9０-９]+)*"
# A road (and its section, 北三段) or an estate, then its house, lane (弄) or building number, then
# building, unit, floor and room.
_ZH_ADDRESS = re.compile(
    r"(?:路|街|大街|大道|道|巷|弄|胡同|里|小区|花园|公寓|大厦|家园|苑|新村|村|园|广场|大楼|中心|社区|城|府|湾)"
    r"(?:[东西南北中]?[一二三四五六七八九十]*段)?"
    rf"{_ZH_NUMBER}(?:号楼|号院|号|弄|巷|栋|幢|座|期)"
    rf"(?:{_ZH_NUMBER}(?:号楼|号院|号|栋|幢|座|单元|门|层|楼|室|户))*"
    r"(?:(?<=[栋幢座楼元门])[0-9０-９]{3,4}(?![0-9０-９]))?")
# jieba's tags for the words of a place name: nouns, place, other proper and organisation names,
# person names (streets are named after people), locatives, abbreviations, and adjectives (幸福小区).
_PLACE_TAGS = frozenset({"n", "ns", "nz", "nt", "nr", "nrt", "nrfg", "s", "j", "a", "ng"})
_NOT_PLACE = frozenset({"地址", "住址", "地点", "位置", "家", "我家", "小区"})
_ZH_ADDRESS_MAX = 30
_CJK_NUMERALS = frozenset("一二三四五六七八九十百千")
_GENERIC_PLACES = frozenset({"路", "街", "大街", "大道", "道", "巷", "弄", "东路", "西路", "南路", "北路", "中路",
                             "小区", "花园", "公寓", "大厦", "家园", "新村", "村", "园", "广场", "大楼", "中心", "社区",
                             "城"})
# Pronouns, prepositions, conjunctions, adverbs, particles, punctuation: never part of a place name.
_FUNCTION_TAGS = frozenset({"r", "p", "c", "d", "u", "uj", "ul", "ud", "ug", "uz", "uv", "x", "y", "e", "o"})


def _en_addresses(text: str) -> Iterator[Span]:
    for match in _EN_ADDRESS.finditer(text):
        yield Span(match.start(), match.end(), "ADDRESS")


def _zh_addresses(text: str, tokens: list[tuple[str, str, int]]) -> Iterator[Span]:
    for match in _ZH_ADDRESS.finditer(text):
        # The token holding the road or estate word, then the place words before it.
        index = max(i for i, (_, _, start) in enumerate(tokens) if start <= match.start())
        while index > 0:
            word, tag, start = tokens[index - 1]
            numeral = tag == "m" and all(ch in _CJK_NUMERALS for ch in word)  # 一环路, 三里屯
            # A bare 西路 or 小区 needs its name, whatever jieba tags it (体育/vn 西路/ns).
            named = tokens[index][0] not in _GENERIC_PLACES or not _CJK.match(word) or tag in _FUNCTION_TAGS
            if ((tag not in _PLACE_TAGS and not numeral and named) or word in _NOT_PLACE
                    or match.end() - start > _ZH_ADDRESS_MAX):
                break
            index -= 1
        yield Span(min(tokens[index][2], match.start()), match.end(), "ADDRESS")


# --- PERSON --------------------------------------------------------------------------------------
_WORD = r"[A-Z][A-Za-z'’-]*[a-z]"
_WORD_IN_RUN = re.compile(_WORD)
_CAPITALISED_RUN = re.compile(rf"{_WORD}(?:\s+(?:[A-Z]\.\s+)?{_WORD})+")
_NAME_WORDS = rf"({_WORD}(?:\s+{_WORD}){{0,2}})"
# After a self-introduction, a title or a sign-off, capitalised words are a name whatever the
# census lists say.
_NAME_CUES = re.compile(r"(?:\b(?:[Mm]y name is|[Nn]ame:|[Ss]igned|[Rr]egards,|[Tt]hanks,|[Ss]incerely,|"
                        r"Mrs?\.?|Ms\.?|Miss|Dr\.?|Officer|Detective|Sgt\.?)|(?:^|\n)\s*[-—–]+)\s+" + _NAME_WORDS)
# After these, two capitalised words or a census first name ("I'm Sorry" is not a name).
_WEAK_NAME_CUES = re.compile(r"\b(?:I'm|I’m|I am|[Tt]his is|(?i:neighbou?r|landlord|landlady|tenant|super|"
                             r"superintendent|manager|owner|applicant|resident|contact|holder|caseworker|"
                             r"son|daughter|wife|husband|mother|father|mom|dad))\s+" + _NAME_WORDS)
# A name listed before its owner's phone, e-mail or ID: "Kwame Mensah, SSN 577-..."; "方志远，身份证号...".
_LISTED_BEFORE = re.compile(r"[ \t]*[,，]")
_CONTACT_TYPES = frozenset({"PHONE", "EMAIL", "ID"})
_CONTACT_WITHIN = 12  # characters between the comma and the contact: "SSN ", "身份证号码 "
# Capitalised words that end a name: a place or an institution is named after a person.
_NOT_NAME = frozenset(_EN_SUFFIXES.upper().split("|")) | frozenset({
    "PARK", "CENTER", "CENTRE", "SCHOOL", "HOSPITAL", "CHURCH", "LIBRARY", "STATION", "BRIDGE", "HALL",
    "BUILDING", "HOUSE", "TOWER", "COUNTY", "CITY", "DEPARTMENT", "COLLEGE", "UNIVERSITY", "GARDEN", "GARDENS",
    "MARKET", "MALL", "HOTEL", "AIRPORT", "TUNNEL", "BEACH", "HEIGHTS", "VILLAGE", "AND", "THE"})
# The commonest Chinese surnames (about 300, most of the population), and the compound ones.
_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢"
    "姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤常温康"
    "施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成苗"
    "谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜"
    "冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝")
_COMPOUND_SURNAMES = ("欧阳", "司马", "诸葛", "上官", "东方", "慕容", "令狐", "皇甫", "尉迟", "公孙", "司徒", "夏侯",
                      "长孙", "宇文", "轩辕", "端木", "独孤", "南宫", "西门")
_ZH_SURNAME = "(?:{}|[{}])".format("|".join(_COMPOUND_SURNAMES), "".join(sorted(_SURNAMES)))
# jieba often tags a surname alone (nr) and the given name as another word: 冯/nr 建华/nz.
_GIVEN_NAME_TAGS = frozenset({"n", "nr", "nrt", "nrfg", "nz", "ns", "ng", "a", "an", "j"})
_PLACE_ENDINGS = frozenset("路街道巷弄村镇区县市省苑园桥站场")
# jieba's dictionary counts (of 60 million words): the names in it are counted a few hundred times
# at most; the words it also tags nr that are common words are counted more.
_COMMON_WORD_COUNT = 500
_ZH_NAME_CUES = "我叫|我是|名叫|叫做|姓名|名字|联系人|申请人|反映人|举报人|投诉人|当事人|户主|业主|经理|主任|房东|邻居"
_ZH_DELIMITED_NAME = re.compile(rf"(?:^|[\s，,。；;：:、（(]|(?P<cue>{_ZH_NAME_CUES})[：:是为]?)"
                                rf"(?P<name>{_ZH_SURNAME}[\u4e00-\u9fff]{{1,2}})(?=[\s，,。；;：:、）)]|$)")
_ZH_TITLED_NAME = re.compile(rf"{_ZH_SURNAME}(?:先生|女士|小姐|老师|师傅|阿姨|大爷|大妈)")


@functools.cache
def _census_names() -> tuple[frozenset[str], frozenset[str]]:
    """The first names and the surnames (upper case) of the 1990 US census, as `names` ships them."""
    package = importlib.resources.files("names")

    def read(*files: str) -> frozenset[str]:
        return frozenset(line.split(maxsplit=1)[0] for file in files
                         for line in (package / file).read_text().splitlines() if line.strip())

    return read("dist.male.first", "dist.female.first"), read("dist.all.last")


def _key(word: str) -> str:
    """How the census lists spell `word`: upper case, no apostrophe (O'Neill is ONEILL)."""
    return word.upper().replace("'", "").replace("’", "")


def _en_persons(text: str, contacts: list[int]) -> Iterator[Span]:
    for match in _NAME_CUES.finditer(text):
        yield from _name_words(match, weak=False)
    for match in _WEAK_NAME_CUES.finditer(text):
        yield from _name_words(match, weak=True)
    for run in _CAPITALISED_RUN.finditer(text):
        first_names, surnames = _census_names()
        words = list(_WORD_IN_RUN.finditer(run[0]))
        if _listed_before(text, run.end(), contacts) and not {_key(w[0]) for w in words[-2:]} & _NOT_NAME:
            yield Span(run.start() + words[-2].start(), run.end(), "PERSON")
        for i in range(len(words) - 1):
            first, last = _key(words[i][0]), _key(words[i + 1][0])
            if first in first_names and last in surnames and not {first, last} & _NOT_NAME:
                end = i + 1
                after = _key(words[end + 1][0]) if end + 1 < len(words) else ""
                if after in surnames and after not in _NOT_NAME:
                    end += 1  # a double surname, or a middle name before the surname
                    after = _key(words[end + 1][0]) if end + 1 < len(words) else ""
                if after not in _NOT_NAME:  # Cherry Hill Rd is a street
                    yield Span(run.start() + words[i].start(), run.start() + words[end].end(), "PERSON")
                break


def _listed_before(text: str, end: int, contacts: list[int]) -> bool:
    """Whether a comma follows `end` and then, soon after it, a phone number, e-mail or ID."""
    comma = _LISTED_BEFORE.match(text, end)
    if comma is None:
        return False
    after = bisect.bisect_left(contacts, comma.end())
    return after < len(contacts) and contacts[after] - comma.end() <= _CONTACT_WITHIN


def _name_words(match: re.Match[str], *, weak: bool) -> Iterator[Span]:
    """The capitalised words of the cue's name group up to the first that cannot be part of a name;
    after a weak cue, only two or more of them or a census first name."""
    words = []
    for word in _WORD_IN_RUN.finditer(match[1]):
        if _key(word[0]) in _NOT_NAME:
            break
        words.append(word)
    if not words or (weak and len(words) < 2 and _key(words[0][0]) not in _census_names()[0]):
        return
    offset = match.start(1)
    yield Span(offset + words[0].start(), offset + words[-1].end(), "PERSON")


def _zh_persons(text: str, tokens: list[tuple[str, str, int]], contacts: list[int]) -> Iterator[Span]:
    starts = {start for _, _, start in tokens}
    for i, (word, tag, start) in enumerate(tokens):
        if _place_follows(tokens, i + 1):
            continue
        if tag.startswith("nr") and 2 <= len(word) <= 4 and _zh_name_like(word) and not _common_word(word):
            yield Span(start, start + len(word), "PERSON")
        elif ((tag.startswith("nr") and word in _SURNAMES) or word in _COMPOUND_SURNAMES) and i + 1 < len(tokens):
            given, given_tag, _ = tokens[i + 1]
            if (given_tag in _GIVEN_NAME_TAGS and len(given) <= 2 and _zh_name_like(word + given)
                    and not _place_follows(tokens, i + 2)):
                yield Span(start, start + len(word) + len(given), "PERSON")
    for match in _ZH_DELIMITED_NAME.finditer(text):
        if _zh_name_like(match["name"]) and (match["cue"] or _listed_before(text, match.end(), contacts)):
            yield Span(match.start("name"), match.end("name"), "PERSON")
    for match in _ZH_TITLED_NAME.finditer(text):
        if match.start() in starts:  # 园林师傅 is a gardener, not Mr Lin
            yield Span(match.start(), match.end(), "PERSON")


def _zh_name_like(word: str) -> bool:
    """Chinese characters led by a surname, not doubled (谢谢, 汤汤水水), not ending as a place does."""
    return (all(_CJK.match(ch) for ch in word) and (word[0] in _SURNAMES or word[:2] in _COMPOUND_SURNAMES)
            and word[0] != word[1] and word[-1] not in _PLACE_ENDINGS)


def _place_follows(tokens: list[tuple[str, str, int]], index: int) -> bool:
    """Whether the token at `index` makes the words before it a place name (金沙/nr 路, 文昌/nr 桥)."""
    return index < len(tokens) and (tokens[index][0] in _GENERIC_PLACES or tokens[index][0][-1] in _PLACE_ENDINGS)


def _common_word(word: str) -> bool:
    """Whether jieba's dictionary counts `word` so often that it is a common word that can also be a
    name (明白, 高峰, 谢谢), rather than a name."""
    return _tagger().tokenizer.FREQ.get(word, 0) > _COMMON_WORD_COUNT


@functools.cache
def _tagger() -> POSTokenizer:
    """jieba's part-of-speech tagger, its dictionary loaded (once per process: see the module docstring)."""
    import jieba
    import jieba.posseg

    jieba.setLogLevel(logging.WARNING)  # it logs the dictionary load at DEBUG to stderr otherwise
    jieba.posseg.dt.tokenizer.initialize()
    return jieba.posseg.dt


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """jieba's words of `text` as (word, tag, start); they cover the text end to end."""
    tokens, start = [], 0
    for pair in _tagger().cut(text):
        tokens.append((pair.word, pair.flag, start))
        start += len(pair.word)
    return tokens
