"""``winback validate``: everything the services check at start-up about playbooks and content,
for a campaign team's own CI.

Checks, and reports every problem found as one line (``file:line: field: reason`` where the
problem has a place in a file):

- the content's ``catalog.yaml`` and ``offers.yaml`` (:mod:`shared.content`);
- every playbook (steps, templates, offers, variants, windows) against that catalogue;
- every template on every channel in every locale of the content: all parts present, every
  file parses, no undeclared field, and trial renders with the catalogue's sample data;
- every offer put into words in the default locale's ``offers.json``.

Exit code 0 when nothing is wrong, 1 otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from services.dispatcher.rendering import (
    DEFAULT_LOCALE,
    OFFERS_FILE,
    Brand,
    TemplateRenderer,
    samples_from,
    specs_from,
    variants_from,
)
from services.scheduler.domain.errors import PlaybookError
from services.scheduler.domain.loader import load_playbooks
from shared.content import Catalog, ContentError, catalog_for


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    playbooks: int = 0
    templates: int = 0
    offers: int = 0
    locales: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (
            f"ok: {self.playbooks} playbooks, {self.templates} templates, {self.offers} offers, "
            f"locales {', '.join(self.locales)}"
        )


def validate(playbooks_dir: Path, content_dir: Path | None) -> Report:
    """Every problem with the playbooks of ``playbooks_dir`` and the content of
    ``content_dir`` (``None``: the shipped content)."""
    report = Report()
    try:
        catalog = catalog_for(content_dir)
    except ContentError as exc:
        report.problems.extend(str(p) for p in exc.problems)
        return report
    report.templates, report.offers = len(catalog.templates), len(catalog.offers)
    try:
        report.playbooks = len(load_playbooks(playbooks_dir, catalog=catalog))
    except PlaybookError as exc:
        report.problems.extend(str(p) for p in exc.problems)
    renderer = TemplateRenderer(
        Brand("Validate", "1 Example Street"),
        catalog.directory,
        specs=specs_from(catalog),
        samples=samples_from(catalog),
        variants=variants_from(catalog),
    )
    report.locales = renderer.locales
    where = str(catalog.directory)
    report.problems.extend(
        f"{where}: {problem}"
        for problem in renderer.template_problems(sorted(catalog.template_names))
    )
    report.problems.extend(_offer_wording(catalog))
    return report


def _offer_wording(catalog: Catalog) -> list[str]:
    """Offers of ``offers.yaml`` without words in the default locale, and words for offers
    that do not exist."""
    path = catalog.directory / DEFAULT_LOCALE / OFFERS_FILE
    try:
        words = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{path}: cannot read: {exc}"]
    if not isinstance(words, dict):
        return [f"{path}: must be an object of offer name to words"]
    missing = sorted(set(catalog.offers) - set(words))
    unknown = sorted(set(words) - set(catalog.offers))
    problems = [f"{path}: {name}: offer has no wording" for name in missing]
    problems += [f"{path}: {name}: not an offer of offers.yaml" for name in unknown]
    return problems
