"""The renderer: every shipped template renders in every locale, and never with a blank hole."""

from __future__ import annotations

import json
import shutil
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markupsafe import escape

from services.dispatcher.errors import PermanentSendError, TemplateError
from services.dispatcher.rendering import (
    OPTIONAL_PROFILE_FIELDS,
    SAMPLE_CONTEXT,
    SHIPPED_LOCALES,
    TEMPLATE_SPECS,
    TEMPLATES_DIR,
    Brand,
    Channel,
    TemplateRenderer,
    TemplateSpec,
)
from shared.channels import names as channel_names

BRAND = Brand(company_name="Acme Oy", postal_address="Mannerheimintie 1, 00100 Helsinki")
RENDERER = TemplateRenderer(BRAND)

FULL: dict[str, Any] = {
    "name": "Aino",
    "product": "Ledgerly",
    "offer": "50 % off the next 3 months",
    "valid_until": date(2026, 3, 1),
    "new_features": ["Bank sync for Nordic banks", "Shared approval flows"],
    "cta_url": "https://app.example.com/welcome-back?c=42",
    "unsubscribe_url": "https://winback.example.com/u/1.abc.def",
    "churn_reason": "too_expensive",
    "segment": "high_value",
    "mrr": Decimal("249.00"),
    "currency": "EUR",
    "lifecycle": "churned_customer",
    "customer_id": "cus_42",
    "email": "aino@example.com",
    "phone": "+358401234567",
    "tenure": "long term",
    "sent_so_far": ["email: we_miss_you (2026-02-01)"],
    "status_url": "https://winback.example.com/v1/customers/cus_42/winback",
    "competitor": "Rival Books",
}

CASES = sorted((name, chan.value) for name, chan in TEMPLATE_SPECS)
EMAIL_NAMES = sorted(name for name, chan in TEMPLATE_SPECS if chan is Channel.EMAIL)

DEFAULT_PLAYBOOK_TEMPLATES = [
    "we_miss_you",
    "what_you_missed",
    "special_offer",
    "last_chance",
    "whats_new",
    "feature_built",
    "comparison",
    "budget_checkin",
    "what_we_changed",
    "check_in",
    "value_content",
    "customer_story",
    "final_decision",
    "quarterly_checkin",
    "trial_expired",
    "lead_followup",
    "inactive_nudge",
    "exit_survey",
    "trial_extension",
    "demo_follow_up",
    "usage_nudge",
    "crm_personal_outreach",
]

FORMATTED_DATE = {
    "en": "March 1, 2026",
    "fi": "1. maaliskuuta 2026",
    "da": "1. marts 2026",
    "ms": "1 Mac 2026",
}
ART_21 = {
    "en": "GDPR Art. 21",
    "fi": "GDPR 21 artikla",
    "da": "GDPR art. 21",
    "ms": "GDPR Perkara 21",
}


def context_for(name: str, channel: str, *, optional: bool = True) -> dict[str, Any]:
    spec = TEMPLATE_SPECS[(name, Channel(channel))]
    fields = spec.required | spec.optional if optional else spec.required
    return {f: FULL[f] for f in fields}


NAMELESS_GREETING = {"en": "Hi there,", "fi": "Hei,", "da": "Hej,", "ms": "Hai,"}
OPTIONAL_CASES = sorted(
    (name, chan.value, f) for (name, chan), spec in TEMPLATE_SPECS.items() for f in spec.optional
)
REQUIRED_CASES = sorted(
    (name, chan.value, f) for (name, chan), spec in TEMPLATE_SPECS.items() for f in spec.required
)


FIRST_WORD = {"en": "Hi", "fi": "Hei", "da": "Hej", "ms": "Hai"}


def layout(text: str) -> list[bool]:
    """Which lines of a text are blank: its paragraph structure."""
    return [bool(line.strip()) for line in text.split("\n")]


def assert_no_holes(text: str) -> None:
    markers = ("None", "{{", "}}", "{%", "%}", "Undefined", " ,", " .", " ?", " :", "()", ": \n")
    for marker in (*markers, "  ", ", ,", ",,", "\n,", "<p>,", "<p> "):
        assert marker not in text, f"{marker!r} in rendered output"


