"""Moving open cases onto another version of their playbook, in bounded batches.

The decisions are the case aggregate's (:meth:`~services.scheduler.domain.case.Case.migrate`,
over the pure :func:`~services.scheduler.domain.plan_migration`); this module loads what it
needs and writes the answer with :func:`~services.scheduler.store.save_cases`. One unit of
work per case (``shared.messaging.uow``), as the API's pause / resume / cancel do: lock the
case row, then its step rows (a timer deciding one of them is waited for, so an in-flight
step is seen as dispatched and kept), check the case is still open and on the old version,
plan, write the steps and ``cases.playbook_version``, and put ``case.migrated`` in the
outbox — all or nothing; a transient failure (a deadlock) is retried by ``retry.REQUEST``.
A dry run plans the same way and writes nothing (and locks nothing).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from services.scheduler import store
from services.scheduler.domain import CustomerView, Migration, Playbook
from services.scheduler.domain.case import CaseChange, CaseMigrated
from services.scheduler.views import customer_view
from shared.clock import Clock
from shared.messaging.transport import DEFAULT_MAX_RECORD_BYTES
from shared.messaging.uow import UnitOfWork
from shared.retry import REQUEST

log = logging.getLogger(__name__)


class UnknownPlaybook(LookupError):
    """No such playbook name or version (neither loaded nor run by an open case)."""


class InvalidMigration(ValueError):
    """The request cannot be carried out; ``field`` names the input at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass
class CaseResult:
    case_id: str
    customer_id: str
    status: str
    migration: Migration


@dataclass
class MigrationRun:
    """What one call did (or, for a dry run, would do)."""

    playbook: str
    from_version: int
    to_version: int
    dry_run: bool
    cases: list[CaseResult] = field(default_factory=list)
    skipped: int = 0  # closed or moved by someone else between listing and locking
    remaining: int = 0

    def total(self, bucket: str) -> int:
        return sum(len(getattr(c.migration, bucket)) for c in self.cases)


class CaseMigrator:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        playbooks: Sequence[Playbook],
        topic: str,
        source: str,
        fallback_timezone: str = "UTC",
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.playbooks = list(playbooks)
        self.topic = topic
        self.source = source
        self.fallback_timezone = fallback_timezone
        self.max_record_bytes = max_record_bytes  # kafka.max_record_bytes

    async def target(self, name: str, from_version: int, to_version: int | None) -> Playbook:
        """The version to migrate to (default: the latest loaded), after checking the request.

        Raises:
            UnknownPlaybook: the name, ``to_version`` or ``from_version`` is unknown.
            InvalidMigration: ``to_version`` is ``from_version``.
        """
        versions = {p.version: p for p in self.playbooks if p.name == name}
        if not versions:
            raise UnknownPlaybook(f"no playbook {name!r}")
        version = max(versions) if to_version is None else to_version
        if version not in versions:
            raise UnknownPlaybook(f"no playbook {name!r} version {version}")
        if from_version not in versions:
            # a version no longer loaded is still known while open cases run it
            async with self.engine.connect() as conn:
                if not await store.count_open_cases_on_version(conn, name, from_version):
                    raise UnknownPlaybook(f"no playbook {name!r} version {from_version}")
        if version == from_version:
            implied = " (the latest loaded version)" if to_version is None else ""
            raise InvalidMigration(
                "to_version", f"{version}{implied} is from_version: nothing to migrate"
            )
        return versions[version]

    async def run(
        self,
        name: str,
        from_version: int,
        to_version: int | None = None,
        *,
        dry_run: bool = False,
        limit: int = 1000,
    ) -> MigrationRun:
        """Migrate at most ``limit`` open cases of ``name`` from ``from_version``."""
        target = await self.target(name, from_version, to_version)
        async with self.engine.connect() as conn:
            ids = await store.open_cases_on_version(conn, name, from_version, limit)
            total = await store.count_open_cases_on_version(conn, name, from_version)
        run = MigrationRun(name, from_version, target.version, dry_run)
        for case_id in ids:
            one = functools.partial(self._one, case_id, target, from_version, dry_run)
            result = await REQUEST.call(one, "case migration", log)
            if result is None:
                run.skipped += 1
            else:
                run.cases.append(result)
        if dry_run:
            run.remaining = max(total - len(ids), 0)
        else:
            async with self.engine.connect() as conn:
                run.remaining = await store.count_open_cases_on_version(conn, name, from_version)
        log.info(
            "playbook migration",
            extra={
                "playbook": name,
                "from_version": from_version,
                "to_version": target.version,
                "dry_run": dry_run,
                "cases": len(run.cases),
                "remaining": run.remaining,
            },
        )
        return run

    async def _one(
        self, case_id: str, target: Playbook, from_version: int, dry_run: bool
    ) -> CaseResult | None:
        unit = UnitOfWork(
            self.engine,
            self.clock,
            self.source,
            self.max_record_bytes,
            name="scheduler.migrate_case",
        )
        async with unit as tx:
            conn, now = tx.conn, tx.now
            case = await store.load_case(conn, case_id, lock=not dry_run)
            if (
                case is None
                or not case.is_open
                or case.playbook != target.name
                or case.playbook_version != from_version
            ):
                return None
            person = await store.customer(conn, case.customer_id)
            view = (
                customer_view(person._mapping)
                if person is not None
                else CustomerView(case.customer_id)
            )
            change = case.migrate(target, view, now, fallback_timezone=self.fallback_timezone)
            assert isinstance(change, CaseChange)  # open, and on the target's playbook
            if not dry_run:
                await store.save_cases(tx, self.topic, [change])
        migrated = next(e for e in change.events if isinstance(e, CaseMigrated))
        return CaseResult(case_id, case.customer_id, case.status, migrated.migration)
