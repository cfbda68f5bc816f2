"""One example ``data`` per event type, as the producer writes it (the AsyncAPI document shows
them; a test round-trips each through its model). One story: Aino (``cus_42``) cancelled over
price, got two emails, came back."""

from __future__ import annotations

from typing import Any

CASE = "0f5c3d6e-8a41-5b7e-9a53-2f1c6b0e4d21"
REONBOARDING_CASE = "7d2e9b14-3c5a-5f80-b1e6-94a07c3d2e58"
EPISODE = "3f9a1c7e5b2d4a6c8e0f1a3b5c7d9e1f"
CUSTOMER = "cus_42"

PROFILE: dict[str, Any] = {
    "email": "aino@example.com",
    "timezone": "Europe/Helsinki",
    "locale": "fi-FI",
    "mrr_minor": 4900,
    "currency": "EUR",
    "customer_since": "2024-05-01T00:00:00Z",
}

SNAPSHOT: dict[str, Any] = {
    "id": CUSTOMER,
    "email": "aino@example.com",
    "phone": None,
    "name": "Aino",
    "locale": "fi-FI",
    "timezone": "Europe/Helsinki",
    "plan": "pro",
    "mrr_minor": 4900,
    "currency": "EUR",
    "customer_since": "2024-05-01T00:00:00+00:00",
    "engagement": "high",
    "crm_owner": "owner-3",
    "status": "churned",
    "consent": {},
    "opted_out_all": False,
}

SEGMENT: dict[str, Any] = {
    "lifecycle": "churned_customer",
    "reason": "price",
    "value_tier": "medium",
    "engagement": "high",
    "tenure": "long_term",
    "is_rechurn": False,
    "days_since_churn": 0,
    "labels": ["active_user"],
}

OUTCOME: dict[str, Any] = {
    "idempotency_key": f"{CASE}:d3_what_you_missed",
    "case_id": CASE,
    "step_key": "d3_what_you_missed",
    "step_id": 1042,
    "customer_id": CUSTOMER,
    "channel": "email",
    "provider": "sendgrid",
    "provider_message_id": "14c5d75ce93.dfd.64b469.filter-001",
    "template": "what_you_missed",
    "variant": "default",
    "crm_owner": "owner-3",
    "playbook": "price_discount",
}

WEBHOOK: dict[str, Any] = {
    **OUTCOME,
    "occurred_at": "2026-03-05T08:12:40+00:00",
    "provider_event_id": "sg-event-5f3b4c2a",
}

INBOUND: dict[str, dict[str, Any]] = {
    "subscription.cancelled": {
        "customer_id": CUSTOMER,
        "reason": "too_expensive",
        "comment": "Too pricey for a team of three.",
        "mrr_minor": 4900,
        "currency": "EUR",
        "customer": PROFILE,
    },
    "subscription.reactivated": {
        "customer_id": CUSTOMER,
        "plan": "pro",
        "mrr_minor": 4900,
        "currency": "EUR",
    },
    "subscription.created": {
        "customer_id": "cus_77",
        "plan": "starter",
        "mrr_minor": 1900,
        "currency": "EUR",
        "customer": {"email": "mads@example.com", "locale": "da-DK"},
    },
    "trial.expired": {
        "customer_id": "cus_trial_8",
        "reason": "missing_features",
        "feature": "SSO login",
    },
    "lead.lost": {"customer_id": "lead_9", "reason": "competitor", "competitor": "Rival Oy"},
    "user.inactive": {"customer_id": "cus_51", "days_inactive": 30, "usage_drop_percent": 85.0},
    "user.active": {"customer_id": "cus_51"},
    "feature.released": {
        "feature": "sso_login",
        "name": "SSO",
        "description": "Sign in with your identity provider.",
    },
    "feedback.received": {
        "customer_id": CUSTOMER,
        "reason": "too_complex",
        "comment": "Setting up the reports took us weeks.",
        "tags": ["onboarding", "reports"],
    },
    "issue.resolved": {
        "issue": "ENG-1042",
        "title": "Report setup in one click",
        "tags": ["poor_experience", "reports"],
        "features": ["reports"],
    },
    "competitor.changed": {
        "competitor": "Rival CRM",
        "kind": "price_increase",
        "note": "Rival CRM raised its prices by 30% on 1 May.",
    },
    "consent.withdrawn": {"customer_id": CUSTOMER, "channel": "sms"},
    "customer.updated": {
        "customer_id": CUSTOMER,
        "customer": {
            "phone": "+358401234567",
            "name": "Aino Virtanen",
            "fiscal_year_start_month": 4,
        },
    },
}
"""Inbound examples, by type name without the prefix."""