def test_every_default_playbook_template_has_a_spec_and_passes_the_startup_check() -> None:
    RENDERER.check_templates(DEFAULT_PLAYBOOK_TEMPLATES)
    assert set(RENDERER.locales) == set(SHIPPED_LOCALES)
    for name in ("we_miss_you", "special_offer", "last_chance"):
        assert (name, Channel.SMS) in TEMPLATE_SPECS


@pytest.mark.parametrize("locale", SHIPPED_LOCALES)
@pytest.mark.parametrize(("name", "channel"), CASES)
def test_every_template_renders_in_every_locale_with_a_full_context(
    name: str, channel: str, locale: str
) -> None:
    message = RENDERER.render(name, channel, locale, context_for(name, channel))

    assert message.locale == locale
    assert message.template == name
    assert message.channel == Channel(channel)
    used = context_for(name, channel)
    for part in (message.subject or "", message.text, message.html or ""):
        assert_no_holes(part)
    assert FULL["name"] in message.text
    assert FULL["product"] in message.text
    if "new_features" in used:
        for feature in FULL["new_features"]:
            assert feature in message.text
            assert message.html is None or feature in message.html
    if "offer" in used:
        assert FULL["offer"] in message.text
    if channel in ("email", "webhook"):
        assert message.subject
        assert message.html
        assert f'<html lang="{locale}">' in message.html
        if "valid_until" in used:
            assert FORMATTED_DATE[locale] in message.text
        for part in (message.text, message.html):
            assert FULL["unsubscribe_url"] in part  # visible unsubscribe link
            assert ART_21[locale] in part  # the right to object
            assert FULL["cta_url"].replace("&", "&amp;") in part or FULL["cta_url"] in part
            assert BRAND.postal_address in part
        assert f'href="{FULL["unsubscribe_url"]}"' in message.html
    if channel == "sms":
        assert message.subject is None
        assert message.html is None
        assert "STOP" in message.text
        assert FULL["cta_url"] in message.text
        assert len(message.text) <= 320
    if channel == "crm":
        assert message.subject
        assert message.html is None
        assert FULL["churn_reason"] in message.text
        assert FULL["segment"] in message.text


@pytest.mark.parametrize("locale", SHIPPED_LOCALES)
@pytest.mark.parametrize(("name", "channel"), CASES)
def test_templates_render_without_their_optional_fields(
    name: str, channel: str, locale: str
) -> None:
    message = RENDERER.render(name, channel, locale, context_for(name, channel, optional=False))

    for part in (message.subject or "", message.text, message.html or ""):
        assert_no_holes(part)
    spec = TEMPLATE_SPECS[(name, Channel(channel))]
    if "offer" in spec.optional:
        assert FULL["offer"] not in message.text


@pytest.mark.parametrize("locale", SHIPPED_LOCALES)
@pytest.mark.parametrize(("name", "channel", "missing"), OPTIONAL_CASES)
def test_templates_render_without_each_optional_field(
    name: str, channel: str, missing: str, locale: str
) -> None:
    context = context_for(name, channel)
    del context[missing]

    message = RENDERER.render(name, channel, locale, context)

    for part in (message.subject or "", message.text, message.html or ""):
        assert_no_holes(part)
    if missing == "currency":  # the money needs both: without a currency there is no MRR line
        assert "249" not in message.text


@pytest.mark.parametrize("locale", SHIPPED_LOCALES)
@pytest.mark.parametrize(("name", "channel"), CASES)
def test_a_customer_without_a_name_gets_the_message_greeted_without_one(
    name: str, channel: str, locale: str
) -> None:
    context = context_for(name, channel)
    del context["name"]

    message = RENDERER.render(name, channel, locale, context)

    for part in (message.subject or "", message.text, message.html or ""):
        assert_no_holes(part)
    for part in (message.subject or "X", message.text):
        assert part[0].isupper(), f"starts in lower case: {part[:30]!r}"
    greeting = NAMELESS_GREETING[locale]
    named = RENDERER.render(name, channel, locale, context_for(name, channel))
    # without the name the words change, never the layout: the greeting (or the CRM task's
    # opening sentence) is a paragraph of its own
    assert layout(message.text) == layout(named.text)
    if channel != "sms":
        assert message.text.split("\n")[1] == ""
    if channel in ("email", "webhook"):
        assert message.text.startswith(greeting + "\n\n")
        assert named.text.startswith(f"{FIRST_WORD[locale]} {FULL['name']},\n\n")
        assert message.html is not None
        assert f"<p>{greeting}</p>" in message.html
    if channel == "sms":
        assert message.text.startswith(greeting + " ")


