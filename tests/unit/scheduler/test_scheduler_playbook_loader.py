import textwrap
from pathlib import Path

import pytest

from services.scheduler.domain.errors import PlaybookError
from services.scheduler.domain.loader import load_playbooks, parse_playbook
from shared.templates_catalog import OFFERS, TEMPLATE_NAMES

SHIPPED = Path(__file__).parents[3] / "services" / "scheduler" / "playbooks"

VALID = """\
name: sample
version: 1
priority: 10
match:
  reasons: [price]
  engagement: [high, medium]
  rechurn: false
steps:
  - key: day0
    offset: 0d
    channel: email
    template: we_miss_you
  - key: offer
    offset: 7d
    channel: email
    template: special_offer
    offer: discount_50pct_3mo
    is_discount: true
    variants:
      - {name: a, weight: 1}
      - {name: b, weight: 3, offer: free_month}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_valid_playbook_parses_into_the_model() -> None:
    playbook = parse_playbook(VALID, "sample.yaml", templates=TEMPLATE_NAMES, offers=OFFERS)
    assert (playbook.name, playbook.version, playbook.priority) == ("sample", 1, 10)
    assert [s.key for s in playbook.steps] == ["day0", "offer"]
    assert playbook.step("offer").weights == (("a", 1.0), ("b", 3.0))
    assert playbook.step("offer").resolve("b") == ("special_offer", "free_month")
    assert playbook.attribution_window_days == 90
    assert playbook.exits_on("reactivated")
    assert not playbook.exits_on("activity")


BROKEN = [
    pytest.param(
        VALID.replace("offset: 7d", "offset: 7x"),
        14,
        "steps[1].offset",
        "not a duration",
        id="bad-offset",
    ),
    pytest.param(
        VALID.replace(
            "channel: email\n    template: special", "channel: fax\n    template: special"
        ),
        15,
        "steps[1].channel",
        "'email', 'sms', 'crm' or 'webhook'",
        id="bad-channel",
    ),
    pytest.param(
        VALID.replace("weight: 3", "weight: 0"),
        21,
        "steps[1].variants[1].weight",
        "greater than 0",
        id="zero-weight",
    ),
    pytest.param(
        VALID.replace("weight: 3", "weight: -2"),
        21,
        "steps[1].variants[1].weight",
        "greater than 0",
        id="negative-weight",
    ),
    pytest.param(
        VALID.replace("priority: 10", "priority: 10\nholdout: 1.0"),
        4,
        "holdout",
        "less than 1",
        id="holdout-one",
    ),
    pytest.param(
        VALID.replace("priority: 10", "priority: 10\nholdout: -0.1"),
        4,
        "holdout",
        "greater than or equal to 0",
        id="holdout-negative",
    ),
    pytest.param(
        VALID.replace("key: offer", "key: day0"),
        13,
        "steps[1].key",
        "duplicate step key",
        id="duplicate-step-key",
    ),
    pytest.param(
        VALID.replace("reasons: [price]", "reasons: [price, budget]"),
        18,
        "steps[1].is_discount",
        "only for price churners",
        id="discount-not-price",
    ),
    pytest.param(
        VALID.replace("engagement: [high, medium]", "engagement: [high, low]"),
        18,
        "steps[1].is_discount",
        "low engagement",
        id="discount-low-engagement",
    ),
    pytest.param(
        VALID.replace("  rechurn: false\n", ""),
        17,
        "steps[1].is_discount",
        "discount loop",
        id="discount-rechurners",
    ),
    pytest.param(
        VALID.replace("    offset: 0d\n", ""),
        9,
        "steps[0]",
        "exactly one of offset, calendar, trigger",
        id="no-timing",
    ),
    pytest.param(
        VALID.replace("offset: 0d", "offset: 0d\n    trigger: feature.released"),
        9,
        "steps[0]",
        "exactly one",
        id="two-timings",
    ),
    pytest.param(
        VALID.replace("offset: 7d", "offset: 13mo"),
        14,
        "steps[1].offset",
        "horizon",
        id="offset-beyond-horizon",
    ),
    pytest.param(
        VALID.replace(
            "    channel: email\n    template: we_miss_you\n", "    template: we_miss_you\n"
        ),
        9,
        "steps[0].channel",
        "required",
        id="missing-channel",
    ),
    pytest.param(
        VALID.replace("priority: 10", "priority: 10\npriorty: 3"),
        4,
        "priorty",
        "unknown field",
        id="unknown-field",
    ),
    pytest.param(
        VALID.replace("version: 1", "version: one"),
        2,
        "version",
        "valid integer",
        id="version-not-int",
    ),
    pytest.param(
        VALID.replace("exit_on", "x") + "exit_on: [activity]\n",
        22,
        "exit_on",
        "reactivated, unsubscribed_all",
        id="exit-missing-required",
    ),
    pytest.param(
        VALID.replace("{name: b,", "{name: a,"),
        21,
        "steps[1].variants[1].name",
        "duplicate variant",
        id="duplicate-variant",
    ),
    pytest.param(
        VALID.replace("version: 1", "version: 1\nversion: 2"),
        3,
        "version",
        "duplicate key",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        VALID.replace("match:\n", "match: [\n"), 6, "<playbook>", "not valid YAML", id="yaml-syntax"
    ),
    pytest.param(
        VALID.replace("version: 1", "version: !!python/object:os.system 1"),
        2,
        "<playbook>",
        "not valid YAML",
        id="unsafe-tag",
    ),
    pytest.param(
        VALID.replace("template: we_miss_you", "template: we_miss_u"),
        12,
        "steps[0].template",
        "unknown template",
        id="unknown-template",
    ),
    pytest.param(
        VALID.replace("offer: free_month", "offer: bonus_features"),
        21,
        "steps[1].variants[1].offer",
        "is not a discount",
        id="offer-kind-mismatch",
    ),
    pytest.param(
        VALID.replace("reasons: [price]", "reasons: [price, lottery]"),
        5,
        "match.reasons[1]",
        "'price'",
        id="unknown-reason",
    ),
    pytest.param(
        VALID.replace("windows", "x") + "windows:\n  - {name: late, start: 3d}\n",
        22,
        "windows",
        "start at churn",
        id="bad-windows",
    ),
]


@pytest.mark.parametrize(("text", "line", "field", "reason"), BROKEN)
def test_errors_name_file_line_field_and_reason(
    tmp_path: Path, text: str, line: int, field: str, reason: str
) -> None:
    path = write(tmp_path, "broken.yaml", text)
    with pytest.raises(PlaybookError) as caught:
        load_playbooks(tmp_path, templates=TEMPLATE_NAMES, offers=OFFERS)
    located = [(p.file, p.line, p.field) for p in caught.value.problems]
    assert (str(path), line, field) in located, caught.value
    assert f"{path}:{line}: {field}: " in str(caught.value)
    assert reason in str(caught.value)


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", VALID.replace("offset: 7d", "offset: soon"))
    write(tmp_path, "b.yaml", VALID.replace("channel: email", "channel: fax"))
    with pytest.raises(PlaybookError) as caught:
        load_playbooks(tmp_path)
    files = {Path(p.file or "").name for p in caught.value.problems}
    assert files == {"a.yaml", "b.yaml"}
    assert len(caught.value.problems) == 3


def test_same_name_and_version_in_two_files_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", VALID)
    second = write(tmp_path, "b.yaml", VALID)
    with pytest.raises(PlaybookError, match=r"already defined in .*a\.yaml:1") as caught:
        load_playbooks(tmp_path)
    assert [(p.file, p.line, p.field) for p in caught.value.problems] == [(str(second), 1, "name")]


def test_two_versions_of_one_playbook_load_side_by_side(tmp_path: Path) -> None:
    write(tmp_path, "v1.yaml", VALID)
    write(tmp_path, "v2.yml", VALID.replace("version: 1", "version: 2"))
    loaded = load_playbooks(tmp_path)
    assert [(p.name, p.version) for p in loaded] == [("sample", 1), ("sample", 2)]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no playbook files"),
        (lambda d: write(d, "empty.yaml", ""), "empty"),
        (lambda d: write(d, "list.yaml", "- a\n- b\n"), "mapping"),
    ],
)
def test_directory_without_usable_playbooks_fails(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    setup(tmp_path)
    with pytest.raises(PlaybookError, match=message):
        load_playbooks(tmp_path)


def test_missing_directory_fails_with_its_name(tmp_path: Path) -> None:
    with pytest.raises(PlaybookError, match="not found"):
        load_playbooks(tmp_path / "nowhere")


def test_shipped_default_playbooks_all_load_against_the_catalogue() -> None:
    playbooks = load_playbooks(SHIPPED, templates=TEMPLATE_NAMES, offers=OFFERS)
    names = {p.name for p in playbooks}
    assert {
        "short_email_series",
        "saas_series",
        "window_ladder",
        "price_discount",
        "missing_feature",
        "competitor",
        "budget",
        "poor_experience",
        "situational",
        "low_engagement",
        "lost_lead",
        "passive_user",
    } <= names
    used = {s.template for p in playbooks for s in p.steps}
    used |= {v.template for p in playbooks for s in p.steps for v in s.variants if v.template}
    used |= {s.without_discount for p in playbooks for s in p.steps if s.without_discount}
    # the catalogue may hold templates no shipped playbook uses (a user's playbook can)
    assert used <= TEMPLATE_NAMES, "only catalogued templates are used"
    assert len(used) >= 20