PUBLISHED: dict[str, dict[str, Any]] = {
    "churn.recorded": {
        "customer": SNAPSHOT,
        "episode": {
            "id": EPISODE,
            "kind": "subscription_cancelled",
            "reason": "price",
            "reason_raw": "too_expensive",
            "feature": None,
            "competitor": None,
            "occurred_at": "2026-03-02T08:00:00+00:00",
            "mrr_at_churn_minor": 4900,
            "currency": "EUR",
            "tenure_days": 670,
        },
        "superseded": [],
    },
    "customer.returned": {
        "customer": {**SNAPSHOT, "status": "active"},
        "kind": "reactivated",
        "returned_at": "2026-03-07T08:00:00+00:00",
        "previous_status": "churned",
        "ended_episodes": [EPISODE],
        "mrr_minor": 4900,
    },
    "customer.activity": {
        "customer_id": "cus_51",
        "at": "2026-03-09T14:20:00+00:00",
        "status": "inactive",
    },
    "customer.updated": {"customer": {**SNAPSHOT, "name": "Aino Virtanen"}},
    "consent.changed": {
        "customer_id": CUSTOMER,
        "channel": "sms",
        "granted": False,
        "at": "2026-03-04T10:00:00+00:00",
        "customer": {**SNAPSHOT, "consent": {"sms": False}},
    },
    "feature.released": {
        "feature": "sso_login",
        "name": "SSO",
        "description": "Sign in with your identity provider.",
        "released_at": "2026-03-10T09:00:00+00:00",
    },
    "feedback.received": {
        "customer_id": CUSTOMER,
        "reason": "poor_experience",
        "reason_raw": "too_complex",
        "tags": ["onboarding", "reports"],
        "episode_id": "3f1c2b7a9d4e5f60718293a4b5c6d7e8",
        "received_at": "2026-03-03T10:00:00+00:00",
    },
    "issue.resolved": {
        "issue": "ENG-1042",
        "title": "Report setup in one click",
        "tags": ["poor_experience", "reports"],
        "features": ["reports"],
        "resolved_at": "2026-05-02T09:00:00+00:00",
    },
    "competitor.changed": {
        "competitor": "Rival CRM",
        "kind": "price_increase",
        "note": "Rival CRM raised its prices by 30% on 1 May.",
        "changed_at": "2026-05-01T08:00:00+00:00",
    },
    "customer.erased": {
        "customer_id": CUSTOMER,
        "address_hashes": {
            "email": "5d41402abc4b2a76b9719d911017c5925d41402abc4b2a76b9719d911017c592"
        },
        "erased_at": "2026-04-01T12:00:00+00:00",
    },
    "dispatch.requested": {
        "idempotency_key": f"{CASE}:d3_what_you_missed",
        "case_id": CASE,
        "step_id": 1042,
        "step_key": "d3_what_you_missed",
        "playbook": "price_discount",
        "playbook_version": 1,
        "channel": "email",
        "template": "what_you_missed",
        "offer": None,
        "is_discount": False,
        "variant": "default",
        "valid_until": None,
        "customer": {
            "id": CUSTOMER,
            "email": "aino@example.com",
            "phone": None,
            "name": "Aino",
            "locale": "fi-FI",
            "timezone": "Europe/Helsinki",
            "plan": "pro",
            "crm_owner": "owner-3",
        },
        "reason": "price",
        "features": [],
        "feature_description": None,
        "requested_at": "2026-03-05T08:00:00+00:00",
        "send_window": {"start": "09:00", "end": "20:00", "timezone": "Europe/Helsinki"},
        "expires_at": "2027-03-02T08:00:00+00:00",
    },
    "case.opened": {
        "case_id": CASE,
        "customer_id": CUSTOMER,
        "purpose": "winback",
        "playbook": "price_discount",
        "playbook_version": 1,
        "segment": SEGMENT,
        "holdout": False,
        "is_rechurn": False,
        "time_since_return_days": None,
        "steps": 4,
    },
    "case.closed": {
        "case_id": CASE,
        "customer_id": CUSTOMER,
        "reason": "returned",
        "playbook": "price_discount",
    },
    "case.won_back": {
        "case_id": CASE,
        "customer_id": CUSTOMER,
        "episode_id": EPISODE,
        "playbook": "price_discount",
        "playbook_version": 1,
        "step_key": "d3_what_you_missed",
        "channel": "email",
        "template": "what_you_missed",
        "variant": "default",
        "offer": None,
        "crm_owner": "owner-3",
        "mrr_regained_minor": 4900,
        "mrr_at_churn_minor": 4900,
        "currency": "EUR",
        "days_to_return": 5,
        "churned_at": "2026-03-02T08:00:00+00:00",
        "returned_at": "2026-03-07T08:00:00+00:00",
    },
    "case.migrated": {
        "case_id": CASE,
        "customer_id": CUSTOMER,
        "playbook": "price_discount",
        "from_version": 1,
        "to_version": 2,
        "expires_at": "2027-03-02T08:00:00+00:00",
        "added": [
            {
                "step_key": "d10_customer_story",
                "channel": "email",
                "template": "customer_story",
                "offer": None,
                "variant": "default",
                "window": "series",
                "due_at": "2026-03-12T08:00:00+00:00",
                "original_due_at": "2026-03-12T08:00:00+00:00",
            }
        ],
        "cancelled": [
            {
                "step_key": "d14_last_chance",
                "cause": "removed",
                "due_at": "2026-03-16T08:00:00+00:00",
            }
        ],
        "retimed": [],
        "updated": [
            {
                "step_key": "d7_special_offer",
                "channel": "email",
                "template": "special_offer",
                "offer": "free_month",
                "variant": "default",
                "window": "series",
                "due_at": "2026-03-09T08:00:00+00:00",
                "original_due_at": "2026-03-09T08:00:00+00:00",
                "changed": ["offer"],
            }
        ],
        "kept": ["d0_we_miss_you", "d3_what_you_missed"],
        "unchanged": [],
    },
    "message.sent": OUTCOME,
    "message.failed": {
        **OUTCOME,
        "provider": None,
        "provider_message_id": None,
        "reason": "every provider failed: sendgrid: 503 Service Unavailable",
    },
    "message.suppressed": {
        **OUTCOME,
        "provider": None,
        "provider_message_id": None,
        "reason": "case closed",
    },
    "message.delivered": WEBHOOK,
    "message.opened": WEBHOOK,
    "message.clicked": WEBHOOK,
    "message.bounced": {**WEBHOOK, "reason": "550 5.1.1 mailbox unavailable"},
    "message.complained": WEBHOOK,
    "customer.unsubscribed": {
        "customer_id": CUSTOMER,
        "channel": "email",
        "method": "one_click",
        "unsubscribed_at": "2026-03-05T09:30:00+00:00",
    },
}
"""Examples of our own events, by type name without ``dev.winback.``."""