@pytest.mark.parametrize("name", ["", "   ", "\x07\x1b", None])
def test_a_blank_name_is_left_out_like_a_missing_one(name: str | None) -> None:
    context = context_for("check_in", "email") | {"name": name}

    message = RENDERER.render("check_in", "email", "en", context)

    assert message.subject == "How are things?"
    assert message.text.startswith("Hi there,\n")


def test_the_optional_profile_fields_are_never_required() -> None:
    assert {
        "name",
        "churn_reason",
        "segment",
        "mrr",
        "currency",
        "lifecycle",
        "customer_id",
        "email",
        "phone",
        "tenure",
        "sent_so_far",
        "status_url",
    } == OPTIONAL_PROFILE_FIELDS
    for (name, channel), spec in TEMPLATE_SPECS.items():
        assert not spec.required & OPTIONAL_PROFILE_FIELDS, (name, channel)
    with pytest.raises(ValueError, match="name cannot be required"):
        TemplateSpec(required=frozenset({"name", "product"}))


@pytest.mark.parametrize("locale", SHIPPED_LOCALES)
@pytest.mark.parametrize(("name", "channel", "missing"), REQUIRED_CASES)
def test_without_a_required_field_the_message_fails_naming_it(
    name: str, channel: str, missing: str, locale: str
) -> None:
    context = context_for(name, channel)
    del context[missing]

    with pytest.raises(TemplateError) as caught:
        RENDERER.render(name, channel, locale, context)

    assert caught.value.missing_fields == (missing,)
    assert f"missing field(s): {missing}" in caught.value.reason
    assert isinstance(caught.value, PermanentSendError)


def test_feature_built_cannot_go_without_the_feature() -> None:
    context = context_for("feature_built", "email")
    del context["name"]
    del context["new_features"]

    with pytest.raises(TemplateError, match=r"missing field\(s\): new_features "):
        RENDERER.render("feature_built", "email", "fi", context)


@pytest.mark.parametrize("name", EMAIL_NAMES)
def test_every_email_offers_something_new_and_an_easy_next_step(name: str) -> None:
    spec = TEMPLATE_SPECS[(name, Channel.EMAIL)]
    assert spec.required & {"new_features", "offer"}, "nothing new to offer"
    assert {"cta_url", "unsubscribe_url", "product"} <= spec.required
    assert "name" in spec.optional


def test_the_scheduler_playbooks_templates_and_offers_are_all_shipped() -> None:
    from shared.templates_catalog import OFFER_NAMES, TEMPLATE_NAMES

    RENDERER.check_templates(TEMPLATE_NAMES)
    assert RENDERER.offer_codes >= OFFER_NAMES
    assert set(channel_names()) == {"email", "sms", "crm", "webhook"}


@pytest.mark.parametrize(
    ("locale", "wording"),
    [
        ("en", "50% off your next 3 months"),
        ("fi-FI", "50 % alennus seuraavista 3 kuukaudesta"),
        ("da", "50 % rabat de næste 3 måneder"),
        ("ms", "Diskaun 50% untuk 3 bulan akan datang"),
    ],
)
def test_offer_codes_are_put_into_words_in_the_locale(locale: str, wording: str) -> None:
    context = context_for("special_offer", "email") | {"offer": "discount_50pct_3mo"}

    message = RENDERER.render("special_offer", "email", locale, context)

    assert wording in message.text
    assert "discount_50pct_3mo" not in message.text


def test_an_unknown_offer_code_is_an_error_but_free_text_passes() -> None:
    context = context_for("special_offer", "email")
    with pytest.raises(TemplateError, match="offer code 'discount_99pct_forever'") as caught:
        RENDERER.render(
            "special_offer", "email", "en", context | {"offer": "discount_99pct_forever"}
        )
    assert caught.value.missing_fields == ("offer",)
    free = RENDERER.render("special_offer", "email", "en", context | {"offer": "Two months free"})
    assert "Two months free" in free.text


