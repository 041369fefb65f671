"""API keys at rest: AES-GCM bound to the enterprise; plaintext passes through."""

from __future__ import annotations

import pytest

from retailcrm_service.security.key_crypto import DecryptionError, decrypt_api_key, encrypt_api_key
from retailcrm_service.security.secrets import Secret

KEY = Secret("a-secret-key-of-some-length")
API_KEY = "Xk2PqL9vT4mZ8sW1cR7yB3nD6fH0jG5a"


def test_round_trip_hides_the_key_and_recovers_it() -> None:
    stored = encrypt_api_key(API_KEY, enterprise_number="0367", secret_key=KEY)
    assert stored.startswith("enc:v1:")
    assert API_KEY not in stored
    assert (
        decrypt_api_key(stored, enterprise_number="0367", secret_key=KEY).get_secret_value()
        == API_KEY
    )


def test_each_encryption_uses_a_fresh_nonce() -> None:
    a = encrypt_api_key(API_KEY, enterprise_number="0367", secret_key=KEY)
    b = encrypt_api_key(API_KEY, enterprise_number="0367", secret_key=KEY)
    assert a != b


def test_ciphertext_moved_to_another_enterprise_does_not_decrypt() -> None:
    stored = encrypt_api_key(API_KEY, enterprise_number="0367", secret_key=KEY)
    with pytest.raises(DecryptionError):
        decrypt_api_key(stored, enterprise_number="0368", secret_key=KEY)


def test_tampered_ciphertext_or_wrong_key_or_no_key_is_refused() -> None:
    stored = encrypt_api_key(API_KEY, enterprise_number="0367", secret_key=KEY)
    flipped = stored[:-2] + ("A" if stored[-2] != "A" else "B") + stored[-1]
    with pytest.raises(DecryptionError):
        decrypt_api_key(flipped, enterprise_number="0367", secret_key=KEY)
    with pytest.raises(DecryptionError):
        decrypt_api_key(stored, enterprise_number="0367", secret_key=Secret("other-key-entirely"))
    with pytest.raises(DecryptionError):
        decrypt_api_key(stored, enterprise_number="0367", secret_key=None)
    with pytest.raises(DecryptionError):
        decrypt_api_key("enc:v1:!!notbase64", enterprise_number="0367", secret_key=KEY)


def test_without_a_secret_key_keys_are_stored_and_read_as_given() -> None:
    assert encrypt_api_key(API_KEY, enterprise_number="0367", secret_key=None) == API_KEY
    read = decrypt_api_key(API_KEY, enterprise_number="0367", secret_key=KEY)
    assert read.get_secret_value() == API_KEY
