"""The scheduler's pure domain core: segments, playbooks, timing windows, planning,
guardrails, variants and attribution — plain code over plain data and an injected ``now``.
No database, broker or HTTP imports here; the adapters wire it up.
"""

from services.scheduler.domain.attribution import (
    DEFAULT_ATTRIBUTION_WINDOW,
    WinBackCredit,
    attribute_reactivation,
    credited_step,
    time_since_return,
)
from services.scheduler.domain.durations import format_duration, parse_duration
from services.scheduler.domain.errors import PlaybookError, PlaybookProblem
from services.scheduler.domain.guardrails import (
    DEFAULT_POLICY,
    FrequencyCap,
    GuardrailPolicy,
    decide,
    discount_block,
    earliest_send_time,
)
from services.scheduler.domain.loader import load_playbooks, parse_playbook
from services.scheduler.domain.localtime import SendWindow, resolve_zone
from services.scheduler.domain.model import (
    CHANNELS,
    DEFAULT_VARIANT,
    Channel,
    ChurnEpisode,
    ChurnReason,
    ContactHistory,
    CustomerView,
    Decision,
    Defer,
    LifecycleType,
    PlannedStep,
    Segment,
    Send,
    SentStep,
    Skip,
)
from services.scheduler.domain.planning import (
    FEATURE_RELEASED,
    case_expires_at,
    choose_playbook,
    find_playbook,
    latest_versions,
    plan_steps,
    plan_triggered,
)
from services.scheduler.domain.playbook import MatchRule, Playbook, Step, Variant, check_playbook
from services.scheduler.domain.segmentation import (
    DEFAULT_THRESHOLDS,
    SegmentationThresholds,
    ValueTierThresholds,
    segment,
)
from services.scheduler.domain.templates_catalog import OFFERS, TEMPLATE_NAMES
from services.scheduler.domain.variants import assign_variant, in_holdout
from services.scheduler.domain.windows import (
    DEFAULT_LADDER,
    DEFAULT_WINDOW_CONFIG,
    TimingWindow,
    WindowLadder,
    window_for,
)

__all__ = [
    "CHANNELS",
    "DEFAULT_ATTRIBUTION_WINDOW",
    "DEFAULT_LADDER",
    "DEFAULT_POLICY",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_VARIANT",
    "DEFAULT_WINDOW_CONFIG",
    "FEATURE_RELEASED",
    "OFFERS",
    "TEMPLATE_NAMES",
    "Channel",
    "ChurnEpisode",
    "ChurnReason",
    "ContactHistory",
    "CustomerView",
    "Decision",
    "Defer",
    "FrequencyCap",
    "GuardrailPolicy",
    "LifecycleType",
    "MatchRule",
    "PlannedStep",
    "Playbook",
    "PlaybookError",
    "PlaybookProblem",
    "Segment",
    "SegmentationThresholds",
    "Send",
    "SendWindow",
    "SentStep",
    "Skip",
    "Step",
    "TimingWindow",
    "ValueTierThresholds",
    "Variant",
    "WinBackCredit",
    "WindowLadder",
    "assign_variant",
    "attribute_reactivation",
    "case_expires_at",
    "check_playbook",
    "choose_playbook",
    "credited_step",
    "decide",
    "discount_block",
    "earliest_send_time",
    "find_playbook",
    "format_duration",
    "in_holdout",
    "latest_versions",
    "load_playbooks",
    "parse_duration",
    "parse_playbook",
    "plan_steps",
    "plan_triggered",
    "resolve_zone",
    "segment",
    "time_since_return",
    "window_for",
]