def test_trial_extension_renders_without_a_valid_until_date() -> None:
    context = {k: FULL[k] for k in ("name", "product", "cta_url", "unsubscribe_url")}
    message = RENDERER.render(
        "trial_extension", "email", "da", context | {"offer": "extended_trial_30d"}
    )
    assert "30 dages ekstra gratis prøveperiode" in message.text
    assert "gælder til og med" not in message.text


def test_a_missing_field_is_a_named_permanent_template_error() -> None:
    context = context_for("special_offer", "email")
    del context["valid_until"]
    del context["offer"]

    with pytest.raises(TemplateError) as caught:
        RENDERER.render("special_offer", Channel.EMAIL, "en", context)

    error = caught.value
    assert isinstance(error, PermanentSendError)
    assert error.suppress is False
    assert error.missing_fields == ("offer", "valid_until")
    assert error.template == "special_offer"
    assert "offer, valid_until" in error.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("product", "\n"),
        ("new_features", []),
        ("new_features", ["ok", " "]),
        ("new_features", "not a list"),
        ("valid_until", "2026-03-01"),
        ("cta_url", "javascript:alert(1)"),
        ("unsubscribe_url", "/relative/only"),
        ("name", 42),
    ],
)
def test_blank_or_unusable_fields_are_refused(field: str, value: object) -> None:
    name = "special_offer" if field == "valid_until" else "we_miss_you"
    context = context_for(name, "email") | {field: value}

    with pytest.raises(TemplateError) as caught:
        RENDERER.render(name, "email", "en", context)

    assert field in caught.value.missing_fields


def test_crm_money_must_be_a_number_and_currency_a_code() -> None:
    context = context_for("crm_personal_outreach", "crm")
    with pytest.raises(TemplateError, match="mrr"):
        RENDERER.render("crm_personal_outreach", "crm", "en", context | {"mrr": "lots"})
    with pytest.raises(TemplateError, match="currency"):
        RENDERER.render("crm_personal_outreach", "crm", "en", context | {"currency": "€"})


def test_a_blank_optional_field_is_left_out_rather_than_rendered_empty() -> None:
    context = context_for("we_miss_you", "email") | {"offer": "  ", "valid_until": None}

    message = RENDERER.render("we_miss_you", "email", "en", context)

    assert "come back, here is an offer" not in message.text
    assert_no_holes(message.text)


def test_unknown_template_and_unknown_channel_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="no template 'nope'"):
        RENDERER.render("nope", "email", "en", FULL)
    with pytest.raises(TemplateError, match="no template 'whats_new' for channel 'sms'"):
        RENDERER.render("whats_new", "sms", "en", FULL)
    with pytest.raises(TemplateError, match="unknown channel"):
        RENDERER.render("we_miss_you", "pigeon", "en", FULL)


def test_html_is_autoescaped_and_text_is_not() -> None:
    evil = "<script>alert('x')</script>"
    context = context_for("we_miss_you", "email") | {
        "name": evil,
        "new_features": ['<img src=x onerror="boom">'],
    }

    message = RENDERER.render("we_miss_you", "email", "en", context)

    assert message.html is not None
    assert "<script>" not in message.html
    assert "<img" not in message.html
    assert str(escape(evil)) in message.html
    assert evil in message.text  # plain text is never interpreted as HTML


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("fi-FI", "fi"),
        ("fi_FI", "fi"),
        ("FI", "fi"),
        ("da-DK", "da"),
        ("ms-MY", "ms"),
        ("en-GB", "en"),
        ("sv-SE", "en"),
        ("klingon", "en"),
        ("", "en"),
        (None, "en"),
    ],
)
def test_locale_falls_back_from_region_to_language_to_english(
    requested: str | None, expected: str
) -> None:
    message = RENDERER.render(
        "we_miss_you", "email", requested, context_for("we_miss_you", "email")
    )
    assert message.locale == expected


