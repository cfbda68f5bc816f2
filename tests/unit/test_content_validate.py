"""Content as data and ``winback validate``: a new template, offer and subject variant are
files only; a broken copy of the content or a playbook is reported file:line: field: reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from services.dispatcher.rendering import Brand, TemplateRenderer, specs_from, variants_from
from services.scheduler.domain.loader import load_playbooks
from services.validate import validate
from shared.content import SHIPPED_CONTENT_DIR, ContentError, load_catalog
from shared.settings import SchedulerSettings

PLAYBOOKS = SchedulerSettings().playbooks_dir
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def content(tmp_path: Path) -> Path:
    target = tmp_path / "content"
    shutil.copytree(SHIPPED_CONTENT_DIR, target)
    return target


@pytest.fixture
def playbooks(tmp_path: Path) -> Path:
    target = tmp_path / "playbooks"
    shutil.copytree(PLAYBOOKS, target)
    return target


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


def _line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def test_the_shipped_content_and_playbooks_validate() -> None:
    report = validate(PLAYBOOKS, None)
    assert report.problems == []
    assert report.playbooks >= 12
    assert report.templates >= 20
    assert report.offers >= 8
    assert set(report.locales) >= {"en", "fi", "da", "ms"}


def test_the_catalogue_reads_the_fields_and_samples_as_the_renderer_needs_them() -> None:
    catalog = load_catalog()
    we_miss_you = catalog.templates["we_miss_you"]
    assert we_miss_you.channels == {"email", "webhook", "sms"}
    assert {"product", "cta_url", "unsubscribe_url", "new_features"} <= we_miss_you.fields[
        "email"
    ].required
    assert "new_features" not in we_miss_you.fields["sms"].required
    assert we_miss_you.sample["valid_until"] == date(2030, 12, 31)
    assert we_miss_you.sample["mrr"] == Decimal("99.00")
    assert catalog.offer_discounts["free_month"] is True
    assert catalog.offer_discounts["premium_onboarding"] is False


def test_a_new_template_offer_and_subject_variant_are_files_only(
    content: Path, playbooks: Path
) -> None:
    _append(
        content / "catalog.yaml",
        "  free_upgrade:\n"
        '    about: "name, a free upgrade to the next plan for the offer\'s duration"\n'
        "    channels: [email, webhook]\n"
        "    required: [new_features, offer]\n"
        "  free_upgrade_short:\n"
        "    like: free_upgrade\n"
        '    subject: "{% if name is defined %}{{ name }}, {% endif %}an upgrade on us"\n'
        '    blocks: {closing: "Enjoy it, {{ product }} is yours."}\n',
    )
    _append(
        content / "offers.yaml",
        "  upgrade_2mo: {kind: service, discount: false, cost_minor: 2000, cost_currency: EUR}\n",
    )
    for locale in ("en", "fi", "da", "ms"):  # each locale words every offer
        path = content / locale / "offers.json"
        words = path.read_text(encoding="utf-8")
        path.write_text(
            words.replace("{", '{\n  "upgrade_2mo": "Two months on the next plan, free",', 1),
            encoding="utf-8",
        )
    email = content / "en" / "email"
    (email / "free_upgrade.subject.txt").write_text("A free upgrade for you\n", encoding="utf-8")
    for part in ("txt", "html"):
        body = (email / f"check_in.{part}").read_text(encoding="utf-8")
        (email / f"free_upgrade.{part}").write_text(
            body.replace(
                "If any of it sounds helpful, have a look at your own pace.",
                "On us: {{ offer }}.",
            ),
            encoding="utf-8",
        )
    (playbooks / "upgrade.yaml").write_text(
        "name: upgrade\n"
        "version: 1\n"
        "description: A free upgrade, two subject lines tested.\n"
        "priority: 5\n"
        "match: {lifecycle: [churned_customer], reasons: [unused]}\n"
        "steps:\n"
        "  - key: d0_upgrade\n"
        "    offset: 0d\n"
        "    channel: email\n"
        "    template: free_upgrade\n"
        "    offer: upgrade_2mo\n"
        "    variants:\n"
        "      - {name: upgrade, weight: 1}\n"
        "      - {name: welcome, weight: 1, template: we_miss_you}\n"
        "      - {name: short_subject, weight: 1, template: free_upgrade_short}\n",
        encoding="utf-8",
    )

    report = validate(playbooks, content)
    assert report.problems == []
    catalog = load_catalog(content)
    assert "upgrade" in {p.name for p in load_playbooks(playbooks, catalog=catalog)}
    renderer = TemplateRenderer(
        Brand("Acme", "1 Main St"),
        content,
        specs=specs_from(catalog),
        variants=variants_from(catalog),
    )
    rendered = renderer.render(
        "free_upgrade",
        "email",
        "en",
        {
            "product": "Acme",
            "offer": "upgrade_2mo",
            "new_features": ["Dark mode"],
            "cta_url": "https://acme.example/back",
            "unsubscribe_url": "https://acme.example/u/t",
        },
    )
    assert rendered.subject == "A free upgrade for you"
    assert "On us: Two months on the next plan, free." in rendered.text
    assert rendered.html is not None
    assert "Two months on the next plan, free" in rendered.html

    # the subject variant: the base's files, its own subject line and closing paragraph
    context = {
        "product": "Acme",
        "offer": "upgrade_2mo",
        "new_features": ["Dark mode"],
        "cta_url": "https://acme.example/back",
        "unsubscribe_url": "https://acme.example/u/t",
        "name": "Aino",
    }
    short = renderer.render("free_upgrade_short", "email", "en", context)
    base = renderer.render("free_upgrade", "email", "en", context)
    assert short.subject == "Aino, an upgrade on us"
    assert "Enjoy it, Acme is yours." in short.text
    assert short.html is not None
    assert "Enjoy it, Acme is yours." in short.html
    assert short.text.replace("Enjoy it, Acme is yours.", "") == base.text.replace(
        "No pressure at all; we just wanted to say hello.", ""
    )
    assert catalog.templates["free_upgrade_short"].channels == {"email", "webhook"}

    # a misspelt block is a problem, not silently ignored
    _append(
        content / "catalog.yaml",
        "  free_upgrade_typo:\n    like: free_upgrade\n    blocks: {closin: Bye}\n",
    )
    problems = validate(playbooks, content).problems
    assert any("'closin' is not a block of en/email/free_upgrade" in p for p in problems), problems


def test_a_broken_copy_is_reported_file_line_and_field(content: Path, playbooks: Path) -> None:
    catalog = content / "catalog.yaml"
    text = catalog.read_text(encoding="utf-8")
    catalog.write_text(
        text.replace("    channels: [email, webhook]\n", "    channels: [email, pigeon]\n", 1),
        encoding="utf-8",
    )
    offers = content / "offers.yaml"
    offers.write_text(
        offers.read_text(encoding="utf-8").replace("kind: free_months", "kind: free_beer"),
        encoding="utf-8",
    )
    with pytest.raises(ContentError) as caught:
        load_catalog(content)
    lines = [str(p) for p in caught.value.problems]
    pigeon = _line_of(catalog, "pigeon")
    assert any(
        line.startswith(f"{catalog}:{pigeon}: ") and "unknown channel 'pigeon'" in line
        for line in lines
    ), lines
    beer = _line_of(offers, "free_beer")
    assert any(line.startswith(f"{offers}:{beer}: offers.free_month.kind") for line in lines), lines

    # the playbooks against an intact catalogue: a bad offset and an unknown offer
    shutil.rmtree(content)
    shutil.copytree(SHIPPED_CONTENT_DIR, content)
    series = playbooks / "short_email_series.yaml"
    series.write_text(
        series.read_text(encoding="utf-8").replace("offset: 3d", "offset: three days", 1),
        encoding="utf-8",
    )
    price = playbooks / "price_discount.yaml"
    price.write_text(
        price.read_text(encoding="utf-8").replace("offer: free_month}", "offer: free_lunch}", 1),
        encoding="utf-8",
    )
    report = validate(playbooks, content)
    offset_line, offer_line = _line_of(series, "three days"), _line_of(price, "free_lunch")
    assert any(
        p.startswith(f"{series}:{offset_line}: steps[") and ".offset: " in p
        for p in report.problems
    ), report.problems
    assert any(
        p.startswith(f"{price}:{offer_line}: ") and "unknown offer 'free_lunch'" in p
        for p in report.problems
    ), report.problems


def test_a_template_that_does_not_render_is_a_problem(content: Path) -> None:
    (content / "fi" / "email" / "check_in.txt").write_text("{{ name ", encoding="utf-8")
    report = validate(PLAYBOOKS, content)
    assert any("check_in (email)" in p and "'fi'" in p for p in report.problems), report.problems


def test_winback_validate_exit_codes(content: Path) -> None:
    good = subprocess.run(
        [sys.executable, "-m", "services.cli", "validate", "--content", str(content)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("ok: ")
    offers = content / "offers.yaml"
    offers.write_text(
        offers.read_text(encoding="utf-8").replace("percent_off: 50", "percent_off: 500"),
        encoding="utf-8",
    )
    bad = subprocess.run(
        [sys.executable, "-m", "services.cli", "validate", "--content", str(content)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert bad.returncode == 1
    line = _line_of(offers, "percent_off: 500")
    assert f"{offers}:{line}: offers.discount_50pct_3mo.percent_off" in bad.stdout
    assert "Traceback" not in bad.stderr
