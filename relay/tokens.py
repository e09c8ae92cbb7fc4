"""Conversation-scoped client tokens: minted by the customer's backend, checked by every edge.

Tokens are JWTs (RFC 7519) that any stock library mints (docs/protocol.md "Tokens"): HS256 with
a shared secret, or RS256 / ES256 / EdDSA with a private key only the backend holds, so edges
verify with public keys and cannot mint. The claim ``conv`` names the one conversation the token
opens; ``exp`` is required; ``iat`` and ``nbf`` are checked when present; ``aud`` and ``iss`` when
the deployment configures them. Several keys are accepted at once, chosen by the header's ``kid``,
so keys rotate without refusing anyone (docs/operations.md "Rotating token keys").

PyJWT checks signatures and the registered claims, but it reads a claim with ``int()`` (so
``"exp": "9999999999"`` passes) and decodes base64 leniently (padding, ``+``/``/`` and stray bits
all give the same bytes). One token must have one spelling and one meaning, so this module checks
the encoding, the header and the claim types itself before PyJWT sees the token.

The pre-JWT format ``v1.<payload>.<signature>`` is still accepted while ``RELAY_TOKEN_ACCEPT_V1``
is on (the transition period, see docs/operations.md), parsed just as strictly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from relay.errors import (
    ConfigError,
    InvalidConversationId,
    TokenError,
    TokenExpired,
    TokenMissing,
    TokenNotYetValid,
    TokenWrongConversation,
)
from relay.keys import validate_conversation_id

log = structlog.get_logger(__name__)

CONVERSATION_CLAIM = "conv"
MAX_TTL_S = 7 * 24 * 3600
# Tolerated clock difference between the minting backend and the edges (RELAY_TOKEN_LEEWAY_S).
CLOCK_SKEW_S = 30
# A token is a header line, not a document: anything longer is refused before any decoding.
MAX_TOKEN_CHARS = 4096
ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
# Header members a relay token may carry. Anything else (crit, b64, jku, jwk, x5u, ...) asks the
# verifier for behaviour it does not have, so the token is refused rather than half-understood.
_HEADER_MEMBERS = frozenset({"alg", "typ", "kid"})
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_V1 = "v1"
_NUMERIC_CLAIMS = ("exp", "iat", "nbf")


@dataclass(frozen=True)
class TokenClaims:
    conversation_id: str
    issued_at: int | None
    expires_at: int
    key_id: str | None = None


@dataclass(frozen=True)
class VerificationKey:
    """One key an edge accepts, pinned to one algorithm: a token is verified with a key only under
    that key's algorithm, which is what defeats algorithm confusion (an HS256 token "signed" with
    an RSA public key's PEM as the secret)."""

    kid: str
    algorithm: str
    key: Any = field(repr=False)  # bytes for HS256, a cryptography public key otherwise


