"""Domain and body validation of the config API (pure functions; no database needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from retailcrm_service.storage.config_writes import ConfigIn, validate_domain

ACCEPTED = {
    "https://acme.retailcrm.ru": "https://acme.retailcrm.ru",
    "https://ACME.retailcrm.pro/": "https://acme.retailcrm.pro",
    "https://shop-1.retailcrm.es": "https://shop-1.retailcrm.es",
    "https://acme.simla.com": "https://acme.simla.com",
    "  https://acme.simla.io  ": "https://acme.simla.io",
}
REFUSED = [
    "acme.retailcrm.ru",
    "http://acme.retailcrm.ru",
    "https://retailcrm.ru",
    "https://acme.retailcrm.ru.evil.com",
    "https://evilretailcrm.ru",
    "https://a.b.retailcrm.ru",
    "https://acme.retailcrm.ru:8443",
    "https://acme.retailcrm.ru/api/v5",
    "https://acme.retailcrm.ru/#x",
    "https://u:p@acme.retailcrm.ru",
    "ftp://acme.retailcrm.ru",
    "http://127.0.0.1",
    "http://localhost:8090",
    "",
]


@pytest.mark.parametrize("raw", sorted(ACCEPTED))
def test_account_urls_are_accepted_and_normalised(raw: str) -> None:
    assert validate_domain(raw, allow_http=False) == ACCEPTED[raw]


@pytest.mark.parametrize("raw", REFUSED)
def test_other_urls_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        validate_domain(raw, allow_http=True)


def test_loopback_http_needs_the_switch() -> None:
    with pytest.raises(ValueError, match="RETAILCRM_ALLOW_HTTP"):
        validate_domain("http://127.0.0.1:8090", allow_http=False)
    assert validate_domain("http://127.0.0.1:8090/", allow_http=True) == "http://127.0.0.1:8090"


def test_masked_or_empty_key_means_keep_the_stored_one() -> None:
    for key in (None, "", "***Gh5a"):
        body = ConfigIn.model_validate({"domain": "https://acme.retailcrm.ru", "api_key": key})
        assert body.api_key is None
    with pytest.raises(ValidationError):
        ConfigIn.model_validate({"domain": "https://acme.retailcrm.ru", "api_key": "k" * 200})
