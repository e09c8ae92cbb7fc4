"""Client tokens as pure logic: JWT with HS256 and public keys, rotation by kid, strict parsing of
JWT and v1 tokens, the keys file (no server needed)."""

from __future__ import annotations

import base64
import json
import os
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.errors import (
    ConfigError,
    TokenError,
    TokenExpired,
    TokenMissing,
    TokenNotYetValid,
    TokenWrongConversation,
)
from relay.settings import Settings
from relay.tokens import (
    KeyRing,
    TokenVerifier,
    VerificationKey,
    mint_token,
    mint_v1_token,
    mint_with_settings,
    parse_key_set,
    verifier_from_settings,
)

SECRET = "unit-secret-0123456789-0123456789"
NOW = 1_800_000_000


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict, claims: dict, secret: str = SECRET) -> str:
    """A correctly signed HS256 JWT with exactly the given JSON (PyJWT would normalise it)."""
    import hashlib
    import hmac

    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(sig)}"


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private) -> str:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_hs256_round_trip_and_scope():
    verifier = TokenVerifier.for_secret(SECRET)
    token = mint_token(SECRET, "c-1", ttl_s=60, now=NOW)
    claims = verifier.verify(token, "c-1", now=NOW + 10)
    assert (claims.conversation_id, claims.issued_at, claims.expires_at) == ("c-1", NOW, NOW + 60)
    plain = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_iat": False})
    assert plain["conv"] == "c-1"  # a plain JWT any library reads
    with pytest.raises(TokenWrongConversation):
        verifier.verify(token, "c-2", now=NOW)
    with pytest.raises(TokenMissing):
        verifier.verify("", "c-1")
    with pytest.raises(TokenExpired):
        verifier.verify(token, "c-1", now=NOW + 60 + 30)
    assert verifier.verify(token, "c-1", now=NOW + 60 + 29)  # within the documented skew


@pytest.mark.parametrize("claims, error", [
    ({"conv": "c-1", "iat": NOW + 31, "exp": NOW + 600}, TokenNotYetValid),
    ({"conv": "c-1", "nbf": NOW + 31, "exp": NOW + 600}, TokenNotYetValid),
    ({"conv": "c-1", "iat": NOW}, TokenError),                      # no exp
    ({"conv": "c-1", "exp": str(NOW + 600)}, TokenError),           # exp as a string
    ({"conv": "c-1", "exp": NOW + 600.5}, TokenError),              # exp as a float
    ({"conv": "c-1", "exp": True}, TokenError),
    ({"conv": "c-1", "exp": NOW + 600, "iat": "0"}, TokenError),
    ({"conv": 5, "exp": NOW + 600}, TokenError),                    # conversation as a number
    ({"conv": ["c-1"], "exp": NOW + 600}, TokenError),
    ({"c": "c-1", "exp": NOW + 600}, TokenError),                   # the v1 claim name
    ({"conv": "c{1}", "exp": NOW + 600}, TokenError),
    ({"conv": "c-1", "exp": NOW + 8 * 86400}, TokenError),          # longer than 7 days
    ({"conv": "c-1", "exp": NOW + 600, "sub": 7}, TokenError),
])
def test_claims_are_strictly_typed(claims, error):
    token = hand_made({"alg": "HS256", "typ": "JWT"}, claims)
    with pytest.raises(error):
        TokenVerifier.for_secret(SECRET).verify(token, "c-1", now=NOW)


def test_future_dated_within_skew_is_accepted():
    token = hand_made({"alg": "HS256"}, {"conv": "c-1", "iat": NOW + 29, "exp": NOW + 600})
    assert TokenVerifier.for_secret(SECRET).verify(token, "c-1", now=NOW).issued_at == NOW + 29


@pytest.mark.parametrize("header", [
    {"alg": "none"}, {"alg": "HS512"}, {"alg": "RS256"}, {"alg": "HS256", "crit": ["exp"]},
    {"alg": "HS256", "b64": False}, {"alg": "HS256", "typ": "JWE"}, {"alg": "HS256", "kid": 3},
    {"alg": "HS256", "kid": "unknown"}, {"alg": "HS256", "jku": "https://evil.example/k"},
])
def test_headers_outside_the_rules_are_refused(header):
    token = hand_made(header, {"conv": "c-1", "exp": NOW + 600})
    with pytest.raises(TokenError):
        TokenVerifier.for_secret(SECRET).verify(token, "c-1", now=NOW)


def test_unsigned_token_is_refused():
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps({"conv": "c-1", "exp": NOW + 600}).encode())
    for token in (f"{head}.{body}.", f"{head}.{body}"):
        with pytest.raises(TokenError):
            TokenVerifier.for_secret(SECRET).verify(token, "c-1", now=NOW)


