"""Provider adapters: one per API, each over an injected ``httpx.AsyncClient``.

Idempotency per provider (the delivery row is the guarantee everywhere; these add to it):

- SendGrid, Postmark: no idempotency key in the API; ours travels in ``custom_args`` /
  ``Metadata`` and comes back in their webhooks.
- Twilio: ``I-Twilio-Idempotency-Token`` header, best effort (not documented for the REST API).
- HubSpot: none; optionally a unique-valued task property (``idempotency_property``).
- Webhook: our own protocol, ``Idempotency-Key`` header and body ``id``.
"""

from services.dispatcher.providers.base import (
    CrmTaskDetails,
    OutboundMessage,
    Provider,
    SendResult,
    parse_retry_after,
)
from services.dispatcher.providers.hubspot import HubSpotTaskProvider
from services.dispatcher.providers.postmark import PostmarkProvider
from services.dispatcher.providers.sendgrid import SendGridProvider
from services.dispatcher.providers.twilio import TwilioProvider
from services.dispatcher.providers.webhook import WebhookProvider

__all__ = [
    "CrmTaskDetails",
    "HubSpotTaskProvider",
    "OutboundMessage",
    "PostmarkProvider",
    "Provider",
    "SendGridProvider",
    "SendResult",
    "TwilioProvider",
    "WebhookProvider",
    "parse_retry_after",
]