@pytest.mark.parametrize(
    ("locale", "formatted"),
    [
        ("en", "March 1, 2026"),
        ("en-US", "March 1, 2026"),
        ("en-GB", "1 March 2026"),
        ("fi-FI", "1. maaliskuuta 2026"),
        ("da-DK", "1. marts 2026"),
        ("ms-MY", "1 Mac 2026"),
        ("sv-SE", "March 1, 2026"),  # English template: date in English, not Swedish
    ],
)
def test_valid_until_is_formatted_in_the_customers_locale(locale: str, formatted: str) -> None:
    message = RENDERER.render(
        "special_offer", "email", locale, context_for("special_offer", "email")
    )

    assert formatted in message.text
    assert message.html is not None
    assert formatted in message.html


def test_crm_task_formats_money_in_the_locale() -> None:
    context = context_for("crm_personal_outreach", "crm")
    danish = RENDERER.render("crm_personal_outreach", "crm", "da", context).text
    english = RENDERER.render("crm_personal_outreach", "crm", "en", context).text
    assert "249,00\xa0€" in danish  # decimal comma, non-breaking space, symbol after
    assert "€249.00" in english


def test_the_webhook_channel_carries_the_email_parts() -> None:
    context = context_for("whats_new", "webhook")
    email = RENDERER.render("whats_new", "email", "da", context)
    hook = RENDERER.render("whats_new", "webhook", "da", context)
    assert (hook.subject, hook.text, hook.html) == (email.subject, email.text, email.html)


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40).filter(
        str.strip
    ),
    locale=st.sampled_from(SHIPPED_LOCALES),
)
def test_any_name_is_escaped_in_html_and_appears_in_text(name: str, locale: str) -> None:
    message = RENDERER.render(
        "check_in", "email", locale, context_for("check_in", "email") | {"name": name}
    )

    cleaned = " ".join(name.split())
    assert message.html is not None
    assert str(escape(cleaned)) in message.html
    assert cleaned in message.text
    assert message.subject is not None
    assert "\n" not in message.subject


def test_whitespace_and_control_characters_in_fields_are_normalised() -> None:
    context = context_for("check_in", "email") | {"name": " Aino\r\n\tVirtanen\x07 "}

    message = RENDERER.render("check_in", "email", "fi", context)

    assert message.subject == "Mitä kuuluu, Aino Virtanen?"
    assert message.text.startswith("Hei Aino Virtanen,\n")
    nameless = RENDERER.render("check_in", "email", "fi", context | {"name": "\x07\x1b"})
    assert nameless.subject == "Mitä kuuluu?"
    assert nameless.text.startswith("Hei,\n")


# --- start-up check against broken template directories ----------------------------------


@pytest.fixture
def broken_dir(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, target)
    return target


def test_check_templates_reports_unknown_names() -> None:
    with pytest.raises(TemplateError, match="no_such_template: no template spec"):
        RENDERER.check_templates(["we_miss_you", "no_such_template"])


def test_check_templates_reports_a_partial_translation(broken_dir: Path) -> None:
    (broken_dir / "fi" / "email" / "special_offer.html").unlink()
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match=r"locale 'fi' lacks fi/email/special_offer\.html"):
        renderer.check_templates(["special_offer"])


def test_a_template_missing_in_a_locale_falls_back_to_english(broken_dir: Path) -> None:
    for part in ("subject.txt", "html", "txt"):
        (broken_dir / "da" / "email" / f"check_in.{part}").unlink()
    renderer = TemplateRenderer(BRAND, broken_dir)

    renderer.check_templates(["check_in"])  # an untranslated template is fine
    message = renderer.render("check_in", "email", "da-DK", context_for("check_in", "email"))
    assert message.locale == "en"


def test_check_templates_reports_a_missing_default_locale(broken_dir: Path) -> None:
    (broken_dir / "en" / "sms" / "last_chance.txt").unlink()
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match="default locale 'en' lacks a part"):
        renderer.check_templates(["last_chance"])


def test_check_templates_reports_a_field_outside_the_spec(broken_dir: Path) -> None:
    path = broken_dir / "da" / "email" / "check_in.subject.txt"
    path.write_text("Hej {{ name }}, din rabat {{ discount_code }}\n", encoding="utf-8")
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match="uses undeclared field"):
        renderer.check_templates(["check_in"])


