"""Who a client is and what it may do: JWT validation and the anonymous rules. Pure.

With ``GATEWAY_JWT_SECRET`` (HS256) or ``GATEWAY_JWT_PUBLIC_KEY_FILE`` (RS256/ES256) set,
every client needs a token; its claims ``channels`` and ``publish`` (lists of glob patterns)
say where it may subscribe and publish, and ``subs`` (channel names) where it is subscribed
at connect without asking. Without either, clients are anonymous and get the
``GATEWAY_ANONYMOUS_*`` patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt
import msgspec

from gateway.access import Access, personal_channel
from publisher.control import USER_MAX_LENGTH
from publisher.envelope import is_valid_channel

__all__ = ["AuthError", "Authenticator", "Identity", "bearer_token"]

#: Algorithms per kind of key; a token may never choose its own (no "none", no HS with a
#: public key as the secret).
SECRET_ALGORITHMS = ("HS256",)
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")


#: The largest ``info`` claim, encoded: it is stored and sent with every presence entry.
MAX_INFO_BYTES = 1024


class AuthError(Exception):
    """The handshake is refused with HTTP 401; the message says why, without secrets."""


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str | None  # None: anonymous
    access: Access
    expires_at: float | None = None  # unix seconds; the connection closes with 4001 then
    subs: tuple[str, ...] = ()  # the token's server-side subscriptions, made at connect
    personal: str | None = None  # the user's personal channel, if ``sub`` makes one
    info: bytes | None = None  # the token's public ``info`` claim, as JSON, shown in presence


class Authenticator:
    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        max_token_bytes: int = 8192,
        anonymous: Access,
    ) -> None:
        if secret is not None and public_key is not None:
            raise ValueError("set either a JWT secret or a public key file, not both")
        self._key: str | None = secret if secret is not None else public_key
        self._algorithms = list(SECRET_ALGORITHMS if secret is not None else PUBLIC_KEY_ALGORITHMS)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.max_token_bytes = max_token_bytes
        self.anonymous = Identity(None, anonymous)

    @property
    def required(self) -> bool:
        return self._key is not None

    def authenticate(self, token: str | None) -> Identity:
        """The identity for ``token`` (None: none given); raise AuthError if refused."""
        if self._key is None:
            return self.anonymous
        if not token:
            raise AuthError("a token is required: ?token=<JWT> or Authorization: Bearer <JWT>")
        if len(token) > self.max_token_bytes or len(token.encode()) > self.max_token_bytes:
            # Refused unread: decoding costs 30 to 50 us per KB before the signature is seen.
            raise AuthError(f"token over {self.max_token_bytes} bytes")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > USER_MAX_LENGTH:
            # Services name users in control requests (publisher.control): one they could not
            # name they could not disconnect.
            raise AuthError(f"invalid token: 'sub' must be a string of 1 to {USER_MAX_LENGTH}")
        if not _encodable(subject):
            raise AuthError("invalid token: 'sub' is not valid Unicode (a lone surrogate)")
        subs = _patterns(claims, "subs")
        if not all(is_valid_channel(channel) for channel in subs):
            raise AuthError("invalid token: 'subs' must be a list of valid channel names")
        own = personal_channel(subject)
        access = Access(
            subscribe=_patterns(claims, "channels"),
            publish=_patterns(claims, "publish"),
            granted=frozenset(subs) | ({own} if own else set()),
            presence=_patterns(claims, "presence"),
            own=own,
        )
        info = None
        if "info" in claims:
            try:
                info = msgspec.json.encode(claims["info"])
            except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
                raise AuthError("invalid token: 'info' is not valid Unicode JSON") from None
            if len(info) > MAX_INFO_BYTES:
                raise AuthError(f"invalid token: 'info' is over {MAX_INFO_BYTES} bytes as JSON")
        return Identity(subject, access, float(claims["exp"]), subs, own, info)

    def refresh(self, subject: str, token: str) -> Identity:
        """What a connection opened as ``subject`` becomes with ``token``: a valid token of
        the same subject (its new rights and expiry); AuthError if refused."""
        identity = self.authenticate(token)
        if identity.subject != subject:
            raise AuthError("the token is for another subject ('sub')")
        return identity


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _patterns(claims: dict[str, object], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthError(f"invalid token: '{name}' must be a list of channel patterns")
    return tuple(value)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it is."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