# --- encoding checks ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _strict_unb64(text: str) -> bytes:
    """Decode unpadded base64url, refusing every spelling but the canonical one."""
    if not _B64URL.match(text):
        raise TokenError("token is not canonical base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("token is not canonical base64url") from exc
    if _b64(data) != text:  # e.g. non-zero unused bits in the last character
        raise TokenError("token is not canonical base64url")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise TokenError("token has a duplicated member")
        result[key] = value
    return result


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenError("token part is not JSON") from exc
    if not isinstance(body, dict):
        raise TokenError("token part is not a JSON object")
    return body


def _refuse_constant(name: str) -> Any:
    raise TokenError(f"token holds {name}")


def _int_claim(claims: Mapping[str, Any], name: str) -> int | None:
    """A NumericDate as every stock library writes it: a JSON integer (booleans are not)."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise TokenError(f"claim {name} must be an integer")
    return value


# --- minting ------------------------------------------------------------------------------------


def mint_token(
    key: str | bytes | Any, conversation_id: str, *, ttl_s: int = 3600, now: float | None = None,
    kid: str | None = None, algorithm: str = "HS256", audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """Return a JWT that lets a client watch ``conversation_id`` for ``ttl_s`` seconds.

    ``key`` is the shared secret for HS256, or the private key (PEM or a cryptography key object)
    for RS256, ES256 and EdDSA. ``kid`` names the key in the edges' key set (rotation).
    """
    validate_conversation_id(conversation_id)
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be between 1 and {MAX_TTL_S}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {CONVERSATION_CLAIM: conversation_id, "iat": issued,
                              "exp": issued + ttl_s}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    if algorithm == "HS256":
        if len(key.encode() if isinstance(key, str) else key) < MIN_HS256_BYTES:
            raise ValueError(f"HS256 secrets need at least {MIN_HS256_BYTES} bytes")
    elif isinstance(key, str | bytes):
        key = load_private_key(key)
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def mint_v1_token(
    secret: str, conversation_id: str, *, ttl_s: int = 3600, now: float | None = None
) -> str:
    """A token in the pre-JWT format, for backends and tests of the transition period only."""
    validate_conversation_id(conversation_id)
    issued = int(time.time() if now is None else now)
    claims = {"c": conversation_id, "iat": issued, "exp": issued + ttl_s}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signed_part = f"{_V1}.{payload}"
    return f"{signed_part}.{_b64(_v1_sign(secret, signed_part))}"


def _v1_sign(secret: str, signed_part: str) -> bytes:
    return hmac.new(secret.encode(), signed_part.encode(), hashlib.sha256).digest()


def load_private_key(pem: str | bytes) -> Any:
    """A private key from PEM text (the backend's signing key; edges never need one)."""
    try:
        return load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("the signing key is not an unencrypted PEM private key") from exc


def algorithm_for_private_key(key: Any) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ConfigError("signing keys must be RSA, EC P-256 or Ed25519")


# --- verification -------------------------------------------------------------------------------


class TokenVerifier:
    """Checks tokens against a key set; one per edge, built from the settings."""

    def __init__(
        self, keys: Mapping[str, VerificationKey] | KeyRing, *, default_kid: str = "default",
        v1_secret: str | None = None, audience: str | None = None, issuer: str | None = None,
        leeway_s: int = CLOCK_SKEW_S,
    ) -> None:
        self._ring = keys if isinstance(keys, KeyRing) else KeyRing(dict(keys))
        self._default_kid = default_kid
        self._v1_secret = v1_secret
        self._audience = audience or None
        self._issuer = issuer or None
        self.leeway_s = leeway_s

    @classmethod
    def for_secret(cls, secret: str, *, kid: str = "default", accept_v1: bool = True,
                   leeway_s: int = CLOCK_SKEW_S) -> TokenVerifier:
        if len(secret.encode()) < MIN_HS256_BYTES:
            raise ValueError(f"HS256 secrets need at least {MIN_HS256_BYTES} bytes")
        key = VerificationKey(kid, "HS256", secret.encode())
        return cls({kid: key}, default_kid=kid, v1_secret=secret if accept_v1 else None,
                   leeway_s=leeway_s)

    def verify(self, token: str | None, conversation_id: str, *,
               now: float | None = None) -> TokenClaims:
        """Check encoding, signature, times and scope; raise a TokenError subclass naming the
        failure (its message is fixed text: it never quotes the token)."""
        if not token:
            raise TokenMissing("no token given")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("token is too long")
        current = time.time() if now is None else now
        if token.startswith(f"{_V1}.") and self._v1_secret is not None:
            claims = self._verify_v1(token, current)
        else:
            claims = self._verify_jwt(token, current)
        if claims.conversation_id != conversation_id:
            raise TokenWrongConversation("token is for another conversation")
        return claims

    def _check_times(self, exp: int | None, iat: int | None, nbf: int | None,
                     current: float) -> None:
        if exp is None:
            raise TokenError("token has no exp claim")
        if exp + self.leeway_s <= current:
            raise TokenExpired("token has expired")
        if iat is not None and iat > current + self.leeway_s:
            raise TokenNotYetValid("token is issued in the future")
        if nbf is not None and nbf > current + self.leeway_s:
            raise TokenNotYetValid("token is not valid yet")
        # A token that outlives MAX_TTL_S is a mistake or a leak waiting to happen.
        if exp > current + MAX_TTL_S + self.leeway_s:
            raise TokenError("token lifetime is too long")

    def _verify_jwt(self, token: str, current: float) -> TokenClaims:
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("token is malformed")
        header = _json_object(_strict_unb64(parts[0]))
        claims = _json_object(_strict_unb64(parts[1]))
        _strict_unb64(parts[2])
        key = self._key_for(header)
        exp, iat, nbf = (_int_claim(claims, name) for name in _NUMERIC_CLAIMS)
        conversation = claims.get(CONVERSATION_CLAIM)
        if not isinstance(conversation, str):
            raise TokenError(f"claim {CONVERSATION_CLAIM} must be a string")
        self._signature_and_registered_claims(token, key, current)
        self._check_times(exp, iat, nbf, current)
        _check_conversation(conversation)
        return TokenClaims(conversation, iat, exp or 0, key.kid)

    def _key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        if set(header) - _HEADER_MEMBERS:
            raise TokenError("token header has members the relay does not support")
        alg, kid = header.get("alg"), header.get("kid", self._default_kid)
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise TokenError("token algorithm is not accepted")
        if header.get("typ", "JWT") != "JWT" or not isinstance(kid, str):
            raise TokenError("token header is malformed")
        key = self._ring.get(kid)
        if key is None:
            raise TokenError("token key id is unknown")
        if key.algorithm != alg:
            raise TokenError("token algorithm does not match its key")
        return key

    def _signature_and_registered_claims(
        self, token: str, key: VerificationKey, current: float
    ) -> None:
        # Times are checked by _check_times against the same clock; PyJWT checks the signature,
        # aud and iss (each only when configured, and then required).
        required = ["exp"] + (["aud"] if self._audience else []) + (["iss"] if self._issuer else [])
        options: Any = {"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                        "require": required}
        try:
            jwt.decode(token, key.key, algorithms=[key.algorithm], audience=self._audience,
                       issuer=self._issuer, options=options)
        except jwt.InvalidSignatureError as exc:
            raise TokenError("token signature does not match") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError,
                jwt.MissingRequiredClaimError) as exc:
            raise TokenError("token audience or issuer is not accepted") from exc
        except jwt.PyJWTError as exc:  # any other refusal; its text may quote the token
            raise TokenError("token is malformed") from exc

    def _verify_v1(self, token: str, current: float) -> TokenClaims:
        assert self._v1_secret is not None
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("token is malformed")
        payload = _strict_unb64(parts[1])
        signature = _strict_unb64(parts[2])
        if not hmac.compare_digest(signature, _v1_sign(self._v1_secret, f"{_V1}.{parts[1]}")):
            raise TokenError("token signature does not match")
        body = _json_object(payload)
        if set(body) != {"c", "iat", "exp"}:
            raise TokenError("v1 token payload must hold exactly c, iat and exp")
        conversation = body["c"]
        if not isinstance(conversation, str):
            raise TokenError("claim c must be a string")
        exp, iat = _int_claim(body, "exp"), _int_claim(body, "iat")
        self._check_times(exp, iat, None, current)
        _check_conversation(conversation)
        return TokenClaims(conversation, iat, exp or 0, None)


def _check_conversation(conversation: str) -> None:
    try:
        validate_conversation_id(conversation)
    except InvalidConversationId as exc:
        raise TokenError("token names an invalid conversation id") from exc


def verify_token(
    secret: str, token: str | None, conversation_id: str, *, now: float | None = None
) -> TokenClaims:
    """Check an HS256 token (or a v1 token) against one shared secret."""
    return TokenVerifier.for_secret(secret).verify(token, conversation_id, now=now)


# --- key sets -----------------------------------------------------------------------------------


class KeyRing:
    """The verification keys by kid, optionally backed by a JWKS file that is re-read when it
    changes (checked at most once a second), so a key is added or retired without a restart."""

    RECHECK_S = 1.0

    def __init__(self, static: dict[str, VerificationKey], path: str = "") -> None:
        self._static = static
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._keys = dict(static)
        self.reload_error: str | None = None
        if path:
            self._reload(strict=True)

    def get(self, kid: str) -> VerificationKey | None:
        if self._path and time.monotonic() - self._checked >= self.RECHECK_S:
            self._reload(strict=False)
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        return sorted(self._keys)

    def _reload(self, *, strict: bool) -> None:
        self._checked = time.monotonic()
        stamp: tuple[int, int] | None = None
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            with open(self._path, "rb") as source:
                loaded = parse_key_set(source.read())
            clash = set(loaded) & set(self._static)
            if clash:
                raise ConfigError(f"kid {sorted(clash)[0]!r} is also RELAY_TOKEN_KID")
        except (OSError, ConfigError) as exc:
            if strict:
                raise ConfigError(f"RELAY_TOKEN_KEYS_FILE: {_describe(exc)}") from exc
            # Keep the keys that work; report a broken edit once, not once a second.
            self._stamp = stamp
            if self.reload_error != _describe(exc):
                self.reload_error = _describe(exc)
                log.warning("token_keys_reload_failed", error=self.reload_error)
            return
        self._stamp, self.reload_error = stamp, None
        self._keys = {**self._static, **loaded}
        log.info("edge_token_keys", kids=self.kids())


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def parse_key_set(data: bytes) -> dict[str, VerificationKey]:
    """Keys from a JWK Set (RFC 7517): ``{"keys": [{"kid", "alg", ...}, ...]}``.

    Every key needs ``kid`` and ``alg`` (the algorithm is pinned per key). Public keys are JWKs
    (``kty`` RSA, EC or OKP) or, for convenience, ``{"kid", "alg", "pem"}`` with a PEM public key;
    HS256 secrets are ``kty: "oct"`` keys. A private key in the file is refused: an edge that can
    mint is exactly what asymmetric keys are there to avoid. Error texts never quote key material.
    """
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise ConfigError("not JSON") from exc
    entries = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise ConfigError('expected a JWK Set: {"keys": [...]}')
    keys: dict[str, VerificationKey] = {}
    for index, entry in enumerate(entries):
        key = _parse_key(entry, index)
        if key.kid in keys:
            raise ConfigError(f"kid {key.kid!r} appears twice")
        keys[key.kid] = key
    return keys


def _parse_key(entry: Any, index: int) -> VerificationKey:
    if not isinstance(entry, dict):
        raise ConfigError(f"key {index} is not an object")
    kid, alg = entry.get("kid"), entry.get("alg")
    if not isinstance(kid, str) or not kid:
        raise ConfigError(f"key {index} has no kid")
    if alg not in ALGORITHMS:
        raise ConfigError(f"key {kid!r}: alg must be one of {', '.join(ALGORITHMS)}")
    if entry.get("use", "sig") != "sig":
        raise ConfigError(f"key {kid!r} is not a signing key (use)")
    if "pem" in entry:
        return VerificationKey(kid, alg, _public_pem(entry["pem"], kid, alg))
    if alg == "HS256":
        return VerificationKey(kid, alg, _oct_secret(entry, kid))
    if "d" in entry:
        raise ConfigError(f"key {kid!r} is a private key; edges need only the public key")
    try:
        public = jwt.PyJWK(entry, algorithm=alg).key
    except jwt.PyJWTError as exc:
        raise ConfigError(f"key {kid!r} is not a valid {alg} JWK") from exc
    _check_key_type(public, kid, alg)
    return VerificationKey(kid, alg, public)


def _oct_secret(entry: Mapping[str, Any], kid: str) -> bytes:
    value = entry.get("k")
    if entry.get("kty") != "oct" or not isinstance(value, str):
        raise ConfigError(f"key {kid!r}: HS256 keys are kty oct with k")
    try:
        secret = _strict_unb64(value)
    except TokenError as exc:
        raise ConfigError(f"key {kid!r}: k is not base64url") from exc
    if len(secret) < MIN_HS256_BYTES:
        raise ConfigError(f"key {kid!r}: HS256 secrets need at least {MIN_HS256_BYTES} bytes")
    return secret


# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash.
MIN_HS256_BYTES = 32


def _public_pem(pem: Any, kid: str, alg: str) -> Any:
    if not isinstance(pem, str):
        raise ConfigError(f"key {kid!r}: pem must be a string")
    if "PRIVATE KEY" in pem:
        raise ConfigError(f"key {kid!r} is a private key; edges need only the public key")
    try:
        public = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"key {kid!r}: pem is not a PEM public key") from exc
    _check_key_type(public, kid, alg)
    return public


_KEY_TYPES: dict[str, Any] = {
    "RS256": rsa.RSAPublicKey, "ES256": ec.EllipticCurvePublicKey,
    "EdDSA": ed25519.Ed25519PublicKey,
}


def _check_key_type(public: Any, kid: str, alg: str) -> None:
    if not isinstance(public, _KEY_TYPES[alg]):
        raise ConfigError(f"key {kid!r} does not fit alg {alg}")
    if alg == "ES256" and not isinstance(public.curve, ec.SECP256R1):
        raise ConfigError(f"key {kid!r}: ES256 needs a P-256 key")
    if alg == "RS256" and public.key_size < 2048:
        raise ConfigError(f"key {kid!r}: RS256 keys need at least 2048 bits")


def verifier_from_settings(settings: Any) -> TokenVerifier:
    """The edge's verifier: RELAY_TOKEN_SECRET under RELAY_TOKEN_KID, plus the keys file."""
    static: dict[str, VerificationKey] = {}
    secret = settings.token_secret
    if secret:
        static[settings.token_kid] = VerificationKey(settings.token_kid, "HS256", secret.encode())
    ring = KeyRing(static, settings.token_keys_file)
    if not settings.token_keys_file:
        log.info("edge_token_keys", kids=ring.kids())
    if not ring.kids():
        raise ConfigError("no token keys: set RELAY_TOKEN_SECRET or RELAY_TOKEN_KEYS_FILE")
    return TokenVerifier(
        ring, default_kid=settings.token_kid,
        v1_secret=secret if secret and settings.token_accept_v1 else None,
        audience=settings.token_audience, issuer=settings.token_issuer,
        leeway_s=settings.token_leeway_s,
    )


def mint_with_settings(settings: Any, conversation_id: str, *, ttl_s: int | None = None,
                       kid: str | None = None, key_file: str | None = None) -> str:
    """What ``relay token`` prints: a token for this deployment's keys (a backend's own code
    mints with any JWT library instead, see docs/protocol.md)."""
    common: dict[str, Any] = {"ttl_s": ttl_s or settings.token_ttl_s, "kid": kid,
                              "audience": settings.token_audience or None,
                              "issuer": settings.token_issuer or None}
    try:
        return _mint_for(settings, conversation_id, common, kid, key_file)
    except ValueError as exc:  # a lifetime or id out of range: the caller's input
        raise ConfigError(str(exc)) from exc


def _mint_for(settings: Any, conversation_id: str, common: dict[str, Any], kid: str | None,
              key_file: str | None) -> str:
    if key_file:
        try:
            with open(key_file, "rb") as source:
                private = load_private_key(source.read())
        except OSError as exc:
            raise ConfigError(f"--key-file: {_describe(exc)}") from exc
        return mint_token(private, conversation_id, algorithm=algorithm_for_private_key(private),
                          **common)
    secret: str | bytes | None = None
    if kid and kid != settings.token_kid and settings.token_keys_file:
        key = KeyRing({}, settings.token_keys_file).get(kid)
        if key is None or key.algorithm != "HS256":
            raise ConfigError(f"RELAY_TOKEN_KEYS_FILE has no HS256 secret with kid {kid!r}")
        secret = key.key
    elif kid and kid != settings.token_kid:
        raise ConfigError(f"no secret for kid {kid!r}: RELAY_TOKEN_SECRET is kid "
                          f"{settings.token_kid!r} (RELAY_TOKEN_KID)")
    return mint_token(secret or settings.require_secret(), conversation_id, **common)
