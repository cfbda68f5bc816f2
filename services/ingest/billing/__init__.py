"""Billing connectors: Stripe, Paddle Billing and Chargebee webhooks in.

Each provider's webhook is verified by its own scheme (``auth.py``), mapped by a pure function
over the provider's JSON (``stripe.py``, ``paddle.py``, ``chargebee.py``) into one of our
inbound lifecycle events, and put through the same pipeline as ``POST /v1/events``
(``routes.py``): inbox dedupe on the provider's event id, the provider's event time.
"""
