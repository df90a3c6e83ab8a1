"""Prometheus metrics of webhook delivery (server.webhooks), in a service's registry
(server.metrics.Metrics.registry).

The `url` label is the configured callback URL without its query string (which may carry a
credential), so its values are bounded by the configuration. Counters count in the process
that did the work: the feeder (one per database) counts events queued, each process counts
what it delivered; add them up across processes.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Delivery lag (event time to a 2xx), seconds: from a receiver that answers at once up to a
# day-long outage.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)


def url_label(url: str) -> str:
    """The URL as a label: scheme, host and path, no query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class WebhookMetrics:
    """Events queued, deliveries, retries, parkings, backlog and lag, per callback URL."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter(
            "follow_webhook_events",
            "Outbox events read for a callback URL by the feeder, by kind (follow, unfollow,"
            " account_deleted; an account deletion sends no webhook).",
            ["url", "kind"],
            registry=r,
        )
        self.delivered = Counter(
            "follow_webhook_delivered",
            "Webhooks answered with a 2xx.",
            ["url"],
            registry=r,
        )
        self.retried = Counter(
            "follow_webhook_retried",
            "Webhook attempts that failed (a non-2xx, a timeout, no connection) and will be"
            " tried again.",
            ["url"],
            registry=r,
        )
        self.parked = Counter(
            "follow_webhook_parked",
            "Webhooks given up after the retry budget: kept in webhook_deliveries (parked_at"
            " set), not sent again.",
            ["url"],
            registry=r,
        )
        self.backlog = Gauge(
            "follow_webhook_backlog",
            "Webhooks queued and not delivered yet (parked ones excluded), as last counted.",
            ["url"],
            registry=r,
        )
        self.parked_now = Gauge(
            "follow_webhook_parked_rows",
            "Parked webhooks still kept (until --event-retention), as last counted.",
            ["url"],
            registry=r,
        )
        self.lag = Histogram(
            "follow_webhook_delivery_lag_seconds",
            "Time from an event's commit time to its webhook's 2xx.",
            ["url"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.outbox_deleted = Counter(
            "follow_events_deleted",
            "Outbox events deleted by retention (--event-retention).",
            registry=r,
        )
