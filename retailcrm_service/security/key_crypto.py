"""Authenticated encryption of RetailCRM API keys at rest (AES-256-GCM, RETAILCRM_SECRET_KEY).

Stored form: ``enc:v1:<urlsafe base64 of nonce(12) || ciphertext+tag>``. The enterprise number is
bound in as associated data, so a ciphertext copied to another enterprise does not decrypt.
Values without the prefix are plaintext written by the platform or before a key was set; they are
read as they are.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from retailcrm_service.security.secrets import Secret

PREFIX = "enc:v1:"
_NONCE_BYTES = 12


class DecryptionError(Exception):
    """A stored value is encrypted but cannot be decrypted (wrong or missing key, or tampered)."""


def _derive(secret_key: Secret) -> bytes:
    # Any length of RETAILCRM_SECRET_KEY works; a domain-separated SHA-256 gives the 256-bit key.
    return hashlib.sha256(
        b"vochi-retailcrm-api-key-v1\0" + secret_key.get_secret_value().encode()
    ).digest()


def _aad(enterprise_number: str) -> bytes:
    return b"retailcrm:" + enterprise_number.encode()


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


def encrypt_api_key(api_key: str, *, enterprise_number: str, secret_key: Secret | None) -> str:
    """The value to store: encrypted when a secret key is configured, else ``api_key`` unchanged."""
    if secret_key is None:
        return api_key
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(_derive(secret_key)).encrypt(nonce, api_key.encode(), _aad(enterprise_number))
    return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def decrypt_api_key(stored: str, *, enterprise_number: str, secret_key: Secret | None) -> Secret:
    """The API key from its stored form; raises ``DecryptionError`` when it cannot be recovered."""
    if not is_encrypted(stored):
        return Secret(stored)
    if secret_key is None:
        raise DecryptionError("the API key is encrypted but RETAILCRM_SECRET_KEY is not set")
    try:
        raw = base64.urlsafe_b64decode(stored[len(PREFIX) :].encode("ascii"))
        nonce, sealed = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
        plain = AESGCM(_derive(secret_key)).decrypt(nonce, sealed, _aad(enterprise_number))
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError("the stored API key cannot be decrypted with this key") from exc
    return Secret(plain.decode())
