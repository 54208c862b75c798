"""Webhooks: the event log delivered as signed JSON POSTs, at least once, in ``seq`` order."""

from gpusm.notify.deliverer import Encode, Sender, WebhookNotifier, WebhookWorker
from gpusm.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from gpusm.notify.webhook import HttpSender, PostResult

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Encode",
    "HttpSender",
    "PostResult",
    "Sender",
    "WebhookNotifier",
    "WebhookWorker",
    "sign",
    "verify",
]