def respellings(token: str) -> list[str]:
    """The same bytes written differently: padding, the standard alphabet, unused bits."""
    head, body, sig = token.split(".")
    raw_sig = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    standard = base64.b64encode(raw_sig).rstrip(b"=").decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    spare = alphabet[last ^ 1]  # the unused low bits of the final character
    out = [f"{head}.{body}.{sig}=", f"{head}=.{body}.{sig}", f"{head}.{body}.{sig[:-1]}{spare}",
           f" {token}", f"{token}\n", f"{head}.{body}.{sig[:4]}\n{sig[4:]}"]
    if standard != sig:
        out.append(f"{head}.{body}.{standard}")
    return out


def test_one_token_has_one_spelling():
    token = mint_token(SECRET, "c-1", ttl_s=600, now=NOW)
    verifier = TokenVerifier.for_secret(SECRET)
    assert verifier.verify(token, "c-1", now=NOW)
    for other in respellings(token):
        with pytest.raises(TokenError):
            verifier.verify(other, "c-1", now=NOW)


def test_duplicate_json_members_are_refused():
    signing = (b64(b'{"alg":"HS256","alg":"none"}') + "."
               + b64(f'{{"conv":"c-1","exp":{NOW + 600},"conv":"c-2"}}'.encode()))
    import hashlib
    import hmac

    token = f"{signing}.{b64(hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest())}"
    with pytest.raises(TokenError):
        TokenVerifier.for_secret(SECRET).verify(token, "c-1", now=NOW)


@pytest.mark.parametrize("make", ["rsa", "ec", "ed25519"])
def test_public_keys_verify_without_being_able_to_mint(make, rsa_key):
    private = {"rsa": lambda: rsa_key, "ec": lambda: ec.generate_private_key(ec.SECP256R1()),
               "ed25519": ed25519.Ed25519PrivateKey.generate}[make]()
    alg = {"rsa": "RS256", "ec": "ES256", "ed25519": "EdDSA"}[make]
    keys = parse_key_set(json.dumps({"keys": [{"kid": "pub", "alg": alg,
                                               "pem": public_pem(private)}]}).encode())
    verifier = TokenVerifier(keys, default_kid="pub")
    token = mint_token(private, "c-1", algorithm=alg, kid="pub", ttl_s=60, now=NOW)
    assert verifier.verify(token, "c-1", now=NOW).key_id == "pub"
    # The same public key as a JWK works too.
    jwk = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(private.public_key()))
    assert TokenVerifier(parse_key_set(json.dumps(
        {"keys": [{**jwk, "kid": "pub", "alg": alg}]}).encode())).verify(token, "c-1", now=NOW)
    # A token signed by another private key of the same type is refused.
    with pytest.raises(TokenError):
        verifier.verify(mint_token(SECRET, "c-1", kid="pub", now=NOW), "c-1", now=NOW)


def test_algorithm_confusion_is_refused(rsa_key):
    """An HS256 token whose 'secret' is the RSA public key's PEM: the classic forgery."""
    pem = public_pem(rsa_key)
    keys = parse_key_set(json.dumps({"keys": [{"kid": "pub", "alg": "RS256", "pem": pem}]})
                         .encode())
    verifier = TokenVerifier(keys, default_kid="pub")
    forged = hand_made({"alg": "HS256", "kid": "pub"}, {"conv": "c-1", "exp": NOW + 600},
                       secret=pem)
    with pytest.raises(TokenError, match="algorithm does not match"):
        verifier.verify(forged, "c-1", now=NOW)


def test_rotation_by_kid():
    old, new = SECRET, "another-secret-abcdefghij-0123456789"
    ring = {"k1": VerificationKey("k1", "HS256", old.encode()),
            "k2": VerificationKey("k2", "HS256", new.encode())}
    verifier = TokenVerifier(ring, default_kid="k1")
    assert verifier.verify(mint_token(old, "c", now=NOW), "c", now=NOW).key_id == "k1"
    assert verifier.verify(mint_token(old, "c", kid="k1", now=NOW), "c", now=NOW).key_id == "k1"
    assert verifier.verify(mint_token(new, "c", kid="k2", now=NOW), "c", now=NOW).key_id == "k2"
    with pytest.raises(TokenError):  # right secret, wrong kid
        verifier.verify(mint_token(new, "c", kid="k1", now=NOW), "c", now=NOW)


