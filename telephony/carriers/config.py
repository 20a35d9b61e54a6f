"""`[carriers]`: the carriers' own credentials for their media streams.

Each is optional. Unset, a carrier's route is an audio route like any other: it needs an
`[api] keys` key when keys are set, which each carrier can send (see docs/carriers.md). Set,
the carrier's own credential is checked on the upgrade instead of a key, as Twilio's signature is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CarriersConfig:
    # Telnyx `stream_auth_token`: the `x-telnyx-streaming-auth-token` header must equal it.
    telnyx_stream_token: str = ""
    # Vonage's signature secret: the upgrade's `Authorization: Bearer <JWT>` (endpoint
    # `authorization: {"type": "vonage"}`) must be an HS256 JWT signed with it, issued lately.
    vonage_signature_secret: str = ""
    vonage_max_token_age_s: int = 300  # a Vonage JWT issued longer ago than this is refused

    def __post_init__(self) -> None:
        if self.vonage_max_token_age_s <= 0:
            raise ValueError(
                f"carriers.vonage_max_token_age_s = {self.vonage_max_token_age_s}: over 0"
            )