def test_check_templates_reports_an_untranslated_offer(broken_dir: Path) -> None:
    path = broken_dir / "ms" / "offers.json"
    table = json.loads(path.read_text(encoding="utf-8"))
    del table["free_month"]
    path.write_text(json.dumps(table), encoding="utf-8")
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match="locale 'ms' lacks free_month"):
        renderer.check_templates(["we_miss_you"])
    # at send time the English wording stands in rather than a raw code
    context = context_for("special_offer", "email") | {"offer": "free_month"}
    assert "A free month on us" in renderer.render("special_offer", "email", "ms", context).text


def test_a_broken_offers_file_is_refused_at_start(broken_dir: Path) -> None:
    (broken_dir / "da" / "offers.json").write_text('{"free_month": ""}', encoding="utf-8")
    with pytest.raises(TemplateError, match="non-blank"):
        TemplateRenderer(BRAND, broken_dir)


def test_check_templates_reports_syntax_errors(broken_dir: Path) -> None:
    (broken_dir / "ms" / "email" / "whats_new.txt").write_text("{% block x %}", encoding="utf-8")
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match="does not parse"):
        renderer.check_templates(["whats_new"])


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("fi/email/_base.txt", "Hei {{ name }},\n\n{{ cta_url }} {{ unsubscribe_url }}\n"),
        (
            "da/crm/crm_at_risk.body.txt",
            "{{ product }}{% if mrr is defined %} {{ mrr | format_money(currency) }}{% endif %}",
        ),
    ],
    ids=["name", "currency"],
)
def test_check_templates_catches_a_profile_field_used_without_a_guard(
    broken_dir: Path, path: str, source: str
) -> None:
    (broken_dir / path).write_text(source, encoding="utf-8")
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match="uses a field its spec does not provide"):
        renderer.check_templates(["check_in", "crm_at_risk"])


def test_check_templates_catches_an_optional_field_used_without_a_guard(broken_dir: Path) -> None:
    (broken_dir / "en" / "sms" / "we_miss_you.txt").write_text(
        "Hi {{ name }}, {{ offer }} at {{ product }}: {{ cta_url }}\n", encoding="utf-8"
    )
    renderer = TemplateRenderer(BRAND, broken_dir)

    with pytest.raises(TemplateError, match="we_miss_you"):
        renderer.check_templates(["we_miss_you"])


def _custom_renderer(tmp_path: Path, source: str) -> TemplateRenderer:
    (tmp_path / "en" / "sms").mkdir(parents=True)
    (tmp_path / "en" / "sms" / "custom.txt").write_text(source, encoding="utf-8")
    (tmp_path / "en" / "sms" / "custom.html").write_text(source, encoding="utf-8")
    specs = {("custom", Channel.SMS): TemplateSpec(required=frozenset({"product", "new_features"}))}
    return TemplateRenderer(BRAND, tmp_path, specs=specs)


def test_the_sandbox_refuses_unsafe_attribute_access(tmp_path: Path) -> None:
    renderer = _custom_renderer(tmp_path, "{{ product.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError, match="cannot be rendered"):
        renderer.render("custom", "sms", "en", SAMPLE_CONTEXT)


def test_the_sandbox_is_immutable(tmp_path: Path) -> None:
    renderer = _custom_renderer(tmp_path, "{{ new_features.append('x') }}{{ product }}")
    with pytest.raises(TemplateError, match="cannot be rendered"):
        renderer.render("custom", "sms", "en", SAMPLE_CONTEXT)


def test_an_empty_html_element_is_a_blank_hole(tmp_path: Path) -> None:
    (tmp_path / "en" / "email").mkdir(parents=True)
    for part, source in {
        "subject.txt": "Hi from {{ product }}",
        "txt": "Hi from {{ product }}",
        "html": "<p>Hi from {{ product }}</p><p>{% if false %}x{% endif %}</p>",
    }.items():
        (tmp_path / "en" / "email" / f"hole.{part}").write_text(source, encoding="utf-8")
    specs = {("hole", Channel.EMAIL): TemplateSpec(required=frozenset({"product"}))}
    renderer = TemplateRenderer(BRAND, tmp_path, specs=specs)

    with pytest.raises(TemplateError, match="empty <p>"):
        renderer.render("hole", "email", "en", {"product": "Ledgerly"})


def test_brand_needs_an_address() -> None:
    with pytest.raises(ValueError, match="postal address"):
        Brand(company_name="Acme", postal_address=" ")