def test_keys_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "keys.json"
    secret = b"x" * 32
    path.write_text(json.dumps({"keys": [{"kid": "a", "alg": "HS256", "kty": "oct",
                                          "k": b64(secret)}]}))
    ring = KeyRing({}, str(path))
    assert ring.kids() == ["a"]
    path.write_text(json.dumps({"keys": [{"kid": "b", "alg": "HS256", "kty": "oct",
                                          "k": b64(secret)}]}))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    ring._checked = 0.0  # skip the once-a-second pause
    assert ring.get("b") is not None and ring.get("a") is None
    path.write_text("not json")  # a broken edit keeps the working keys
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    ring._checked = 0.0
    assert ring.get("b") is not None and ring.reload_error == "not JSON"
    path.write_text(json.dumps({"keys": [{"kid": "c", "alg": "HS256", "kty": "oct",
                                          "k": b64(secret)}]}))  # fixed: taken up
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 3 * 10**9))
    ring._checked = 0.0
    assert ring.get("c") is not None and ring.reload_error is None


@pytest.mark.parametrize("entry, message", [
    ({"kid": "a", "alg": "HS256", "kty": "oct", "k": b64(b"short")}, "at least 32"),
    ({"alg": "HS256", "kty": "oct", "k": b64(b"x" * 32)}, "no kid"),
    ({"kid": "a", "kty": "oct", "k": b64(b"x" * 32)}, "alg must be"),
    ({"kid": "a", "alg": "none"}, "alg must be"),
    ({"kid": "a", "alg": "RS256", "pem": "-----BEGIN PRIVATE KEY-----\n..."}, "private key"),
    ({"kid": "a", "alg": "ES256", "kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"},
     "private key"),
])
def test_bad_key_files_are_clear_and_quote_no_key(entry, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_key_set(json.dumps({"keys": [entry]}).encode())
    assert b64(b"x" * 32) not in str(caught.value)


def test_v1_tokens_during_the_transition():
    verifier = TokenVerifier.for_secret(SECRET)
    token = mint_v1_token(SECRET, "c-1", ttl_s=60, now=NOW)
    assert verifier.verify(token, "c-1", now=NOW).conversation_id == "c-1"
    with pytest.raises(TokenError):
        TokenVerifier.for_secret(SECRET, accept_v1=False).verify(token, "c-1", now=NOW)
    with pytest.raises(TokenExpired):
        verifier.verify(token, "c-1", now=NOW + 90)
    for other in respellings(token):
        with pytest.raises(TokenError):
            verifier.verify(other, "c-1", now=NOW)


@pytest.mark.parametrize("payload, error", [
    ({"c": "c-1", "iat": NOW + 3600, "exp": NOW + 7200}, TokenNotYetValid),  # an hour ahead
    ({"c": "c-1", "iat": NOW, "exp": str(NOW + 60)}, TokenError),
    ({"c": 5, "iat": NOW, "exp": NOW + 60}, TokenError),
    ({"c": "c-1", "exp": NOW + 60}, TokenError),
    ({"c": "c-1", "iat": NOW, "exp": NOW + 60, "x": 1}, TokenError),
])
def test_v1_parsing_is_strict(payload, error):
    import hashlib
    import hmac

    signed = "v1." + b64(json.dumps(payload).encode())
    token = f"{signed}.{b64(hmac.new(SECRET.encode(), signed.encode(), hashlib.sha256).digest())}"
    with pytest.raises(error):
        TokenVerifier.for_secret(SECRET).verify(token, "c-1", now=NOW)


def test_audience_and_issuer_when_configured():
    verifier = TokenVerifier({"default": VerificationKey("default", "HS256", SECRET.encode())},
                             audience="relay", issuer="backend")
    good = mint_token(SECRET, "c", audience="relay", issuer="backend", now=NOW)
    assert verifier.verify(good, "c", now=NOW)
    for bad in (mint_token(SECRET, "c", now=NOW),
                mint_token(SECRET, "c", audience="other", issuer="backend", now=NOW),
                mint_token(SECRET, "c", audience="relay", issuer="other", now=NOW)):
        with pytest.raises(TokenError):
            verifier.verify(bad, "c", now=NOW)
    # Not configured: a token naming an audience is not for this relay.
    with pytest.raises(TokenError):
        TokenVerifier.for_secret(SECRET).verify(good, "c", now=NOW)


def test_settings_build_the_key_set_and_mint(tmp_path, rsa_key):
    pem_path = tmp_path / "signing.pem"
    pem_path.write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"kid": "rsa-1", "alg": "RS256", "pem": public_pem(rsa_key)},
        {"kid": "hs-2", "alg": "HS256", "kty": "oct", "k": b64(b"n" * 32)}]}))
    settings = Settings(token_secret=SECRET, token_keys_file=str(keys))
    verifier = verifier_from_settings(settings)
    for kid, key_file in (("rsa-1", str(pem_path)), ("hs-2", None), (None, None)):
        token = mint_with_settings(settings, "c-9", kid=kid, key_file=key_file)
        assert verifier.verify(token, "c-9").key_id == (kid or "default")
    with pytest.raises(ConfigError):
        mint_with_settings(settings, "c-9", kid="nope")
    with pytest.raises(ConfigError, match="no token keys"):
        verifier_from_settings(Settings())
