"""Load playbook YAML files, reporting every problem with its file, line and field.

Start-up calls :func:`load_playbooks` on the playbook directory; a bad file stops it with a
:class:`~.errors.PlaybookError` whose message lists ``file:line: field: reason`` for every
problem in every file. One playbook per file (``*.yaml`` / ``*.yml``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import yaml
from pydantic import ValidationError

from services.scheduler.domain.errors import FieldPath, PlaybookError, PlaybookProblem
from services.scheduler.domain.playbook import Playbook
from shared import templates_catalog
from shared.content import Catalog
from shared.yamlfile import duplicate_keys as _duplicate_keys
from shared.yamlfile import line_of as _line_of
from shared.yamlfile import pydantic_reason as _pydantic_reason
from shared.yamlfile import yaml_problem


def load_playbooks(
    directory: str | Path,
    *,
    templates: Collection[str] | None = None,
    offers: Mapping[str, bool] | None = None,
    catalog: Catalog | None = None,
) -> list[Playbook]:
    """Load and validate every playbook file in ``directory``, sorted by (name, version).

    Besides each playbook's own rules, checks that (name, version) is unique across files,
    and, when given, that template names are in ``templates`` and offers in ``offers``
    (offer name → is it a discount), with ``is_discount`` agreeing with the catalogue.
    ``catalog`` (a content directory's, :mod:`shared.content`) gives all three: its template
    names, its offers and the channels each template ships on.

    Raises:
        PlaybookError: with every problem found, or when the directory holds no playbook.
    """
    if catalog is not None:
        templates, offers = catalog.template_names, catalog.offer_discounts
    root = Path(directory)
    if not root.is_dir():
        raise PlaybookError([PlaybookProblem((), "playbook directory not found", file=str(root))])
    files = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        raise PlaybookError([PlaybookProblem((), "no playbook files (*.yaml)", file=str(root))])

    problems: list[PlaybookProblem] = []
    loaded: list[Playbook] = []
    first_seen: dict[tuple[str, int], tuple[str, int | None]] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(PlaybookProblem((), f"cannot read: {exc}", file=str(path)))
            continue
        try:
            playbook, node = _parse(
                text, str(path), templates=templates, offers=offers, catalog=catalog
            )
        except PlaybookError as exc:
            problems.extend(exc.problems)
            continue
        identity = (playbook.name, playbook.version)
        line = _line_of(node, ("name",))
        if identity in first_seen:
            other_file, other_line = first_seen[identity]
            problems.append(
                PlaybookProblem(
                    ("name",),
                    f"playbook {playbook.name!r} version {playbook.version} is already defined "
                    f"in {other_file}:{other_line}",
                    file=str(path),
                    line=line,
                )
            )
            continue
        first_seen[identity] = (str(path), line)
        loaded.append(playbook)
    if problems:
        raise PlaybookError(problems)
    return sorted(loaded, key=lambda p: (p.name, p.version))


def parse_playbook(
    text: str,
    source: str = "<string>",
    *,
    templates: Collection[str] | None = None,
    offers: Mapping[str, bool] | None = None,
) -> Playbook:
    """Parse and validate one playbook document; ``source`` names it in error messages.

    Raises:
        PlaybookError: with every problem found.
    """
    return _parse(text, source, templates=templates, offers=offers)[0]


def _parse(
    text: str,
    source: str,
    *,
    templates: Collection[str] | None,
    offers: Mapping[str, bool] | None,
    catalog: Catalog | None = None,
) -> tuple[Playbook, yaml.Node]:
    def located(path: FieldPath, reason: str, line: int | None = None) -> PlaybookProblem:
        return PlaybookProblem(path, reason, file=source, line=line or _line_of(node, path))

    loader = yaml.SafeLoader(text)
    try:
        try:
            maybe_node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, source) from None
        if maybe_node is None:
            raise PlaybookError([PlaybookProblem((), "the file is empty", file=source, line=1)])
        node: yaml.Node = maybe_node
        if not isinstance(node, yaml.MappingNode):
            raise PlaybookError([located((), "a playbook file must be a mapping of fields")])
        duplicates = list(_duplicate_keys(node, ()))
        if duplicates:
            raise PlaybookError([located(path, "duplicate key", line) for path, line in duplicates])
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()

    try:
        playbook = Playbook.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        locs = [tuple(e["loc"]) for e in errors]
        # a container error (e.g. "too short") that only echoes its items' errors is noise
        kept = [
            (loc, e)
            for loc, e in zip(locs, errors, strict=True)
            if not any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs)
        ]
        raise PlaybookError([located(loc, _pydantic_reason(e)) for loc, e in kept]) from None
    except PlaybookError as exc:
        raise PlaybookError([located(p.path, p.reason) for p in exc.problems]) from None

    catalog_problems = [
        located(path, reason)
        for path, reason in _catalog_problems(playbook, templates, offers, catalog)
    ]
    if catalog_problems:
        raise PlaybookError(catalog_problems)
    return playbook, node


def _catalog_problems(
    playbook: Playbook,
    templates: Collection[str] | None,
    offers: Mapping[str, bool] | None,
    catalog: Catalog | None = None,
) -> list[tuple[FieldPath, str]]:
    found: list[tuple[FieldPath, str]] = []
    for index, step in enumerate(playbook.steps):
        at: FieldPath = ("steps", index)
        named: list[tuple[FieldPath, str | None, str | None]] = [
            ((*at,), step.template, step.offer),
        ]
        if step.without_discount is not None:
            named.append(((*at, "without_discount"), step.without_discount, None))
        named.extend(
            ((*at, "variants", v), variant.template, variant.offer)
            for v, variant in enumerate(step.variants)
        )
        for path, template, offer in named:
            if templates is not None and template is not None and template not in templates:
                field = "without_discount" if path[-1] == "without_discount" else "template"
                where = path if field == "without_discount" else (*path, "template")
                found.append((where, f"unknown template {template!r}"))
            elif templates is not None and template is not None:
                problem = (catalog or templates_catalog.SHIPPED).channel_problem(
                    template, step.channel
                )
                if problem is not None:
                    where = path if path[-1] == "without_discount" else (*path, "template")
                    found.append((where, problem))
            if offers is not None and offer is not None:
                if offer not in offers:
                    found.append(((*path, "offer"), f"unknown offer {offer!r}"))
                elif offers[offer] != step.is_discount:
                    kind = "a discount" if offers[offer] else "not a discount"
                    found.append(
                        (
                            (*path, "offer"),
                            f"offer {offer!r} is {kind}; is_discount says {step.is_discount}",
                        )
                    )
    return found


def _yaml_error(exc: yaml.YAMLError, source: str) -> PlaybookError:
    found = yaml_problem(exc, source)
    return PlaybookError([PlaybookProblem((), found.reason, file=source, line=found.line)])
