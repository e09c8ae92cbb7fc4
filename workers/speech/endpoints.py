"""Where and as whom SDK sessions connect: the real Motion Server or the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field

import spatius
import structlog
from spatius.net import get_ssl_context

from relay.errors import ConfigError
from relay.settings import Settings

log = structlog.get_logger(__name__)

# Credentials the simulator accepts (it takes any non-empty app id, key and avatar id).
SIM_API_KEY = "relay-sim"
SIM_APP_ID = "relay-sim"
SIM_AVATAR_ID = "relay-sim-avatar"


@dataclass(frozen=True)
class MotionEndpoints:
    """Where and as whom SDK sessions connect: the real Motion Server or the simulator."""

    app_id: str
    region: str
    console_url: str
    ingress_url: str
    default_avatar_id: str
    simulated: bool
    api_key: str = field(default="", repr=False)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, console_url: str | None = None, ingress_url: str | None = None
    ) -> MotionEndpoints:
        """Real server when Spatius credentials are set, else the simulator at the given URLs."""
        console = console_url or settings.spatius_console_url
        ingress = ingress_url or settings.spatius_ingress_url
        if settings.uses_real_motion_server:
            return cls(
                app_id=settings.spatius_app_id,
                region=settings.spatius_region,
                console_url=console,
                ingress_url=ingress,
                default_avatar_id=settings.spatius_avatar_id,
                simulated=False,
                api_key=settings.spatius_api_key,
            )
        if not (console and ingress):
            raise ConfigError(
                "no Spatius credentials (SPATIUS_API_KEY, SPATIUS_APP_ID) and no simulator "
                "endpoints (SPATIUS_CONSOLE_URL, SPATIUS_INGRESS_URL)"
            )
        return cls(
            app_id=settings.spatius_app_id or SIM_APP_ID,
            region=settings.spatius_region,
            console_url=console,
            ingress_url=ingress,
            default_avatar_id=settings.spatius_avatar_id or SIM_AVATAR_ID,
            simulated=True,
            api_key=settings.spatius_api_key or SIM_API_KEY,
        )


async def prewarm_sdk(endpoints: MotionEndpoints) -> None:
    """The SDK's once-per-process setup, done at producer start instead of in the first turn.

    * The SDK's shared TLS context (CA bundle loaded: about 20 ms of blocked event loop here):
      every token fetch's connector takes it, even for plain-http simulator URLs, so without this
      the first session open of a process stalls every turn running beside it.
    * Against the real Motion Server, ``spatius.prewarm``: the region of ``auto`` resolved and
      cached (bootstrap API), and one throwaway TLS connection to the console and the ingress
      host each (DNS, network path, TLS session tickets), so later handshakes are shorter.
      No session token is prefetched: the docs say tokens are single-use, and the SDK's cache
      would hand one token to every session. Nothing here opens a session or counts against the
      session cap or billing (metering starts at a confirmed session).
    """
    get_ssl_context()
    if endpoints.simulated:
        return  # no region to resolve, no TLS to warm (the simulator speaks plain http)
    result = await spatius.prewarm(
        app_id=endpoints.app_id, region=endpoints.region,
        console_endpoint_url=endpoints.console_url, ingress_endpoint_url=endpoints.ingress_url,
        warm_tls=True, prefetch_session_token=False)
    log.info("sdk_prewarmed", region=result.region, tls_warmed=len(result.tls_warmed))


def configure_sdk_telemetry(setting: str, *, simulated: bool) -> str:
    """Apply RELAY_SPATIUS_SDK_TELEMETRY (on, off, or a collector URL) to the SDK's process-wide
    OTLP exporter before any session starts; returns what was applied. Simulator sessions are
    never reported: they would only pollute the vendor's figures."""
    if simulated or setting == "off":
        disable_sdk_telemetry()
        return "off"
    if setting == "on":
        return "on"  # the SDK's built-in endpoint
    try:
        spatius.configure_telemetry(setting)
    except RuntimeError:
        log.warning("sdk_telemetry_already_configured")
    return "collector"


def disable_sdk_telemetry() -> None:
    """Keep the SDK from exporting metrics and traces to Spatius about simulator sessions."""
    try:
        spatius.configure_telemetry("")
    except RuntimeError:
        # Another component configured telemetry first; that choice stands.
        log.warning("sdk_telemetry_already_configured")


# --- one session ---------------------------------------------------------------------------------
