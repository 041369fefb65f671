"""Glue between the platform's call services and ``vochi_crm_client``.

- ``adapters.translate``: host webhook payloads -> ``CallEvent`` (every host quirk lives there);
- ``adapters.fastapi``: a lifespan-owned ``CrmClient``, ``/health`` and ``/stats``, a dependency;
- ``adapters.call_service``: the reference call service, ``vochi-call-service``.

No policy lives here: what to deliver, when and how is the library's business.
"""

from adapters.translate import HOST_EVENTS, Skipped, Translator, normalise_payload, translate

__all__ = ["HOST_EVENTS", "Skipped", "Translator", "normalise_payload", "translate"]
