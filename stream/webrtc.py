"""The HTTP offer/answer edge: validate an SDP offer, build the session's peer connection.

Kept apart from the tracks (which only pace frames) and from the session (which only owns
resources): this is the one place that knows about SDP, ICE servers and the stats data channel.
"""

from __future__ import annotations

import logging
import time

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import SessionDescription

from models.errors import DiffstreamError
from stream.protocol import Answer, Offer
from stream.sessions import Session
from stream.settings import Settings
from stream.turn import session_ice_servers

log = logging.getLogger(__name__)

STATS_CHANNEL = "stats"


class OfferError(DiffstreamError):
    """An SDP offer the service cannot answer (says what the client must change)."""


class ViewerConflict(DiffstreamError):
    """The session already has a connected viewer."""


def check_offer(offer: Offer) -> SessionDescription:
    """Parse the offer and insist on a video section the service can send into."""
    if not offer.sdp.lstrip().startswith("v=0"):
        raise OfferError(
            "the offer is not SDP (it must start with 'v=0'); send pc.localDescription"
        )
    try:
        parsed = SessionDescription.parse(offer.sdp)
    except Exception as exc:  # aiortc's parser: many of its errors carry no message
        raise OfferError(
            f"the offer's SDP could not be parsed ({type(exc).__name__}: {exc}); send "
            "pc.localDescription.sdp as the browser made it"
        ) from None
    kinds = [m.kind for m in parsed.media]
    video = [m for m in parsed.media if m.kind == "video"]
    if not video:
        raise OfferError(
            "the offer has no video transceiver; add one with "
            "pc.addTransceiver('video', {direction: 'recvonly'}) before createOffer "
            f"(media sections found: {kinds or 'none'})"
        )
    if all(m.direction in ("sendonly", "inactive") for m in video):
        raise OfferError(
            "the offer's video section must be recvonly or sendrecv to receive the avatar"
        )
    return parsed


def _configuration(settings: Settings, session: Session) -> RTCConfiguration:
    """The service peer's ICE servers; with turn_secret, TURN credentials of its own."""
    servers = [
        RTCIceServer(
            urls=entry["urls"],  # type: ignore[arg-type]
            username=entry.get("username"),  # type: ignore[arg-type]
            credential=entry.get("credential"),  # type: ignore[arg-type]
        )
        for entry in session_ice_servers(settings, session, service=True)
    ]
    return RTCConfiguration(iceServers=servers)


async def answer_offer(session: Session, offer: Offer, settings: Settings) -> Answer:
    """Create the session's peer connection with its tracks and return the SDP answer."""
    parsed = check_offer(offer)
    if session.pc is not None and session.pc.connectionState not in ("closed", "failed"):
        raise ViewerConflict(f"session {session.id} already has a viewer; DELETE it and start anew")
    pc = RTCPeerConnection(configuration=_configuration(settings, session))
    session.pc = pc

    @pc.on("connectionstatechange")
    async def _on_state() -> None:
        state = pc.connectionState
        log.info("session %s viewer %s", session.id, state)
        session.touch()
        if state == "connected" and session.viewer_connected_at is None:
            session.viewer_connected_at = time.monotonic()
        if state in ("failed", "closed") and session.pc is pc and not session.closed:
            session.spawn(session.close("viewer_gone", f"peer connection {state}"), "close")

    @pc.on("datachannel")
    def _on_channel(channel) -> None:  # noqa: ANN001 - aiortc's RTCDataChannel
        if channel.label == STATS_CHANNEL:
            session.stats_channel = channel

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
        has_audio = any(m.kind == "audio" for m in parsed.media)
        session.video_sender = pc.addTrack(session.video)
        session.viewer_audio = has_audio
        if has_audio:
            pc.addTrack(session.audio)
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except DiffstreamError:
        raise
    except Exception as exc:
        session.pc = None
        await pc.close()
        raise OfferError(f"cannot answer this offer: {exc}") from None
    session.start_streaming()
    local = pc.localDescription
    return Answer(sdp=local.sdp, type="answer")
